"""Chunked gated linear attention in Triton: state in, outputs and final state out.

Split like flash-linear-attention's chunk kernels, so only the state recurrence is sequential:
- `_scan_kernel` walks the CHUNK-token chunks of one (batch, head, Dk block, Dv block) with the state in
  registers, matmuls only: S <- diag(exp(b_last)) S + (k exp(b_last - b))^T v. Run in reverse on
  (q, dO) it gives the state gradients.
- `_output_kernel` and `_grads_kernel` run one SUB-row tile each, in parallel over the whole sequence:
  readout of the chunk's entering state plus the tile's causal pairs inside its chunk.
b is the cumulative log decay inside each chunk (precomputed), so every exponent is a difference that is
<= 0 and strong decay underflows instead of overflowing. With a scalar decay per head the pairs are
plain tensor-core tiles masked by exp(b_t - b_s). With a decay per key channel, tiles below the diagonal
factor through the first row r of the query tile, (q exp(b - b_r)) (k exp(b_r - b))^T, both factors <= 1,
and the diagonal tile is built key row by key row. Document starts reset the state.
"""
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from longtrain.kernels.reference import acc_dtype, chunk_inputs, chunk_resets, decay_shape

CHUNK = 64  # state-passing granularity: the recurrence runs once per chunk
SUB = 16  # rows per intra-chunk tile


@triton.jit
def _rows(PTR, bh, rows, N, offs, ok, D):
    """[len(rows), len(offs)] of head bh's [N, D] matrix; zeros past row N or column D."""
    return tl.load(PTR + (bh * N + rows[:, None]) * D + offs[None, :], mask=(rows[:, None] < N) & ok[None, :],
                   other=0.0)


@triton.jit
def _decay(BC, bh, rows, NP, offs_k, k_ok, sbn, sbk):
    """Cumulative in-chunk log decay of `rows`, [len(rows), BLOCK_K] (a scalar decay broadcasts over Dk)."""
    return tl.load(BC + (bh * NP + rows[:, None]) * sbn + offs_k[None, :] * sbk, mask=k_ok[None, :], other=0.0)


