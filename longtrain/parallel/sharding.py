"""Which tokens each SP rank holds: contiguous blocks or the causal-balanced zigzag layout."""
import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.parallel.comm import group_rank, group_size

LAYOUTS = ("contiguous", "zigzag")


def num_chunks(P: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return P if layout == "contiguous" else 2 * P


def check_divisible(n: int, P: int, layout: str) -> None:
    parts = num_chunks(P, layout)
    if n % parts:
        raise ValueError(f"sequence length N={n} is not divisible by {parts} (SP degree P={P}, layout={layout!r}); "
                         f"set parallel.pad=true or choose N divisible by {parts}")


def chunk_ids(P: int, rank: int, layout: str) -> list[int]:
    """Global chunk indices held by `rank`, in the order they are stored locally."""
    return [rank] if layout == "contiguous" else [rank, 2 * P - 1 - rank]


def by_chunk(gathered: Tensor, P: int, layout: str) -> list[Tensor]:
    """Entries gathered per rank [P, chunks per rank, ...] as a list in global chunk order."""
    out = [None] * (P * gathered.shape[1])
    for p in range(P):
        for i, c in enumerate(chunk_ids(P, p, layout)):
            out[c] = gathered[p, i]
    return out


def local_chunks(n_local: int, P: int, rank: int, layout: str) -> list[tuple[int, int, int]]:
    """(local_offset, global_start, length) of each chunk this rank holds, for n_local local tokens."""
    ids = chunk_ids(P, rank, layout)
    size = n_local // len(ids)
    return [(i * size, c * size, size) for i, c in enumerate(ids)]


def local_positions(n_local: int, group, layout: str, device=None) -> Tensor:
    """Global positions [n_local] of this rank's tokens."""
    P, r = group_size(group), group_rank(group)
    return torch.cat([torch.arange(g, g + n, device=device) for _, g, n in local_chunks(n_local, P, r, layout)])


def shard_sequence(x: Tensor, dim: int, group=None, layout: str = "contiguous") -> Tensor:
    """This rank's tokens of the full sequence x along `dim`."""
    P, r = group_size(group), group_rank(group)
    check_divisible(x.shape[dim], P, layout)
    chunks = x.chunk(num_chunks(P, layout), dim)
    return torch.cat([chunks[c] for c in chunk_ids(P, r, layout)], dim)


def unshard_sequence(x_local: Tensor, dim: int, group=None, layout: str = "contiguous") -> Tensor:
    """The full sequence from every rank's shard (all-gather, no autograd)."""
    P = group_size(group)
    parts = [torch.empty_like(x_local) for _ in range(P)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    return gather_order(parts, dim, layout)


def gather_order(parts: list[Tensor], dim: int, layout: str) -> Tensor:
    """Concatenate per-rank shards [rank 0, rank 1, ...] into global sequence order."""
    P = len(parts)
    if layout == "contiguous":
        return torch.cat(parts, dim)
    chunks = [None] * (2 * P)
    for r, part in enumerate(parts):
        front, back = part.chunk(2, dim)
        chunks[r], chunks[2 * P - 1 - r] = front, back
    return torch.cat(chunks, dim)


def scatter_order(full: Tensor, dim: int, P: int, layout: str) -> list[Tensor]:
    """Inverse of gather_order: split a global-order tensor into per-rank shards."""
    chunks = full.chunk(num_chunks(P, layout), dim)
    return [torch.cat([chunks[c] for c in chunk_ids(P, r, layout)], dim) for r in range(P)]


def pad_sequence(tokens: Tensor, multiple: int, pad_id: int = 0) -> tuple[Tensor, int]:
    """Right-pad [B, N] tokens to a multiple of `multiple`; returns (padded, number of pad tokens)."""
    pad = (-tokens.shape[1]) % multiple
    if pad:
        tokens = torch.nn.functional.pad(tokens, (0, pad), value=pad_id)
    return tokens, pad
