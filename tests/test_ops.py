"""The two core ops against independent naive references (full masked matrices, token-by-token recurrence)."""
import math

import pytest
import torch

from longtrain.attention import linear_attention, merge_attention, sigmoid_attention, softmax_attention
from longtrain.kernels import reference, sdpa
from longtrain.kernels.reference import linear_attention_recurrent
from naive import naive_sigmoid, naive_softmax


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(reference, "BLOCK", 16)  # several tiles, so skipping and online merging are exercised
    monkeypatch.setattr(reference, "WINDOW_BLOCK", 4)  # several query blocks per window band


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def docs(B, N, shared=False):
    """Documents per batch row (different rows, different documents), or the same documents in every row."""
    seg = torch.zeros(B, N, dtype=torch.long)
    seg[:, 20:] = 1
    seg[:, 33:] = 2
    if not shared:
        seg[-1] = 0
        seg[-1, 5:] = 1
    return seg


CASES = [dict(), dict(causal=False), dict(window=7), dict(window=3), dict(segment_ids=True),
         dict(window=9, segment_ids=True),
         dict(segment_ids="shared"), dict(window=9, segment_ids="shared"), dict(causal=False, segment_ids=True),
         dict(q_start=30, k_start=10), dict(q_start=0, k_start=40), dict(q_start=20, k_start=0, window=12)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_softmax_matches_naive(case, heads):
    B, N, D = 2, 50, 8
    case = dict(case)
    q = rand(B, heads[0], N, D, seed=1).requires_grad_()
    k = rand(B, heads[1], N, D, seed=2).requires_grad_()
    v = rand(B, heads[1], N, D, seed=3).requires_grad_()
    seg_kind = case.pop("segment_ids", False)
    seg = docs(B, N, shared=seg_kind == "shared") if seg_kind else None
    out, lse = softmax_attention(q, k, v, segment_ids=seg, **case)
    want, want_lse = naive_softmax(q, k, v, causal=case.get("causal", True), window=case.get("window"),
                                   q_start=case.get("q_start", 0), k_start=case.get("k_start", 0), q_seg=seg, k_seg=seg)
    assert lse.dtype == torch.float64 and out.dtype == q.dtype
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-12, rtol=0)
    assert not out.isnan().any()
    dout = rand(*out.shape, seed=4)
    for with_lse in (True, False):  # dlse folded into the backward, and the plain backward
        got = torch.autograd.grad((out * dout).sum() + with_lse * lse[finite].sum(), (q, k, v), retain_graph=True)
        ref = torch.autograd.grad((want * dout).sum() + with_lse * want_lse[finite].sum(), (q, k, v),
                                  retain_graph=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


@pytest.mark.parametrize("case", [dict(window=7), dict(window=3), dict(window=9, segment_ids=True),
                                  dict(window=9, segment_ids="shared"), dict(q_start=20, k_start=0, window=12)],
                         ids=str)
def test_window_band_split_as_on_cuda_matches_naive(case, monkeypatch):
    monkeypatch.setattr(reference, "splits_band", lambda device, window: True)  # CUDA's edge / all / diagonal
    test_softmax_matches_naive(case, (4, 2))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_softmax_tile_loop_as_for_float64_on_cuda_matches_naive(case, monkeypatch):
    monkeypatch.setattr(reference, "uses_fused", lambda q, kind: False)  # CUDA has no fused float64 attention
    test_softmax_matches_naive(case, (4, 2))


@pytest.mark.parametrize("case", [dict(window=7), dict(q_start=30, k_start=10), dict(window=9, segment_ids=True)],
                         ids=str)
def test_block_masks_built_without_the_cache_match_naive(case, monkeypatch):
    monkeypatch.setattr(reference, "CACHED_MASK_ELEMENTS", 0)  # large blocks' masks are not cached: build every one
    test_softmax_matches_naive(case, (4, 2))


@pytest.mark.parametrize("case", [dict(), dict(window=24), dict(segment_ids=True), dict(segment_ids="equal"),
                                  dict(q_start=64, k_start=0)], ids=str)
@pytest.mark.parametrize("B", [1, 2])  # B=1: evenly spaced blocks run as strided views
def test_softmax_fp32_matches_naive(case, B):
    case = dict(case)
    q, k, v = (rand(B, 4, 96, 16, seed=s, dtype=torch.float32).requires_grad_() for s in range(3))
    seg_kind = case.pop("segment_ids", False)
    seg = docs(B, 96) if seg_kind is True else None
    if seg_kind == "equal":  # 6 documents of 16 tokens
        seg = (torch.arange(96) // 16).repeat(B, 1)
    out, lse = softmax_attention(q, k, v, segment_ids=seg, **case)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want, want_lse = naive_softmax(q64, k64, v64, window=case.get("window"), q_start=case.get("q_start", 0),
                                   k_start=case.get("k_start", 0), q_seg=seg, k_seg=seg)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=0)
    dout = rand(*out.shape, seed=4)
    got = torch.autograd.grad((out * dout.float()).sum(), (q, k, v))
    for a, b in zip(got, torch.autograd.grad((want * dout).sum(), (q64, k64, v64))):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=0)


