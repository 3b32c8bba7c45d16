"""ZeCO All-Scan (2025): the state scan pipelined in K blocks along Dv.

Communication (per rank, P ranks): forward receives block b of S_r [B, H, Dk, Dv/K] from rank r-1,
forms block b of A_r S_r + M_r and sends it to rank r+1 while block b+1 is in flight, so the scan
costs about P-1+K-1 block hops instead of P-1 full-state hops, and each rank sends exactly one
state's bytes. The scan runs right after the cheap state pass; the last sends drain while the
intra-slice output pass computes. Backward runs the same pipeline in reverse on W blocks.
"""
import torch

from longtrain.parallel.comm import group_rank, group_size, p2p, wait
from longtrain.parallel.linear_state import (combine, correction_backward, finish_forward, gate_of,
                                             local_backward, local_pass, zero_state)

DEFAULT_BLOCKS = 4


def num_blocks(dv: int, blocks: int | None) -> int:
    """K: the requested number of blocks (default 4), capped at Dv."""
    k = DEFAULT_BLOCKS if blocks is None else blocks
    if k < 1:
        raise ValueError(f"zeco_blocks must be >= 1, got {k}")
    return min(k, dv)


class ZeCO(torch.autograd.Function):
    """This rank's shard of linear attention; the state prefix arrives through the All-Scan pipeline."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, seg, gates, group, scale, chunk_size, backend, blocks):
        P, r = group_size(group), group_rank(group)
        state_in = zero_state(q, v)
        parts_in = [part.contiguous() for part in state_in.tensor_split(num_blocks(v.shape[-1], blocks), -1)]
        recv = p2p([], [(part, r - 1) for part in parts_in], group, "zeco_fwd") if r > 0 else []
        sends = []

        def all_scan(state, decay):
            for b, part in enumerate(parts_in):
                if recv:
                    recv[b].wait()
                part.mul_(gate_of(gates, r, part))
                if r < P - 1:
                    state_b = state.tensor_split(len(parts_in), -1)[b]
                    sends.extend(p2p([(combine(backend, decay, part, state_b), r + 1)], [], group, "zeco_fwd"))

        lp = local_pass(q, k, v, log_decay, seg, scale, chunk_size, backend, state_first=all_scan)
        state_in = torch.cat(parts_in, -1)
        out = finish_forward(ctx, lp, state_in, q)
        wait(sends)
        ctx.group, ctx.gates, ctx.blocks = group, gates, len(parts_in)
        return out

    @staticmethod
    def backward(ctx, dout):
        group, gates, lp, state_in = ctx.group, ctx.gates, ctx.lp, ctx.state_in
        P, r = group_size(group), group_rank(group)
        correction, grad_state = correction_backward(lp, dout, state_in)
        grad_parts = grad_state.tensor_split(ctx.blocks, -1)
        w_parts = [torch.zeros_like(g).contiguous() for g in grad_parts] if r < P - 1 else []
        recv = p2p([], [(w, r + 1) for w in w_parts], group, "zeco_bwd") if w_parts else []
        decay, sends = lp.decay.detach(), []
        for b, grad_b in enumerate(grad_parts):
            if recv:
                recv[b].wait()
                grad_b = combine(lp.backend, decay, w_parts[b], grad_b.contiguous())
            if r > 0:
                sends.extend(p2p([(gate_of(gates, r, grad_b) * grad_b, r - 1)], [], group, "zeco_bwd"))
        w_next = torch.cat(w_parts, -1) if w_parts else None
        grads = local_backward(lp, dout, state_in, w_next, correction)
        wait(sends)
        return (*grads, None, None, None, None, None, None, None)
