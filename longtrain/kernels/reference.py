"""Pure-PyTorch reference kernels: blockwise attention (softmax, sigmoid) and chunked linear attention.

Shapes are [B, H, N, D]. Attention runs tile by tile (online softmax forward, FlashAttention-2
backward), so no N x N matrix is ever built; fully masked tiles are skipped. The Triton kernels
in this package expose exactly these signatures.
"""
import math
from collections.abc import Callable

import torch
from torch import Tensor

BLOCK = 256


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tile_is_masked(q_lo: int, q_hi: int, k_lo: int, k_hi: int, causal: bool, window: int | None) -> bool:
    """True when every (query, key) pair of the tile of positions [q_lo, q_hi) x [k_lo, k_hi) is masked."""
    if causal and k_lo > q_hi - 1:
        return True
    if window is not None and k_hi - 1 <= q_lo - window:
        return True
    return False


def tile_mask(q_pos: Tensor, k_pos: Tensor, causal: bool, window: int | None,
              q_seg: Tensor | None, k_seg: Tensor | None) -> Tensor | None:
    """Boolean mask of allowed pairs, broadcastable to [B, 1, 1, nq, nk] (GQA layout), or None."""
    mask = None
    if causal:
        mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        in_window = k_pos[None, :] > q_pos[:, None] - window
        mask = in_window if mask is None else mask & in_window
    if q_seg is not None:
        same_doc = q_seg[:, None, None, :, None] == k_seg[:, None, None, None, :]
        mask = same_doc if mask is None else mask & same_doc
    return mask


