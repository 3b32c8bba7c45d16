"""Linear-family SP algorithms: forward+backward time, bytes sent and peak memory per rank.

Strong scaling (N fixed, more ranks) and weak scaling (N/P fixed):
    python benchmarks/sp_linear.py --n 2048 4096 8192 --p 1 2 4
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import plot, print_table, sweep, sweep_args, time_fwd_bwd  # noqa: E402
from longtrain.parallel import sp_linear_attention  # noqa: E402


def worker(rank, world, algorithms, sizes, heads, head_dim, repeats):
    device = torch.device("cpu")
    rows = []
    for algorithm in algorithms:
        for n in sizes:
            q, k, v = (torch.randn(1, heads, n // world, head_dim, requires_grad=True) for _ in range(3))
            g = (-torch.rand(1, heads, n // world, head_dim) * 0.1).requires_grad_()
            dout = torch.randn(1, heads, n // world, head_dim)

            def step():
                out = sp_linear_attention(q, k, v, group=dist.group.WORLD, algorithm=algorithm, log_decay=g)
                out.backward(dout)

            seconds, sent, peak = time_fwd_bwd(step, repeats, device)
            rows.append({"algorithm": algorithm, "P": world, "N": n, "N/P": n // world, "ms": seconds * 1e3,
                         "tokens/s": n / seconds, "KB sent/rank": sent / 2 ** 10, "peak MB/rank": peak})
    return rows


def main() -> None:
    args = sweep_args([2048, 4096, 8192], ["lasp1", "lasp2", "zeco", "ulysses"], 64, "benchmarks/sp_linear.png")
    rows = sweep(worker, args)
    columns = ["algorithm", "P", "N", "N/P", "ms", "tokens/s", "KB sent/rank", "peak MB/rank"]
    print("strong scaling (N fixed):")
    print_table(sorted(rows, key=lambda r: (r["N"], r["algorithm"], r["P"])), columns)
    print("weak scaling (N/P fixed):")
    print_table(sorted(rows, key=lambda r: (r["N/P"], r["algorithm"], r["P"])), columns)
    plot(rows, "N", "ms", ["algorithm", "P"], args.out, "linear SP: forward+backward per step")


if __name__ == "__main__":
    main()
