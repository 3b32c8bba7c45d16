"""ZeCO All-Scan (2025): the state scan pipelined in K blocks along Dv and overlapped with local compute.

Communication (per rank, P ranks): forward receives S_r [B, H, Dk, Dv] from rank r-1 as K blocks
[B, H, Dk, Dv/K], each its own request; as soon as block b arrives, block b of A_r S_r + M_r goes to
rank r+1. The scan costs about (P-1) + (K-1) block hops instead of P-1 full-state hops, and each rank
sends exactly one state's bytes. Overlap: the receives are posted before the local pass; the scan starts
as soon as this rank's M_r exists and runs on a side CUDA stream (a thread on CPU) while the intra-slice
output products compute; the outputs take S_r once both are done. Backward runs the same pipeline in
reverse on the state gradients W, overlapped with the local backward through the outputs (all of it
but the gradients through M_r and A_r, which need W_{r+1}); see `overlap_backward` for when the scan
runs first instead. With the zigzag layout the scan visits ranks 0..P-1 and back
(`state_scan.py`), so hybrid models keep their ring attention balanced.
"""
import torch

from longtrain.kernels import get_backend
from longtrain.kernels.reference import acc_dtype
from longtrain.parallel.comm import Overlap, group_rank, group_size
from longtrain.parallel.linear_state import (add_grads, correct, correction_backward, keep_for_backward, local_backward,
                                             local_passes, overlap_backward, state_grads, take_for_backward)
from longtrain.parallel.sharding import local_chunks
from longtrain.parallel.state_scan import first_receives, scan_backward, scan_forward, scan_route

DEFAULT_BLOCKS = 4


def num_blocks(dv: int, blocks: int | None) -> int:
    """K: the requested number of blocks (default 4), capped at Dv."""
    k = DEFAULT_BLOCKS if blocks is None else blocks
    if k < 1:
        raise ValueError(f"zeco_blocks must be >= 1, got {k}")
    return min(k, dv)


def scan_backend(backend, device: torch.device):
    """Kernels of the scan's state combines: on CPU the scan runs on a thread, and Triton on CPU is its interpreter,
    which is not thread-safe, so the combines run in torch there."""
    return backend if device.type == "cuda" else get_backend("torch")


class ZeCO(torch.autograd.Function):
    """This rank's shard of linear attention; the state prefix arrives through the All-Scan pipeline."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, seg, gates, group, scale, chunk_size, backend, blocks, layout):
        P, r = group_size(group), group_rank(group)
        route, K = scan_route(P, r, layout), num_blocks(v.shape[-1], blocks)
        shape = (q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])  # [B, H, Dk, Dv]
        incoming = first_receives(route, r, False, shape, acc_dtype(q), q.device, K, group, "zeco_fwd")
        scan_kernels = scan_backend(backend, q.device)
        scan = {}

        def start_scan(summaries):
            scan["job"] = Overlap(lambda: scan_forward(summaries, route, r, gates, incoming, K, scan_kernels, group,
                                                       "zeco_fwd"), q.device)

        chunks = local_chunks(q.shape[2], P, r, layout)
        lps = local_passes(q, k, v, log_decay, seg, scale, chunk_size, backend, chunks, start_scan)
        states_in = scan["job"].join()
        ctx.group, ctx.gates, ctx.route, ctx.blocks, ctx.chunks = group, gates, route, K, chunks
        ctx.local, ctx.overlap = (scale, chunk_size, backend), overlap_backward(lps[0])
        keep_for_backward(ctx, lps, states_in, (q, k, v, log_decay, seg))
        return torch.cat([correct(lp, s) for lp, s in zip(lps, states_in)], 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        group, gates, route, K = ctx.group, ctx.gates, ctx.route, ctx.blocks
        lps, states_in = take_for_backward(ctx, *ctx.local, ctx.chunks)
        r = group_rank(group)
        incoming = first_receives(route, r, True, states_in[0].shape, states_in[0].dtype, dout.device, K, group,
                                 "zeco_bwd")
        douts = [dout.narrow(2, off, n) for off, _, n in ctx.chunks]
        corrections = [correction_backward(lp, d, s) for lp, d, s in zip(lps, douts, states_in)]
        decays = [lp.decay.detach() for lp in lps]

        def scan():
            return scan_backward([g for _, g in corrections], decays, route, r, gates, incoming, K,
                                 scan_backend(lps[0].backend, dout.device), group, "zeco_bwd")

        corr = [c for c, _ in corrections]
        if ctx.overlap:
            job = Overlap(scan, dout.device)
            partial = local_backward(lps, douts, states_in, [None] * len(lps), corr, keep_graph=True)
            merged = add_grads(partial, state_grads(lps, states_in, job.join()))
        else:
            merged = local_backward(lps, douts, states_in, scan(), corr)
        return (*merged, None, None, None, None, None, None, None, None)