def key_tiles(q_tile: Tensor, k: Tensor, v: Tensor, qa: int, qb: int, scale: float, causal: bool,
              window: int | None, q_seg: Tensor | None, k_seg: Tensor | None, q_start: int, k_start: int):
    """(ka, kb, v_tile, scaled scores [B, Hkv, G, nq, nk], mask) of every key tile query rows [qa, qb) can see."""
    q_pos = torch.arange(q_start + qa, q_start + qb, device=q_tile.device)
    for ka in range(0, k.shape[2], BLOCK):
        kb = min(ka + BLOCK, k.shape[2])
        if tile_is_masked(q_start + qa, q_start + qb, k_start + ka, k_start + kb, causal, window):
            continue
        scores = q_tile @ k[:, :, None, ka:kb].to(q_tile.dtype).transpose(-1, -2) * scale
        mask = tile_mask(q_pos, torch.arange(k_start + ka, k_start + kb, device=q_tile.device), causal, window,
                         None if q_seg is None else q_seg[:, qa:qb], None if k_seg is None else k_seg[:, ka:kb])
        yield ka, kb, v[:, :, None, ka:kb].to(q_tile.dtype), scores, mask


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True,
                      window: int | None = None, q_seg: Tensor | None = None, k_seg: Tensor | None = None,
                      q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                      sigmoid_bias: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """Blockwise attention forward. Returns (out [B, Hq, Nq, Dv] in acc dtype, lse [B, Hq, Nq] or None).

    kind="softmax": online softmax, lse = logsumexp of the scaled scores (-inf, out 0 for empty rows).
    kind="sigmoid": out = sum_j sigmoid(s_ij + sigmoid_bias) v_j over allowed j; no lse.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    dt = acc_dtype(q)
    out = q.new_zeros(B, Hkv, G, Nq, Dv, dtype=dt)
    lse = q.new_full((B, Hkv, G, Nq), -math.inf, dtype=dt) if kind == "softmax" else None
    qg = q.view(B, Hkv, G, Nq, D)
    for qa in range(0, Nq, BLOCK):
        qb = min(qa + BLOCK, Nq)
        q_tile = qg[:, :, :, qa:qb].to(dt)  # [B, Hkv, G, nq, D]
        m = q_tile.new_full(q_tile.shape[:-1], -math.inf)
        row_sum = q_tile.new_zeros(q_tile.shape[:-1])
        acc = q_tile.new_zeros(*q_tile.shape[:-1], Dv)
        for ka, kb, v_tile, s, mask in key_tiles(q_tile, k, v, qa, qb, scale, causal, window, q_seg, k_seg,
                                                 q_start, k_start):
            if kind == "sigmoid":
                p = torch.sigmoid(s + sigmoid_bias)
                if mask is not None:
                    p = p.masked_fill(~mask, 0.0)
                acc = acc + p @ v_tile
                continue
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            row_sum = row_sum * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v_tile
            m = m_new
        if kind == "sigmoid":
            out[:, :, :, qa:qb] = acc
            continue
        out[:, :, :, qa:qb] = torch.where(row_sum[..., None] > 0, acc / row_sum.clamp_min(1e-30)[..., None], 0.0)
        lse[:, :, :, qa:qb] = m + torch.log(row_sum)
    out = out.view(B, Hq, Nq, Dv)
    return out, (None if lse is None else lse.view(B, Hq, Nq))


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None, lse: Tensor | None, *,
                       scale: float, causal: bool = True, window: int | None = None, q_seg: Tensor | None = None,
                       k_seg: Tensor | None = None, q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                       sigmoid_bias: float = 0.0, delta: Tensor | None = None,
                       dlse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Blockwise attention backward (FlashAttention-2: recompute P from lse, delta = rowsum(dO * O)).

    For a ring block, `out`/`lse`/`delta` are the merged (global) values. Returns dq, dk, dv in acc dtype.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    dt = acc_dtype(q)
    dq = q.new_zeros(B, Hkv, G, Nq, D, dtype=dt)
    dk = q.new_zeros(B, Hkv, Nk, D, dtype=dt)
    dv = q.new_zeros(B, Hkv, Nk, Dv, dtype=dt)
    qg = q.view(B, Hkv, G, Nq, D)
    dog = dout.view(B, Hkv, G, Nq, Dv)
    if kind == "softmax":
        if delta is None:
            delta = (dout.to(dt) * out.to(dt)).sum(-1)
        delta = delta.to(dt).view(B, Hkv, G, Nq)
        if dlse is not None:
            delta = delta - dlse.to(dt).view(B, Hkv, G, Nq)
        lse = lse.to(dt).view(B, Hkv, G, Nq)
        lse = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    for qa in range(0, Nq, BLOCK):
        qb = min(qa + BLOCK, Nq)
        q_tile = qg[:, :, :, qa:qb].to(dt)
        do_tile = dog[:, :, :, qa:qb].to(dt)
        for ka, kb, v_tile, s, mask in key_tiles(q_tile, k, v, qa, qb, scale, causal, window, q_seg, k_seg,
                                                 q_start, k_start):
            k_tile = k[:, :, None, ka:kb].to(dt)
            dp = do_tile @ v_tile.transpose(-1, -2)
            if kind == "sigmoid":
                p = torch.sigmoid(s + sigmoid_bias)
                ds = dp * p * (1 - p)
                if mask is not None:
                    p = p.masked_fill(~mask, 0.0)
                    ds = ds.masked_fill(~mask, 0.0)
            else:
                if mask is not None:
                    s = s.masked_fill(~mask, -math.inf)
                p = torch.exp(s - lse[:, :, :, qa:qb, None])
                ds = p * (dp - delta[:, :, :, qa:qb, None])
            dv[:, :, ka:kb] += (p.transpose(-1, -2) @ do_tile).sum(2)
            dq[:, :, :, qa:qb] += ds @ k_tile * scale
            dk[:, :, ka:kb] += (ds.transpose(-1, -2) @ q_tile).sum(2) * scale
    return dq.view(B, Hq, Nq, D), dk, dv


def merge_partials(out: Tensor, lse: Tensor, out_blk: Tensor, lse_blk: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two softmax partials over disjoint key sets, overflow-safe and NaN-free for empty rows.

    out -= sigmoid(lse_blk - lse) * (out - out_blk); lse = logaddexp(lse, lse_blk).
    """
    diff = torch.where(torch.isneginf(lse_blk), lse_blk, lse_blk - lse)
    weight = torch.sigmoid(diff)[..., None]
    return out - weight * (out - out_blk), torch.logaddexp(lse, lse_blk)


