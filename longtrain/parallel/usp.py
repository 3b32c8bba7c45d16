"""USP: Ulysses all-to-all inside groups of U ranks, ring attention across the P/U groups.

Communication: the Ulysses all-to-alls within each group of U consecutive SP ranks, then the ring's
P2P of K/V (heads H/U) among the P/U ranks that share an index inside their group. SP may then exceed
the head count. With the zigzag layout the tokens a group gathers are exactly the zigzag chunks of a
P/U ring, so the ring keeps its causal load balance.
"""
import torch.distributed as dist
from torch import Tensor

from longtrain.parallel.comm import group_rank
from longtrain.parallel.ring import ring_attention
from longtrain.parallel.ulysses import HeadToSeq, SeqToHead, check_heads, gather_segments

_GROUPS: dict = {}


def usp_groups(group, ulysses_size: int):
    """(ulysses_group, ring_group) of this rank, created once per (SP group, U)."""
    ranks = dist.get_process_group_ranks(group)
    key = (tuple(ranks), ulysses_size)
    if key not in _GROUPS:
        P, r = len(ranks), group_rank(group)
        if P % ulysses_size:
            raise ValueError(f"parallel.ulysses_size={ulysses_size} must divide the SP degree {P}")
        g, i = divmod(r, ulysses_size)
        ulysses = ranks[g * ulysses_size:(g + 1) * ulysses_size]
        ring = ranks[i::ulysses_size]
        _GROUPS[key] = (dist.new_group(ulysses, use_local_synchronization=True),
                        dist.new_group(ring, use_local_synchronization=True))
    return _GROUPS[key]


def usp_attention(q: Tensor, k: Tensor, v: Tensor, seg: Tensor | None, group, layout: str, ulysses_size: int,
                  backend, opts: dict, return_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """Ulysses over groups of `ulysses_size` ranks, then ring attention across groups."""
    check_heads(q.shape[1], k.shape[1], ulysses_size)
    ulysses, ring = usp_groups(group, ulysses_size)
    qh, kh, vh = (SeqToHead.apply(t, ulysses, layout) for t in (q, k, v))
    out, lse = ring_attention(qh, kh, vh, gather_segments(seg, ulysses, layout), ring, layout, backend, opts)
    out = HeadToSeq.apply(out, ulysses, layout)
    if lse is None or not return_lse:
        return out, None
    return out, HeadToSeq.apply(lse[..., None], ulysses, layout)[..., 0]
