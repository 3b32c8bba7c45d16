"""Softmax-family SP algorithms: forward+backward time, tokens/s, bytes sent and peak memory per rank.

    python benchmarks/sp_softmax.py --n 1024 2048 4096 --p 1 2 4     # CPU (gloo) or GPU (nccl) when present
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import plot, print_table, sweep, sweep_args, time_fwd_bwd  # noqa: E402
from longtrain.parallel import sp_softmax_attention  # noqa: E402


def worker(rank, world, algorithms, sizes, heads, head_dim, repeats):
    device = torch.device("cpu")
    rows = []
    for algorithm in algorithms:
        for n in sizes:
            layout = "zigzag" if algorithm in ("ring", "usp") else "contiguous"
            q, k, v = (torch.randn(1, heads, n // world, head_dim, requires_grad=True) for _ in range(3))
            dout = torch.randn(1, heads, n // world, head_dim)

            def step():
                out, _ = sp_softmax_attention(q, k, v, group=dist.group.WORLD, algorithm=algorithm, layout=layout,
                                              ulysses_size=2 if algorithm == "usp" else 1)
                out.backward(dout)

            seconds, sent, peak = time_fwd_bwd(step, repeats, device)
            rows.append({"algorithm": algorithm, "P": world, "N": n, "ms": seconds * 1e3,
                         "tokens/s": n / seconds, "MB sent/rank": sent / 2 ** 20, "peak MB/rank": peak})
    return rows


def main() -> None:
    args = sweep_args([1024, 2048, 4096], ["ring", "allgather", "ulysses"], 32, "benchmarks/sp_softmax.png")
    rows = sweep(worker, args)
    print_table(rows, ["algorithm", "P", "N", "ms", "tokens/s", "MB sent/rank", "peak MB/rank"])
    plot(rows, "N", "ms", ["algorithm", "P"], args.out, "softmax SP: forward+backward per step")


if __name__ == "__main__":
    main()
