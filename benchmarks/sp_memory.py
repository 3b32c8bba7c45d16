"""Memory an SP algorithm keeps per rank between forward and backward (what activation memory pays per layer).

On CPU: the process's resident memory after the forward minus before it (large tensors are returned to
the OS when freed), median over repeats, on every rank of P processes; the max over ranks is printed.
    python benchmarks/sp_memory.py --p 4
"""
import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table  # noqa: E402
from longtrain.parallel import sp_linear_attention, sp_softmax_attention  # noqa: E402
from longtrain.parallel.spawn import run_distributed  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2 ** 20


def retained_mb(forward, repeats: int) -> float:
    """Median resident MB that forward()'s output (and the graph behind it) keeps alive."""
    sizes = []
    for _ in range(repeats + 1):
        gc.collect()
        before = resident_mb()
        out = forward()
        gc.collect()
        sizes.append(resident_mb() - before)
        del out
    return sorted(sizes[1:])[repeats // 2]


def worker(rank, world, cases, repeats):
    rows = []
    for name, n, heads, dim in cases:
        q, k, v = (torch.randn(1, heads, n // world, dim, requires_grad=True) for _ in range(3))
        g = (-torch.rand(1, heads, n // world, dim) * 0.1).requires_grad_()
        if name.startswith("allgather"):
            kw = {"save_gathered_kv": True} if name.endswith("save_kv") else {}
            forward = lambda: sp_softmax_attention(q, k, v, group=dist.group.WORLD, algorithm="allgather", **kw)[0]
        else:
            forward = lambda: sp_linear_attention(q, k, v, group=dist.group.WORLD, algorithm=name, log_decay=g)
        kv_full_mb = 2 * n * heads * dim * 4 / 2 ** 20
        state_mb = world * heads * dim * dim * 4 / 2 ** 20
        rows.append({"algorithm": name, "P": world, "N": n, "H": heads, "D": dim,
                     "retained MB/rank": retained_mb(forward, repeats),
                     "gathered K/V MB": kv_full_mb, "P states MB": state_mb})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--p", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--algorithms", nargs="+", default=["allgather", "allgather_save_kv", "lasp2"])
    args = p.parse_args()
    shapes = {"allgather": (16384, 8, 64), "allgather_save_kv": (16384, 8, 64), "lasp2": (256, 32, 128)}
    cases = [(name, *shapes[name]) for name in args.algorithms]
    per_rank = run_distributed(worker, args.p, cases, args.repeats)
    rows = [dict(r, **{"retained MB/rank": max(rank[i]["retained MB/rank"] for rank in per_rank)})
            for i, r in enumerate(per_rank[0])]
    print_table(rows, ["algorithm", "P", "N", "H", "D", "retained MB/rank", "gathered K/V MB", "P states MB"])


if __name__ == "__main__":
    main()
