"""Flash attention in Triton: tiled online-softmax forward with lse out, FlashAttention-2 backward.

Same signatures as reference.attention_forward / attention_backward: global offsets q_start/k_start
(a ring block is a rectangle of the global causal mask), sliding window, segment ids, GQA without
repeating K/V, any head dim up to 256, fp32 accumulation. Only the key (or query) tiles that the
causal/window mask leaves visible are visited. kind="sigmoid" runs sigmoid attention in the same kernels.
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from longtrain.kernels.reference import acc_dtype

BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _tile_mask(offs_m, offs_n, q_start, k_start, Nq, Nk, qseg_ptr, kseg_ptr, b,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr):
    """[BLOCK_M, BLOCK_N] of allowed (query, key) pairs, in global positions."""
    q_pos = q_start + offs_m
    k_pos = k_start + offs_n
    mask = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    if CAUSAL:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    if WINDOW > 0:
        mask = mask & (k_pos[None, :] > q_pos[:, None] - WINDOW)
    if HAS_SEG:
        q_seg = tl.load(qseg_ptr + b * Nq + offs_m, mask=offs_m < Nq, other=-1)
        k_seg = tl.load(kseg_ptr + b * Nk + offs_n, mask=offs_n < Nk, other=-2)
        mask = mask & (q_seg[:, None] == k_seg[None, :])
    return mask


@triton.jit
def _key_range(m_lo, m_hi, q_start, k_start, Nk, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK: tl.constexpr):
    """[lo, hi) of key indices that queries [m_lo, m_hi) may see, lo aligned to BLOCK."""
    lo = 0
    hi = Nk
    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(0, q_start + m_hi - k_start))
    if WINDOW > 0:
        lo = tl.maximum(0, q_start + m_lo - WINDOW + 1 - k_start)
        lo = (lo // BLOCK) * BLOCK
    return lo, hi


@triton.jit
def _fwd_kernel(Q, K, V, OUT, LSE, QSEG, KSEG, sm_scale, sig_bias, q_start, k_start, Nq, Nk, Hq, G, D,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SIGMOID: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=(offs_m[:, None] < Nq) & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, q_start, k_start, Nk, CAUSAL, WINDOW, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * sm_scale
        mask = _tile_mask(offs_m, offs_n, q_start, k_start, Nq, Nk, QSEG, KSEG, b, CAUSAL, WINDOW, HAS_SEG)
        if SIGMOID:
            p = tl.where(mask, tl.sigmoid(s + sig_bias), 0.0)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        else:
            s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
            m_i = m_new
    if not SIGMOID:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(LSE + bh * Nq + offs_m, lse, mask=offs_m < Nq)
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], acc,
             mask=(offs_m[:, None] < Nq) & d_ok[None, :])


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, QSEG, KSEG, sm_scale, sig_bias, q_start, k_start,
                     Nq, Nk, Hkv, G, D, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SIGMOID: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV of one key tile, summed over the G query heads that share it and every visible query tile."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    hi = Nq
    if CAUSAL:
        lo = tl.maximum(0, k_start + pid_n * BLOCK_N - q_start)
        lo = (lo // BLOCK_M) * BLOCK_M
    if WINDOW > 0:
        hi = tl.minimum(Nq, tl.maximum(0, k_start + pid_n * BLOCK_N + BLOCK_N + WINDOW - 1 - q_start))
    for g in range(G):
        h = hk * G + g
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Nq
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :],
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * sm_scale
            mask = _tile_mask(offs_m, offs_n, q_start, k_start, Nq, Nk, QSEG, KSEG, b, CAUSAL, WINDOW, HAS_SEG)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
            if SIGMOID:
                p = tl.sigmoid(s + sig_bias)
                ds = dp * p * (1.0 - p)
            else:
                lse = tl.load(LSE + (b * Hkv * G + h) * Nq + offs_m, mask=m_ok, other=float("inf"))
                delta = tl.load(DELTA + (b * Hkv * G + h) * Nq + offs_m, mask=m_ok, other=0.0)
                p = tl.exp(tl.where(mask, s, float("-inf")) - lse[:, None])
                ds = p * (dp - delta[:, None])
            p = tl.where(mask, p, 0.0)
            ds = tl.where(mask, ds, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(tl.float32)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(tl.float32) * sm_scale
    tl.store(DK + bh * Nk * D + offs_n[:, None] * D + offs_d[None, :], dk, mask=kv_ok)
    tl.store(DV + bh * Nk * D + offs_n[:, None] * D + offs_d[None, :], dv, mask=kv_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QSEG, KSEG, sm_scale, sig_bias, q_start, k_start,
                   Nq, Nk, Hq, G, D, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SIGMOID: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of one query tile over every visible key tile."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Nq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * Nq + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, q_start, k_start, Nk, CAUSAL, WINDOW, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * sm_scale
        mask = _tile_mask(offs_m, offs_n, q_start, k_start, Nq, Nk, QSEG, KSEG, b, CAUSAL, WINDOW, HAS_SEG)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
        if SIGMOID:
            p = tl.sigmoid(s + sig_bias)
            ds = dp * p * (1.0 - p)
        else:
            p = tl.exp(tl.where(mask, s, float("-inf")) - lse[:, None])
            ds = p * (dp - delta[:, None])
        ds = tl.where(mask, ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(tl.float32) * sm_scale
    tl.store(DQ + bh * Nq * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=m_ok[:, None] & d_ok[None, :])


def _prepare(q: Tensor, k: Tensor, v: Tensor, q_seg: Tensor | None, k_seg: Tensor | None):
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"flash_attn needs head_dim of q ({q.shape[-1]}) == of v ({v.shape[-1]})")
    if q.shape[-1] > 256:
        raise ValueError(f"flash_attn supports head_dim <= 256, got {q.shape[-1]}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    segs = (q_seg.contiguous(), k_seg.contiguous()) if q_seg is not None else (q, q)  # unused when no segments
    return q, k, v, segs


def _meta(q: Tensor, causal: bool, window: int | None, has_seg: bool, kind: str) -> dict:
    return dict(CAUSAL=causal, WINDOW=window or 0, HAS_SEG=has_seg, SIGMOID=kind == "sigmoid",
                PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True,
                      window: int | None = None, q_seg: Tensor | None = None, k_seg: Tensor | None = None,
                      q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                      sigmoid_bias: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """(out [B, Hq, Nq, D] fp32, lse [B, Hq, Nq] fp32 or None for sigmoid), like reference.attention_forward."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    q, k, v, (qs, ks) = _prepare(q, k, v, q_seg, k_seg)
    out = torch.empty(B, Hq, Nq, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hq, Nq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Nq, BLOCK_M), B * Hq)
    _fwd_kernel[grid](q, k, v, out, lse, qs, ks, scale, sigmoid_bias, q_start, k_start, Nq, Nk, Hq, Hq // Hkv, D,
                      *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                      **_meta(q, causal, window, q_seg is not None, kind))
    dt = acc_dtype(q)
    return out.to(dt), (None if kind == "sigmoid" else lse.to(dt))


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None, lse: Tensor | None, *,
                       scale: float, causal: bool = True, window: int | None = None, q_seg: Tensor | None = None,
                       k_seg: Tensor | None = None, q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                       sigmoid_bias: float = 0.0, delta: Tensor | None = None,
                       dlse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (fp32) like reference.attention_backward; delta = rowsum(dO * O) - dlse is precomputed."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    q, k, v, (qs, ks) = _prepare(q, k, v, q_seg, k_seg)
    dout = dout.contiguous().to(q.dtype)
    if kind == "softmax":
        if delta is None:
            delta = (dout.float() * out.float()).sum(-1)
        delta = delta.float() - (0.0 if dlse is None else dlse.float())
        lse = torch.where(torch.isinf(lse), math.inf, lse).float()
    else:
        delta = lse = q.new_zeros(1, dtype=torch.float32)
    delta, lse = delta.contiguous(), lse.contiguous()
    dq = torch.empty(B, Hq, Nq, D, device=q.device, dtype=torch.float32)
    dk = torch.empty(B, Hkv, Nk, D, device=q.device, dtype=torch.float32)
    dv = torch.empty(B, Hkv, Nk, D, device=q.device, dtype=torch.float32)
    meta = _meta(q, causal, window, q_seg is not None, kind)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    _bwd_dkdv_kernel[(triton.cdiv(Nk, BLOCK_N), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, qs, ks, scale, sigmoid_bias, q_start, k_start, Nq, Nk, Hkv, Hq // Hkv, D,
        *strides, **meta)
    _bwd_dq_kernel[(triton.cdiv(Nq, BLOCK_M), B * Hq)](
        q, k, v, dout, lse, delta, dq, qs, ks, scale, sigmoid_bias, q_start, k_start, Nq, Nk, Hq, Hq // Hkv, D,
        *strides, **meta)
    dt = acc_dtype(q)
    return dq.to(dt), dk.to(dt), dv.to(dt)
