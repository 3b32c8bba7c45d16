"""Flash attention in Triton: tiled online-softmax forward with lse out, FlashAttention-2 backward.

Same signatures as reference.attention_forward / attention_backward: global offsets q_start/k_start
(a ring block is a rectangle of the global causal mask), sliding window, segment ids, GQA without
repeating K/V, any head dim up to 256, fp32 accumulation. Only the key (or query) tiles that the
causal/window mask and the documents leave visible are visited, and only tiles on a mask edge compute
the mask. Documents: doc_ranges finds each query's key span and each key's query span (a binary search
per position on the device, no host sync, whatever the tile size); a kernel reads them at its tile's first
and last row, skips tiles outside them and runs tiles inside one document unmasked. A batch row whose ids
decrease somewhere (not packed documents) falls back to masking every visited tile. Softmax runs in base 2
with log2(e) folded into the scale. On a GPU the autotuner picks tile sizes, warps and pipeline stages
per shape; the interpreter (and LONGTRAIN_TRITON_AUTOTUNE=0) runs one small config. kind="sigmoid" runs
sigmoid attention in the same kernels.
"""
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from longtrain.kernels.reference import acc_dtype

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
TUNE_KEY = ["Nq", "Nk", "D", "CAUSAL", "WINDOW", "HAS_SEG", "SIGMOID"]
# (BLOCK_M, BLOCK_N, warps, stages) candidates; BLOCK_M is the query tile, BLOCK_N the key tile
FWD_BLOCKS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 2)]
DKDV_BLOCKS = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 32, 4, 2)]
DQ_BLOCKS = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)]


