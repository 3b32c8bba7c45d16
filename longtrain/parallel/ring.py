"""Ring attention: K/V blocks travel around the SP ring; partial (out, lse) merge in float32.

Communication (per rank, P ranks, local K/V of shape [B, Hkv, N/P, D]):
  forward:  P-1 steps, each sends this step's (K, V) block (+ its segment ids) to rank r+1 and receives
            the next from rank r-1 (batch_isend_irecv), posted before the step's compute so they overlap.
  backward: K/V rotate again (P-1 hops); the dK/dV accumulator of each block travels with it (P hops)
            and arrives back at its owner; dK/dV transfers overlap the next step's compute.
Query/key chunk pairs that the causal or window mask hides entirely are skipped; with the zigzag layout
every rank then does the same causal work. With packed documents (ids non-decreasing along the sequence),
pairs whose chunks share no document are skipped too: each chunk's first and last document id tell every
rank which pairs are empty (the trainer computes them once per step from the full ids; without them, one
small all-gather at the start of the forward).
"""
import torch
from torch import Tensor

from longtrain.kernels.reference import acc_dtype, merge_partials, tile_is_masked
from longtrain.parallel.comm import all_gather, group_rank, group_size, p2p, wait
from longtrain.parallel.sharding import by_chunk, chunk_ids, local_chunks, num_chunks


def chunk_stats(parts: list[Tensor]) -> Tensor:
    """[chunks, B, 3]: first id, last id and whether the ids never decrease, of each [B, n] chunk."""
    return torch.stack([torch.stack([p[:, 0], p[:, -1], (p.diff(dim=1) >= 0).all(1).long()], 1) for p in parts])


def spans_of(stats: Tensor) -> list | None:
    """[chunk][row] = (first, last) document id from chunk_stats in sequence order; None unless ids never decrease."""
    stats = stats.tolist()
    rows = range(len(stats[0]))
    ordered = all(s[b][2] for s in stats for b in rows) and all(
        stats[c][b][0] >= stats[c - 1][b][1] for c in range(1, len(stats)) for b in rows)
    return [[row[:2] for row in chunk] for chunk in stats] if ordered else None


def sequence_spans(segment_ids: Tensor | None, P: int, layout: str) -> list | None:
    """document_spans from the full [B, N] ids, without communication (a trainer computes them once per step)."""
    return None if segment_ids is None else spans_of(chunk_stats(list(segment_ids.chunk(num_chunks(P, layout), 1))))


def document_spans(seg: Tensor | None, group, layout: str) -> list | None:
    """spans_of every global chunk from the ranks' local ids [B, N/P]: one small all-gather and a host sync."""
    if seg is None:
        return None
    P = group_size(group)
    local = chunk_stats(list(seg.chunk(len(chunk_ids(P, 0, layout)), 1)))
    gathered, _ = all_gather(local.long(), group, "ring_docs")  # [P, chunks per rank, B, 3]
    return spans_of(torch.stack(by_chunk(gathered, P, layout)))


def share_document(spans: list | None, q_chunk: int, k_chunk: int) -> bool:
    """Whether some row has a document in both chunks (sorted ids: their id ranges intersect)."""
    if spans is None:
        return True
    return any(max(q[0], k[0]) <= min(q[1], k[1]) for q, k in zip(spans[q_chunk], spans[k_chunk]))


