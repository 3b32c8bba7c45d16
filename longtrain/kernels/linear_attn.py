"""Chunked gated linear attention in Triton: state in, outputs and final state out.

One program per (batch, head, Dv block) walks the chunks in order with the [Dk, Dv] state in
registers: inter-chunk readout (q * exp(b)) @ S, intra-chunk decayed scores, then the state update
S = diag(exp(b_last)) S + (k * exp(b_last - b))^T v. Every exponent is a decay difference <= 0 inside
one chunk (the intra-chunk scores are built key row by key row for that reason), so strong decay
underflows instead of overflowing. Decay may be none, scalar per head or per key channel; document
starts reset the state. The backward walks the chunks in reverse with the state gradient in registers,
from the chunk states the forward stored.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from longtrain.kernels.reference import acc_dtype, resets_from_segments

CHUNK = 16


@triton.jit
def _chunk_fwd_kernel(Q, K, V, G, R, S0, OUT, SN, HS, scale, N, H, DK, DV, sgn, sgk,
                      HAS_S0: tl.constexpr, STORE_STATES: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
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
        if STORE_STATES:
            tl.store(HS + ((bh * tl.cdiv(N, CHUNK) + c0 // CHUNK) * DK + offs_k[:, None]) * DV + offs_v[None, :],
                     state, mask=k_ok[:, None] & v_ok[None, :])
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


@triton.jit
def _chunk_bwd_kernel(Q, K, V, G, R, HS, DO, DSN, DQ, DK_, DV_, DS0, DBL, scale, N, H, DK, DV, sgn, sgk,
                      HAS_DSN: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """Chunks in reverse with dS (the gradient of the state leaving the chunk) in registers.

    Writes this Dv block's share of dq (w.r.t. scale*q) and dk, its dv, dS0, and per chunk the decay
    term sum_v dS_out * S_out that belongs to the chunk's last token; the caller sums the Dv blocks and
    turns q*dq - k*dk into the log-decay gradient.
    """
    bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = bh // H
    n_chunks = tl.cdiv(N, CHUNK)
    offs_t = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    kv_mask = k_ok[:, None] & v_ok[None, :]
    base = bh * N
    dstate = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
    if HAS_DSN:
        dstate = tl.load(DSN + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=kv_mask, other=0.0)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        c0 = c * CHUNK
        rows = c0 + offs_t
        row_ok = rows < N
        qk_mask = row_ok[:, None] & k_ok[None, :]
        rv_mask = row_ok[:, None] & v_ok[None, :]
        q = tl.load(Q + (base + rows[:, None]) * DK + offs_k[None, :], mask=qk_mask, other=0.0) * scale
        k = tl.load(K + (base + rows[:, None]) * DK + offs_k[None, :], mask=qk_mask, other=0.0)
        v = tl.load(V + (base + rows[:, None]) * DV + offs_v[None, :], mask=rv_mask, other=0.0)
        do = tl.load(DO + (base + rows[:, None]) * DV + offs_v[None, :], mask=rv_mask, other=0.0)
        g = tl.load(G + (base + rows[:, None]) * sgn + offs_k[None, :] * sgk, mask=qk_mask, other=0.0)
        seen = tl.cumsum(tl.load(R + b * N + rows, mask=row_ok, other=0), 0)
        from_state = (seen == 0).to(tl.float32)
        to_state = (seen == tl.max(seen, 0)).to(tl.float32)
        carry = tl.min(from_state, 0)
        bcum = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)
        state_in = tl.load(HS + ((bh * n_chunks + c) * DK + offs_k[:, None]) * DV + offs_v[None, :], mask=kv_mask,
                           other=0.0)
        # the state leaving the chunk: S_out = exp(b_last) carry S_in + (k exp(b_last - b) to)^T v
        out_decay = tl.exp(b_last[None, :] - bcum) * to_state[:, None]
        k_out = k * out_decay
        state_out = state_in * (tl.exp(b_last) * carry)[:, None] + tl.dot(tl.trans(k_out), v, input_precision="ieee")
        tl.store(DBL + ((pid_v * tl.num_programs(0) + bh) * n_chunks + c) * DK + offs_k,
                 tl.sum(dstate * state_out, 1), mask=k_ok)
        dv = tl.dot(k_out, dstate, input_precision="ieee")
        dk = tl.dot(v, tl.trans(dstate), input_precision="ieee") * out_decay
        # inter-chunk readout: o += (q exp(b) from) S_in
        in_decay = tl.exp(bcum) * from_state[:, None]
        dq = tl.dot(do, tl.trans(state_in), input_precision="ieee") * in_decay
        dstate = dstate * (tl.exp(b_last) * carry)[:, None] + tl.dot(tl.trans(q * in_decay), do,
                                                                     input_precision="ieee")
        # intra-chunk pairs, key row by key row (exponents <= 0)
        b_run = tl.zeros([BLOCK_K], tl.float32)
        seen_s = tl.zeros([1], tl.int32)
        for s in range(0, CHUNK):
            row = c0 + s
            s_ok = (row + tl.arange(0, 1)) < N
            k_s = tl.load(K + (base + row) * DK + offs_k, mask=k_ok & s_ok, other=0.0)
            v_s = tl.load(V + (base + row) * DV + offs_v, mask=v_ok & s_ok, other=0.0)
            b_run += tl.load(G + (base + row) * sgn + offs_k * sgk, mask=k_ok & s_ok, other=0.0)
            seen_s += tl.load(R + b * N + row + tl.arange(0, 1), mask=s_ok, other=0)
            visible = (offs_t >= s) & (seen == seen_s) & row_ok
            decay = tl.exp(tl.where(visible[:, None], bcum - b_run[None, :], float("-inf")))  # [CHUNK, BLOCK_K]
            score = tl.sum(q * k_s[None, :] * decay, 1)  # A[:, s]
            dscore = tl.where(visible, tl.sum(do * v_s[None, :], 1), 0.0)  # dA[:, s]
            is_s = (offs_t == s).to(tl.float32)[:, None]
            dv += is_s * tl.sum(score[:, None] * do, 0)[None, :]
            dq += dscore[:, None] * k_s[None, :] * decay
            dk += is_s * tl.sum(dscore[:, None] * q * decay, 0)[None, :]
        part = (pid_v * tl.num_programs(0) + bh) * N
        tl.store(DQ + (part + rows[:, None]) * DK + offs_k[None, :], dq, mask=qk_mask)
        tl.store(DK_ + (part + rows[:, None]) * DK + offs_k[None, :], dk, mask=qk_mask)
        tl.store(DV_ + (base + rows[:, None]) * DV + offs_v[None, :], dv, mask=rv_mask)
    tl.store(DS0 + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], dstate, mask=kv_mask)


def kernel_inputs(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, segment_ids: Tensor | None):
    """fp32 contiguous q, k, v, the decay as [B, H, N, 1 or Dk], and int32 document-start flags [B, N]."""
    B, H, N, _ = q.shape
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    if log_decay is None:
        g = q.new_zeros(B, H, N, 1)
    else:
        g = (log_decay[..., None] if log_decay.dim() == 3 else log_decay).float().contiguous()
    resets = resets_from_segments(segment_ids, N, q.device)
    resets = torch.zeros(B, N, dtype=torch.int32, device=q.device) if resets is None else resets.int().contiguous()
    return q, k, v, g, resets


def block_sizes(DK: int, DV: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(DK)), min(64, max(16, triton.next_power_of_2(DV)))


def chunk_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, log_decay: Tensor | None,
                  initial_state: Tensor | None, segment_ids: Tensor | None,
                  store_states: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """(out [B, H, N, Dv], final_state [B, H, Dk, Dv], states entering each chunk or None), all fp32."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    q, k, v, g, resets = kernel_inputs(q, k, v, log_decay, segment_ids)
    out = torch.empty(B, H, N, DV, device=q.device, dtype=torch.float32)
    final = torch.empty(B, H, DK, DV, device=q.device, dtype=torch.float32)
    states = torch.empty(B, H, triton.cdiv(N, CHUNK), DK, DV, device=q.device, dtype=torch.float32) \
        if store_states else final
    s0 = initial_state.float().contiguous() if initial_state is not None else final
    block_k, block_v = block_sizes(DK, DV)
    _chunk_fwd_kernel[(B * H, triton.cdiv(DV, block_v))](
        q, k, v, g, resets, s0, out, final, states, scale, N, H, DK, DV, g.shape[-1], 1 if g.shape[-1] > 1 else 0,
        HAS_S0=initial_state is not None, STORE_STATES=store_states, CHUNK=CHUNK, BLOCK_K=block_k, BLOCK_V=block_v)
    return out, final, (states if store_states else None)


