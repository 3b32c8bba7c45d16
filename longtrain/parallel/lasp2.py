"""LASP-2 (Sun et al. 2025): one AllGather of every chunk's (M, A); each rank combines its own prefix.

Communication (per rank, P ranks): forward one all-gather of the flat (M [B, H, Dk, Dv], A [B, H, Dk|1])
buffer of each chunk the rank holds (one with the contiguous layout, two with zigzag), started once the
state passes are done and overlapping the output pass; backward one all-gather of the state gradients.
The bytes do not depend on N. Because every rank sees every chunk's summary, the zigzag layout works
too: a hybrid model can keep its ring attention load-balanced.
"""
import torch

from longtrain.parallel.comm import all_gather, group_rank, group_size
from longtrain.parallel.linear_state import (combine, correct, correction_backward, gate_of, local_backward,
                                             local_pass, zero_state)
from longtrain.parallel.sharding import chunk_ids, local_chunks


def narrow(t, off: int, n: int, dim: int = 2):
    return None if t is None else t.narrow(dim, off, n)


class Lasp2(torch.autograd.Function):
    """This rank's shard of linear attention; the state prefix of each of its chunks from one all-gather."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, seg, gates, group, scale, chunk_size, backend, layout):
        P, r = group_size(group), group_rank(group)
        chunks = local_chunks(q.shape[2], P, r, layout)
        pending = {}

        def start_gather(summaries):
            flat = torch.cat([t.detach().flatten() for pair in summaries for t in pair])
            pending["flat"], pending["req"] = all_gather(flat, group, "lasp2_fwd", async_op=True)

        lps = []
        for i, (off, _, n) in enumerate(chunks):
            last = i == len(chunks) - 1
            first_done = [(lp.state, lp.decay) for lp in lps]
            lps.append(local_pass(narrow(q, off, n), narrow(k, off, n), narrow(v, off, n), narrow(log_decay, off, n),
                                  narrow(seg, off, n, 1), scale, chunk_size, backend,
                                  state_first=(lambda s, d: start_gather(first_done + [(s, d)])) if last else None))
        pending["req"].wait()
        state_shape, decay_shape = lps[0].state.shape, lps[0].decay.shape
        per_chunk = state_shape.numel() + decay_shape.numel()
        gathered = pending["flat"].view(P, len(chunks), per_chunk)
        n_total = P * len(chunks)
        states, decays = [None] * n_total, [None] * n_total
        for p in range(P):
            for i, c in enumerate(chunk_ids(P, p, layout)):
                states[c] = gathered[p, i, :state_shape.numel()].view(state_shape)
                decays[c] = gathered[p, i, state_shape.numel():].view(decay_shape)
        own = chunk_ids(P, r, layout)
        states_in, state = {}, zero_state(q, v)
        for c in range(max(own) + 1):
            if c > 0:
                state = gate_of(gates, c, state) * combine(backend, decays[c - 1], state, states[c - 1])
            if c in own:
                states_in[c] = state
        ctx.group, ctx.gates, ctx.decays, ctx.lps, ctx.layout = group, gates, decays, lps, layout
        ctx.states_in = [states_in[c] for c in own]
        outs = [correct(lp, s_in) for lp, s_in in zip(lps, ctx.states_in)]
        return torch.cat(outs, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        group, gates, decays, lps, layout = ctx.group, ctx.gates, ctx.decays, ctx.lps, ctx.layout
        P, r = group_size(group), group_rank(group)
        chunks = local_chunks(dout.shape[2], P, r, layout)
        douts = [dout.narrow(2, off, n) for off, _, n in chunks]
        corrections = [correction_backward(lp, d, s) for lp, d, s in zip(lps, douts, ctx.states_in)]
        gathered, _ = all_gather(torch.stack([grad for _, grad in corrections]), group, "lasp2_bwd")
        grad_states = [None] * (P * len(chunks))
        for p in range(P):
            for i, c in enumerate(chunk_ids(P, p, layout)):
                grad_states[c] = gathered[p, i]
        own = chunk_ids(P, r, layout)
        w_after, w_next = {}, None  # w_after[c] = W_{c+1}, the state gradient chunk c+1 sends back
        for c in range(len(grad_states) - 1, min(own) - 1, -1):
            w_after[c] = w_next
            grad_c = grad_states[c] if w_next is None else combine(lps[0].backend, decays[c], w_next, grad_states[c])
            w_next = gate_of(gates, c, grad_c) * grad_c
        grads = [local_backward(lp, d, s_in, w_after[c], corr)
                 for lp, d, s_in, c, (corr, _) in zip(lps, douts, ctx.states_in, own, corrections)]
        merged = [None if parts[0] is None else torch.cat(parts, 2) for parts in zip(*grads)]
        return (*merged, None, None, None, None, None, None, None)