def chunk_pairs(n_local: int, P: int, q_rank: int, k_rank: int, layout: str, causal: bool, window: int | None,
                spans: list | None = None):
    """(q_chunk, k_chunk) pairs between the tokens of q_rank and k_rank that have unmasked entries."""
    q_chunks = local_chunks(n_local, P, q_rank, layout)
    k_chunks = local_chunks(n_local, P, k_rank, layout)
    return [(qc, kc) for qc in q_chunks for kc in k_chunks
            if not tile_is_masked(qc[1], qc[1] + qc[2], kc[1], kc[1] + kc[2], causal, window)
            and share_document(spans, qc[1] // qc[2], kc[1] // kc[2])]


def seq_slice(x: Tensor | None, chunk: tuple[int, int, int], dim: int = 2) -> Tensor | None:
    return None if x is None else x.narrow(dim, chunk[0], chunk[2])


class RingAttention(torch.autograd.Function):
    """(out, lse) of this rank's queries against every rank's keys, K/V passed around the ring."""

    @staticmethod
    def forward(ctx, q, k, v, seg, group, layout, backend, opts, spans):
        P, r = group_size(group), group_rank(group)
        n_local = q.shape[2]
        kind, dt = opts["kind"], acc_dtype(q)
        if spans is None:
            spans = document_spans(seg, group, layout)
        out = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=dt)
        lse = q.new_full(q.shape[:3], -torch.inf, dtype=dt) if kind == "softmax" else None
        block = [t.contiguous() for t in [k, v] + ([] if seg is None else [seg])]
        for step in range(P):
            src = (r - step) % P
            reqs, nxt = [], None
            if step < P - 1:
                nxt = [torch.empty_like(t) for t in block]
                reqs = p2p([(t, (r + 1) % P) for t in block], [(t, (r - 1) % P) for t in nxt], group, "ring_fwd")
            k_blk, v_blk = block[0], block[1]
            k_seg = block[2] if seg is not None else None
            for qc, kc in chunk_pairs(n_local, P, r, src, layout, opts["causal"], opts["window"], spans):
                o_part, lse_part = backend.attention_forward(
                    seq_slice(q, qc), seq_slice(k_blk, kc), seq_slice(v_blk, kc), q_seg=seq_slice(seg, qc, 1),
                    k_seg=seq_slice(k_seg, kc, 1), q_start=qc[1], k_start=kc[1], **opts)
                sl = slice(qc[0], qc[0] + qc[2])
                if kind == "sigmoid":
                    out[:, :, sl] += o_part
                else:
                    out[:, :, sl], lse[:, :, sl] = merge_partials(out[:, :, sl], lse[:, :, sl], o_part, lse_part)
            wait(reqs)
            if nxt is not None:
                block = nxt
        ctx.save_for_backward(q, k, v, seg, out, lse)
        ctx.group, ctx.layout, ctx.backend, ctx.opts, ctx.spans = group, layout, backend, opts, spans
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, seg, out, lse = ctx.saved_tensors
        group, layout, backend, opts = ctx.group, ctx.layout, ctx.backend, ctx.opts
        P, r = group_size(group), group_rank(group)
        n_local = q.shape[2]
        delta = None
        if opts["kind"] == "softmax":
            delta = (dout.to(out.dtype) * out).sum(-1)
            if dlse is not None:
                delta = delta - dlse.to(delta.dtype)
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
        block = [t.contiguous() for t in [k, v] + ([] if seg is None else [seg])]
        grad_reqs, grad_in = [], None
        for step in range(P):
            src = (r - step) % P
            reqs, nxt = [], None
            if step < P - 1:
                nxt = [torch.empty_like(t) for t in block]
                reqs = p2p([(t, (r + 1) % P) for t in block], [(t, (r - 1) % P) for t in nxt], group, "ring_bwd")
            k_blk, v_blk = block[0], block[1]
            k_seg = block[2] if seg is not None else None
            dk_blk = torch.zeros_like(k_blk, dtype=out.dtype)
            dv_blk = torch.zeros_like(v_blk, dtype=out.dtype)
            for qc, kc in chunk_pairs(n_local, P, r, src, layout, opts["causal"], opts["window"], ctx.spans):
                sq = slice(qc[0], qc[0] + qc[2])
                dq_p, dk_p, dv_p = backend.attention_backward(
                    seq_slice(dout, qc), seq_slice(q, qc), seq_slice(k_blk, kc), seq_slice(v_blk, kc), None,
                    None if lse is None else lse[:, :, sq], q_seg=seq_slice(seg, qc, 1),
                    k_seg=seq_slice(k_seg, kc, 1), q_start=qc[1], k_start=kc[1],
                    delta=None if delta is None else delta[:, :, sq], **opts)
                dq[:, :, sq] += dq_p
                dk_blk[:, :, kc[0]:kc[0] + kc[2]] += dk_p
                dv_blk[:, :, kc[0]:kc[0] + kc[2]] += dv_p
            wait(grad_reqs)
            if grad_in is not None:
                dk_blk += grad_in[0]
                dv_blk += grad_in[1]
            if P > 1:
                grad_in = [torch.empty_like(dk_blk), torch.empty_like(dv_blk)]
                grad_reqs = p2p([(dk_blk, (r + 1) % P), (dv_blk, (r + 1) % P)],
                                [(grad_in[0], (r - 1) % P), (grad_in[1], (r - 1) % P)], group, "ring_bwd_grad")
            else:
                grad_in = [dk_blk, dv_blk]
            wait(reqs)
            if nxt is not None:
                block = nxt
        wait(grad_reqs)
        dk, dv = grad_in
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, seg: Tensor | None, group, layout: str, backend,
                   opts: dict, doc_spans: list | None = None) -> tuple[Tensor, Tensor | None]:
    """Ring attention over `group`; q/k/v/seg are this rank's shards in `layout`. doc_spans: sequence_spans of the
    full ids when the caller has them (else gathered here)."""
    return RingAttention.apply(q, k, v, seg, group, layout, backend, opts, doc_spans)
