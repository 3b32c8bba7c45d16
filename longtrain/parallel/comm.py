"""Collectives and P2P for the SP algorithms: byte accounting, NCCL semantics on gloo, an emulated slow link.

Accounting convention (per rank): a P2P send counts its bytes as sent; all_gather and reduce_scatter
count (P-1) local shards sent and received (the ring algorithm); all_to_all counts the (P-1)/P of the
tensor that leaves the rank. The trainer logs these as comm/bytes_sent/<kind>.

What the algorithms rely on, where gloo (CPU tests) and NCCL (users) differ:
- Requests from `p2p` are only waited on, never indexed or counted: NCCL's batch_isend_irecv coalesces
  a batch into ONE request that completes the whole batch, gloo returns one per op. An algorithm
  that must act on each message as it arrives (ZeCO's pipeline) posts one batch per message.
- A send buffer is not written until its request has completed (NCCL reads it asynchronously, on its
  own stream). `Request.wait` checks this through the tensor's version counter, on every backend;
  the buffer stays referenced by its request until then.
- On CUDA, `wait()` makes only the current stream wait; the CPU does not block. Work that uses a
  received tensor runs on the stream that waited; `Overlap` runs a scan on a side stream and
  `Overlap.join` makes the caller's stream wait for it (and records its outputs on that stream).
  On CPU `Overlap` runs the scan on a thread: gloo's waits block the calling thread only.
- all_gather_into_tensor puts rank p's shard at rows [p*n, (p+1)*n) of dim 0 on both backends; gloo
  has no reduce_scatter_tensor (emulated by all_reduce and a slice, so inputs are [P, ...] stacks).
- bf16 tensors go through every wrapper on both backends (gloo sums bf16 in all_reduce).

`emulate_nccl(True)` gives gloo runs NCCL's coalesced requests; the CPU tests run every P2P algorithm
in both modes. `set_link(latency_s, bytes_per_s)` delays every message as a slow link would (sends
leave one after another, each taking latency + bytes / bandwidth), so benchmarks on one machine show
what overlaps what.
"""
import queue
import threading
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
BYTES_SENT: dict[str, int] = defaultdict(int)
BYTES_RECV: dict[str, int] = defaultdict(int)
NCCL_SEMANTICS = {"coalesce": False}
LINK: dict = {"link": None}


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


def emulate_nccl(on: bool = True) -> None:
    """Make p2p return one request per batch, as NCCL's coalesced batch_isend_irecv does."""
    NCCL_SEMANTICS["coalesce"] = on


def set_link(latency_s: float = 0.0, bytes_per_s: float | None = None) -> None:
    """Delay every message by latency + bytes / bandwidth, sends in order (bytes_per_s=None: no delay)."""
    LINK["link"] = None if bytes_per_s is None and latency_s == 0 else SlowLink(latency_s, bytes_per_s)


class Request:
    """Completion of a batch of P2P ops; fails if a send buffer was written before it completed."""

    def __init__(self, works: list, sends: list[Tensor], kind: str):
        self.works, self.kind = works, kind
        self.sends = [(t, t._version) for t in sends]

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        for t, version in self.sends:
            if t._version != version:
                raise RuntimeError(f"{self.kind}: a send buffer {tuple(t.shape)} was written before its send "
                                   f"completed (NCCL would send the new values)")


class SlowLink:
    """This rank's emulated outgoing link: a thread posts each send once the link has carried it."""

    def __init__(self, latency_s: float, bytes_per_s: float | None):
        self.latency, self.bandwidth, self.free_at = latency_s, bytes_per_s, 0.0
        self.queue = queue.Queue()
        threading.Thread(target=self.run, daemon=True).start()

    def delay(self, n_bytes: int) -> float:
        return self.latency + (n_bytes / self.bandwidth if self.bandwidth else 0.0)

    def send(self, t: Tensor, peer: int, group) -> "DelayedSend":
        self.free_at = max(time.perf_counter(), self.free_at) + self.delay(nbytes(t))
        req = DelayedSend()
        self.queue.put((self.free_at, t, dist.get_global_rank(group, peer), group, req))
        return req

    def run(self) -> None:
        while True:
            at, t, dst, group, req = self.queue.get()
            time.sleep(max(0.0, at - time.perf_counter()))
            try:
                req.work = dist.isend(t, dst, group=group)
            except BaseException as e:  # re-raised by the waiter
                req.error = e
            req.posted.set()


class DelayedSend:
    """A send that the slow link posts later; wait() waits for the post, then for the send."""

    def __init__(self):
        self.posted, self.work, self.error = threading.Event(), None, None

    def wait(self) -> None:
        self.posted.wait()
        if self.error is not None:
            raise self.error
        self.work.wait()


