"""State-passing linear SP over an emulated slow link: how much communication each algorithm exposes.

Every message is delayed as on a link that carries one full state [B, H, Dk, Dv] in --hop-delay-ms
(comm.set_link: sends leave one after another, each taking bytes / bandwidth). Exposed communication =
time of a phase with the delay minus without, each phase timed barrier to barrier over all ranks.
Models, with tau the full-state hop: LASP-1 (P-1) tau; ZeCO (K + P - 2) tau / K (block b reaches rank
P-1 after P-1 block hops behind the K-1 blocks before it), less the output compute it overlaps; LASP-2
a ring all-gather of P-1 (state + decay) shards.
    python benchmarks/sp_overlap.py --hop-delay-ms 50 --p 2 3 4
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import barrier_seconds, plot, print_table  # noqa: E402
from longtrain.parallel import comm, sp_linear_attention  # noqa: E402
from longtrain.parallel.spawn import run_distributed  # noqa: E402


def phase_times(algorithm: str, inputs: list, blocks: int, repeats: int) -> tuple[float, float]:
    """Median forward and backward seconds."""
    q, k, v, g, dout = inputs
    fwd, bwd = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        outs = []
        fwd.append(barrier_seconds(lambda: outs.append(sp_linear_attention(q, k, v, group=dist.group.WORLD, algorithm=algorithm,
                                                                 log_decay=g, zeco_blocks=blocks))))
        bwd.append(barrier_seconds(lambda: outs[0].backward(dout)))
    return sorted(fwd[1:])[repeats // 2], sorted(bwd[1:])[repeats // 2]


def model_ms(algorithm: str, P: int, K: int, tau_ms: float) -> float:
    if algorithm == "zeco":
        return (K + P - 2) * tau_ms / K
    return (P - 1) * tau_ms


def worker(rank, world, algorithms, n, heads, head_dim, blocks, tau_ms, repeats):
    torch.manual_seed(rank)
    q, k, v = (torch.randn(1, heads, n // world, head_dim, requires_grad=True) for _ in range(3))
    g = (-torch.rand(1, heads, n // world, head_dim) * 0.1).requires_grad_()
    inputs = [q, k, v, g, torch.randn(1, heads, n // world, head_dim)]
    state_bytes = heads * head_dim * head_dim * 4
    rows = []
    for algorithm in algorithms:
        comm.set_link()
        base = phase_times(algorithm, inputs, blocks, repeats)
        comm.set_link(bytes_per_s=state_bytes / (tau_ms / 1e3))
        slow = phase_times(algorithm, inputs, blocks, repeats)
        comm.set_link()
        for phase, b, s in zip(("forward", "backward"), base, slow):
            rows.append({"algorithm": algorithm, "P": world, "phase": phase, "ms no delay": b * 1e3,
                         "ms with delay": s * 1e3, "exposed comm ms": (s - b) * 1e3,
                         "model ms": model_ms(algorithm, world, blocks, tau_ms)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hop-delay-ms", type=float, default=50.0)
    p.add_argument("--p", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--algorithms", nargs="+", default=["lasp1", "zeco", "lasp2"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/sp_overlap.png")
    args = p.parse_args()
    rows = []
    for world in args.p:
        rows += run_distributed(worker, world, args.algorithms, args.n, args.heads, args.head_dim, args.blocks,
                                args.hop_delay_ms, args.repeats)[0]
    print(f"hop delay {args.hop_delay_ms} ms per full state, K={args.blocks}, N={args.n}, H={args.heads}, "
          f"Dk=Dv={args.head_dim}")
    print_table(rows, ["algorithm", "P", "phase", "ms no delay", "ms with delay", "exposed comm ms", "model ms"])
    series = [dict(r, curve=f"{r['algorithm']} {r['phase']}") for r in rows]
    series += [dict(r, curve=f"{r['algorithm']} model", **{"exposed comm ms": r["model ms"]})
               for r in rows if r["phase"] == "forward"]
    plot(series, "P", "exposed comm ms", ["curve"], args.out, f"exposed communication, hop delay {args.hop_delay_ms} ms")


if __name__ == "__main__":
    main()