def _configs(blocks: list[tuple[int, int, int, int]]) -> list:
    """Autotune candidates on a GPU; one config in the interpreter, where timing means nothing, and with
    LONGTRAIN_TRITON_AUTOTUNE=0 (tests on a GPU, where compiling every candidate would take most of the time)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("LONGTRAIN_TRITON_AUTOTUNE") == "0":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in blocks]


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
def _doc_bounds(lo, full_lo, full_hi, hi, DOC, b, N, first, last, BLOCK: tl.constexpr):
    """Intersect [lo, hi) with the document span of rows first..last (DOC [B, 2, N]: each row's span in the
    other array); the interior [full_lo, full_hi) keeps only tiles inside one document's span. A batch row
    whose ids are not packed has spans -1: its range stays and every tile of it is masked."""
    first_lo = tl.load(DOC + b * 2 * N + first)
    first_hi = tl.load(DOC + b * 2 * N + N + first)
    last_lo = tl.load(DOC + b * 2 * N + last)
    last_hi = tl.load(DOC + b * 2 * N + N + last)
    packed = first_lo >= 0
    one_doc = packed & (first_lo == last_lo) & (first_hi == last_hi)
    lo = tl.where(packed, tl.maximum(lo, (first_lo // BLOCK) * BLOCK), lo)
    hi = tl.where(packed, tl.minimum(hi, last_hi), hi)
    full_lo = tl.maximum(full_lo, tl.where(one_doc, tl.cdiv(first_lo, BLOCK) * BLOCK, hi))
    full_hi = tl.minimum(full_hi, tl.where(one_doc, (first_hi // BLOCK) * BLOCK, 0))
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_ranges(m_lo, m_hi, q_start, k_start, Nq, Nk, QDOC, b, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                HAS_SEG: tl.constexpr, BLOCK: tl.constexpr):
    """Key tiles that queries [m_lo, m_hi) may see, [lo, hi), and the interior [full_lo, full_hi) of tiles
    every one of those queries sees whole (no mask needed); all starts aligned to BLOCK. With segment ids,
    tiles outside the queries' documents are skipped (rows whose ids are not packed mask every tile)."""
    lo = 0
    hi = Nk
    full_lo = 0
    full_hi = (Nk // BLOCK) * BLOCK
    if CAUSAL:
        hi = tl.minimum(Nk, tl.maximum(0, q_start + m_hi - k_start))
        full_hi = (tl.minimum(Nk, tl.maximum(0, q_start + m_lo + 1 - k_start)) // BLOCK) * BLOCK
    if WINDOW > 0:
        lo = (tl.maximum(0, q_start + m_lo - WINDOW + 1 - k_start) // BLOCK) * BLOCK
        full_lo = tl.cdiv(tl.maximum(0, q_start + m_hi - WINDOW - k_start), BLOCK) * BLOCK
    if HAS_SEG:
        lo, full_lo, full_hi, hi = _doc_bounds(lo, full_lo, full_hi, hi, QDOC, b, Nq, m_lo,
                                               tl.minimum(m_hi, Nq) - 1, BLOCK)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n_lo, n_hi, q_start, k_start, Nq, Nk, KDOC, b, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  HAS_SEG: tl.constexpr, BLOCK: tl.constexpr):
    """Query tiles that may see keys [n_lo, n_hi), [lo, hi), and the interior [full_lo, full_hi) of tiles
    that see all of those keys; rows past Nq or keys past Nk add nothing to dK, dV, so need no mask.
    Documents as in _key_ranges."""
    lo = 0
    hi = Nq
    full_lo = 0
    full_hi = Nq
    if CAUSAL:
        lo = (tl.maximum(0, k_start + n_lo - q_start) // BLOCK) * BLOCK
        full_lo = tl.cdiv(tl.maximum(0, k_start + n_hi - 1 - q_start), BLOCK) * BLOCK
    if WINDOW > 0:
        hi = tl.minimum(Nq, tl.maximum(0, k_start + n_hi + WINDOW - 1 - q_start))
        full_hi = (tl.maximum(0, k_start + n_lo + WINDOW - q_start) // BLOCK) * BLOCK
    if HAS_SEG:
        lo, full_lo, full_hi, hi = _doc_bounds(lo, full_lo, full_hi, hi, KDOC, b, Nk, n_lo,
                                               tl.minimum(n_hi, Nk) - 1, BLOCK)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, skn, svn, lo, hi, offs_m, offs_d, d_ok, qk_scale, sig_bias,
               q_start, k_start, Nq, Nk, QSEG, KSEG, b, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SIGMOID: tl.constexpr, PREC: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Accumulate key tiles [lo, hi): online softmax in base 2 (scores carry log2(e)), or sigmoid."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
        keys = offs_n[:, None].to(tl.int64)  # times a stride: past 2**31 at long N
        k = tl.load(K + keys * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + keys * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * qk_scale
        if MASKED:
            mask = _tile_mask(offs_m, offs_n, q_start, k_start, Nq, Nk, QSEG, KSEG, b, CAUSAL, WINDOW, HAS_SEG)
        if SIGMOID:
            p = tl.sigmoid(s + sig_bias)
            if MASKED:
                p = tl.where(mask, p, 0.0)
            acc += tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        else:
            if MASKED:
                s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
            m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_configs(FWD_BLOCKS), key=TUNE_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, OUT, LSE, QSEG, KSEG, QDOC, KDOC, sm_scale, sig_bias, q_start, k_start, Nq, Nk, Hq, G, D,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
                SIGMOID: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :],
                mask=(offs_m[:, None] < Nq) & d_ok[None, :], other=0.0)
    qk_scale = sm_scale
    if not SIGMOID:
        qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    K = K + b * skb + hk * skh
    V = V + b * svb + hk * svh
    lo, full_lo, full_hi, hi = _key_ranges(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, q_start, k_start, Nq, Nk,
                                           QDOC, b, CAUSAL, WINDOW, HAS_SEG, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, skn, svn, lo, full_lo, offs_m, offs_d, d_ok, qk_scale,
                               sig_bias, q_start, k_start, Nq, Nk, QSEG, KSEG, b, True, CAUSAL, WINDOW, HAS_SEG,
                               SIGMOID, PREC, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, skn, svn, full_lo, full_hi, offs_m, offs_d, d_ok, qk_scale,
                               sig_bias, q_start, k_start, Nq, Nk, QSEG, KSEG, b, False, CAUSAL, WINDOW, HAS_SEG,
                               SIGMOID, PREC, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, skn, svn, full_hi, hi, offs_m, offs_d, d_ok, qk_scale,
                               sig_bias, q_start, k_start, Nq, Nk, QSEG, KSEG, b, True, CAUSAL, WINDOW, HAS_SEG,
                               SIGMOID, PREC, BLOCK_N)
    if not SIGMOID:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + bh * Nq + offs_m, lse, mask=offs_m < Nq)
    tl.store(OUT + b * sob + h * soh + offs_m[:, None].to(tl.int64) * son + offs_d[None, :], acc,
             mask=(offs_m[:, None] < Nq) & d_ok[None, :])


@triton.jit
def _row_stats(LSE, DELTA, offs_m, m_ok, SIGMOID: tl.constexpr):
    """(base-2 lse, delta) of query rows; sigmoid attention has neither (zeros, nothing read)."""
    if SIGMOID:
        lse2 = tl.zeros(offs_m.shape, tl.float32)
        delta = tl.zeros(offs_m.shape, tl.float32)
    else:
        lse2 = tl.load(LSE + offs_m, mask=m_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    return lse2, delta


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, sm_scale, sig_bias, mask, MASKED: tl.constexpr,
                       SIGMOID: tl.constexpr, PREC: tl.constexpr):
    """(P, dS) of one tile from the saved base-2 lse (softmax) or the recomputed sigmoid; masked pairs 0."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
    if SIGMOID:
        p = tl.sigmoid(s * sm_scale + sig_bias)
        ds = dp * p * (1.0 - p)
    else:
        p = tl.exp2(s * (sm_scale * LOG2E) - lse2[:, None])
        ds = p * (dp - delta[:, None])
    if MASKED:
        p = tl.where(mask, p, 0.0)
        ds = tl.where(mask, ds, 0.0)
    return p, ds


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, sqn, sdn, lo, hi, offs_n, offs_d, d_ok, sm_scale, sig_bias,
                q_start, k_start, Nq, Nk, QSEG, KSEG, b, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SIGMOID: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Accumulate one query head's tiles [lo, hi) into the key tile's dK, dV."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Nq
        rows = offs_m[:, None].to(tl.int64)  # times a stride: past 2**31 at long N
        q = tl.load(Q + rows * sqn + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + rows * sdn + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse2, delta = _row_stats(LSE, DELTA, offs_m, m_ok, SIGMOID)
        mask = None
        if MASKED:
            mask = _tile_mask(offs_m, offs_n, q_start, k_start, Nq, Nk, QSEG, KSEG, b, CAUSAL, WINDOW, HAS_SEG)
        p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, sm_scale, sig_bias, mask, MASKED, SIGMOID, PREC)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(tl.float32)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(tl.float32)
    return dk, dv


@triton.autotune(configs=_configs(DKDV_BLOCKS), key=TUNE_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, QSEG, KSEG, QDOC, KDOC, sm_scale, sig_bias, q_start, k_start,
                     Nq, Nk, Hkv, G, D, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
                     SIGMOID: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """dK, dV of one key tile, summed over the G query heads that share it and every visible query tile."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    b = bh // Hkv
    hk = bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None].to(tl.int64) * svn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _query_ranges(pid_n * BLOCK_N, pid_n * BLOCK_N + BLOCK_N, q_start, k_start, Nq, Nk,
                                             KDOC, b, CAUSAL, WINDOW, HAS_SEG, BLOCK_M)
    for g in range(G):
        h = hk * G + g
        q_h = Q + b * sqb + h * sqh
        do_h = DO + b * sdb + h * sdh
        lse_h = LSE + (b * Hkv * G + h) * Nq
        delta_h = DELTA + (b * Hkv * G + h) * Nq
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_h, do_h, lse_h, delta_h, sqn, sdn, lo, full_lo, offs_n, offs_d, d_ok,
                             sm_scale, sig_bias, q_start, k_start, Nq, Nk, QSEG, KSEG, b, True, CAUSAL, WINDOW,
                             HAS_SEG, SIGMOID, PREC, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_h, do_h, lse_h, delta_h, sqn, sdn, full_lo, full_hi, offs_n, offs_d,
                             d_ok, sm_scale, sig_bias, q_start, k_start, Nq, Nk, QSEG, KSEG, b, False, CAUSAL, WINDOW,
                             HAS_SEG, SIGMOID, PREC, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_h, do_h, lse_h, delta_h, sqn, sdn, full_hi, hi, offs_n, offs_d, d_ok,
                             sm_scale, sig_bias, q_start, k_start, Nq, Nk, QSEG, KSEG, b, True, CAUSAL, WINDOW,
                             HAS_SEG, SIGMOID, PREC, BLOCK_M)
    tl.store(DK + bh * Nk * D + offs_n[:, None] * D + offs_d[None, :], dk * sm_scale, mask=kv_ok)
    tl.store(DV + bh * Nk * D + offs_n[:, None] * D + offs_d[None, :], dv, mask=kv_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, K, V, skn, svn, lo, hi, offs_m, offs_d, d_ok, sm_scale, sig_bias,
              q_start, k_start, Nq, Nk, QSEG, KSEG, b, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SIGMOID: tl.constexpr, PREC: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Accumulate key tiles [lo, hi) into the query tile's dQ."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Nk) & d_ok[None, :]
        keys = offs_n[:, None].to(tl.int64)  # times a stride: past 2**31 at long N
        k = tl.load(K + keys * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + keys * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        mask = None
        if MASKED:
            mask = _tile_mask(offs_m, offs_n, q_start, k_start, Nq, Nk, QSEG, KSEG, b, CAUSAL, WINDOW, HAS_SEG)
        p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, sm_scale, sig_bias, mask, MASKED, SIGMOID, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(tl.float32)
    return dq


@triton.autotune(configs=_configs(DQ_BLOCKS), key=TUNE_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QSEG, KSEG, QDOC, KDOC, sm_scale, sig_bias, q_start, k_start,
                   Nq, Nk, Hq, G, D, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
                   SIGMOID: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """dQ of one query tile over every visible key tile."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < Nq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None].to(tl.int64) * sdn + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse2, delta = _row_stats(LSE + bh * Nq, DELTA + bh * Nq, offs_m, m_ok, SIGMOID)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, q_start, k_start, Nq, Nk,
                                           QDOC, b, CAUSAL, WINDOW, HAS_SEG, BLOCK_N)
    K = K + b * skb + hk * skh
    V = V + b * svb + hk * svh
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, skn, svn, lo, full_lo, offs_m, offs_d, d_ok, sm_scale, sig_bias,
                   q_start, k_start, Nq, Nk, QSEG, KSEG, b, True, CAUSAL, WINDOW, HAS_SEG, SIGMOID, PREC, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, skn, svn, full_lo, full_hi, offs_m, offs_d, d_ok, sm_scale,
                   sig_bias, q_start, k_start, Nq, Nk, QSEG, KSEG, b, False, CAUSAL, WINDOW, HAS_SEG, SIGMOID, PREC,
                   BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, skn, svn, full_hi, hi, offs_m, offs_d, d_ok, sm_scale, sig_bias,
                   q_start, k_start, Nq, Nk, QSEG, KSEG, b, True, CAUSAL, WINDOW, HAS_SEG, SIGMOID, PREC, BLOCK_N)
    tl.store(DQ + bh * Nq * D + offs_m[:, None] * D + offs_d[None, :], dq * sm_scale,
             mask=m_ok[:, None] & d_ok[None, :])


def _prepare(q: Tensor, k: Tensor, v: Tensor, q_seg: Tensor | None, k_seg: Tensor | None):
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"flash_attn needs head_dim of q ({q.shape[-1]}) == of v ({v.shape[-1]})")
    if q.shape[-1] > 256:
        raise ValueError(f"flash_attn supports head_dim <= 256, got {q.shape[-1]}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    return q, k, v, _segment_args(q, q_seg, k_seg)


def doc_ranges(q_seg: Tensor, k_seg: Tensor) -> tuple[Tensor, Tensor]:
    """Per query, the span [start, end) of the keys of its document; per key, that of its document's queries:
    int32 [B, 2, Nq] and [B, 2, Nk] by binary search, on the device (no host sync). A batch row whose ids
    decrease somewhere (not packing) gets -1 throughout: the kernels mask its every tile instead."""
    q_seg, k_seg = q_seg.contiguous(), k_seg.to(q_seg.dtype).contiguous()
    packed = (_non_decreasing(q_seg) & _non_decreasing(k_seg))[:, None, None]  # [B, 1, 1]
    return tuple(torch.where(packed, spans, -1) for spans in (_spans(k_seg, q_seg), _spans(q_seg, k_seg)))


def _non_decreasing(seg: Tensor) -> Tensor:
    """[B] bool: the row's ids never decrease."""
    return (seg[:, 1:] >= seg[:, :-1]).all(1)


def _spans(sorted_ids: Tensor, ids: Tensor) -> Tensor:
    """[B, 2, len(ids)]: where each id's run starts and ends in sorted_ids (start == end when it has none)."""
    starts = torch.searchsorted(sorted_ids, ids)
    ends = torch.searchsorted(sorted_ids, ids, right=True)
    return torch.stack([starts, ends], 1).to(torch.int32).contiguous()


def _segment_args(q: Tensor, q_seg: Tensor | None, k_seg: Tensor | None) -> tuple[tuple, bool]:
    """((QSEG, KSEG, QDOC, KDOC) kernel arguments, HAS_SEG); q stands in for the unused ones."""
    if q_seg is None:
        return (q, q, q, q), False
    return (q_seg.contiguous(), k_seg.contiguous(), *doc_ranges(q_seg, k_seg)), True


def _meta(q: Tensor, causal: bool, window: int | None, has_seg: bool, kind: str) -> dict:
    return dict(CAUSAL=causal, WINDOW=window or 0, HAS_SEG=has_seg, SIGMOID=kind == "sigmoid",
                PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
                BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True,
                      window: int | None = None, q_seg: Tensor | None = None, k_seg: Tensor | None = None,
                      q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                      sigmoid_bias: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """(out [B, Hq, Nq, D] fp32, lse [B, Hq, Nq] fp32 or None for sigmoid), like reference.attention_forward."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    q, k, v, (segs, has_seg) = _prepare(q, k, v, q_seg, k_seg)
    # [B, Nq, Hq, D] in memory, as the output projection reads it: the model's transpose and reshape are views
    out = torch.empty(B, Nq, Hq, D, device=q.device, dtype=torch.float32).transpose(1, 2)
    lse = torch.empty(B, Hq, Nq, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    _fwd_kernel[grid](q, k, v, out, lse, *segs, scale, sigmoid_bias, q_start, k_start, Nq, Nk, Hq, Hq // Hkv, D,
                      *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                      **_meta(q, causal, window, has_seg, kind))
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
    q, k, v, (segs, has_seg) = _prepare(q, k, v, q_seg, k_seg)
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
    meta = _meta(q, causal, window, has_seg, kind)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, *segs, scale, sigmoid_bias, q_start, k_start, Nq, Nk, Hkv, Hq // Hkv, D,
        *strides, **meta)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * Hq)](
        q, k, v, dout, lse, delta, dq, *segs, scale, sigmoid_bias, q_start, k_start, Nq, Nk, Hq, Hq // Hkv, D,
        *strides, **meta)
    dt = acc_dtype(q)
    return dq.to(dt), dk.to(dt), dv.to(dt)