def chunk_backward(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, segment_ids: Tensor | None,
                   states: Tensor, dout: Tensor, dfinal: Tensor | None, scale: float):
    """(dq, dk, dv, dlog_decay or None, dinitial_state), fp32, from the reverse-chunk kernel."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    q, k, v, g, resets = kernel_inputs(q, k, v, log_decay, segment_ids)
    block_k, block_v = block_sizes(DK, DV)
    nv, nc = triton.cdiv(DV, block_v), triton.cdiv(N, CHUNK)
    dq_parts = torch.empty(nv, B, H, N, DK, device=q.device, dtype=torch.float32)
    dk_parts = torch.empty_like(dq_parts)
    dv = torch.empty(B, H, N, DV, device=q.device, dtype=torch.float32)
    ds0 = torch.empty(B, H, DK, DV, device=q.device, dtype=torch.float32)
    last_terms = torch.empty(nv, B, H, nc, DK, device=q.device, dtype=torch.float32)
    dfinal = dfinal.float().contiguous() if dfinal is not None else ds0
    _chunk_bwd_kernel[(B * H, nv)](
        q, k, v, g, resets, states, dout.float().contiguous(), dfinal, dq_parts, dk_parts, dv, ds0, last_terms,
        scale, N, H, DK, DV, g.shape[-1], 1 if g.shape[-1] > 1 else 0, HAS_DSN=dfinal is not ds0, CHUNK=CHUNK,
        BLOCK_K=block_k, BLOCK_V=block_v)
    dq_scaled, dk = dq_parts.sum(0), dk_parts.sum(0)
    dg = None
    if log_decay is not None:
        # d(cumulative decay b_t) = q_t dq_t - k_t dk_t, plus sum_v dS_out * S_out at each chunk's last token
        db = q * scale * dq_scaled - k * dk
        last = torch.clamp(torch.arange(1, nc + 1, device=q.device) * CHUNK, max=N) - 1
        db[:, :, last] += last_terms.sum(0)
        db = torch.nn.functional.pad(db, (0, 0, 0, nc * CHUNK - N)).view(B, H, nc, CHUNK, DK)
        dg = db.flip(3).cumsum(3).flip(3).reshape(B, H, nc * CHUNK, DK)[:, :, :N]  # b is a cumsum of g per chunk
        dg = dg.sum(-1) if log_decay.dim() == 3 else dg
    return dq_scaled * scale, dk, dv, dg, ds0


class ChunkedLinearAttention(torch.autograd.Function):
    """Triton forward (storing each chunk's entering state) and Triton reverse-chunk backward."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, segment_ids, scale):
        out, final, states = chunk_forward(q, k, v, scale, log_decay, initial_state, segment_ids, store_states=True)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, segment_ids, states)
        ctx.scale = scale
        return out.to(q.dtype), final.to(acc_dtype(q))

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, log_decay, initial_state, segment_ids, states = ctx.saved_tensors
        dq, dk, dv, dg, ds0 = chunk_backward(q, k, v, log_decay, segment_ids, states, dout, dfinal, ctx.scale)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dg is None else dg.to(log_decay.dtype),
                None if initial_state is None else ds0.to(initial_state.dtype), None, None)


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, *, scale: float, log_decay: Tensor | None = None,
                             initial_state: Tensor | None = None, output_final_state: bool = False,
                             segment_ids: Tensor | None = None,
                             chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Same contract as reference.linear_attention_chunked; the kernels use their own chunk size (CHUNK)."""
    out, final = ChunkedLinearAttention.apply(q, k, v, log_decay, initial_state, segment_ids, scale)
    return out, (final if output_final_state else None)
