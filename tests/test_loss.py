"""The chunked head + loss equals the plain F.cross_entropy on full logits: value, count and gradients."""
import pytest
import torch
import torch.nn.functional as F

from longtrain.attention import AttnContext
from longtrain.config import load_config
from longtrain.trainer.loss import linear_cross_entropy
from longtrain.trainer.model import LM


def plain_loss(h, weight, targets, mask):
    """Today's loss: full logits, their fp32 (or fp64) copy, F.cross_entropy (ignore_index=-100), masked sum."""
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return (losses * mask.flatten()).sum(), correct


def inputs(dtype, B=2, N=37, d=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, d, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, N), generator=g)
    targets[0, :3] = -100  # ignored targets
    mask = torch.rand(B, N, generator=g) > 0.3
    return h, weight, targets, mask


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_chunked_loss_equals_plain(dtype, tol, chunk):
    h, weight, targets, mask = inputs(dtype)
    ref, ref_correct = plain_loss(h, weight, targets, mask)
    ref_grads = torch.autograd.grad(ref * 0.7, (h, weight))
    loss, correct = linear_cross_entropy(h, weight, targets, mask, chunk)
    grads = torch.autograd.grad(loss * 0.7, (h, weight))
    assert loss.dtype == ref.dtype and correct.item() == ref_correct.item()
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def test_peaked_logits_and_all_masked_tokens():
    """Large logits (softmax saturates) and a fully masked batch stay exact and finite."""
    h, weight, targets, mask = inputs(torch.float64)
    weight = (weight.detach() * 40).requires_grad_()
    for m in (mask, torch.zeros_like(mask)):
        ref, _ = plain_loss(h, weight, targets, m)
        loss, _ = linear_cross_entropy(h, weight, targets, m, 5)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        for g, r in zip(torch.autograd.grad(loss, (h, weight)), torch.autograd.grad(ref, (h, weight))):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tie", [True, False])
def test_model_chunked_head_equals_full_logits(tie):
    """LM with loss_chunk > 0 gives the loss and every parameter gradient of loss_chunk=0 (tied head too)."""
    grads = {}
    for chunk in (0, 7):
        cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=40",
                                 "model.pattern=gla,softmax", "model.chunk_size=8", f"model.tie_embeddings={tie}",
                                 f"model.loss_chunk={chunk}"])
        torch.manual_seed(0)
        model = LM(cfg.model)
        tokens = torch.randint(0, 40, (2, 24))
        mask = torch.rand(2, 24) > 0.5
        ctx = AttnContext(torch.arange(24), 24, None, None, "torch")
        loss, _ = model(tokens, ctx, tokens.roll(-1, 1), mask)
        loss.backward()
        grads[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[7][0], grads[0][0], rtol=1e-6, atol=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[7][1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_as_accurate_as_plain():
    """Under bf16 autocast both paths cast h and W to bf16; the chunked one is no further from fp64 than the plain
    (over 64 chunks: dW summed in bf16 across chunks would drift 4x further)."""
    h, weight, targets, mask = inputs(torch.float32, N=512, V=100)
    exact = plain_loss(h.double(), weight.double(), targets, mask)[0]
    exact_grads = torch.autograd.grad(exact, (h, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = plain_loss(h, weight, targets, mask)
        loss, _ = linear_cross_entropy(h, weight, targets, mask, 16)
    assert loss.dtype == torch.float32
    assert (loss - exact).abs() <= 2 * (ref - exact).abs() + 1e-4
    grads = torch.autograd.grad(loss, (h, weight))
    for g, r, e in zip(grads, torch.autograd.grad(ref, (h, weight)), exact_grads):
        assert g.dtype == torch.float32
        assert (g - e).abs().max() <= 2 * (r - e).abs().max()