def test_backward_with_global_delta_sums_over_key_blocks():
    """Ring/all-gather contract: per key block, backward with the merged lse and delta (out=None)."""
    q, k, v = (rand(2, 4, 40, 8, seed=s).requires_grad_() for s in range(3))
    seg = docs(2, 40)
    want, want_lse = naive_softmax(q, k, v, q_seg=seg, k_seg=seg)
    dout, dlse = rand(*want.shape, seed=5), rand(*want_lse.shape, seed=6)
    finite = torch.isfinite(want_lse)
    ref = torch.autograd.grad((want * dout).sum() + (want_lse * dlse)[finite].sum(), (q, k, v))
    delta = (dout * want).sum(-1) - dlse
    dq = torch.zeros_like(q)
    for a, b in ((0, 17), (17, 40)):
        dq_p, dk_p, dv_p = reference.attention_backward(
            dout, q.detach(), k.detach()[:, :, a:b], v.detach()[:, :, a:b], None, want_lse.detach(), scale=8 ** -0.5,
            q_seg=seg, k_seg=seg[:, a:b], k_start=a, delta=delta.detach())
        dq += dq_p
        torch.testing.assert_close(dk_p, ref[1][:, :, a:b], atol=1e-11, rtol=0)
        torch.testing.assert_close(dv_p, ref[2][:, :, a:b], atol=1e-11, rtol=0)
    torch.testing.assert_close(dq, ref[0], atol=1e-11, rtol=0)


def test_softmax_fp32_lse_and_fully_masked_rows():
    q, k, v = (rand(1, 2, 20, 8, dtype=torch.float32, seed=s) for s in range(3))
    out, lse = softmax_attention(q, k, v, q_start=0, k_start=10)  # rows 0..9 see no key at all
    assert lse.dtype == torch.float32
    assert torch.isneginf(lse[..., :10]).all() and (out[..., :10, :] == 0).all()
    assert torch.isfinite(lse[..., 10:]).all()


def test_merge_of_two_key_halves_reproduces_the_full_result():
    q, k, v = (rand(2, 3, 40, 8, seed=s) for s in range(3))
    seg = docs(2, 40)
    full, full_lse = softmax_attention(q, k, v, segment_ids=seg)
    parts = [softmax_attention(q, k[:, :, a:b], v[:, :, a:b], segment_ids=seg, kv_segment_ids=seg[:, a:b],
                               k_start=a) for a, b in ((0, 17), (17, 40))]
    out, lse = merge_attention(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    torch.testing.assert_close(out, full, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=0)
    empty_out, empty_lse = torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2), -math.inf)
    merged, merged_lse = merge_attention(empty_out, empty_lse, empty_out, empty_lse)
    assert not merged.isnan().any() and torch.isneginf(merged_lse).all()


