"""Triton kernels against the torch reference: outputs, lse, final state and every gradient.

On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) at small shapes; on a GPU
the same tests run compiled, plus bf16 at a larger shape.
"""
import pytest
import torch

from longtrain.attention import linear_attention, softmax_attention
from longtrain.kernels import get_backend, linear_attn, reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
flash = get_backend("triton")


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def segments(B, N, starts=(29,), last_row_start=70, shift=0):
    """Document ids [B, N + shift]: documents start at `starts` in every row, and at last_row_start in the last."""
    seg = torch.zeros(B, N + shift, dtype=torch.long)
    for i, start in enumerate(starts):
        seg[:, start:] = i + 1
    seg[-1, last_row_start:] = len(starts) + 1
    return seg.to(DEVICE)


FLASH_CASES = [dict(), dict(causal=False), dict(window=17), dict(segments=True), dict(window=40, segments=True),
               dict(kind="sigmoid", sigmoid_bias=-3.0), dict(q_start=32, k_start=0, segments=True)]


@pytest.mark.parametrize("case", FLASH_CASES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64])
def test_flash_attention_matches_reference(case, head_dim):
    case = dict(case)
    B, Hq, Hkv, N = 2, 4, 2, 96
    nk = N + case.get("q_start", 0)
    q, k, v = rand(B, Hq, N, head_dim, seed=1), rand(B, Hkv, nk, head_dim, seed=2), rand(B, Hkv, nk, head_dim, seed=3)
    if case.pop("segments", False):
        seg = segments(B, N, shift=nk - N)
        case.update(q_seg=seg[:, nk - N:], k_seg=seg)
    case.setdefault("causal", True)
    out, lse = flash.attention_forward(q, k, v, scale=0.17, **case)
    ref_out, ref_lse = reference.attention_forward(q, k, v, scale=0.17, **case)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    if lse is not None:
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        torch.testing.assert_close(lse[torch.isfinite(lse)], ref_lse[torch.isfinite(ref_lse)], atol=2e-5, rtol=1e-5)
    dout = rand(*out.shape, seed=4)
    grads = flash.attention_backward(dout, q, k, v, out, lse, scale=0.17, **case)
    ref_grads = reference.attention_backward(dout, q, k, v, ref_out, ref_lse, scale=0.17, **case)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("q_start, head_dim, window", [(0, 32, 150), (40, 32, 150), (0, 96, 150), (0, 32, 127),
                                                       (0, 32, 130)])
def test_flash_attention_wide_window_has_unmasked_interior_tiles(q_start, head_dim, window):
    """N=256, windows wider than a tile: tiles inside both the causal and the window edge take the unmasked path
    (127 and 130: edges one short of and two past a 64-tile boundary). head_dim 96 runs in a 128-wide tile with
    the extra columns masked."""
    q = rand(1, 1, 256, head_dim, seed=1)
    k, v = rand(1, 1, 256 + q_start, head_dim, seed=2), rand(1, 1, 256 + q_start, head_dim, seed=3)
    opts = dict(scale=0.2, causal=True, window=window, q_start=q_start)
    out, lse = flash.attention_forward(q, k, v, **opts)
    ref_out, ref_lse = reference.attention_forward(q, k, v, **opts)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    dout = rand(*out.shape, seed=4)
    grads = flash.attention_backward(dout, q, k, v, out, lse, **opts)
    for name, got, want in zip("qkv", grads, reference.attention_backward(dout, q, k, v, ref_out, ref_lse, **opts)):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4, msg=f"d{name}")


def packed(B, N, starts, seed=0):
    """Packed document ids [B, N], non-decreasing: documents start at `starts`, plus 3 random starts in later rows."""
    seg = torch.zeros(B, N, dtype=torch.long)
    for start in starts:
        seg[:, start:] += 1
    extra = torch.randint(1, N, (3,), generator=torch.Generator().manual_seed(seed))
    for start in extra.tolist():
        seg[1:, start:] += 1
    return seg.to(DEVICE)


