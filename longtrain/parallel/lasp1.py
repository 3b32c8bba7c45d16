"""LASP-1 (Sun et al. 2024): the linear-attention state scan as a sequential ring of P2P sends.

Communication (per rank, P ranks): forward receives S_r [B, H, Dk, Dv] from rank r-1 and sends
A_r S_r + M_r to rank r+1; backward receives W_{r+1} from rank r+1 and sends W_r to rank r-1. One
state per rank per direction, whatever N. Overlap: the receive is posted before the local pass, so
the transfer into this rank overlaps it; the chain itself is sequential, about (P-1) full-state hops
(ZeCO pipelines it). With the zigzag layout the chain visits ranks 0..P-1 and back (`state_scan.py`).
"""
import torch

from longtrain.kernels.reference import acc_dtype
from longtrain.parallel.comm import group_rank, group_size
from longtrain.parallel.linear_state import (correct, correction_backward, keep_for_backward, local_backward,
                                             local_passes, take_for_backward)
from longtrain.parallel.sharding import local_chunks
from longtrain.parallel.state_scan import first_receives, scan_backward, scan_forward, scan_route


class Lasp1(torch.autograd.Function):
    """This rank's shard of linear attention over the whole sequence, states passed along the ring."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, seg, gates, group, scale, chunk_size, backend, layout):
        P, r = group_size(group), group_rank(group)
        route = scan_route(P, r, layout)
        shape = (q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])  # [B, H, Dk, Dv]
        incoming = first_receives(route, r, False, shape, acc_dtype(q), q.device, 1, group, "lasp1_fwd")
        chunks = local_chunks(q.shape[2], P, r, layout)
        lps = local_passes(q, k, v, log_decay, seg, scale, chunk_size, backend, chunks)
        summaries = [(lp.state.detach(), lp.decay.detach()) for lp in lps]
        states_in = scan_forward(summaries, route, r, gates, incoming, 1, backend, group, "lasp1_fwd")
        ctx.group, ctx.gates, ctx.route, ctx.chunks, ctx.local = group, gates, route, chunks, (scale, chunk_size, backend)
        keep_for_backward(ctx, lps, states_in, (q, k, v, log_decay, seg))
        return torch.cat([correct(lp, s) for lp, s in zip(lps, states_in)], 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        group = ctx.group
        lps, states_in = take_for_backward(ctx, *ctx.local, ctx.chunks)
        r = group_rank(group)
        incoming = first_receives(ctx.route, r, True, states_in[0].shape, states_in[0].dtype, dout.device, 1, group,
                                 "lasp1_bwd")
        douts = [dout.narrow(2, off, n) for off, _, n in ctx.chunks]
        corrections = [correction_backward(lp, d, s) for lp, d, s in zip(lps, douts, states_in)]
        w_after = scan_backward([g for _, g in corrections], [lp.decay.detach() for lp in lps], ctx.route, r,
                                ctx.gates, incoming, 1, lps[0].backend, group, "lasp1_bwd")
        merged = local_backward(lps, douts, states_in, w_after, [corr for corr, _ in corrections])
        return (*merged, None, None, None, None, None, None, None)