@pytest.mark.parametrize("case", [dict(), dict(window=5), dict(segment_ids=True), dict(causal=False)], ids=str)
def test_sigmoid_matches_naive(case):
    case = dict(case)
    q = rand(2, 4, 30, 8, seed=1).requires_grad_()
    k = rand(2, 2, 30, 8, seed=2).requires_grad_()
    v = rand(2, 2, 30, 8, seed=3).requires_grad_()
    seg = docs(2, 30) if case.pop("segment_ids", False) else None
    out = sigmoid_attention(q, k, v, segment_ids=seg, **case)
    want = naive_sigmoid(q, k, v, causal=case.get("causal", True), window=case.get("window"), q_seg=seg, k_seg=seg)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


@pytest.mark.parametrize("case", ["causal", "docs", "window", "window split", "window uncached", "offset"])
def test_softmax_computes_only_visible_blocks(monkeypatch, case):
    """The fused operator sees only visible blocks, equal blocks batched into one call: causal one is_causal
    call, 8 documents one call of 8 documents, a window its band in a few calls (split into edge, unmasked
    and diagonal blocks as on CUDA and on CPU where the band's mask would be too large to cache, or one masked
    block per query block as on CPU); no N x N mask is built."""
    monkeypatch.setattr(reference, "WINDOW_BLOCK", 128)
    if case == "window split":
        monkeypatch.setattr(reference, "splits_band", lambda device, window: True)
    if case == "window uncached":
        monkeypatch.setattr(reference, "CACHED_MASK_ELEMENTS", 128 * 128)
    N, calls = 1024, []
    real_forward = sdpa.forward

    def spy(q, k, v, mask, causal, scale):
        calls.append((q.shape[0], q.shape[2], k.shape[2], causal, None if mask is None else mask.numel()))
        return real_forward(q, k, v, mask, causal, scale)

    monkeypatch.setattr(sdpa, "forward", spy)
    q = k = v = torch.randn(1, 2, N, 16)
    seg = torch.arange(N).div(128, rounding_mode="floor")[None]
    kw = dict(causal=dict(), docs=dict(segment_ids=seg), window=dict(window=128), offset=dict(q_start=N, k_start=0))
    kw = kw[case.split()[0]]
    out, lse = softmax_attention(q, k[:, :, :N], v, **kw)
    assert torch.isfinite(lse).all()
    if case == "causal":
        assert calls == [(1, N, N, True, None)]
    if case == "docs":
        assert calls == [(8, 128, 128, True, None)]
    if case in ("window split", "window uncached"):
        pairs = sum(b * nq * nk / (2 if causal else 1) for b, nq, nk, causal, _ in calls)
        assert pairs <= N * (128 + 128 / 2) and max(m or 0 for *_, m in calls) <= 128 * 128 and len(calls) <= 3
    if case == "window":  # the first query block, then the band's 7 others in one call
        assert calls == [(1, 128, 128, True, None), (7, 128, 255, False, 128 * 255)]
    if case == "offset":  # every query after every key: one unmasked block
        assert calls == [(1, N, N, False, None)]


DECAYS = ["none", "scalar", "channel"]