def assert_flash_matches_reference(q, k, v, **opts):
    """Outputs, lse and dq, dk, dv of the Triton kernels against the torch reference."""
    out, lse = flash.attention_forward(q, k, v, **opts)
    ref_out, ref_lse = reference.attention_forward(q, k, v, **opts)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse[torch.isfinite(lse)], ref_lse[torch.isfinite(ref_lse)], atol=2e-5, rtol=1e-5)
    dout = rand(*out.shape, seed=4)
    grads = flash.attention_backward(dout, q, k, v, out, lse, **opts)
    ref_grads = reference.attention_backward(dout, q, k, v, ref_out, ref_lse, **opts)
    if ON_GPU:  # the torch path runs PyTorch's CUDA operators there: first check them, so a failure names its side
        cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in (dout, q, k, v, ref_out, ref_lse)]
        cpu_opts = {key: val.cpu() if isinstance(val, torch.Tensor) else val for key, val in opts.items()}
        cpu_ref = (*reference.attention_forward(*cpu[1:4], **cpu_opts),
                   *reference.attention_backward(*cpu, **cpu_opts))
        for name, got, want in zip(["out", "lse", "dq", "dk", "dv"], (ref_out, ref_lse, *ref_grads), cpu_ref):
            torch.testing.assert_close(got.cpu(), want, atol=5e-5, rtol=1e-4, msg=f"torch path {name}: CUDA vs CPU")
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4, msg=f"d{name}")


def test_doc_ranges_match_brute_force():
    """Each query's span is exactly the keys of its document (and the reverse), also for documents that
    the other array lacks (a ring block); a row whose ids decrease gets -1 spans (the masked fallback)."""
    from longtrain.kernels.flash_attn import doc_ranges
    seg = packed(2, 120, starts=(7, 8, 50, 90), seed=3)
    for q_seg, k_seg in [(seg, seg), (seg[:, 60:], seg[:, :70]), (seg[:, :30], seg[:, 40:])]:
        q_spans, k_spans = doc_ranges(q_seg, k_seg)
        for spans, ids, other in [(q_spans, q_seg, k_seg), (k_spans, k_seg, q_seg)]:
            for b in range(ids.shape[0]):
                for i, doc in enumerate(ids[b].tolist()):
                    same = (other[b] == doc).nonzero().flatten().tolist()
                    assert list(range(spans[b, 0, i], spans[b, 1, i])) == same
    mixed = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 0, 0]], device=DEVICE)  # row 1 reuses id 0
    q_spans, k_spans = doc_ranges(mixed, mixed)
    assert (q_spans[1] == -1).all() and (k_spans[1] == -1).all()
    assert q_spans[0].tolist() == [[0, 0, 2, 2, 4, 4], [2, 2, 4, 4, 6, 6]]


DOC_CASES = [dict(), dict(causal=False), dict(window=50), dict(q_start=64, k_start=0, nk=320),
             dict(q_start=192, k_start=0, n=192, causal=False), dict(q_start=0, k_start=64, nk=192),
             dict(reused_ids="all"), dict(reused_ids="row 1")]


@pytest.mark.parametrize("case", DOC_CASES, ids=str)
def test_flash_attention_with_packed_documents(case):
    """Documents of 1-86 tokens against the interpreter's 64-token tiles, GQA: skipped tiles, one-document
    tiles without a mask, and ring blocks (q_start != k_start) whose queries' documents the keys may lack; reused_ids
    (ids not sorted, in every row or in row 1 only) runs the fallback that masks every tile of those rows."""
    case = dict(case)
    n, q_start, k_start = case.pop("n", 256), case.get("q_start", 0), case.get("k_start", 0)
    nk = case.pop("nk", n)
    seg = packed(2, max(q_start + n, k_start + nk), starts=(29, 64, 150, 151, 200, 240))
    reused = case.pop("reused_ids", None)
    if reused == "all":
        seg = seg % 2
    elif reused == "row 1":
        seg[1] = seg[1] % 2
    q = rand(2, 2, n, 16, seed=1)
    k, v = rand(2, 1, nk, 16, seed=2), rand(2, 1, nk, 16, seed=3)
    assert_flash_matches_reference(q, k, v, scale=0.3, q_seg=seg[:, q_start:q_start + n],
                                   k_seg=seg[:, k_start:k_start + nk], **case)


