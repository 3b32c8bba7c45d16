"""Fused Triton kernels for the per-layer steps of linear-attention SP (LASP-1/2, ZeCO).

sp_correction: out + (scale q exp(b) mask) @ S_r without materialising the decayed queries; its backward
gives dq, db and the state gradient (one [Dk, Dv] partial per row tile, summed here).
state_combine: diag(A) S_in + M in one pass. Same signatures as the torch reference.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 32


@triton.jit
def _correction_fwd_kernel(OUT, OUT_IN, Q, BC, FROM, S, scale, N, H, DK, DV, sbn, sbk,
                           HAS_FROM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    pid_v = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    q = tl.load(Q + (bh * N + rows[:, None]) * DK + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b = tl.load(BC + (bh * N + rows[:, None]) * sbn + offs_k[None, :] * sbk, mask=row_ok[:, None] & k_ok[None, :],
                other=0.0)
    weight = scale * tl.exp(b)
    if HAS_FROM:
        weight = weight * tl.load(FROM + (bh // H) * N + rows, mask=row_ok, other=0.0)[:, None]
    s = tl.load(S + (bh * DK + offs_k[:, None]) * DV + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :],
                other=0.0)
    out_mask = row_ok[:, None] & v_ok[None, :]
    out = tl.load(OUT_IN + (bh * N + rows[:, None]) * DV + offs_v[None, :], mask=out_mask, other=0.0)
    out += tl.dot(q * weight, s, input_precision="ieee")
    tl.store(OUT + (bh * N + rows[:, None]) * DV + offs_v[None, :], out, mask=out_mask)


@triton.jit
def _correction_bwd_kernel(DOUT, Q, BC, FROM, S, DQ, DB, DS, scale, N, H, DK, DV, sbn, sbk,
                           HAS_FROM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    row_ok = rows < N
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    qk_mask = row_ok[:, None] & k_ok[None, :]
    q = tl.load(Q + (bh * N + rows[:, None]) * DK + offs_k[None, :], mask=qk_mask, other=0.0)
    b = tl.load(BC + (bh * N + rows[:, None]) * sbn + offs_k[None, :] * sbk, mask=qk_mask, other=0.0)
    weight = scale * tl.exp(b)
    if HAS_FROM:
        weight = weight * tl.load(FROM + (bh // H) * N + rows, mask=row_ok, other=0.0)[:, None]
    s = tl.load(S + (bh * DK + offs_k[:, None]) * DV + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :],
                other=0.0)
    dout = tl.load(DOUT + (bh * N + rows[:, None]) * DV + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :],
                   other=0.0)
    q_decayed = q * weight
    dq_decayed = tl.dot(dout, tl.trans(s), input_precision="ieee")
    tl.store(DQ + (bh * N + rows[:, None]) * DK + offs_k[None, :], dq_decayed * weight, mask=qk_mask)
    tl.store(DB + (bh * N + rows[:, None]) * DK + offs_k[None, :], q_decayed * dq_decayed, mask=qk_mask)
    ds = tl.dot(tl.trans(q_decayed), dout, input_precision="ieee")
    tl.store(DS + ((pid_n * tl.num_programs(1) + bh) * DK + offs_k[:, None]) * DV + offs_v[None, :], ds,
             mask=k_ok[:, None] & v_ok[None, :])


@triton.jit
def _combine_kernel(OUT, A, S_IN, M, DK, DV, sak, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mask = (offs_k < DK)[:, None] & (offs_v < DV)[None, :]
    idx = (bh * DK + offs_k[:, None]) * DV + offs_v[None, :]
    a = tl.load(A + bh * (sak * DK + (1 - sak)) + offs_k * sak, mask=offs_k < DK, other=0.0)
    out = a[:, None] * tl.load(S_IN + idx, mask=mask, other=0.0) + tl.load(M + idx, mask=mask, other=0.0)
    tl.store(OUT + idx, out, mask=mask)


def _blocks(DK: int, DV: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(DK)), max(16, triton.next_power_of_2(DV))


def _decay_strides(b: Tensor) -> tuple[int, int]:
    """(row stride, channel stride) of the cumulative decay: channel stride 0 broadcasts a scalar decay."""
    return b.shape[-1], (1 if b.shape[-1] > 1 else 0)


def sp_correction(out: Tensor, q: Tensor, b: Tensor, from_state: Tensor | None, scale: float,
                  state: Tensor) -> Tensor:
    """out + (scale q exp(b) [no document start yet]) @ state, fused (fp32)."""
    B, H, N, DK = q.shape
    DV = state.shape[-1]
    q, b, state = (t.float().contiguous() for t in (q, b, state))
    out_in = out.float().contiguous()
    result = torch.empty_like(out_in)
    block_k, block_v = _blocks(DK, DV)
    block_v = min(block_v, 64)
    frm = from_state.float().contiguous() if from_state is not None else q
    _correction_fwd_kernel[(triton.cdiv(N, BLOCK_N), B * H, triton.cdiv(DV, block_v))](
        result, out_in, q, b, frm, state, scale, N, H, DK, DV, *_decay_strides(b), HAS_FROM=from_state is not None,
        BLOCK_N=BLOCK_N, BLOCK_K=block_k, BLOCK_V=block_v)
    return result


def sp_correction_backward(dout: Tensor, q: Tensor, b: Tensor, from_state: Tensor | None, scale: float,
                           state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, db shaped like b, dstate) of sp_correction, fused (fp32)."""
    B, H, N, DK = q.shape
    DV = state.shape[-1]
    q, b, state, dout = (t.float().contiguous() for t in (q, b, state, dout))
    n_tiles = triton.cdiv(N, BLOCK_N)
    dq = torch.empty_like(q)
    db = torch.empty_like(q)
    ds_tiles = torch.empty(n_tiles, B, H, DK, DV, device=q.device, dtype=torch.float32)
    block_k, block_v = _blocks(DK, DV)
    frm = from_state.float().contiguous() if from_state is not None else q
    _correction_bwd_kernel[(n_tiles, B * H)](
        dout, q, b, frm, state, dq, db, ds_tiles, scale, N, H, DK, DV, *_decay_strides(b),
        HAS_FROM=from_state is not None, BLOCK_N=BLOCK_N, BLOCK_K=block_k, BLOCK_V=block_v)
    return dq, (db.sum(-1, keepdim=True) if b.shape[-1] == 1 else db), ds_tiles.sum(0)


def state_combine(decay: Tensor, state_in: Tensor, state: Tensor) -> Tensor:
    """diag(decay) state_in + state in one pass; decay [B, H, Dk|1], states [B, H, Dk, Dv] (fp32)."""
    B, H, DK, DV = state.shape
    decay, state_in, state = (t.float().contiguous() for t in (decay, state_in, state))
    out = torch.empty_like(state)
    block_k, block_v = _blocks(DK, DV)
    _combine_kernel[(B * H,)](out, decay, state_in, state, DK, DV, 1 if decay.shape[-1] > 1 else 0,
                              BLOCK_K=block_k, BLOCK_V=block_v)
    return out