def linear_inputs(decay, B=2, H=3, N=45, D=6, strong=False, seed=0):
    q, k, v = (rand(B, H, N, D, seed=seed + s) for s in range(3))
    g = None
    if decay == "scalar":
        g = -torch.rand(B, H, N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    elif decay == "channel":
        g = -torch.rand(B, H, N, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 2
    if g is not None and strong:
        g = torch.full_like(g, -20.0)
    return q, k, v, g


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
@pytest.mark.parametrize("with_docs", [False, True])
def test_linear_chunked_matches_recurrent(decay, chunk, with_docs):
    q, k, v, g = linear_inputs(decay)
    s0 = rand(2, 3, 6, 6, seed=9)
    seg = docs(2, 45) if with_docs else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    leaves += [g.clone().requires_grad_()] if g is not None else []
    outs = []
    for fn in ("chunked", "recurrent"):
        lq, lk, lv, ls0 = leaves[:4]
        lg = leaves[4] if g is not None else None
        if fn == "chunked":
            o, s = linear_attention(lq, lk, lv, log_decay=lg, initial_state=ls0, output_final_state=True,
                                    segment_ids=seg, chunk_size=chunk)
        else:
            o, s = linear_attention_recurrent(lq, lk, lv, scale=6 ** -0.5, log_decay=lg, initial_state=ls0,
                                              output_final_state=True, segment_ids=seg)
        grads = torch.autograd.grad((o * rand(*o.shape, seed=11)).sum() + (s * rand(*s.shape, seed=12)).sum(), leaves)
        outs.append((o, s, grads))
    (o1, s1, g1), (o2, s2, g2) = outs
    assert s1.dtype == torch.float64
    torch.testing.assert_close(o1, o2, atol=1e-11, rtol=0)
    torch.testing.assert_close(s1, s2, atol=1e-11, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_linear_strong_decay_is_finite_in_fp32(decay):
    q, k, v, g = (t.float() if t is not None else None for t in linear_inputs(decay, strong=True))
    q, k, v, g = (t.requires_grad_() for t in (q, k, v, g))
    out, state = linear_attention(q, k, v, log_decay=g, output_final_state=True, chunk_size=16)
    want, want_state = linear_attention_recurrent(q, k, v, scale=6 ** -0.5, log_decay=g, output_final_state=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, want_state, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v, g))
    assert all(torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("decay", DECAYS)
def test_two_halves_with_state_passing_equal_one_pass(decay):
    q, k, v, g = linear_inputs(decay, N=40)
    full, full_state = linear_attention(q, k, v, log_decay=g, output_final_state=True, chunk_size=8)
    half = lambda t, a, b: None if t is None else t[:, :, a:b]
    first, mid_state = linear_attention(half(q, 0, 23), half(k, 0, 23), half(v, 0, 23), log_decay=half(g, 0, 23),
                                        output_final_state=True, chunk_size=8)
    second, end_state = linear_attention(half(q, 23, 40), half(k, 23, 40), half(v, 23, 40),
                                         log_decay=half(g, 23, 40), initial_state=mid_state,
                                         output_final_state=True, chunk_size=8)
    torch.testing.assert_close(torch.cat([first, second], 2), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(end_state, full_state, atol=1e-12, rtol=0)


def test_linear_chunked_memory_is_linear_in_n():
    """Doubling N doubles (not quadruples) the largest intermediate."""
    sizes = {}
    for N in (256, 512):
        q, k, v, g = (t.float() for t in linear_inputs("channel", B=1, H=1, N=N, D=4))
        seen = []
        real_exp = torch.exp

        def spy(x, *a, **kw):
            seen.append(x.numel())
            return real_exp(x, *a, **kw)

        torch.exp = spy
        try:
            linear_attention(q, k, v, log_decay=g, chunk_size=16)
        finally:
            torch.exp = real_exp
        sizes[N] = max(seen)
    assert sizes[512] == 2 * sizes[256]


def test_bad_inputs_name_the_value():
    q = torch.randn(1, 4, 8, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads 3"):
        softmax_attention(q, torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4))
    with pytest.raises(ValueError, match=r"segment_ids shape \(1, 7\)"):
        softmax_attention(q, q, q, segment_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="log_decay shape"):
        linear_attention(q, q, q, log_decay=torch.zeros(1, 4, 9))
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        softmax_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="window must be a positive integer, got 0"):
        softmax_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match=r"initial_state shape \(1, 4, 4, 4\) != \(1, 4, 4, 8\)"):
        linear_attention(q, q, torch.randn(1, 4, 8, 8), initial_state=torch.zeros(1, 4, 4, 4))


def test_sigmoid_default_bias_counts_the_keys():
    """bias = -log(Nk): 10 queries over 30 keys (a ring block) against the naive reference."""
    q, k, v = rand(1, 2, 10, 8, seed=1), rand(1, 2, 30, 8, seed=2), rand(1, 2, 30, 8, seed=3)
    torch.testing.assert_close(sigmoid_attention(q, k, v, causal=False), naive_sigmoid(q, k, v, causal=False),
                               atol=1e-12, rtol=0)


def test_linear_initial_state_with_wider_values():
    """initial_state [B, H, Dk, Dv] with Dv = 2 Dk continues the recurrence it came from."""
    q, k, v = rand(1, 2, 24, 4, seed=1), rand(1, 2, 24, 4, seed=2), rand(1, 2, 24, 8, seed=3)
    g = -rand(1, 2, 24, 4, seed=4).abs()
    want, _ = linear_attention_recurrent(q, k, v, scale=0.5, log_decay=g)
    _, state = linear_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], log_decay=g[:, :, :10], scale=0.5,
                                output_final_state=True, chunk_size=4)
    second, _ = linear_attention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], log_decay=g[:, :, 10:], scale=0.5,
                                 initial_state=state, chunk_size=4)
    torch.testing.assert_close(second, want[:, :, 10:], atol=1e-12, rtol=0)


