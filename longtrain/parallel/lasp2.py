"""LASP-2 (Sun et al. 2025): one AllGather of every chunk's (M, A); each rank combines its own prefix.

Communication (per rank, P ranks): forward one all-gather of the flat (M [B, H, Dk, Dv], A [B, H, Dk|1])
buffer of each chunk the rank holds (one with the contiguous layout, two with zigzag); backward one
all-gather of the state gradients dS. The bytes do not depend on N. Overlap: the forward gather starts as
soon as the last local M exists and runs while the intra-slice output products compute; the backward
gather runs while the local backward through the outputs computes (all of it but the gradients through
M and A, which need the combined W; see `overlap_backward` for when it waits first). Only the decays this
rank's backward needs are kept, copied out of the gathered buffer, which is freed after the forward.
"""
import torch

from longtrain.parallel.comm import all_gather, group_rank, group_size
from longtrain.parallel.linear_state import (add_grads, combine, correct, correction_backward, gate_of,
                                             keep_for_backward, local_backward, local_passes, overlap_backward,
                                             state_grads, take_for_backward, zero_state)
from longtrain.parallel.sharding import by_chunk, chunk_ids, local_chunks


class Lasp2(torch.autograd.Function):
    """This rank's shard of linear attention; the state prefix of each of its chunks from one all-gather."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, seg, gates, group, scale, chunk_size, backend, layout):
        P, r = group_size(group), group_rank(group)
        chunks = local_chunks(q.shape[2], P, r, layout)
        pending = {}

        def start_gather(summaries):
            flat = torch.cat([t.flatten() for pair in summaries for t in pair])
            pending["flat"], pending["req"] = all_gather(flat, group, "lasp2_fwd", async_op=True)

        lps = local_passes(q, k, v, log_decay, seg, scale, chunk_size, backend, chunks, start_gather)
        pending["req"].wait()
        state_shape, decay_shape = lps[0].state.shape, lps[0].decay.shape
        n_state = state_shape.numel()
        summaries = by_chunk(pending.pop("flat").view(P, len(chunks), -1), P, layout)
        own = chunk_ids(P, r, layout)
        states_in, state = {}, zero_state(q, v)
        for c in range(max(own) + 1):
            if c > 0:
                decay_prev = summaries[c - 1][n_state:].view(decay_shape)
                state = gate_of(gates, c, state) * combine(backend, decay_prev, state, summaries[c - 1][:n_state]
                                                           .view(state_shape))
            if c in own:
                states_in[c] = state
        ctx.decays = {c: s[n_state:].view(decay_shape).clone() for c, s in enumerate(summaries) if c >= min(own)}
        ctx.group, ctx.gates, ctx.layout, ctx.overlap = group, gates, layout, overlap_backward(lps[0])
        ctx.local, own_states = (scale, chunk_size, backend), [states_in[c] for c in own]
        keep_for_backward(ctx, lps, own_states, (q, k, v, log_decay, seg))
        outs = [correct(lp, s_in) for lp, s_in in zip(lps, own_states)]
        return torch.cat(outs, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        group, gates, decays, layout = ctx.group, ctx.gates, ctx.decays, ctx.layout
        ctx.decays = None  # freed with this backward, not when the whole graph goes
        P, r = group_size(group), group_rank(group)
        chunks = local_chunks(dout.shape[2], P, r, layout)
        lps, states_in = take_for_backward(ctx, *ctx.local, chunks)
        douts = [dout.narrow(2, off, n) for off, _, n in chunks]
        corrections = [correction_backward(lp, d, s) for lp, d, s in zip(lps, douts, states_in)]
        gathered, req = all_gather(torch.stack([grad for _, grad in corrections]), group, "lasp2_bwd", async_op=True)
        own = chunk_ids(P, r, layout)
        corr = [c for c, _ in corrections]
        if ctx.overlap:
            partial = local_backward(lps, douts, states_in, [None] * len(lps), corr, keep_graph=True)
        req.wait()
        grad_states = by_chunk(gathered, P, layout)
        w_after, w_next = {}, None  # w_after[c] = W_{c+1}, the state gradient chunk c+1 sends back
        for c in range(len(grad_states) - 1, min(own) - 1, -1):
            w_after[c] = w_next
            grad_c = grad_states[c] if w_next is None else combine(lps[0].backend, decays[c], w_next, grad_states[c])
            w_next = gate_of(gates, c, grad_c) * grad_c
        w_nexts = [w_after[c] for c in own]
        if ctx.overlap:
            merged = add_grads(partial, state_grads(lps, states_in, w_nexts))
        else:
            merged = local_backward(lps, douts, states_in, w_nexts, corr)
        return (*merged, None, None, None, None, None, None, None)
