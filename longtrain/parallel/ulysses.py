"""DeepSpeed-Ulysses: all-to-all from sequence-sharded to head-sharded, attention on full sequences, back.

Communication (per rank, P ranks): forward one all-to-all each for q, k, v ([B, H, N/P, D] ->
[B, H/P, N, D]; (P-1)/P of each tensor leaves the rank) and one for the output; backward the mirror
all-to-alls of the gradients. Heads are independent, so it serves both attention families.
"""
import torch
from torch import Tensor

from longtrain.kernels import local_attention
from longtrain.parallel.comm import all_gather, all_to_all, group_size
from longtrain.parallel.sharding import gather_order, scatter_order


def check_heads(n_heads: int, n_kv_heads: int, P: int) -> None:
    if n_heads % P or n_kv_heads % P:
        valid = [u for u in range(1, P + 1) if P % u == 0 and n_heads % u == 0 and n_kv_heads % u == 0]
        raise ValueError(f"ulysses needs query heads ({n_heads}) and kv heads ({n_kv_heads}) divisible by its "
                         f"degree {P}; use usp with parallel.ulysses_size in {valid} or another algorithm")


def seq_to_head(x: Tensor, group, layout: str, kind: str) -> Tensor:
    """[B, H, N/P, D] sequence shard -> [B, H/P, N, D] head shard in global token order."""
    P = group_size(group)
    parts = all_to_all(torch.stack(x.chunk(P, 1)), group, kind)  # [P, B, H/P, N/P, D], part p from rank p
    return gather_order(list(parts.unbind(0)), 2, layout)


def head_to_seq(x: Tensor, group, layout: str, kind: str) -> Tensor:
    """[B, H/P, N, D] head shard -> [B, H, N/P, D] sequence shard (inverse of seq_to_head)."""
    P = group_size(group)
    parts = all_to_all(torch.stack(scatter_order(x, 2, P, layout)), group, kind)  # part p: heads of rank p
    return torch.cat(list(parts.unbind(0)), 1)


class SeqToHead(torch.autograd.Function):
    """Differentiable seq_to_head; its backward is head_to_seq of the gradient."""

    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group, ctx.layout = group, layout
        return seq_to_head(x, group, layout, "ulysses_fwd")

    @staticmethod
    def backward(ctx, grad):
        return head_to_seq(grad, ctx.group, ctx.layout, "ulysses_bwd"), None, None


class HeadToSeq(torch.autograd.Function):
    """Differentiable head_to_seq; its backward is seq_to_head of the gradient."""

    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group, ctx.layout = group, layout
        return head_to_seq(x, group, layout, "ulysses_fwd")

    @staticmethod
    def backward(ctx, grad):
        return seq_to_head(grad, ctx.group, ctx.layout, "ulysses_bwd"), None, None


def gather_segments(seg: Tensor | None, group, layout: str) -> Tensor | None:
    """Full-sequence segment ids [B, N] from every rank's [B, N/P] (no gradient)."""
    if seg is None:
        return None
    parts, _ = all_gather(seg, group, "ulysses_fwd")
    return gather_order(list(parts.unbind(0)), 1, layout)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, seg: Tensor | None, group, layout: str, backend, opts: dict,
                      return_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """Softmax/sigmoid attention over full sequences of H/P heads; lse travels back only when asked for."""
    check_heads(q.shape[1], k.shape[1], group_size(group))
    qh, kh, vh = (SeqToHead.apply(t, group, layout) for t in (q, k, v))
    seg_full = gather_segments(seg, group, layout)
    out, lse = local_attention(qh, kh, vh, backend=backend, q_seg=seg_full, k_seg=seg_full, **opts)
    out = HeadToSeq.apply(out, group, layout)
    if lse is None or not return_lse:
        return out, None
    return out, HeadToSeq.apply(lse[..., None], group, layout)[..., 0]


def ulysses_linear_attention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, seg: Tensor | None, group,
                             layout: str, backend, scale: float, chunk_size: int) -> Tensor:
    """Chunked linear attention over full sequences of H/P heads (heads are independent)."""
    check_heads(q.shape[1], k.shape[1], group_size(group))
    qh, kh, vh = (SeqToHead.apply(t, group, layout) for t in (q, k, v))
    gh = None
    if log_decay is not None:
        g4 = log_decay if log_decay.dim() == 4 else log_decay[..., None]
        gh = SeqToHead.apply(g4, group, layout)
        gh = gh if log_decay.dim() == 4 else gh[..., 0]
    out, _ = backend.linear_attention_chunked(qh, kh, vh, scale=scale, log_decay=gh,
                                              segment_ids=gather_segments(seg, group, layout), chunk_size=chunk_size)
    return HeadToSeq.apply(out, group, layout)