def test_cross_document_tiles_are_skipped():
    """NaN in the first document's 128 rows of K, V or Q: rows of documents from 256 on stay finite, so no
    tile of theirs read those rows (a masked tile would turn 0 * NaN into NaN); holds for any tile size."""
    n = 384
    seg = packed(1, n, starts=(128, 256, 300))
    q, k, v, dout = (rand(1, 1, n, 16, seed=s) for s in range(4))
    opts = dict(scale=0.3, causal=False, q_seg=seg, k_seg=seg)
    bad = torch.zeros(1, 1, n, 1, dtype=torch.bool, device=DEVICE)
    bad[:, :, :128] = True
    k_nan, v_nan, q_nan = (x.masked_fill(bad, float("nan")) for x in (k, v, q))
    out, lse = flash.attention_forward(q, k_nan, v_nan, **opts)
    dq = flash.attention_backward(dout, q, k_nan, v_nan, out, lse, **opts)[0]
    assert out[:, :, 256:].isfinite().all() and lse[:, :, 256:].isfinite().all() and dq[:, :, 256:].isfinite().all()
    out, lse = flash.attention_forward(q_nan, k, v, **opts)
    dk, dv = flash.attention_backward(dout, q_nan, k, v, out, lse, **opts)[1:]
    assert dk[:, :, 256:].isfinite().all() and dv[:, :, 256:].isfinite().all()


def test_public_op_with_triton_backend_runs_autograd():
    q, k, v = (rand(1, 2, 80, 32, seed=s).requires_grad_() for s in range(3))
    outs = []
    for backend in ("triton", "torch"):
        out, lse = softmax_attention(q, k, v, window=30, backend=backend)
        assert out.transpose(1, 2).is_contiguous()  # [B, N, H, D] in memory: the output projection's view
        grads = torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v))
        outs.append((out, lse, grads))
    for got, want in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def assert_linear_backends_agree(q, k, v, log_decay, s0, seg, out_atol: float, grad_atol: float) -> None:
    """Triton vs torch linear_attention: outputs, final state and the gradient of every input."""
    inputs = {"q": q, "k": k, "v": v, "initial_state": s0, "log_decay": log_decay}
    names = [name for name, t in inputs.items() if t is not None]
    results = []
    for backend in ("triton", "torch"):
        leaves = {name: inputs[name].clone().requires_grad_() for name in names}
        out, final = linear_attention(leaves["q"], leaves["k"], leaves["v"], log_decay=leaves.get("log_decay"),
                                      initial_state=leaves["initial_state"], output_final_state=True,
                                      segment_ids=seg, backend=backend)
        loss = (out * rand(*out.shape, seed=8)).sum() + (final * rand(*final.shape, seed=9)).sum()
        results.append((out, final, torch.autograd.grad(loss, [leaves[name] for name in names])))
    (out, final, grads), (ref_out, ref_final, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=out_atol, rtol=1e-5)
    torch.testing.assert_close(final, ref_final, atol=out_atol, rtol=1e-5)
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, atol=grad_atol, rtol=1e-4, msg=f"d{name}")


@pytest.mark.parametrize("decay", ["none", "scalar", "channel", "strong"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_linear_kernel_matches_reference(decay, with_docs):
    """Three chunks of 64 (the last one partial), so state passing and tile pairs are both exercised; two heads,
    so a per-(batch, head) offset cannot pass as a per-batch one."""
    B, H, N, D = 2, 2, 150, 32
    q, k, v = (rand(B, H, N, D, seed=s) for s in range(3))
    g = {"none": None, "scalar": -rand(B, H, N, seed=5).abs(), "channel": -rand(B, H, N, D, seed=6).abs(),
         "strong": torch.full((B, H, N, D), -20.0, device=DEVICE)}[decay]
    s0 = rand(B, H, D, D, seed=7)
    # documents start inside a tile (29), at a tile boundary (80) and at a chunk boundary (128)
    seg = segments(B, N, starts=(29, 80), last_row_start=128) if with_docs else None
    assert_linear_backends_agree(q, k, v, g, s0, seg, 2e-5, 5e-5)


def test_linear_kernel_takes_keys_in_another_dtype():
    """Under autocast Mamba2's keys come out of a float32 softplus while q and v are half precision (fp16 here:
    the interpreter's bf16 tl.dot is wrong; the kernels take both alike)."""
    q, k, v = (rand(1, 2, 80, 16, seed=s) for s in range(3))
    g = -rand(1, 2, 80, seed=4).abs()
    qh, vh = q.half(), v.half()
    out, _ = flash.linear_attention_chunked(qh, k, vh, scale=0.25, log_decay=g)
    ref, _ = reference.linear_attention_chunked(qh.float(), k.half().float(), vh.float(), scale=0.25, log_decay=g)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not ON_GPU, reason="the autotune candidates compile on a GPU only (the interpreter runs one)")
@pytest.mark.parametrize("index", range(5))
def test_flash_attention_runs_every_autotune_candidate(index, monkeypatch):
    """Candidate `index` of each kernel's autotune list alone (the other tests run one config), bf16, on a window
    with documents at a ring offset, against the fp32 reference. A config too large for this GPU skips."""
    import triton
    from triton.runtime import errors as triton_errors

    from longtrain.kernels import flash_attn
    for kernel, blocks in ((flash_attn._fwd_kernel, flash_attn.FWD_BLOCKS),
                           (flash_attn._bwd_dkdv_kernel, flash_attn.DKDV_BLOCKS),
                           (flash_attn._bwd_dq_kernel, flash_attn.DQ_BLOCKS)):
        m, n, warps, stages = blocks[index]
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps,
                                                              num_stages=stages)])
        monkeypatch.setattr(kernel, "cache", {})
    B, Hq, Hkv, N, shift, D = 2, 4, 2, 300, 64, 64
    q = rand(B, Hq, N, D, seed=1, dtype=torch.bfloat16)
    k, v = rand(B, Hkv, N + shift, D, seed=2, dtype=torch.bfloat16), rand(B, Hkv, N + shift, D, seed=3,
                                                                          dtype=torch.bfloat16)
    seg = segments(B, N, starts=(29, 190), last_row_start=120, shift=shift)
    case = dict(scale=0.125, causal=True, window=100, q_seg=seg[:, shift:], k_seg=seg, q_start=shift)
    try:
        out, lse = flash.attention_forward(q, k, v, **case)
        dout = rand(*out.shape, seed=4, dtype=torch.bfloat16)
        grads = flash.attention_backward(dout, q, k, v, out, lse, **case)
    except (triton_errors.OutOfResources, getattr(triton_errors, "PTXASError", triton_errors.OutOfResources)) as e:
        pytest.skip(reason=f"candidate {index} does not fit this GPU: {e}")
    ref_out, ref_lse = reference.attention_forward(q.float(), k.float(), v.float(), **case)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)
    ref_grads = reference.attention_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, **case)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2, msg=f"d{name}")


