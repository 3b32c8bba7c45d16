"""All-gather K/V attention (Llama-3 context parallelism, the softmax half of LASP-2H).

Communication (per rank, P ranks): forward all-gathers K and V [B, Hkv, N/P, D] (only the Hkv heads
travel under GQA) and the segment ids; backward gathers K and V again (as Llama-3 and Megatron's
all-gather CP do: the gathered [B, Hkv, N, D] pair is not kept between forward and backward, only the
shards; `save_gathered_kv=True` keeps it and skips the second gather when memory allows), then
reduce-scatters dK and dV of the full sequence back to their owners in fp32, the accumulators' dtype:
in bf16 the P partial sums would round at every hop of the reduction and drift from the single-device
gradient, for half the bytes of this one collective.
Each local query chunk attends to the gathered keys at its global offset, so causal and window tiles
outside the mask are skipped by the kernel.
"""
import torch
from torch import Tensor

from longtrain.parallel.comm import all_gather, group_rank, group_size, reduce_scatter
from longtrain.parallel.sharding import gather_order, local_chunks, scatter_order


def gather_sequence(x: Tensor, group, layout: str, dim: int, kind: str) -> Tensor:
    """All-gather shards along `dim` and return them in global sequence order."""
    parts, _ = all_gather(x, group, kind)
    return gather_order(list(parts.unbind(0)), dim, layout)


def gather_kv(k: Tensor, v: Tensor, group, layout: str, kind: str) -> tuple[Tensor, Tensor]:
    """K and V [B, Hkv, N, D] of the full sequence from every rank's shard, in one all-gather."""
    if k.shape != v.shape:
        return gather_sequence(k, group, layout, 2, kind), gather_sequence(v, group, layout, 2, kind)
    parts, _ = all_gather(torch.stack([k, v]), group, kind)  # [P, 2, B, Hkv, N/P, D]
    full = gather_order(list(parts.unbind(0)), 3, layout)
    return full[0], full[1]


class AllGatherAttention(torch.autograd.Function):
    """(out, lse) of local queries against the all-gathered K/V."""

    @staticmethod
    def forward(ctx, q, k, v, seg, group, layout, backend, opts, save_kv):
        P, r = group_size(group), group_rank(group)
        k_full, v_full = gather_kv(k, v, group, layout, "allgather_fwd")
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
        ctx.save_for_backward(q, *((k_full, v_full) if save_kv else (k, v)), seg, seg_full, out, lse)
        ctx.group, ctx.layout, ctx.backend, ctx.opts, ctx.save_kv = group, layout, backend, opts, save_kv
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, seg, seg_full, out, lse = ctx.saved_tensors
        group, layout, backend, opts = ctx.group, ctx.layout, ctx.backend, ctx.opts
        P, r = group_size(group), group_rank(group)
        k_full, v_full = (k, v) if ctx.save_kv else gather_kv(k, v, group, layout, "allgather_bwd")
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
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, seg: Tensor | None, group, layout: str, backend,
                        opts: dict, save_kv: bool = False) -> tuple[Tensor, Tensor | None]:
    """All-gather attention over `group`; q/k/v/seg are this rank's shards in `layout`."""
    return AllGatherAttention.apply(q, k, v, seg, group, layout, backend, opts, save_kv)