class DelayedWork:
    """A collective's request that completes no earlier than the emulated link would deliver it."""

    def __init__(self, work, ready_at: float):
        self.work, self.ready_at = work, ready_at

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))


def p2p(sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]], group, kind: str) -> list[Request]:
    """Post sends [(tensor, group_rank)] and receives [(buffer, group_rank)] together; returns requests to wait on."""
    if not all(t.is_contiguous() for t, _ in recvs):
        raise ValueError(f"{kind}: receive buffers must be contiguous")
    sends = [(t.contiguous(), peer) for t, peer in sends]
    for t, _ in sends:
        BYTES_SENT[kind] += nbytes(t)
    for t, _ in recvs:
        BYTES_RECV[kind] += nbytes(t)
    link = LINK["link"]
    ops = [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for t, peer in recvs]
    if link is None:
        ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group) for t, peer in sends] + ops
        works = dist.batch_isend_irecv(ops) if ops else []
    else:
        works = [link.send(t, peer, group) for t, peer in sends] + (dist.batch_isend_irecv(ops) if ops else [])
    sent = [t for t, _ in sends]
    if NCCL_SEMANTICS["coalesce"]:
        return [Request(works, sent, kind)] if works else []
    return [Request([work], sent[i:i + 1], kind) for i, work in enumerate(works)]


def wait(reqs: list) -> None:
    for req in reqs:
        req.wait()


def collective_delay(P: int, shard_bytes: int) -> float:
    """Emulated time of a ring collective: P-1 hops of one shard (0 without a slow link)."""
    link = LINK["link"]
    return 0.0 if link is None else (P - 1) * link.delay(shard_bytes)


def all_gather(t: Tensor, group, kind: str, async_op: bool = False):
    """Gather t from every rank into [P, *t.shape]; returns (tensor, request or None)."""
    P = group_size(group)
    t = t.contiguous()
    out = t.new_empty(P * t.shape[0], *t.shape[1:]) if t.dim() else t.new_empty(P)
    BYTES_SENT[kind] += (P - 1) * nbytes(t)
    BYTES_RECV[kind] += (P - 1) * nbytes(t)
    ready_at = time.perf_counter() + collective_delay(P, nbytes(t))
    req = ALL_GATHER(out, t if t.dim() else t[None], group=group, async_op=async_op)
    if async_op and LINK["link"] is not None:
        req = DelayedWork(req, ready_at)
    elif not async_op:
        DelayedWork(None, ready_at).wait()
    return out.view(P, *t.shape), req


def reduce_scatter(t: Tensor, group, kind: str) -> Tensor:
    """Sum [P, ...] over ranks and return this rank's slice t[rank] (all_reduce where gloo lacks it)."""
    P = group_size(group)
    t = t.contiguous()
    BYTES_SENT[kind] += (P - 1) * nbytes(t[0])
    BYTES_RECV[kind] += (P - 1) * nbytes(t[0])
    ready_at = time.perf_counter() + collective_delay(P, nbytes(t[0]))
    if dist.get_backend(group) == "gloo":
        dist.all_reduce(t, group=group)
        out = t[group_rank(group)].clone()
    else:
        out = t.new_empty(t.shape[1:])
        REDUCE_SCATTER(out, t.flatten(0, 1), group=group)
    DelayedWork(None, ready_at).wait()
    return out


def all_to_all(t: Tensor, group, kind: str) -> Tensor:
    """Exchange t [P, ...]: slice p goes to rank p; returns [P, ...] with slice p from rank p."""
    P = group_size(group)
    t = t.contiguous()
    out = torch.empty_like(t)
    BYTES_SENT[kind] += (P - 1) * nbytes(t[0])
    BYTES_RECV[kind] += (P - 1) * nbytes(t[0])
    ready_at = time.perf_counter() + collective_delay(P, nbytes(t[0]))
    dist.all_to_all_single(out, t, group=group)
    DelayedWork(None, ready_at).wait()
    return out


class Overlap:
    """Run fn() alongside the caller's compute: on a side stream on CUDA, on a thread on CPU (gloo)."""

    def __init__(self, fn, device: torch.device):
        self.result, self.error, self.stream, self.thread = None, None, None, None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream), torch.no_grad():
                self.result = fn()
        else:
            self.thread = threading.Thread(target=self.run, args=(fn,), daemon=True)
            self.thread.start()

    def run(self, fn) -> None:
        try:
            with torch.no_grad():
                self.result = fn()
        except BaseException as e:  # re-raised by join
            self.error = e

    def join(self):
        """fn's result, ready for use on the caller's stream / thread."""
        if self.stream is not None:
            current = torch.cuda.current_stream(self.stream.device)
            current.wait_stream(self.stream)
            if isinstance(self.result, Tensor):
                self.result.record_stream(current)
            return self.result
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result
