"""Collectives and P2P for the SP algorithms: byte accounting, NCCL semantics on gloo, an emulated slow link.

Accounting convention (per rank): a P2P send counts its bytes as sent; all_gather and reduce_scatter
count (P-1) local shards sent and received (the ring algorithm); all_to_all counts the (P-1)/P of the
tensor that leaves the rank. The trainer logs these as comm/bytes_sent/<kind>.

What the algorithms rely on, where gloo (CPU tests) and NCCL (users) differ:
- Requests from `p2p` are only waited on, never indexed or counted: NCCL's batch_isend_irecv coalesces
  a batch into ONE request that completes the whole batch (on the group's stream), gloo returns one per
  op. An algorithm that must act on each message as it arrives (ZeCO's pipeline) uses `send`/`recv`:
  single ops, which NCCL runs on a communicator and stream of their own per rank pair.
- NCCL runs the ops between two ranks in the order they were posted, each blocking the ones behind it:
  a receive posted before a send the peer is waiting for deadlocks. The state scans post a chunk's
  receives only after the sends of the chunk before it.
- A send buffer is not written until its request has completed (NCCL reads it asynchronously, on its
  own stream). `Request.wait` checks this through the tensor's version counter, on every backend;
  the buffer stays referenced by its request until then.
- On CUDA, `wait()` makes only the current stream wait; the CPU does not block. Work that uses a
  received tensor runs on the stream that waited; `Overlap` runs a scan on a side stream and
  `Overlap.join` makes the caller's stream wait for it and records its output tensors on that stream.
  On CPU `Overlap` runs the scan on a thread: gloo's waits block the calling thread only.
- all_gather_into_tensor puts rank p's shard at rows [p*n, (p+1)*n) of dim 0 on both backends; gloo
  has no reduce_scatter_tensor (emulated by all_reduce and a slice, so inputs are [P, ...] stacks).
- bf16 tensors go through every wrapper on both backends (gloo sums bf16 in all_reduce).

`emulate_nccl(True)` makes gloo runs follow the first two points: coalesced batch requests, and the
`send`/`recv` ops with each peer run one after another on a thread per peer, each waiting for the one
before, so an order that deadlocks on NCCL fails the CPU tests too (at the process group's timeout).
The tests run every P2P algorithm in both modes. `set_link(latency_s, bytes_per_s)` delays every sent
message as a slow link would (messages to a peer leave one after another, each taking latency +
bytes / bandwidth), so benchmarks on one machine show what overlaps what.
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
NCCL = {"on": False}
LINK = {"latency": 0.0, "bandwidth": None}
CHANNELS: dict = {}


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
    """Give gloo NCCL's P2P semantics: one request per batch, and each peer's send/recv ops run in order."""
    NCCL["on"] = on


def set_link(latency_s: float = 0.0, bytes_per_s: float | None = None) -> None:
    """Delay every sent message by latency + bytes / bandwidth, in order per peer (defaults: no delay)."""
    LINK.update(latency=latency_s, bandwidth=bytes_per_s)


def link_delay(n_bytes: int) -> float:
    return LINK["latency"] + (n_bytes / LINK["bandwidth"] if LINK["bandwidth"] else 0.0)


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


class Channel:
    """This rank's ops with one peer, posted in order by a thread: a send once the emulated link has carried it;
    with in_order, each op only after the one before completed (an NCCL stream of that rank pair)."""

    def __init__(self):
        self.queue, self.free_at = queue.Queue(), 0.0
        threading.Thread(target=self.run, daemon=True).start()

    def post(self, op, t: Tensor, dst: int, group, delay: float, in_order: bool) -> "Posted":
        ready = time.perf_counter()
        if delay:
            self.free_at = ready = max(ready, self.free_at) + delay
        posted = Posted()
        self.queue.put((ready, op, t, dst, group, in_order, posted))
        return posted

    def run(self) -> None:
        while True:
            ready, op, t, dst, group, in_order, posted = self.queue.get()
            time.sleep(max(0.0, ready - time.perf_counter()))
            try:
                posted.work = op(t, dst, group=group)
                if in_order:
                    posted.work.wait()  # gloo's works must not be waited twice: the waiter skips it then
                    posted.work = None
            except BaseException as e:  # re-raised by the waiter
                posted.error = e
            posted.event.set()


class Posted:
    """An op that a Channel posts later; wait() waits for the post, then for the op (unless the Channel did)."""

    def __init__(self):
        self.event, self.work, self.error = threading.Event(), None, None

    def wait(self) -> None:
        self.event.wait()
        if self.error is not None:
            raise self.error
        if self.work is not None:
            self.work.wait()


class DelayedWork:
    """A collective's request that completes no earlier than the emulated link would deliver it."""

    def __init__(self, work, ready_at: float):
        self.work, self.ready_at = work, ready_at

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))


