"""The point-to-point state scan of LASP-1 and ZeCO, over the chunks in sequence order, in K blocks along Dv.

Chunk c's incoming state is S_c = gate_c (A_{c-1} S_{c-1} + M_{c-1}); its state gradient flows back as
W_c = gate_c (dS_c + A_c W_{c+1}). With the contiguous layout chunk c is rank c, so the scan is a chain
0 -> 1 -> ... -> P-1. With zigzag, rank r holds chunks r and 2P-1-r, and the chain visits ranks
0 .. P-1 and back to 0 (rank P-1 passes chunk P-1's state to its own chunk P without a message): twice
the hops, the same bytes per rank in total, and the softmax layers of a hybrid stay load-balanced.
Every message is split into K blocks along Dv, each a single send/recv with its own request (NCCL runs
them on the rank pair's own stream; a batch would coalesce into one request on the group's stream), and
each block is forwarded as soon as it arrives: the scan costs about (hops + K - 1) block transfers
instead of hops full-state transfers (ZeCO's All-Scan). NCCL runs a rank pair's ops in posting order,
so only the receives of the chunk the scan visits first are posted early (before the local compute);
the others are posted when the scan reaches their chunk, after the sends before them. (Zigzag: rank r
sends to r+1 before it receives from r+1, and rank r+1 receives from r before it sends to r.)
"""
import torch
from torch import Tensor

from longtrain.parallel.comm import recv, send, wait
from longtrain.parallel.linear_state import combine, gate_of
from longtrain.parallel.sharding import chunk_ids


def scan_route(P: int, r: int, layout: str) -> list[tuple[int, int | None, int | None]]:
    """(chunk, rank holding chunk-1, rank holding chunk+1) for each of rank r's chunks, in sequence order."""
    owner = {c: p for p in range(P) for c in chunk_ids(P, p, layout)}
    return [(c, owner.get(c - 1), owner.get(c + 1)) for c in chunk_ids(P, r, layout)]


def block_sizes(dv: int, blocks: int) -> list[int]:
    return [len(ids) for ids in torch.arange(dv).tensor_split(blocks)]


def post_receives(peer: int, shape: tuple, dtype, device, blocks: int, group, kind: str) -> list:
    """(buffer, request) of each block of a state [B, H, Dk, Dv] arriving from group rank `peer`, in block order."""
    parts = [torch.empty(*shape[:-1], n, dtype=dtype, device=device) for n in block_sizes(shape[-1], blocks)]
    return [(part, recv(part, peer, group, kind)) for part in parts]


def first_receives(route: list, r: int, from_next: bool, shape: tuple, dtype, device, blocks: int, group,
                   kind: str) -> dict:
    """{chunk: blocks} for the chunk the scan visits first when its state comes from another rank (forward: the
    first chunk, from chunk c-1's rank; backward, from_next: the last chunk, from chunk c+1's rank)."""
    c, prev_rank, next_rank = route[-1] if from_next else route[0]
    peer = next_rank if from_next else prev_rank
    if peer is None or peer == r:
        return {}
    return {c: post_receives(peer, shape, dtype, device, blocks, group, kind)}


def receive(incoming: dict, c: int, peer: int, like: Tensor, blocks: int, b: int, group, kind: str) -> Tensor:
    """Block b of chunk c's incoming state, posting the chunk's receives first if the scan had not yet."""
    if c not in incoming:
        incoming[c] = post_receives(peer, like.shape, like.dtype, like.device, blocks, group, kind)
    part, req = incoming[c][b]
    wait([req])
    return part


def scan_forward(summaries: list[tuple[Tensor, Tensor]], route: list, r: int, gates, incoming: dict, blocks: int,
                 backend, group, kind: str) -> list[Tensor]:
    """S_c [B, H, Dk, Dv] of each own chunk from its (M_c, A_c) summaries; sends A_c S_c + M_c on, block by block."""
    states_in, carry, sends = [], None, []
    for (state, decay), (c, prev_rank, next_rank) in zip(summaries, route):
        parts, carry_next = [], []
        for b, state_b in enumerate(state.tensor_split(blocks, -1)):
            if prev_rank is None:
                part = torch.zeros_like(state_b)
            else:
                part = carry[b] if prev_rank == r else receive(incoming, c, prev_rank, state, blocks, b, group, kind)
                part = part * gate_of(gates, c, part)
            parts.append(part)
            if next_rank is not None:
                nxt = combine(backend, decay, part, state_b)
                if next_rank == r:
                    carry_next.append(nxt)
                else:
                    sends.append(send(nxt, next_rank, group, kind))
        carry = carry_next
        states_in.append(torch.cat(parts, -1))
    wait(sends)
    return states_in


def scan_backward(grad_states: list[Tensor], decays: list[Tensor], route: list, r: int, gates, incoming: dict,
                  blocks: int, backend, group, kind: str) -> list[Tensor | None]:
    """W_{c+1} of each own chunk (None for the last chunk); sends W_c = gate_c (dS_c + A_c W_{c+1}) back."""
    w_after, carry, sends = [None] * len(route), None, []
    for i in reversed(range(len(route))):
        c, prev_rank, next_rank = route[i]
        w_in, carry_next = [], []
        for b, grad_b in enumerate(grad_states[i].tensor_split(blocks, -1)):
            if next_rank is not None:
                w_b = carry[b] if next_rank == r else receive(incoming, c, next_rank, grad_states[i], blocks, b,
                                                              group, kind)
                w_in.append(w_b)
                grad_b = combine(backend, decays[i], w_b, grad_b.contiguous())
            if prev_rank is not None:
                w_out = gate_of(gates, c, grad_b) * grad_b
                if prev_rank == r:
                    carry_next.append(w_out)
                else:
                    sends.append(send(w_out, prev_rank, group, kind))
        carry = carry_next
        w_after[i] = torch.cat(w_in, -1) if w_in else None
    wait(sends)
    return w_after
