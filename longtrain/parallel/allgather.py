"""All-gather K/V attention (Llama-3 context parallelism, the softmax half of LASP-2H).

Communication (per rank, P ranks): forward all-gathers K and V [B, Hkv, N/P, D] (only the Hkv heads
travel under GQA) and the segment ids; backward reduce-scatters dK and dV of the full sequence back to
their owners. Each local query chunk attends to the gathered keys at its global offset, so causal and
window tiles outside the mask are skipped by the kernel.
"""
import torch
from torch import Tensor

from longtrain.parallel.comm import all_gather, group_rank, group_size, reduce_scatter
from longtrain.parallel.sharding import gather_order, local_chunks, scatter_order


def gather_sequence(x: Tensor, group, layout: str, dim: int, kind: str) -> Tensor:
    """All-gather shards along `dim` and return them in global sequence order."""
    parts, _ = all_gather(x, group, kind)
    return gather_order(list(parts.unbind(0)), dim, layout)


class AllGatherAttention(torch.autograd.Function):
    """(out, lse) of local queries against the all-gathered K/V."""

    @staticmethod
    def forward(ctx, q, k, v, seg, group, layout, backend, opts):
        P, r = group_size(group), group_rank(group)
        k_full = gather_sequence(k, group, layout, 2, "allgather_fwd")
        v_full = gather_sequence(v, group, layout, 2, "allgather_fwd")
        seg_full = None if seg is None else gather_sequence(seg, group, layout, 1, "allgather_fwd")
        outs, lses = [], []
        for off, start, n in local_chunks(q.shape[2], P, r, layout):
            out_c, lse_c = backend.attention_forward(q[:, :, off:off + n], k_full, v_full,
                                             q_seg=None if seg is None else seg[:, off:off + n], k_seg=seg_full,
                                             q_start=start, k_start=0, **opts)
            outs.append(out_c)
            lses.append(lse_c)
        out = torch.cat(outs, 2)
        lse = None if lses[0] is None else torch.cat(lses, 2)
        ctx.save_for_backward(q, k_full, v_full, seg, seg_full, out, lse)
        ctx.group, ctx.layout, ctx.backend, ctx.opts = group, layout, backend, opts
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k_full, v_full, seg, seg_full, out, lse = ctx.saved_tensors
        group, layout, backend, opts = ctx.group, ctx.layout, ctx.backend, ctx.opts
        P, r = group_size(group), group_rank(group)
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
        dk_full = torch.zeros_like(k_full, dtype=out.dtype)
        dv_full = torch.zeros_like(v_full, dtype=out.dtype)
        for off, start, n in local_chunks(q.shape[2], P, r, layout):
            sl = slice(off, off + n)
            dq_c, dk_c, dv_c = backend.attention_backward(
                dout[:, :, sl], q[:, :, sl], k_full, v_full, out[:, :, sl], None if lse is None else lse[:, :, sl],
                q_seg=None if seg is None else seg[:, sl], k_seg=seg_full, q_start=start, k_start=0,
                dlse=None if dlse is None else dlse[:, :, sl], **opts)
            dq[:, :, sl] = dq_c
            dk_full += dk_c
            dv_full += dv_c
        dk = reduce_scatter(torch.stack(scatter_order(dk_full, 2, P, layout)), group, "allgather_bwd")
        dv = reduce_scatter(torch.stack(scatter_order(dv_full, 2, P, layout)), group, "allgather_bwd")
        return dq.to(q.dtype), dk.to(k_full.dtype), dv.to(v_full.dtype), None, None, None, None, None


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, seg: Tensor | None, group, layout: str, backend,
                        opts: dict) -> tuple[Tensor, Tensor | None]:
    """All-gather attention over `group`; q/k/v/seg are this rank's shards in `layout`."""
    return AllGatherAttention.apply(q, k, v, seg, group, layout, backend, opts)