def post(op, t: Tensor, peer: int, group, in_order: bool):
    """Post one isend/irecv with group rank `peer`: at once, or through the peer's Channel (slow link, NCCL order)."""
    dst = dist.get_global_rank(group, peer)
    delay = link_delay(nbytes(t)) if op is dist.isend else 0.0
    if not delay and not in_order:
        return op(t, dst, group=group)
    if (id(group), dst) not in CHANNELS:
        CHANNELS[id(group), dst] = Channel()
    return CHANNELS[id(group), dst].post(op, t, dst, group, delay, in_order)


def send(t: Tensor, peer: int, group, kind: str) -> Request:
    """Send t to group rank `peer` as a single op (NCCL: on the rank pair's own communicator and stream)."""
    t = t.contiguous()
    BYTES_SENT[kind] += nbytes(t)
    return Request([post(dist.isend, t, peer, group, NCCL["on"])], [t], kind)


def recv(buf: Tensor, peer: int, group, kind: str) -> Request:
    """Receive into the contiguous buffer `buf` from group rank `peer` as a single op."""
    if not buf.is_contiguous():
        raise ValueError(f"{kind}: receive buffers must be contiguous")
    BYTES_RECV[kind] += nbytes(buf)
    return Request([post(dist.irecv, buf, peer, group, NCCL["on"])], [], kind)


def p2p(sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]], group, kind: str) -> list[Request]:
    """Post sends [(tensor, group_rank)] and receives [(buffer, group_rank)] together; returns requests to wait on."""
    if not all(t.is_contiguous() for t, _ in recvs):
        raise ValueError(f"{kind}: receive buffers must be contiguous")
    sends = [(t.contiguous(), peer) for t, peer in sends]
    for t, _ in sends:
        BYTES_SENT[kind] += nbytes(t)
    for t, _ in recvs:
        BYTES_RECV[kind] += nbytes(t)
    ops = [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for t, peer in recvs]
    if LINK["latency"] or LINK["bandwidth"]:
        works = [post(dist.isend, t, peer, group, False) for t, peer in sends]
        works += dist.batch_isend_irecv(ops) if ops else []
    else:
        ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group) for t, peer in sends] + ops
        works = dist.batch_isend_irecv(ops) if ops else []
    sent = [t for t, _ in sends]
    if NCCL["on"]:
        return [Request(works, sent, kind)] if works else []
    return [Request([work], sent[i:i + 1], kind) for i, work in enumerate(works)]


def wait(reqs: list) -> None:
    for req in reqs:
        req.wait()


def collective_delay(P: int, shard_bytes: int) -> float:
    """Emulated time of a ring collective: P-1 hops of one shard (0 without a slow link)."""
    return (P - 1) * link_delay(shard_bytes)


def all_gather(t: Tensor, group, kind: str, async_op: bool = False):
    """Gather t from every rank into [P, *t.shape]; returns (tensor, request or None)."""
    P = group_size(group)
    t = t.contiguous()
    out = t.new_empty(P * t.shape[0], *t.shape[1:]) if t.dim() else t.new_empty(P)
    BYTES_SENT[kind] += (P - 1) * nbytes(t)
    BYTES_RECV[kind] += (P - 1) * nbytes(t)
    ready_at = time.perf_counter() + collective_delay(P, nbytes(t))
    req = ALL_GATHER(out, t if t.dim() else t[None], group=group, async_op=async_op)
    if async_op and (LINK["latency"] or LINK["bandwidth"]):
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


SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one side stream per GPU: the caching allocator keeps a pool per stream, so a new stream per call
    would spread freed blocks over many pools that other streams cannot reuse."""
    if device not in SIDE_STREAMS:
        SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return SIDE_STREAMS[device]


class Overlap:
    """Run fn() alongside the caller's compute: on a side stream on CUDA, on a thread on CPU (gloo)."""

    def __init__(self, fn, device: torch.device):
        self.result, self.error, self.stream, self.thread = None, None, None, None
        if device.type == "cuda":
            self.stream = side_stream(device)
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
            for t in self.result if isinstance(self.result, (list, tuple)) else [self.result]:
                if isinstance(t, Tensor):
                    t.record_stream(current)
            return self.result
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result