@triton.jit
def _scan_kernel(X, Y, BC, SEEN, INIT, STATES, FINAL, x_scale, N, NP, H, DK, DV, sbn, sbk,
                 REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """S <- diag(exp(b_last) carry) S + (x w)^T y over the chunks, storing S before each chunk's update.

    Forward: x = k, y = v, w = exp(b_last - b) for tokens of the chunk's last document; STATES[c] is the
    state entering chunk c. Reverse: x = q, y = dO, w = scale exp(b) for tokens before the chunk's first
    document start; STATES[c] is the gradient of the state leaving chunk c, FINAL that of the initial state.
    """
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    b = bh // H
    n_chunks = NP // CHUNK
    offs_t = tl.arange(0, CHUNK)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    kv_mask = k_ok[:, None] & v_ok[None, :]
    state_offs = offs_k[:, None] * DV + offs_v[None, :]
    state = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
    if HAS_INIT:
        state = tl.load(INIT + bh * DK * DV + state_offs, mask=kv_mask, other=0.0)
    for step in range(n_chunks):
        if REVERSE:
            c = n_chunks - 1 - step
        else:
            c = step
        tl.store(STATES + (bh * n_chunks + c) * DK * DV + state_offs, state, mask=kv_mask)
        c0 = c * CHUNK
        rows = c0 + offs_t
        x = _rows(X, bh, rows, N, offs_k, k_ok, DK)
        y = _rows(Y, bh, rows, N, offs_v, v_ok, DV)
        bc = _decay(BC, bh, rows, NP, offs_k, k_ok, sbn, sbk)
        b_last = tl.load(BC + (bh * NP + c0 + CHUNK - 1) * sbn + offs_k * sbk, mask=k_ok, other=0.0)
        seen = tl.load(SEEN + b * NP + rows)
        seen_last = tl.load(SEEN + b * NP + c0 + CHUNK - 1)
        if REVERSE:
            w = tl.exp(bc) * (seen == 0).to(tl.float32)[:, None] * x_scale
        else:
            w = tl.exp(b_last[None, :] - bc) * (seen == seen_last).to(tl.float32)[:, None]
        carry = (seen_last == 0).to(tl.float32)
        update = tl.dot(tl.trans((x * w).to(X.dtype.element_ty)), y, input_precision=PREC)
        state = state * (tl.exp(b_last) * carry)[:, None] + update
    tl.store(FINAL + bh * DK * DV + state_offs, state, mask=kv_mask)


@triton.jit
def _output_kernel(Q, K, V, BC, SEEN, STATES, OUT, scale, N, NP, H, DK, DV, sbn, sbk,
                   PER_KEY: tl.constexpr, PREC: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """One SUB-row tile of one Dv block: (q exp(b)) @ S_chunk plus the tile's pairs with earlier keys."""
    r0 = tl.program_id(0) * SUB
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    b = bh // H
    c0 = (r0 // CHUNK) * CHUNK
    dt = Q.dtype.element_ty
    offs_s = tl.arange(0, SUB)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    rows = r0 + offs_s
    row_ok = rows < N
    q = _rows(Q, bh, rows, N, offs_k, k_ok, DK).to(tl.float32) * scale
    bq = _decay(BC, bh, rows, NP, offs_k, k_ok, sbn, sbk)
    seen_q = tl.load(SEEN + b * NP + rows)
    state = tl.load(STATES + (bh * (NP // CHUNK) + r0 // CHUNK) * DK * DV + offs_k[:, None] * DV + offs_v[None, :],
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    q_in = q * tl.exp(bq) * (seen_q == 0).to(tl.float32)[:, None]
    acc = tl.dot(q_in.to(dt), state.to(dt), input_precision=PREC)
    if PER_KEY:
        b_ref = tl.load(BC + (bh * NP + r0) * sbn + offs_k * sbk, mask=k_ok, other=0.0)
        q_ref = (q * tl.exp(bq - b_ref[None, :])).to(dt)
        for j0 in range(c0, r0, SUB):
            rows_j = j0 + offs_s
            k_j = _rows(K, bh, rows_j, N, offs_k, k_ok, DK)
            v_j = _rows(V, bh, rows_j, N, offs_v, v_ok, DV)
            b_j = _decay(BC, bh, rows_j, NP, offs_k, k_ok, sbn, sbk)
            k_ref = (k_j * tl.exp(b_ref[None, :] - b_j)).to(dt)
            same_doc = seen_q[:, None] == tl.load(SEEN + b * NP + rows_j)[None, :]
            scores = tl.where(same_doc, tl.dot(q_ref, tl.trans(k_ref), input_precision=PREC), 0.0)
            acc += tl.dot(scores.to(dt), v_j, input_precision=PREC)
        for s in range(SUB):  # the diagonal tile, key row by key row
            row = r0 + s
            s_ok = (row + tl.arange(0, 1)) < N
            k_s = tl.load(K + (bh * N + row) * DK + offs_k, mask=k_ok & s_ok, other=0.0).to(tl.float32)
            v_s = tl.load(V + (bh * N + row) * DV + offs_v, mask=v_ok & s_ok, other=0.0).to(tl.float32)
            b_s = tl.load(BC + (bh * NP + row) * sbn + offs_k * sbk, mask=k_ok, other=0.0)
            visible = (offs_s >= s) & (seen_q == tl.load(SEEN + b * NP + row))
            decay = tl.exp(tl.where(visible[:, None], bq - b_s[None, :], float("-inf")))
            acc += tl.sum(q * k_s[None, :] * decay, 1)[:, None] * v_s[None, :]
    else:
        bq_row = tl.load(BC + (bh * NP + rows) * sbn)
        for j0 in range(c0, r0 + SUB, SUB):
            rows_j = j0 + offs_s
            k_j = _rows(K, bh, rows_j, N, offs_k, k_ok, DK)
            v_j = _rows(V, bh, rows_j, N, offs_v, v_ok, DV)
            visible = (rows[:, None] >= rows_j[None, :]) & (seen_q[:, None] == tl.load(SEEN + b * NP + rows_j)[None, :])
            gap = bq_row[:, None] - tl.load(BC + (bh * NP + rows_j) * sbn)[None, :]
            decay = tl.exp(tl.where(visible, gap, float("-inf")))
            scores = tl.dot(q.to(dt), tl.trans(k_j), input_precision=PREC) * decay
            acc += tl.dot(scores.to(dt), v_j, input_precision=PREC)
    tl.store(OUT + (bh * N + rows[:, None]) * DV + offs_v[None, :], acc, mask=row_ok[:, None] & v_ok[None, :])


@triton.jit
def _grads_kernel(Q, K, V, BC, SEEN, STATES, DSTATES, DO, DQ, DK_, DV_, DB, scale, N, NP, H, DK, DV, sbn, sbk,
                  PER_KEY: tl.constexpr, WITH_DB: tl.constexpr, PREC: tl.constexpr, CHUNK: tl.constexpr,
                  SUB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """dq (w.r.t. scale q) and dk of one SUB-row tile from one Dv block (partials the caller sums), and its dv;
    with WITH_DB also the block's part of d b = (scale q) dq - k dk, the decay gradient before its cumsum.

    State terms use the chunk's entering state and the gradient of its leaving state; pair terms take the
    tile as queries against earlier key tiles (dq) and as keys against later query tiles (dk, dv).
    """
    r0 = tl.program_id(0) * SUB
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: they pass 2**31 at long N
    pid_v = tl.program_id(2)
    b = bh // H
    c0 = (r0 // CHUNK) * CHUNK
    dt = Q.dtype.element_ty
    offs_s = tl.arange(0, SUB)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    rows = r0 + offs_s
    row_ok = rows < N
    qk_mask = row_ok[:, None] & k_ok[None, :]
    rv_mask = row_ok[:, None] & v_ok[None, :]
    q = _rows(Q, bh, rows, N, offs_k, k_ok, DK).to(tl.float32) * scale
    k = _rows(K, bh, rows, N, offs_k, k_ok, DK).to(tl.float32)
    v = _rows(V, bh, rows, N, offs_v, v_ok, DV)
    do = _rows(DO, bh, rows, N, offs_v, v_ok, DV)
    bq = _decay(BC, bh, rows, NP, offs_k, k_ok, sbn, sbk)
    b_last = tl.load(BC + (bh * NP + c0 + CHUNK - 1) * sbn + offs_k * sbk, mask=k_ok, other=0.0)
    seen_q = tl.load(SEEN + b * NP + rows)
    seen_last = tl.load(SEEN + b * NP + c0 + CHUNK - 1)
    state_offs = (bh * (NP // CHUNK) + r0 // CHUNK) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    state_in = tl.load(STATES + state_offs, mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(dt)
    dstate_out = tl.load(DSTATES + state_offs, mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(dt)
    in_w = tl.exp(bq) * (seen_q == 0).to(tl.float32)[:, None]
    out_w = tl.exp(b_last[None, :] - bq) * (seen_q == seen_last).to(tl.float32)[:, None]
    dq = tl.dot(do, tl.trans(state_in), input_precision=PREC) * in_w
    dk = tl.dot(v, tl.trans(dstate_out), input_precision=PREC) * out_w
    dv = tl.dot((k * out_w).to(dt), dstate_out, input_precision=PREC)
    if PER_KEY:
        b_ref = tl.load(BC + (bh * NP + r0) * sbn + offs_k * sbk, mask=k_ok, other=0.0)
        for j0 in range(c0, r0, SUB):  # earlier key tiles -> dq
            rows_j = j0 + offs_s
            k_j = _rows(K, bh, rows_j, N, offs_k, k_ok, DK)
            v_j = _rows(V, bh, rows_j, N, offs_v, v_ok, DV)
            b_j = _decay(BC, bh, rows_j, NP, offs_k, k_ok, sbn, sbk)
            same_doc = seen_q[:, None] == tl.load(SEEN + b * NP + rows_j)[None, :]
            dscores = tl.where(same_doc, tl.dot(do, tl.trans(v_j), input_precision=PREC), 0.0)
            k_ref = (k_j * tl.exp(b_ref[None, :] - b_j)).to(dt)
            dq += tl.dot(dscores.to(dt), k_ref, input_precision=PREC) * tl.exp(bq - b_ref[None, :])
        for m0 in range(r0 + SUB, c0 + CHUNK, SUB):  # later query tiles -> dk, dv
            rows_m = m0 + offs_s
            q_m = _rows(Q, bh, rows_m, N, offs_k, k_ok, DK).to(tl.float32) * scale
            do_m = _rows(DO, bh, rows_m, N, offs_v, v_ok, DV)
            b_m = _decay(BC, bh, rows_m, NP, offs_k, k_ok, sbn, sbk)
            b_ref_m = tl.load(BC + (bh * NP + m0) * sbn + offs_k * sbk, mask=k_ok, other=0.0)
            q_ref = (q_m * tl.exp(b_m - b_ref_m[None, :])).to(dt)
            k_decay = tl.exp(b_ref_m[None, :] - bq)
            same_doc = tl.load(SEEN + b * NP + rows_m)[:, None] == seen_q[None, :]
            scores = tl.where(same_doc, tl.dot(q_ref, tl.trans((k * k_decay).to(dt)), input_precision=PREC), 0.0)
            dv += tl.dot(tl.trans(scores.to(dt)), do_m, input_precision=PREC)
            dscores = tl.where(same_doc, tl.dot(do_m, tl.trans(v), input_precision=PREC), 0.0)
            dk += tl.dot(tl.trans(dscores.to(dt)), q_ref, input_precision=PREC) * k_decay
        do32 = do.to(tl.float32)
        for s in range(SUB):  # the diagonal tile, key row by key row
            row = r0 + s
            s_ok = (row + tl.arange(0, 1)) < N
            k_s = tl.load(K + (bh * N + row) * DK + offs_k, mask=k_ok & s_ok, other=0.0).to(tl.float32)
            v_s = tl.load(V + (bh * N + row) * DV + offs_v, mask=v_ok & s_ok, other=0.0).to(tl.float32)
            b_s = tl.load(BC + (bh * NP + row) * sbn + offs_k * sbk, mask=k_ok, other=0.0)
            visible = (offs_s >= s) & (seen_q == tl.load(SEEN + b * NP + row))
            decay = tl.exp(tl.where(visible[:, None], bq - b_s[None, :], float("-inf")))  # [SUB, BLOCK_K]
            score = tl.sum(q * k_s[None, :] * decay, 1)  # A[:, s]
            dscore = tl.where(visible, tl.sum(do32 * v_s[None, :], 1), 0.0)  # dA[:, s]
            is_s = (offs_s == s)[:, None]
            dv += tl.where(is_s, tl.sum(score[:, None] * do32, 0)[None, :], 0.0)
            dq += dscore[:, None] * k_s[None, :] * decay
            dk += tl.where(is_s, tl.sum(dscore[:, None] * q * decay, 0)[None, :], 0.0)
    else:
        bq_row = tl.load(BC + (bh * NP + rows) * sbn)
        for j0 in range(c0, r0 + SUB, SUB):  # key tiles up to this one -> dq
            rows_j = j0 + offs_s
            k_j = _rows(K, bh, rows_j, N, offs_k, k_ok, DK)
            v_j = _rows(V, bh, rows_j, N, offs_v, v_ok, DV)
            visible = (rows[:, None] >= rows_j[None, :]) & (seen_q[:, None] == tl.load(SEEN + b * NP + rows_j)[None, :])
            gap = bq_row[:, None] - tl.load(BC + (bh * NP + rows_j) * sbn)[None, :]
            dscores = tl.dot(do, tl.trans(v_j), input_precision=PREC) * tl.exp(tl.where(visible, gap, float("-inf")))
            dq += tl.dot(dscores.to(dt), k_j, input_precision=PREC)
        for m0 in range(r0, c0 + CHUNK, SUB):  # query tiles from this one on -> dk, dv
            rows_m = m0 + offs_s
            q_m = _rows(Q, bh, rows_m, N, offs_k, k_ok, DK).to(tl.float32) * scale
            do_m = _rows(DO, bh, rows_m, N, offs_v, v_ok, DV)
            visible = (rows_m[:, None] >= rows[None, :]) & (tl.load(SEEN + b * NP + rows_m)[:, None] == seen_q[None, :])
            gap = tl.load(BC + (bh * NP + rows_m) * sbn)[:, None] - bq_row[None, :]
            decay = tl.exp(tl.where(visible, gap, float("-inf")))  # [query tile, this tile]
            scores = tl.dot(q_m.to(dt), tl.trans(k.to(dt)), input_precision=PREC) * decay
            dv += tl.dot(tl.trans(scores.to(dt)), do_m, input_precision=PREC)
            dscores = tl.dot(do_m, tl.trans(v), input_precision=PREC) * decay
            dk += tl.dot(tl.trans(dscores.to(dt)), q_m.to(dt), input_precision=PREC)
    part = (pid_v * tl.num_programs(1) + bh) * N
    tl.store(DQ + (part + rows[:, None]) * DK + offs_k[None, :], dq, mask=qk_mask)
    tl.store(DK_ + (part + rows[:, None]) * DK + offs_k[None, :], dk, mask=qk_mask)
    if WITH_DB:
        tl.store(DB + (part + rows[:, None]) * DK + offs_k[None, :], q * dq - k * dk, mask=qk_mask)
    tl.store(DV_ + (bh * N + rows[:, None]) * DV + offs_v[None, :], dv, mask=rv_mask)


def _prepare(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, segment_ids: Tensor | None):
    """Contiguous q, k, v in q's dtype (fp64 runs as fp32; under autocast k or v may come in another), the
    cumulative log decay inside each chunk [B, H, NP, 1 or Dk] and the document starts seen so far inside each
    chunk [B, NP] (int32); NP pads N to whole chunks."""
    B, H, N, _ = q.shape
    if q.dtype == torch.float64:
        q = q.float()
    q, k, v = q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    bc = chunk_inputs(decay_shape(log_decay, q).float(), CHUNK).cumsum(3).flatten(2, 3).contiguous()
    seen = chunk_resets(segment_ids, N, CHUNK, q.device)
    seen = torch.zeros(B, bc.shape[2], dtype=torch.int32, device=q.device) if seen is None else \
        seen.reshape(B, -1).int().contiguous()
    return q, k, v, bc, seen


def _meta(q: Tensor, bc: Tensor) -> dict:
    return dict(sbn=bc.shape[-1], sbk=1 if bc.shape[-1] > 1 else 0,
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _scan(x: Tensor, y: Tensor, bc: Tensor, seen: Tensor, init: Tensor | None, x_scale: float,
          reverse: bool) -> tuple[Tensor, Tensor]:
    """(per-chunk states [B, H, NC, Dk, Dv], final [B, H, Dk, Dv]), fp32; see _scan_kernel."""
    B, H, N, DK = x.shape
    DV, NP = y.shape[-1], bc.shape[2]
    final = torch.empty(B, H, DK, DV, device=x.device, dtype=torch.float32)
    states = torch.empty(B, H, NP // CHUNK, DK, DV, device=x.device, dtype=torch.float32)
    block_k, block_v = min(64, max(16, triton.next_power_of_2(DK))), min(64, max(16, triton.next_power_of_2(DV)))
    grid = (B * H, triton.cdiv(DK, block_k), triton.cdiv(DV, block_v))
    _scan_kernel[grid](x, y, bc, seen, final if init is None else init.float().contiguous(),
                       states, final, x_scale, N, NP, H, DK, DV, REVERSE=reverse, HAS_INIT=init is not None,
                       CHUNK=CHUNK, BLOCK_K=block_k, BLOCK_V=block_v, **_meta(x, bc))
    return states, final


def _tile_grid(q: Tensor, bc: Tensor, DV: int) -> tuple[tuple, dict]:
    B, H, _, DK = q.shape
    block_v = min(64, max(16, triton.next_power_of_2(DV)))
    grid = (bc.shape[2] // SUB, B * H, triton.cdiv(DV, block_v))
    return grid, dict(PER_KEY=bc.shape[-1] > 1, CHUNK=CHUNK, SUB=SUB,
                      BLOCK_K=max(16, triton.next_power_of_2(DK)), BLOCK_V=block_v, **_meta(q, bc))


def chunk_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, log_decay: Tensor | None,
                  initial_state: Tensor | None, segment_ids: Tensor | None,
                  on_final_state: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, H, N, Dv] in q's dtype, final_state [B, H, Dk, Dv] fp32): the state scan, then the output tiles.

    on_final_state(final) runs between the two, so communication of the state overlaps the output tiles."""
    B, H, N, _ = q.shape
    state_dtype = acc_dtype(q)
    q, k, v, bc, seen = _prepare(q, k, v, log_decay, segment_ids)
    states, final = _scan(k, v, bc, seen, initial_state, 1.0, reverse=False)
    if on_final_state is not None:
        on_final_state(final.to(state_dtype))
    out = torch.empty(B, H, N, v.shape[-1], device=q.device, dtype=q.dtype)
    grid, meta = _tile_grid(q, bc, v.shape[-1])
    _output_kernel[grid](q, k, v, bc, seen, states, out, scale, N, bc.shape[2], H, q.shape[-1], v.shape[-1], **meta)
    return out, final


def _sum_parts(parts: Tensor) -> Tensor:
    """The sum of the Dv blocks' partials [blocks, ...]; one block's (Dv <= 64) as it is, not a copy."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def chunk_backward(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, initial_state: Tensor | None,
                   segment_ids: Tensor | None, dout: Tensor, dfinal: Tensor | None, scale: float):
    """(dq, dk, dv, dlog_decay or None, dinitial_state), fp32. Recomputes the chunk states (as fla does)."""
    B, H, N, DK = q.shape
    q, k, v, bc, seen = _prepare(q, k, v, log_decay, segment_ids)
    DV, NP = v.shape[-1], bc.shape[2]
    dout = dout.to(q.dtype).contiguous()
    states, final = _scan(k, v, bc, seen, initial_state, 1.0, reverse=False)
    dstates, ds0 = _scan(q, dout, bc, seen, dfinal, scale, reverse=True)
    grid, meta = _tile_grid(q, bc, DV)
    dq_parts = torch.empty(grid[2], B, H, N, DK, device=q.device, dtype=torch.float32)
    dk_parts = torch.empty_like(dq_parts)
    dv = torch.empty(B, H, N, DV, device=q.device, dtype=torch.float32)
    db_parts = torch.empty_like(dq_parts) if log_decay is not None else dq_parts  # (unused without a decay)
    _grads_kernel[grid](q, k, v, bc, seen, states, dstates, dout, dq_parts, dk_parts, dv, db_parts, scale, N, NP, H,
                        DK, DV, WITH_DB=log_decay is not None, **meta)
    dq_scaled, dk = _sum_parts(dq_parts), _sum_parts(dk_parts)
    dg = None
    if log_decay is not None:
        # d b_t = q_t dq_t - k_t dk_t (from the kernel), plus sum_v dS_out * S_out at each chunk's last row (the
        # state leaving chunk c is the one entering c + 1, the last one is final); g -> b is a cumsum
        db = chunk_inputs(_sum_parts(db_parts), CHUNK)  # [B, H, NC, CHUNK, DK]
        db[:, :, :-1, -1] += (dstates[:, :, :-1] * states[:, :, 1:]).sum(-1)
        db[:, :, -1, -1] += (dstates[:, :, -1] * final).sum(-1)
        dg = db.flip(3).cumsum(3).flip(3).flatten(2, 3)[:, :, :N]
        dg = dg.sum(-1) if log_decay.dim() == 3 else dg
    return dq_scaled * scale, dk, dv, dg, ds0


class ChunkedLinearAttention(torch.autograd.Function):
    """Triton forward and backward; the backward recomputes the chunk states instead of saving them."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, segment_ids, scale, on_final_state):
        out, final = chunk_forward(q, k, v, scale, log_decay, initial_state, segment_ids, on_final_state)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, segment_ids)
        ctx.scale = scale
        return out.to(q.dtype), final.to(acc_dtype(q))

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, log_decay, initial_state, segment_ids = ctx.saved_tensors
        dq, dk, dv, dg, ds0 = chunk_backward(q, k, v, log_decay, initial_state, segment_ids, dout, dfinal,
                                             ctx.scale)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dg is None else dg.to(log_decay.dtype),
                None if initial_state is None else ds0.to(initial_state.dtype), None, None, None)


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, *, scale: float, log_decay: Tensor | None = None,
                             initial_state: Tensor | None = None, output_final_state: bool = False,
                             segment_ids: Tensor | None = None, chunk_size: int = 64,
                             on_final_state: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Same contract as reference.linear_attention_chunked; the kernels use their own chunk size (CHUNK)."""
    out, final = ChunkedLinearAttention.apply(q, k, v, log_decay, initial_state, segment_ids, scale, on_final_state)
    return out, (final if output_final_state else None)
