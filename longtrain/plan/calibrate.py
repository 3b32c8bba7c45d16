"""`longtrain calibrate`: measure what this machine achieves and write it as a hardware profile.

Every rank runs the same measurements at once (as in training, ranks share the node): GEMM FLOP/s, the
attention kernels' forward and backward FLOP/s per sequence length, chunked linear attention FLOP/s, and for
each collective of parallel/comm.py (so an emulated link, comm.set_link, is measured too) the median time per
message size, fitted to t = alpha + bytes / beta per hop (hardware.py's model), and each SP algorithm's fixed
time per step (a tiny op's measured time beyond what FLOPs and bytes explain). Under torchrun the ranks are
the launched ones (NCCL on GPUs); otherwise `--nproc` local gloo processes. The measured level (`intra` when
all ranks share a node, else `inter`) replaces the base profile's; the rest of the base profile stays.
"""
import dataclasses
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from longtrain.kernels import get_backend
from longtrain.parallel import LINEAR_SP, SOFTMAX_SP, comm, sp_linear_attention, sp_softmax_attention
from longtrain.plan.cost import (ATTENTION_BWD_RATIO, Mask, OpShape, attention_flop_count, linear_flop_count,
                                 linear_op_cost, overhead_key, softmax_op_cost, sp_steps)
from longtrain.plan.hardware import KINDS, Hardware, Link, load_profile

SIZES = [2 ** 12, 2 ** 16, 2 ** 20, 2 ** 22]  # message bytes for the collectives


def seconds(fn, device: torch.device) -> float:
    """Wall seconds of one fn() call (synchronized on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, device: torch.device, repeats: int = 9) -> float:
    """Median seconds of fn() after one warm-up, all ranks starting together."""
    fn()
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        times.append(seconds(fn, device))
    return statistics.median(times)


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device)


def memory_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy (read + write)."""
    src = torch.empty(2 ** 26 if device.type == "cuda" else 2 ** 24, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device)


def attention_flops(device: torch.device, dtype: torch.dtype, lengths: list[int], heads: int = 4, dim: int = 64
                    ) -> tuple[dict[int, float], dict[int, float]]:
    """Forward and backward FLOP/s of the default kernels' causal attention at each length (B=1)."""
    kernels = get_backend("auto")
    fwd, bwd = {}, {}
    for n in lengths:
        q, k, v, dout = (torch.randn(1, heads, n, dim, device=device, dtype=dtype) for _ in range(4))
        opts = dict(scale=dim ** -0.5, causal=True)
        out, lse = kernels.attention_forward(q, k, v, **opts)
        flops = attention_flop_count(OpShape(1, n, heads, heads, dim), n * (n + 1) / 2)
        fwd[n] = flops / timed(lambda: kernels.attention_forward(q, k, v, **opts), device)
        backward = lambda: kernels.attention_backward(dout, q, k, v, out, lse, **opts)  # noqa: E731
        bwd[n] = ATTENTION_BWD_RATIO * flops / timed(backward, device)
    return fwd, bwd


def linear_flops(device: torch.device, dtype: torch.dtype, n: int, heads: int = 4, dim: int = 64,
                 chunk: int = 64) -> float:
    """FLOP/s of chunked gated linear attention forward + backward (cost.linear_flop_count's count)."""
    kernels = get_backend("auto")
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    g = (-torch.rand(1, heads, n, dim, device=device) * 0.1).requires_grad_()

    def step():
        out, _ = kernels.linear_attention_chunked(q, k, v, scale=dim ** -0.5, log_decay=g, chunk_size=chunk)
        out.sum().backward()

    flops = 3 * sum(linear_flop_count(OpShape(1, n, heads, heads, dim, chunk=chunk), n * heads))
    return flops / timed(step, device)


