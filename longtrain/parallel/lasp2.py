"""LASP-2 (Sun et al. 2025): one AllGather of every rank's (M_r, A_r); each rank combines its own prefix.

Communication (per rank, P ranks): forward one all-gather of the flat (M_r [B, H, Dk, Dv], A_r [B, H, Dk|1])
buffer, started as soon as the state pass is done and overlapping the intra-slice output pass; backward
one all-gather of the state gradients dS_r. The bytes do not depend on N.
"""
import torch

from longtrain.parallel.comm import all_gather, group_rank, group_size
from longtrain.parallel.linear_state import (combine, correction_backward, document_gates, finish_forward, gate_of,
                                             local_backward, local_pass, zero_state)


class Lasp2(torch.autograd.Function):
    """This rank's shard of linear attention; the state prefix comes from one all-gather."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, seg, group, scale, chunk_size, backend):
        P, r = group_size(group), group_rank(group)
        gates = document_gates(seg, group)
        pending = {}

        def start_gather(state, decay):
            flat = torch.cat([state.flatten(), decay.flatten()])
            pending["flat"], pending["req"] = all_gather(flat, group, "lasp2_fwd", async_op=True)
            pending["shapes"] = (state.shape, decay.shape)

        lp = local_pass(q, k, v, log_decay, seg, scale, chunk_size, backend, state_first=start_gather)
        pending["req"].wait()
        state_shape, decay_shape = pending["shapes"]
        n_state = state_shape.numel()
        states = pending["flat"][:, :n_state].view(P, *state_shape)
        decays = pending["flat"][:, n_state:].view(P, *decay_shape)
        state_in = zero_state(q, v)
        for j in range(r):
            state_in = gate_of(gates, j + 1, state_in) * combine(backend, decays[j], state_in, states[j])
        ctx.group, ctx.gates, ctx.decays = group, gates, decays
        return finish_forward(ctx, lp, state_in, q)

    @staticmethod
    def backward(ctx, dout):
        group, gates, decays, lp, state_in = ctx.group, ctx.gates, ctx.decays, ctx.lp, ctx.state_in
        P, r = group_size(group), group_rank(group)
        correction, grad_state = correction_backward(lp, dout, state_in)
        grad_states, _ = all_gather(grad_state, group, "lasp2_bwd")
        w_next = None
        for j in range(P - 1, r, -1):
            grad_j = grad_states[j] if w_next is None else combine(lp.backend, decays[j], w_next, grad_states[j])
            w_next = gate_of(gates, j, grad_j) * grad_j
        return (*local_backward(lp, dout, state_in, w_next, correction), None, None, None, None, None)