def test_cuda_bias_rows_start_on_16_element_boundaries():
    """The CUDA memory-efficient kernel needs attn_bias rows 16-aligned: built on CPU here, as it is on a GPU."""
    mask = torch.rand(1, 1, 5, 20, generator=torch.Generator().manual_seed(0)) > 0.5
    bias = sdpa.cuda_bias(mask, torch.zeros(2, 3, 5, 8), 20)
    assert bias.shape == (2, 3, 5, 20) and bias.stride(-2) % 16 == 0
    assert torch.equal(bias == 0, mask.expand(2, 3, 5, 20)) and torch.isneginf(bias[~mask.expand(2, 3, 5, 20)]).all()


def test_auto_backend_path_per_op_and_device(monkeypatch):
    """auto: CPU runs the torch path; CUDA runs Triton, except float64 (the kernels compute in float32 at most)
    and softmax attention the flash kernel does not take (head dim over 256 or unequal for q and v)."""
    from types import SimpleNamespace

    from longtrain import kernels
    from longtrain.config import KernelsConfig
    from longtrain.kernels import OPS, SOFTMAX_OPS, auto_choice, triton_backend

    def tensor(device, dtype=torch.bfloat16, head_dim=64, batch=1):  # what auto_choice reads; no GPU needed
        return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(batch, 2, 8, head_dim))

    assert KernelsConfig().backend == "auto"
    for op in OPS:
        assert auto_choice(op, tensor("cpu"), tensor("cpu")) is reference
        assert auto_choice(op, tensor("cuda"), tensor("cuda")) is triton_backend, op
    for q, v in ((tensor("cuda", head_dim=320), tensor("cuda", head_dim=320)),
                 (tensor("cuda"), tensor("cuda", head_dim=32))):
        for op in OPS:
            assert auto_choice(op, q, v) is (reference if op in SOFTMAX_OPS else triton_backend), (op, q)
    for op in OPS:
        assert auto_choice(op, tensor("cuda", torch.float64), tensor("cuda", torch.float64)) is reference, op
    assert auto_choice("attention_forward", tensor("cuda", torch.float32), tensor("cuda", torch.float32)) \
        is triton_backend
    assert auto_choice("attention_forward", tensor("cuda", head_dim=256), tensor("cuda", head_dim=256)) \
        is triton_backend
    big = tensor("cuda", batch=32768)  # B * H = 65536 grid rows, one past CUDA's limit
    assert auto_choice("linear_attention_chunked", big, None) is reference
    assert auto_choice("linear_attention_chunked", tensor("cuda", batch=32767), None) is triton_backend
    monkeypatch.setattr(kernels, "HAS_TRITON", False)  # a CUDA torch without Triton
    assert auto_choice("linear_attention_chunked", tensor("cuda"), None) is reference
    q, k, v, g = (t.float() for t in linear_inputs("channel"))
    runs = [lambda backend: softmax_attention(q, k, v, window=9, backend=backend),
            lambda backend: linear_attention(q, k, v, log_decay=g, output_final_state=True, backend=backend)]
    for run in runs:
        for got, want in zip(run("auto"), run("torch")):
            assert torch.equal(got, want)