def fit(points: list[tuple[float, float]]) -> Link:
    """Latency and bandwidth of t = alpha + x / beta over (x bytes, t seconds) points, least squares in relative
    error (weights 1/t^2): the small messages set alpha, the large ones beta, whatever their scale."""
    ws = [1 / t ** 2 for _, t in points]
    total = sum(ws)
    mx = sum(w * x for w, (x, _) in zip(ws, points)) / total
    mt = sum(w * t for w, (_, t) in zip(ws, points)) / total
    slope = sum(w * (x - mx) * (t - mt) for w, (x, t) in zip(ws, points)) / \
        sum(w * (x - mx) ** 2 for w, (x, _) in zip(ws, points))
    slope = max(slope, 1e-15)
    return Link(max(mt - slope * mx, 0.0), 1 / slope)


def collective_links(device: torch.device) -> dict[str, Link]:
    """Per-hop Link of each collective kind over the world group (needs >= 2 ranks)."""
    group, P, r = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    points = {kind: [] for kind in KINDS}
    for size in SIZES:
        shard = torch.zeros(size // 4, device=device)
        stacked = torch.zeros(P, size // 4, device=device)
        recv_buf = torch.empty_like(shard)
        t = timed(lambda: comm.wait(comm.p2p([(shard, (r + 1) % P)], [(recv_buf, (r - 1) % P)], group, "calib")),
                  device)
        points["p2p"].append((size, t))
        points["all_gather"].append((size, timed(lambda: comm.all_gather(shard, group, "calib"), device) / (P - 1)))
        points["reduce_scatter"].append((size, timed(lambda: comm.reduce_scatter(stacked.clone(), group, "calib"),
                                                     device) / (P - 1)))
        points["all_to_all"].append(((P - 1) * size, timed(lambda: comm.all_to_all(stacked, group, "calib"), device)))
    return {kind: fit(p) for kind, p in points.items()}


def fused_linear_backward(device: torch.device) -> bool:
    """Whether the default kernels run the chunked linear attention backward as one fused pass on `device`."""
    return bool(get_backend("auto").FUSED_LINEAR_BACKWARD and device.type == "cuda")


def step_overheads(hw: Hardware, device: torch.device, dtype: torch.dtype, heads: int = 4, dim: int = 64,
                   layout: str = "zigzag", ulysses: int = 2, zeco_blocks: int = 4, chunk: int = 64,
                   backend: str = "auto") -> dict[str, tuple[float, float]]:
    """(forward, backward) seconds per step of each SP algorithm's fixed cost (cost.overhead_key): one tiny op
    (two chunks per rank, heads rounded up so Ulysses divides them) on the world group with `backend`, less what
    cost.py predicts for it from hw's FLOP/s and links, over its steps (0 where the op took less). USP only where
    P % U == 0."""
    group, P = dist.group.WORLD, dist.get_world_size()
    N, U = 2 * P * chunk, min(ulysses, P)
    heads = -(-heads // math.lcm(P, U)) * math.lcm(P, U)
    shape = OpShape(1, N, heads, heads, dim, chunk=chunk, per_channel_decay=True, elem=torch.finfo(dtype).bits // 8)
    q, k, v, dout = (torch.randn(1, heads, N // P, dim, device=device, dtype=dtype, requires_grad=True)
                     for _ in range(4))
    g = (-torch.rand(1, heads, N // P, dim, device=device) * 0.1).requires_grad_()
    calls = [(alg, False, lambda alg=alg: sp_softmax_attention(q, k, v, group=group, algorithm=alg, layout=layout,
                                                               ulysses_size=U, return_lse=False, backend=backend)[0])
             for alg in SOFTMAX_SP if alg != "none" and (alg != "usp" or P % U == 0)]
    calls += [(alg, True, lambda alg=alg: sp_linear_attention(q, k, v, group=group, algorithm=alg, log_decay=g,
                                                              layout=layout, zeco_blocks=zeco_blocks, backend=backend))
              for alg in LINEAR_SP if alg != "none"]
    hw = dataclasses.replace(hw, step_overhead={})
    out = {}
    for alg, linear, call in calls:
        fwd = timed(call, device, repeats=21)
        bwd = max(timed(lambda: call().backward(dout), device, repeats=21) - fwd, 0.0)
        cost = (linear_op_cost(alg, shape, P, hw, layout, zeco_blocks) if linear else
                softmax_op_cost(alg, shape, P, hw, Mask(), layout, U))
        steps = sp_steps(alg, P, layout, U, Mask(), N)
        # a fixed cost is >= 0: a busy machine can time the op below what the FLOP/s and links predict for it
        out[overhead_key(alg, linear)] = (max(fwd - cost.fwd_s, 0.0) / steps, max(bwd - cost.bwd_s, 0.0) / steps)
    return out


def compute_figures(device: torch.device, dtype: torch.dtype, lengths: list[int], linear_n: int, heads: int = 4,
                    dim: int = 64) -> dict:
    """What this rank's kernels achieve: GEMM, attention forward / backward per length and chunked linear
    attention FLOP/s, memory bandwidth, and whether the linear backward is fused."""
    fwd, bwd = attention_flops(device, dtype, lengths, heads, dim)
    return {"matmul": matmul_flops(device, dtype), "attention_fwd": fwd, "attention_bwd": bwd,
            "linear": linear_flops(device, dtype, linear_n, heads, dim), "memory_bandwidth": memory_bandwidth(device),
            "fused_linear_backward": fused_linear_backward(device)}


def measure(rank: int, world: int, lengths: list[int], linear_n: int, base: str = "h100-nvlink-ib",
            same_node: bool = True) -> dict:
    """Everything this rank measures, as plain numbers (base and same_node: the profile the overheads subtract)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = compute_figures(device, dtype, lengths, linear_n)
    out["memory"] = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / world
    if world > 1:
        out["links"] = {k: (v.latency, v.bandwidth) for k, v in collective_links(device).items()}
        out["step_overhead"] = step_overheads(to_profile(out, load_profile(base), world, same_node, "measured"),
                                              device, dtype)
    return out


def to_profile(measured: dict, base: Hardware, world: int, same_node: bool, name: str) -> Hardware:
    """The base profile with the measured figures in place of its own."""
    hw = dataclasses.replace(base)
    hw.name, hw.matmul_flops, hw.linear_flops = name, measured["matmul"], measured["linear"]
    hw.attention_fwd, hw.attention_bwd = measured["attention_fwd"], measured["attention_bwd"]
    hw.memory, hw.memory_bandwidth = measured["memory"], measured["memory_bandwidth"]
    if "links" in measured:
        links = {k: Link(*v) for k, v in measured["links"].items()}
        if same_node:
            hw.intra, hw.gpus_per_node = links, max(base.gpus_per_node, world)
        else:
            hw.inter = links
    hw.step_overhead = measured.get("step_overhead", base.step_overhead)
    hw.fused_linear_backward = measured.get("fused_linear_backward", base.fused_linear_backward)
    return hw


def calibrate(nproc: int, base: str, name: str, lengths: list[int], linear_n: int) -> Hardware:
    """Measure on the torchrun ranks (when launched so) or on nproc local gloo processes; rank 0's figures."""
    if "RANK" in os.environ:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        world = dist.get_world_size()
        same_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
        measured = measure(dist.get_rank(), world, lengths, linear_n, base, same_node)
    elif nproc > 1:
        from longtrain.parallel.spawn import run_distributed
        measured, world, same_node = run_distributed(measure, nproc, lengths, linear_n, base)[0], nproc, True
    else:
        measured, world, same_node = measure(0, 1, lengths, linear_n), 1, True
    return to_profile(measured, load_profile(base), world, same_node, name)


def default_lengths(device_is_cuda: bool) -> list[int]:
    top = 16384 if device_is_cuda else 2048
    return [2 ** e for e in range(int(math.log2(top)) - 3, int(math.log2(top)) + 1, 1)]