def resets_from_segments(segment_ids: Tensor | None, n: int, device) -> Tensor | None:
    """Document starts inside this call: reset[t] = seg[t] != seg[t-1] for t > 0 (token 0 never resets)."""
    if segment_ids is None:
        return None
    reset = torch.zeros(segment_ids.shape[0], n, dtype=torch.bool, device=device)
    reset[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return reset


def decay_shape(log_decay: Tensor | None, q: Tensor) -> Tensor:
    """log_decay as [B, H, N, Dk or 1] in acc dtype (zeros when None)."""
    B, H, N, _ = q.shape
    if log_decay is None:
        return q.new_zeros(B, H, N, 1, dtype=acc_dtype(q))
    g = log_decay.to(acc_dtype(q))
    return g[..., None] if g.dim() == 3 else g


def chunk_inputs(x: Tensor, C: int) -> Tensor:
    """Zero-pad [B, H, N, D] along N to a multiple of C and view it as [B, H, N/C, C, D]."""
    B, H, N, D = x.shape
    pad = (-N) % C
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(B, H, (N + pad) // C, C, D)


def chunk_resets(segment_ids: Tensor | None, n: int, C: int, device) -> Tensor | None:
    """Per chunk, the number of document starts seen so far inside the chunk (inclusive), [B, 1, nc, C]."""
    reset = resets_from_segments(segment_ids, n, device)
    if reset is None:
        return None
    reset = torch.nn.functional.pad(reset, (0, (-n) % C))
    return reset.view(reset.shape[0], 1, -1, C).long().cumsum(-1)


def chunk_states(ks: Tensor, vs: Tensor, b: Tensor, resets: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each chunk's own final state [B, H, nc, Dk, Dv] and its carry decay [B, H, nc, Dk|1, 1]."""
    b_last = b[:, :, :, -1:]
    to_state, carry = 1.0, 1.0
    if resets is not None:
        to_state = (resets == resets[..., -1:])[..., None].to(b.dtype)  # token in the chunk's last document
        carry = (resets[..., -1] == 0)[..., None].to(b.dtype)  # no document start inside the chunk
    state = (ks * torch.exp(b_last - b) * to_state).transpose(-1, -2) @ vs
    return state, (torch.exp(b_last[:, :, :, 0]) * carry)[..., None]


def scan_states(chunk_state: Tensor, chunk_decay: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """Sequential inter-chunk recurrence; returns (state entering each chunk [B, H, nc, Dk, Dv], final)."""
    state, entering = initial, []
    for c in range(chunk_state.shape[2]):
        entering.append(state)
        state = chunk_decay[:, :, c] * state + chunk_state[:, :, c]
    return torch.stack(entering, 2), state


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, *, scale: float, log_decay: Tensor | None = None,
                             initial_state: Tensor | None = None, output_final_state: bool = False,
                             segment_ids: Tensor | None = None, chunk_size: int = 64,
                             on_final_state: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Chunked linear attention: quadratic inside a chunk, state passing between chunks.

    Every exponent is a cumulative decay difference that is <= 0, so strong decay underflows to 0
    instead of overflowing. Differentiable through torch autograd; O(N) time and memory.
    on_final_state(final.detach()) runs once the final state exists, before the output products (SP
    algorithms start their communication there).
    """
    B, H, N, Dk = q.shape
    dt = acc_dtype(q)
    C = chunk_size
    qs, ks, vs = chunk_inputs(q.to(dt) * scale, C), chunk_inputs(k.to(dt), C), chunk_inputs(v.to(dt), C)
    b = chunk_inputs(decay_shape(log_decay, q), C).cumsum(3)  # cumulative log decay in each chunk
    resets = chunk_resets(segment_ids, N, C, q.device)
    pair_ok = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    from_state = 1.0
    if resets is not None:
        pair_ok = pair_ok & (resets[..., :, None] == resets[..., None, :])  # no document start in (s, t]
        from_state = (resets == 0)[..., None].to(dt)  # token still continues the incoming state
    gap = b[:, :, :, :, None] - b[:, :, :, None, :]  # [B, H, nc, C, C, Dk|1], <= 0 where t >= s
    decay_ts = torch.exp(torch.where(pair_ok[..., None], gap, -math.inf))
    if b.shape[-1] == 1:
        scores = (qs @ ks.transpose(-1, -2)) * decay_ts[..., 0]
    else:
        scores = torch.einsum("bhctd,bhcsd,bhctsd->bhcts", qs, ks, decay_ts)
    chunk_state, chunk_decay = chunk_states(ks, vs, b, resets)
    initial = q.new_zeros(B, H, Dk, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    entering, final = scan_states(chunk_state, chunk_decay, initial)
    if on_final_state is not None:
        on_final_state(final.detach())
    out = scores @ vs + (qs * torch.exp(b) * from_state) @ entering
    out = out.view(B, H, -1, v.shape[-1])[:, :, :N].to(q.dtype)
    return out, (final if output_final_state else None)


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, *, scale: float, log_decay: Tensor | None = None,
                               initial_state: Tensor | None = None, output_final_state: bool = False,
                               segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Token-by-token recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t. Tests only."""
    B, H, N, Dk = q.shape
    dt = acc_dtype(q)
    g = decay_shape(log_decay, q)
    reset = resets_from_segments(segment_ids, N, q.device)
    state = q.new_zeros(B, H, Dk, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(N):
        keep = torch.exp(g[:, :, t])[..., None]  # [B, H, Dk|1, 1]
        if reset is not None:
            keep = keep * (~reset[:, t]).to(dt)[:, None, None, None]
        state = keep * state + k[:, :, t, :, None].to(dt) * v[:, :, t, None, :].to(dt)
        outs.append(scale * (q[:, :, t, None, :].to(dt) @ state)[:, :, 0])
    out = torch.stack(outs, 2).to(q.dtype)
    return out, (state if output_final_state else None)


def state_combine(decay: Tensor, state_in: Tensor, state: Tensor) -> Tensor:
    """The SP state combine diag(A) S_in + M: decay [B, H, Dk|1] scales the rows of [B, H, Dk, Dv]."""
    return decay[..., None] * state_in + state


def sp_correction(out: Tensor, q: Tensor, b: Tensor, from_state: Tensor | None, scale: float,
                  state: Tensor) -> Tensor:
    """out + (scale q exp(b) [no document start yet]) @ state; b [B, H, N, Dk|1] is the slice's cumulative decay."""
    q_decayed = q.to(b.dtype) * scale * torch.exp(b)
    if from_state is not None:
        q_decayed = q_decayed * from_state[:, None, :, None]
    return out + q_decayed @ state


def sp_correction_backward(dout: Tensor, q: Tensor, b: Tensor, from_state: Tensor | None, scale: float,
                           state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sp_correction: (dq, db [like b], dstate)."""
    weight = scale * torch.exp(b)
    if from_state is not None:
        weight = weight * from_state[:, None, :, None]
    q_decayed = q.to(b.dtype) * weight
    dout = dout.to(b.dtype)
    dq_decayed = dout @ state.transpose(-1, -2)
    db = q_decayed * dq_decayed
    return dq_decayed * weight, (db.sum(-1, keepdim=True) if b.shape[-1] == 1 else db), \
        q_decayed.transpose(-1, -2) @ dout
