"""Chunked gated linear attention in Triton: state in, outputs and final state out.

One program per (batch, head, Dv block) walks the chunks in order with the [Dk, Dv] state in
registers: inter-chunk readout (q * exp(b)) @ S, intra-chunk decayed scores, then the state update
S = diag(exp(b_last)) S + (k * exp(b_last - b))^T v. Every exponent is a decay difference <= 0 inside
one chunk (the intra-chunk scores are built key row by key row for that reason), so strong decay
underflows instead of overflowing. Decay may be none, scalar per head or per key channel; document
starts reset the state. The backward recomputes through the torch reference (exact, not fused).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from longtrain.kernels import reference
from longtrain.kernels.reference import acc_dtype, resets_from_segments

CHUNK = 16


@triton.jit
def _chunk_fwd_kernel(Q, K, V, G, R, S0, OUT, SN, scale, N, H, DK, DV, sgn, sgk,
                      HAS_S0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = bh // H
    offs_t = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    qkv_base = bh * N
    state = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
    if HAS_S0:
        state = tl.load(S0 + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :],
                        mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    for c0 in range(0, N, CHUNK):
        rows = c0 + offs_t
        row_ok = rows < N
        qk_mask = row_ok[:, None] & k_ok[None, :]
        q = tl.load(Q + (qkv_base + rows[:, None]) * DK + offs_k[None, :], mask=qk_mask, other=0.0) * scale
        k = tl.load(K + (qkv_base + rows[:, None]) * DK + offs_k[None, :], mask=qk_mask, other=0.0)
        v = tl.load(V + (qkv_base + rows[:, None]) * DV + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :],
                    other=0.0)
        g = tl.load(G + (qkv_base + rows[:, None]) * sgn + offs_k[None, :] * sgk, mask=qk_mask, other=0.0)
        resets = tl.load(R + b * N + rows, mask=row_ok, other=0)
        seen = tl.cumsum(resets, 0)  # document starts so far in this chunk, inclusive
        from_state = (seen == 0).to(tl.float32)
        to_state = (seen == tl.max(seen, 0)).to(tl.float32)
        bcum = tl.cumsum(g, 0)  # [CHUNK, BLOCK_K]
        b_last = tl.sum(g, 0)  # [BLOCK_K]
        out = tl.dot(q * tl.exp(bcum) * from_state[:, None], state, input_precision="ieee")
        b_run = tl.zeros([BLOCK_K], tl.float32)
        seen_s = tl.zeros([1], tl.int32)
        for s in range(0, CHUNK):
            row = c0 + s
            s_ok = (row + tl.arange(0, 1)) < N  # [1], broadcast against the row's columns
            k_s = tl.load(K + (qkv_base + row) * DK + offs_k, mask=k_ok & s_ok, other=0.0)
            v_s = tl.load(V + (qkv_base + row) * DV + offs_v, mask=v_ok & s_ok, other=0.0)
            b_run += tl.load(G + (qkv_base + row) * sgn + offs_k * sgk, mask=k_ok & s_ok, other=0.0)
            seen_s += tl.load(R + b * N + row + tl.arange(0, 1), mask=s_ok, other=0)
            visible = (offs_t >= s) & (seen == seen_s)
            gap = tl.where(visible[:, None], bcum - b_run[None, :], float("-inf"))
            score = tl.sum(q * k_s[None, :] * tl.exp(gap), 1)  # [CHUNK]
            out += score[:, None] * v_s[None, :]
        tl.store(OUT + (qkv_base + rows[:, None]) * DV + offs_v[None, :], out, mask=row_ok[:, None] & v_ok[None, :])
        carry = tl.min(from_state, 0)  # 0 once a document starts inside the chunk
        k_decayed = k * tl.exp(b_last[None, :] - bcum) * to_state[:, None]
        state = state * (tl.exp(b_last) * carry)[:, None] + tl.dot(tl.trans(k_decayed), v, input_precision="ieee")
    tl.store(SN + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], state, mask=k_ok[:, None] & v_ok[None, :])


def chunk_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, log_decay: Tensor | None,
                  initial_state: Tensor | None, segment_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out [B, H, N, Dv] fp32, final_state [B, H, Dk, Dv] fp32) from the Triton kernel."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    if log_decay is None:
        g = q.new_zeros(B, H, N, 1)
    else:
        g = (log_decay[..., None] if log_decay.dim() == 3 else log_decay).float().contiguous()
    resets = resets_from_segments(segment_ids, N, q.device)
    resets = torch.zeros(B, N, dtype=torch.int32, device=q.device) if resets is None else resets.int().contiguous()
    out = torch.empty(B, H, N, DV, device=q.device, dtype=torch.float32)
    final = torch.empty(B, H, DK, DV, device=q.device, dtype=torch.float32)
    s0 = initial_state.float().contiguous() if initial_state is not None else final
    block_v = min(64, max(16, triton.next_power_of_2(DV)))
    grid = (B * H, triton.cdiv(DV, block_v))
    _chunk_fwd_kernel[grid](q, k, v, g, resets, s0, out, final, scale, N, H, DK, DV, g.shape[-1],
                            1 if g.shape[-1] > 1 else 0,
                            HAS_S0=initial_state is not None, CHUNK=CHUNK,
                            BLOCK_K=max(16, triton.next_power_of_2(DK)), BLOCK_V=block_v)
    return out, final


class ChunkedLinearAttention(torch.autograd.Function):
    """Triton forward; backward by recomputing the torch reference under autograd (exact)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, segment_ids, scale, chunk_size):
        out, final = chunk_forward(q, k, v, scale, log_decay, initial_state, segment_ids)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, segment_ids)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return out.to(q.dtype), final.to(acc_dtype(q))

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, log_decay, initial_state, segment_ids = ctx.saved_tensors
        inputs = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t
                  for t in (q, k, v, log_decay, initial_state)]
        with torch.enable_grad():
            out, final = reference.linear_attention_chunked(
                *inputs[:3], scale=ctx.scale, log_decay=inputs[3], initial_state=inputs[4], output_final_state=True,
                segment_ids=segment_ids, chunk_size=ctx.chunk_size)
            leaves = [t for t in inputs if t is not None]
            grads = iter(torch.autograd.grad([out, final], leaves, [dout, dfinal], allow_unused=True))
        return (*(next(grads) if t is not None else None for t in inputs), None, None, None)


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, *, scale: float, log_decay: Tensor | None = None,
                             initial_state: Tensor | None = None, output_final_state: bool = False,
                             segment_ids: Tensor | None = None,
                             chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Same contract as reference.linear_attention_chunked (chunk_size applies to the recomputed backward)."""
    out, final = ChunkedLinearAttention.apply(q, k, v, log_decay, initial_state, segment_ids, scale, chunk_size)
    return out, (final if output_final_state else None)