@pytest.mark.skipif(not ON_GPU, reason="bf16 speed-path check needs a CUDA GPU; CPU runs the interpreter tests")
def test_flash_attention_bf16_on_gpu():
    q, k, v = (rand(2, 8, 2048, 128, seed=s, dtype=torch.bfloat16) for s in range(3))
    out, lse = flash.attention_forward(q, k, v, scale=128 ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.to(torch.bfloat16), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_linear_kernel_splits_wide_heads_into_blocks(decay):
    """Dk=96 (two masked Dk blocks in the scan) and Dv=128 (two Dv blocks whose dq, dk partials are summed)."""
    B, H, N, DK, DV = 1, 1, 80, 96, 128
    q, k = rand(B, H, N, DK, seed=1), rand(B, H, N, DK, seed=2)
    v, s0 = rand(B, H, N, DV, seed=3), rand(B, H, DK, DV, seed=4)
    g = -rand(B, H, N, seed=5).abs() if decay == "scalar" else -rand(B, H, N, DK, seed=5).abs()
    assert_linear_backends_agree(q, k, v, g, s0, None, 5e-5, 2e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_final_state_hook_sees_the_returned_final_state(backend):
    """SP algorithms start communicating from this hook, before the output products."""
    q, k, v = (rand(1, 2, 100, 16, seed=s) for s in range(3))
    g = -rand(1, 2, 100, 16, seed=4).abs()
    seen = []
    out, final = get_backend(backend).linear_attention_chunked(q, k, v, scale=0.25, log_decay=g,
                                                               output_final_state=True, on_final_state=seen.append)
    assert len(seen) == 1 and seen[0].dtype == final.dtype and not seen[0].requires_grad
    torch.testing.assert_close(seen[0], final, atol=0, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="bf16 speed-path check needs a CUDA GPU; CPU runs the interpreter tests")
def test_linear_attention_bf16_on_gpu():
    q, k, v = (rand(2, 4, 4096, 128, seed=s, dtype=torch.bfloat16) * 0.3 for s in range(3))
    g = torch.nn.functional.logsigmoid(rand(2, 4, 4096, 128, seed=3)) / 16
    out, _ = linear_attention(q, k, v, log_decay=g, backend="triton")
    ref, _ = linear_attention(q.float(), k.float(), v.float(), log_decay=g, backend="torch")
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_trainer_selects_the_triton_backend(tmp_path):
    from longtrain.config import load_config
    from longtrain.trainer.train import train
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.pattern=gla,softmax",
                             "model.vocab_size=32", "data.seq_len=32", "data.batch_size=2", "data.mqar_pairs=4",
                             "data.mqar_vocab=32", "train.steps=2", "train.eval_every=0", "run.progress=false",
                             "kernels.backend=triton", f"run.dir={tmp_path}", "wandb.mode=disabled"])
    metrics = train(cfg)
    assert metrics["loss"] > 0


