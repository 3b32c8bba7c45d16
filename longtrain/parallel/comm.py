"""Thin wrappers over torch.distributed that count bytes sent/received per rank and per kind.

Accounting convention (per rank): a P2P send counts its bytes as sent; all_gather and reduce_scatter
count (P-1) local shards sent and received (the ring algorithm); all_to_all counts the (P-1)/P of the
tensor that leaves the rank. The trainer logs these as comm/bytes_sent/<kind>.
"""
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
BYTES_SENT: dict[str, int] = defaultdict(int)
BYTES_RECV: dict[str, int] = defaultdict(int)


def reset_counters() -> None:
    BYTES_SENT.clear()
    BYTES_RECV.clear()


def snapshot() -> dict[str, int]:
    """Current counters as flat metrics: comm/bytes_sent/<kind>, comm/bytes_recv/<kind>, comm/bytes_sent."""
    out = {f"comm/bytes_sent/{k}": v for k, v in BYTES_SENT.items()}
    out.update({f"comm/bytes_recv/{k}": v for k, v in BYTES_RECV.items()})
    out["comm/bytes_sent"] = sum(BYTES_SENT.values())
    return out


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


def p2p(sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]], group, kind: str) -> list:
    """Post sends [(tensor, group_rank)] and receives [(buffer, group_rank)] together; returns the requests."""
    if not all(t.is_contiguous() for t, _ in recvs):
        raise ValueError(f"{kind}: receive buffers must be contiguous")
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for t, peer in recvs]
    for t, _ in sends:
        BYTES_SENT[kind] += nbytes(t)
    for t, _ in recvs:
        BYTES_RECV[kind] += nbytes(t)
    return dist.batch_isend_irecv(ops) if ops else []


def wait(reqs: list) -> None:
    for req in reqs:
        req.wait()


def all_gather(t: Tensor, group, kind: str, async_op: bool = False):
    """Gather t from every rank into [P, *t.shape]; returns (tensor, request or None)."""
    P = group_size(group)
    t = t.contiguous()
    out = t.new_empty(P * t.shape[0], *t.shape[1:]) if t.dim() else t.new_empty(P)
    BYTES_SENT[kind] += (P - 1) * nbytes(t)
    BYTES_RECV[kind] += (P - 1) * nbytes(t)
    req = ALL_GATHER(out, t if t.dim() else t[None], group=group, async_op=async_op)
    return out.view(P, *t.shape), req


def reduce_scatter(t: Tensor, group, kind: str) -> Tensor:
    """Sum [P, ...] over ranks and return this rank's slice t[rank] (all_reduce where gloo lacks it)."""
    P = group_size(group)
    t = t.contiguous()
    BYTES_SENT[kind] += (P - 1) * nbytes(t[0])
    BYTES_RECV[kind] += (P - 1) * nbytes(t[0])
    if dist.get_backend(group) == "gloo":
        dist.all_reduce(t, group=group)
        return t[group_rank(group)].clone()
    out = t.new_empty(t.shape[1:])
    REDUCE_SCATTER(out, t.flatten(0, 1), group=group)
    return out


def all_to_all(t: Tensor, group, kind: str) -> Tensor:
    """Exchange t [P, ...]: slice p goes to rank p; returns [P, ...] with slice p from rank p."""
    P = group_size(group)
    t = t.contiguous()
    out = torch.empty_like(t)
    BYTES_SENT[kind] += (P - 1) * nbytes(t[0])
    BYTES_RECV[kind] += (P - 1) * nbytes(t[0])
    dist.all_to_all_single(out, t, group=group)
    return out
