"""Hardware profiles for the cost model: achieved FLOP/s per kind of work and a latency/bandwidth per collective.

A profile is a YAML file: the shipped ones (longtrain/plan/profiles/*.yaml) or one `longtrain calibrate` wrote.
Every figure is what a kernel or collective *achieves* (not the data-sheet peak, kept apart for MFU). Links are
given per level (`intra`: within a node, `inter`: across nodes) and per kind (p2p, all_gather, reduce_scatter,
all_to_all) as `[latency_us, GB/s]`, where GB/s is the bus bandwidth: a ring collective over P ranks moving
P - 1 shards of s bytes takes (P - 1) (latency + s / bandwidth). `step_overhead_us` (optional) gives each SP
algorithm's fixed time per step as `[forward_us, backward_us]`; `fused_linear_backward` (default true) whether the
linear attention backward is one fused kernel pass (Triton) or the torch path's autograd.
"""
import bisect
import math
import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf

PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")
KINDS = ("p2p", "all_gather", "reduce_scatter", "all_to_all")


@dataclass
class Link:
    latency: float  # seconds per message
    bandwidth: float  # bytes per second

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclass
class Hardware:
    name: str
    gpus_per_node: int
    memory: float  # bytes per GPU
    peak_flops: float  # data-sheet dense bf16 FLOP/s, for MFU
    matmul_flops: float  # achieved by large bf16 GEMMs
    attention_fwd: dict[int, float]  # achieved FLOP/s of the fused attention forward, by query/key block length
    attention_bwd: dict[int, float]  # the same for its backward
    linear_flops: float  # achieved by the chunked linear attention kernel (forward and backward)
    memory_bandwidth: float  # bytes per second, for elementwise work and the optimizer
    intra: dict[str, Link]
    inter: dict[str, Link]
    # seconds per step of each SP algorithm (forward, backward) beside its FLOPs and bytes: host work, launches
    # and calls, measured by `longtrain calibrate` (cost.sp_steps counts the steps; absent: 0)
    step_overhead: dict[str, tuple[float, float]] = field(default_factory=dict)
    # the chunked linear attention backward is one fused kernel pass (Triton on GPUs), not autograd over torch ops
    fused_linear_backward: bool = True

    def link(self, kind: str, inter_node: bool) -> Link:
        return (self.inter if inter_node else self.intra)[kind]

    def attention_flops(self, block: float, backward: bool) -> float:
        """Achieved attention FLOP/s at a block length, interpolated in log N (clamped to the measured range)."""
        table = self.attention_bwd if backward else self.attention_fwd
        lengths = sorted(table)
        if block <= lengths[0] or len(lengths) == 1:
            return table[lengths[0]]
        if block >= lengths[-1]:
            return table[lengths[-1]]
        i = bisect.bisect_right(lengths, block)
        lo, hi = lengths[i - 1], lengths[i]
        w = (math.log(block) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return table[lo] * (1 - w) + table[hi] * w


def profile_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".yaml"))


def load_profile(name_or_path: str) -> Hardware:
    """A shipped profile by name (h100-nvlink-ib, a100-nvlink-ib, ...) or a YAML file by path."""
    path = name_or_path if os.path.exists(name_or_path) else os.path.join(PROFILE_DIR, f"{name_or_path}.yaml")
    if not os.path.exists(path):
        raise ValueError(f"hardware profile {name_or_path!r} not found: give a file or one of "
                         f"{', '.join(profile_names())}")
    return from_dict(OmegaConf.to_container(OmegaConf.load(path)), path)


def from_dict(raw: dict, source: str = "profile") -> Hardware:
    """Hardware from the YAML layout (TFLOP/s, GB, [us, GB/s]); names the missing key."""
    def get(key):
        if key not in raw:
            raise ValueError(f"{source}: missing key {key!r}")
        return raw[key]

    def links(level):
        table = get(level)
        missing = [k for k in KINDS if k not in table]
        if missing:
            raise ValueError(f"{source}: {level} lacks {', '.join(missing)}")
        return {k: Link(table[k][0] * 1e-6, table[k][1] * 1e9) for k in KINDS}

    return Hardware(name=raw.get("name", os.path.basename(source)), gpus_per_node=int(get("gpus_per_node")),
                    memory=get("memory_gb") * 2 ** 30, peak_flops=get("peak_tflops") * 1e12,
                    matmul_flops=get("matmul_tflops") * 1e12,
                    attention_fwd={int(n): f * 1e12 for n, f in get("attention_fwd_tflops").items()},
                    attention_bwd={int(n): f * 1e12 for n, f in get("attention_bwd_tflops").items()},
                    linear_flops=get("linear_tflops") * 1e12, memory_bandwidth=get("memory_gbs") * 1e9,
                    intra=links("intra"), inter=links("inter"),
                    step_overhead={alg: (f * 1e-6, b * 1e-6)
                                   for alg, (f, b) in (raw.get("step_overhead_us") or {}).items()},
                    fused_linear_backward=bool(raw.get("fused_linear_backward", True)))


def to_dict(hw: Hardware) -> dict:
    """The YAML layout of from_dict."""
    def links(table):
        return {k: [round(v.latency * 1e6, 3), round(v.bandwidth / 1e9, 4)] for k, v in table.items()}

    return {"name": hw.name, "gpus_per_node": hw.gpus_per_node, "memory_gb": round(hw.memory / 2 ** 30, 2),
            "peak_tflops": hw.peak_flops / 1e12, "matmul_tflops": round(hw.matmul_flops / 1e12, 4),
            "attention_fwd_tflops": {n: round(f / 1e12, 4) for n, f in hw.attention_fwd.items()},
            "attention_bwd_tflops": {n: round(f / 1e12, 4) for n, f in hw.attention_bwd.items()},
            "linear_tflops": round(hw.linear_flops / 1e12, 4), "memory_gbs": round(hw.memory_bandwidth / 1e9, 2),
            "intra": links(hw.intra), "inter": links(hw.inter),
            "step_overhead_us": {alg: [round(f * 1e6, 2), round(b * 1e6, 2)]
                                 for alg, (f, b) in hw.step_overhead.items()},
            "fused_linear_backward": hw.fused_linear_backward}