def worker_sp_on_triton(rank, world):
    """Under NCCL's request semantics, as users run it: the fused backward takes the SP code's non-overlapped
    path, which the torch-backend tests do not."""
    from longtrain.parallel import comm, shard_sequence, sp_linear_attention, sp_softmax_attention
    comm.emulate_nccl(True)
    group = torch.distributed.group.WORLD
    q, k, v = (rand(1, 2, 64, 32, seed=s).requires_grad_() for s in range(3))
    g = (-rand(1, 2, 64, 32, seed=4).abs()).requires_grad_()
    seg = torch.bucketize(torch.arange(64), torch.tensor([20, 40, 45]), right=True)[None]  # one crosses ranks
    ref_out, _ = softmax_attention(q, k, v, segment_ids=seg)
    ref_lin, _ = linear_attention(q, k, v, log_decay=g, segment_ids=seg)
    local = [shard_sequence(t.detach(), 2, group, "zigzag").requires_grad_() for t in (q, k, v)]
    out, _ = sp_softmax_attention(*local, group=group, algorithm="ring", layout="zigzag", backend="triton",
                                  segment_ids=shard_sequence(seg, 1, group, "zigzag"))
    sm_grads = torch.autograd.grad(out.sum(), local)
    torch.testing.assert_close(out, shard_sequence(ref_out.detach(), 2, group, "zigzag"), atol=2e-5, rtol=1e-5)
    lin_ref = [torch.autograd.grad(ref_lin.sum(), t, retain_graph=True)[0] for t in (q, k, v, g)]
    backward_calls, fused_backward = [], linear_attn.chunk_backward
    linear_attn.chunk_backward = lambda *args: backward_calls.append(1) or fused_backward(*args)
    for algorithm in ("zeco", "lasp2"):
        local = [shard_sequence(t.detach(), 2, group).requires_grad_() for t in (q, k, v, g)]
        lin = sp_linear_attention(*local[:3], group=group, algorithm=algorithm, log_decay=local[3], backend="triton",
                                  segment_ids=shard_sequence(seg, 1, group))
        backward_calls.clear()
        lin_grads = torch.autograd.grad(lin.sum(), local)
        assert len(backward_calls) == 1, algorithm  # one fused backward for the output and the final state
        torch.testing.assert_close(lin, shard_sequence(ref_lin.detach(), 2, group), atol=2e-5, rtol=1e-5)
        for got, want in zip(lin_grads, lin_ref):
            torch.testing.assert_close(got, shard_sequence(want, 2, group), atol=2e-5, rtol=1e-5)
    sm_ref = [torch.autograd.grad(ref_out.sum(), t, retain_graph=True)[0] for t in (q, k, v)]
    for got, want in zip(sm_grads, sm_ref):
        torch.testing.assert_close(got, shard_sequence(want, 2, group, "zigzag"), atol=5e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="two ranks on one GPU: gloo cannot send CUDA tensors and NCCL needs a GPU per "
                                   "rank; the CPU run (interpreter) covers the SP code on these kernels")
def test_sp_algorithms_run_exactly_on_the_triton_backend():
    from longtrain.parallel.spawn import run_distributed
    run_distributed(worker_sp_on_triton, 2)