def test_auto_dispatches_on_q_and_v(monkeypatch):
    """auto chooses by q and v: attention_forward's args 0 and 2, attention_backward's 1 and 3 (not dout)."""
    from longtrain import kernels

    seen = []
    monkeypatch.setattr(kernels, "auto_choice", lambda op, q, v: seen.append((op, q, v)) or reference)
    q, k, v, dout = (torch.randn(1, 2, 8, 4) for _ in range(4))
    out, lse = kernels.AUTO.attention_forward(q, k, v, scale=0.5)
    kernels.AUTO.attention_backward(dout, q, k, v, out, lse, scale=0.5)
    kernels.AUTO.linear_attention_chunked(q, k, v, scale=0.5)
    assert [(op, a is q, b is v) for op, a, b in seen[:2]] == [("attention_forward", True, True),
                                                                ("attention_backward", True, True)]
    assert seen[2][0] == "linear_attention_chunked" and seen[2][1] is q and seen[2][2] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fold_delta_keeps_float32_precision_in_half(dtype):
    """The fused backward computes dP - delta as dO V^T over the folded columns: in bf16/fp16 they must carry
    delta to ~float32 precision (one rounded column errs by 2^-8 of delta, which dP ~ delta turns into dS)."""
    from longtrain.kernels.reference import fold_delta
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 16, 64, generator=g).to(dtype) for _ in range(4))
    delta = torch.randn(1, 2, 16, generator=g) * 100
    _, _, v_f, dout_f, out_f = fold_delta(q, k, v, dout, None, delta, None)
    folded = -(dout_f[..., 64:].double() * v_f[..., 64:].double()).sum(-1)
    assert v_f.shape[-1] % 8 == 0 and (out_f == 0).all() and torch.equal(dout_f[..., :64], dout)
    torch.testing.assert_close(folded, delta.double(), rtol=2 ** -15, atol=0)
    one_column = delta.to(dtype).double()
    assert (one_column - delta.double()).abs().max() > 100 * (folded - delta.double()).abs().max()


def test_attention_saves_its_output_in_the_input_dtype():
    """bf16 attention keeps one bf16 output for backward (the tensor it returns), not an fp32 copy besides."""
    q, k, v = (rand(1, 2, 64, 16, seed=s).bfloat16().requires_grad_() for s in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _ = softmax_attention(q, k, v)
    assert [t.dtype for t in saved if t.shape == out.shape] == [torch.bfloat16] * 4  # q, k, v, out


def test_bf16_backward_from_a_bf16_output_keeps_delta_in_float32():
    """LocalAttention saves its output in bf16 (as FlashAttention-2 does): delta = rowsum(dO * O) - dlse must still
    be formed in float32, or the lse gradient's rows lose precision (2.4x the error of dq, dk here)."""
    q, k, v, dout = (rand(1, 2, 256, 64, seed=s).bfloat16() for s in range(4))
    dlse = rand(1, 2, 256, seed=5).float()
    out, lse = reference.attention_forward(q, k, v, scale=0.125)
    got = reference.attention_backward(dout, q, k, v, out.bfloat16(), lse, scale=0.125, dlse=dlse)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    want, want_lse = naive_softmax(q64, k64, v64, causal=True, window=None)
    ref = torch.autograd.grad((want * dout.double()).sum() + (want_lse * dlse.double()).sum(), (q64, k64, v64))
    for a, b in zip(got, ref):
        assert (a.double() - b).norm() / b.norm() < 1.2e-3
