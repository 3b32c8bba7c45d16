"""LASP-1 (Sun et al. 2024): the linear-attention state scan as a sequential ring of P2P sends.

Communication (per rank, P ranks): forward receives S_r [B, H, Dk, Dv] from rank r-1 and sends
A_r S_r + M_r to rank r+1 (the receive is posted before the local pass, so it overlaps it); backward
receives W_{r+1} from rank r+1 and sends W_r to rank r-1. One state per rank per direction, whatever N.
"""
import torch

from longtrain.parallel.comm import group_rank, group_size, p2p, wait
from longtrain.parallel.linear_state import (combine, correction_backward, finish_forward, gate_of, local_backward,
                                             local_pass, zero_state)


class Lasp1(torch.autograd.Function):
    """This rank's shard of linear attention over the whole sequence, states passed along the ring."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, seg, gates, group, scale, chunk_size, backend):
        P, r = group_size(group), group_rank(group)
        state_in = zero_state(q, v)
        recv = p2p([], [(state_in, r - 1)], group, "lasp1_fwd") if r > 0 else []
        lp = local_pass(q, k, v, log_decay, seg, scale, chunk_size, backend)
        wait(recv)
        state_in = state_in * gate_of(gates, r, state_in)
        send = []
        if r < P - 1:
            send = p2p([(combine(backend, lp.decay.detach(), state_in, lp.state.detach()), r + 1)], [], group,
                       "lasp1_fwd")
        out = finish_forward(ctx, lp, state_in, q)
        wait(send)
        ctx.group, ctx.gates = group, gates
        return out

    @staticmethod
    def backward(ctx, dout):
        group, gates, lp, state_in = ctx.group, ctx.gates, ctx.lp, ctx.state_in
        P, r = group_size(group), group_rank(group)
        w_next = torch.zeros_like(state_in) if r < P - 1 else None
        recv = p2p([], [(w_next, r + 1)], group, "lasp1_bwd") if w_next is not None else []
        correction, grad_state = correction_backward(lp, dout, state_in)
        wait(recv)
        if w_next is not None:
            grad_state = combine(lp.backend, lp.decay.detach(), w_next, grad_state)
        send = p2p([(gate_of(gates, r, grad_state) * grad_state, r - 1)], [], group, "lasp1_bwd") if r > 0 else []
        grads = local_backward(lp, dout, state_in, w_next, correction)
        wait(send)
        return (*grads, None, None, None, None, None, None)