@pytest.mark.parametrize("decay", ["scalar", "channel"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_sp_correction_and_state_combine_kernels_match_reference(decay, with_docs):
    B, H, N, DK, DV = 2, 3, 40, 16, 32
    q, out, dout = rand(B, H, N, DK, seed=1), rand(B, H, N, DV, seed=2), rand(B, H, N, DV, seed=3)
    b = -0.02 * rand(B, H, N, DK if decay == "channel" else 1, seed=4).abs().cumsum(2)  # weak: every row counts
    from_state = None
    if with_docs:  # each batch row's first document ends at its own token
        from_state = (torch.arange(N, device=DEVICE)[None] < torch.tensor([[23], [9]], device=DEVICE)).float()
    state, state_in = rand(B, H, DK, DV, seed=5), rand(B, H, DK, DV, seed=6)
    got = flash.sp_correction(out, q, b, from_state, 0.3, state)
    torch.testing.assert_close(got, reference.sp_correction(out, q, b, from_state, 0.3, state), atol=1e-5, rtol=1e-5)
    for got, want in zip(flash.sp_correction_backward(dout, q, b, from_state, 0.3, state),
                         reference.sp_correction_backward(dout, q, b, from_state, 0.3, state)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    decay_vec = rand(B, H, DK if decay == "channel" else 1, seed=7).abs()
    torch.testing.assert_close(flash.state_combine(decay_vec, state_in, state),
                               reference.state_combine(decay_vec, state_in, state), atol=1e-6, rtol=1e-6)


def test_reference_correction_backward_matches_autograd():
    """The hand-written correction backward of the reference equals torch autograd of its forward."""
    q = rand(1, 2, 20, 8, seed=1).double().requires_grad_()
    b = (-rand(1, 2, 20, 8, seed=2).abs().cumsum(2)).double().requires_grad_()
    state = rand(1, 2, 8, 8, seed=3).double().requires_grad_()
    from_state = (torch.arange(20, device=DEVICE) < 11).double()[None]
    dout = rand(1, 2, 20, 8, seed=4).double()
    out = reference.sp_correction(torch.zeros_like(dout), q, b, from_state, 0.5, state)
    want = torch.autograd.grad(out, (q, b, state), dout)
    got = reference.sp_correction_backward(dout, q.detach(), b.detach(), from_state, 0.5, state.detach())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="the torch backend's CUDA operators (SDPA flash / efficient) need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(), dict(window=40), dict(segments=True), dict(q_start=32)], ids=str)
def test_torch_backend_on_cuda(dtype, case):
    """softmax_attention(backend="torch") on CUDA (flash for unmasked bf16 blocks, efficient with a bias
    otherwise; lse folded into the backward) against the naive fp64 reference on CPU."""
    from naive import naive_softmax

    case = dict(case)
    q, k, v = (rand(2, 4, 128, 64, seed=s).to(dtype).requires_grad_() for s in range(3))
    seg = segments(2, 128) if case.pop("segments", False) else None
    out, lse = softmax_attention(q, k, v, segment_ids=seg, backend="torch", **case)
    cpu = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    cpu_seg = None if seg is None else seg.cpu()
    want, want_lse = naive_softmax(*cpu, window=case.get("window"), q_start=case.get("q_start", 0), q_seg=cpu_seg,
                                   k_seg=cpu_seg)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=tol, rtol=tol)
    dout = rand(*out.shape, seed=4)
    for with_lse in (False, True):
        got = torch.autograd.grad((out * dout.to(dtype)).sum() + with_lse * lse.sum(), (q, k, v), retain_graph=True)
        ref = torch.autograd.grad((want * dout.cpu().double()).sum() + with_lse * want_lse.sum(), cpu,
                                  retain_graph=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.cpu().double(), b, atol=10 * tol, rtol=10 * tol)


@pytest.mark.skipif(not ON_GPU, reason="the bf16 fused backward with a given delta runs on CUDA only")
def test_bf16_backward_keeps_a_large_given_delta():
    """A ring block's backward gets the merged delta = rowsum(dO * O) in float32. With V = 100 + noise, delta
    (~800) dwarfs dP - delta, so a delta rounded to bf16 (error ~1.6) would swamp dS; fold_delta's two columns
    keep it to float32 precision. Against the fp64 formulas on CPU (delta exact, as a merged ring output gives)."""
    q, k = (rand(1, 2, 128, 64, seed=s).to(torch.bfloat16) for s in (1, 2))
    v = (100 + rand(1, 2, 128, 64, seed=3)).to(torch.bfloat16)
    dout = rand(1, 2, 128, 64, seed=4).to(torch.bfloat16)
    scale = 0.125
    q64, k64, v64, do64 = (x.cpu().double() for x in (q, k, v, dout))
    s = (q64 @ k64.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(128, 128, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    delta = (do64 * (p @ v64)).sum(-1)
    ds = p * (do64 @ v64.transpose(-1, -2) - delta[..., None])
    want = (ds @ k64 * scale, ds.transpose(-1, -2) @ q64 * scale, p.transpose(-1, -2) @ do64)
    out, lse = reference.attention_forward(q, k, v, scale=scale)  # lse in float32; out unused once delta is given
    got = reference.attention_backward(dout, q, k, v, out, lse, scale=scale, delta=delta.float().to(q.device))
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.cpu().double(), w, atol=2e-2 * w.abs().max().item(), rtol=2e-2, msg=f"d{name}")
