"""The closed-form memory model counts what autograd really saves; the chunked loss saves O(N d), not O(N vocab)."""
import pytest
import torch

from longtrain.attention import AttnContext
from longtrain.config import load_config
from longtrain.trainer.loss import linear_cross_entropy
from longtrain.trainer.memory_model import block_floats, mixer_floats, step_memory
from longtrain.trainer.model import LM


def saved_floats(fn) -> float:
    """Floats autograd keeps for backward while fn() runs (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() / t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def block_saved_per_token(cfg, N: int) -> float:
    """Saved floats per token of one block, as the difference between N and 2N tokens (weights cancel)."""
    torch.manual_seed(0)
    block = LM(cfg).blocks[0]
    counts = []
    for n in (N, 2 * N):
        x = torch.randn(1, n, cfg.d_model, requires_grad=True)
        counts.append(saved_floats(lambda: block(x, AttnContext(torch.arange(n), n, None, None, "torch"))))
    return (counts[1] - counts[0]) / N


@pytest.mark.parametrize("mixer", ["gla", "softmax"])
@pytest.mark.parametrize("shape", [("64", "4", "32", "4"), ("32", "2", "16", "1")])
def test_saved_floats_per_token_match_autograd(mixer, shape):
    d, heads, chunk, kv_heads = shape
    cfg = load_config(None, [f"model.d_model={d}", f"model.n_heads={heads}", f"model.chunk_size={chunk}",
                             f"model.n_kv_heads={kv_heads}", "model.n_layers=1", f"model.pattern={mixer}"]).model
    counted = block_saved_per_token(cfg, 512)
    formula = block_floats(cfg) + mixer_floats(cfg, mixer)
    assert formula == pytest.approx(counted, rel=0.03)


def test_chunked_loss_saves_no_logits():
    T, d, V = 2048, 32, 4096
    h = torch.randn(1, T, d, requires_grad=True)
    weight = torch.randn(V, d, requires_grad=True)
    targets, mask = torch.randint(0, V, (1, T)), torch.ones(1, T, dtype=torch.bool)
    chunked = saved_floats(lambda: linear_cross_entropy(h, weight, targets, mask, 256))
    plain = saved_floats(lambda: torch.nn.functional.cross_entropy((h @ weight.T)[0], targets[0]))
    assert plain >= T * V  # the full logits (or their log-softmax)
    assert chunked <= T * (d + 3) + V * d  # h, lse, targets, weights per token and the head weight


def test_step_memory_scales_with_local_tokens():
    cfg = load_config(None, ["model.pattern=gla*3,softmax", "data.seq_len=4096", "data.batch_size=1"])
    one = step_memory(cfg, 1)
    cfg.parallel.sp_size = 2
    two = step_memory(cfg, 2)
    assert two["activations"] == pytest.approx(one["activations"] / 2)
    assert two["grads+adam"] == pytest.approx(one["grads+adam"] / 2)  # FSDP2 shards them
    assert one["total"] == pytest.approx(sum(v for k, v in one.items() if k != "total"))
