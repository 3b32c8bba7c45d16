"""Ring attention with packed documents: forward+backward time against the same N without documents.

The ring skips (query chunk, key chunk) pairs that share no document; the kernels skip what they can
inside a pair. Zigzag layout, equal documents, ranks on one machine.
    python benchmarks/sp_docs.py --p 4 --n 4096 --docs 8
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table, time_fwd_bwd  # noqa: E402
from longtrain.parallel import shard_sequence, sp_softmax_attention  # noqa: E402
from longtrain.parallel.spawn import run_distributed  # noqa: E402


def worker(rank, world, n, n_docs, heads, head_dim, repeats):
    group = dist.group.WORLD
    q, k, v = (torch.randn(1, heads, n // world, head_dim, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, heads, n // world, head_dim)
    rows = []
    for docs in (1, n_docs):
        seg = shard_sequence((torch.arange(n) * docs // n)[None], 1, group, "zigzag") if docs > 1 else None

        def step():
            out, _ = sp_softmax_attention(q, k, v, group=group, algorithm="ring", layout="zigzag", segment_ids=seg)
            out.backward(dout)

        seconds, sent, _ = time_fwd_bwd(step, repeats, torch.device("cpu"))
        rows.append({"P": world, "N": n, "documents": docs, "ms": seconds * 1e3, "MB sent/rank": sent / 2 ** 20})
    for row in rows:
        row["time vs 1 document"] = row["ms"] / rows[0]["ms"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--p", type=int, default=4)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = run_distributed(worker, args.p, args.n, args.docs, args.heads, args.head_dim, args.repeats)[0]
    print_table(rows, ["P", "N", "documents", "ms", "time vs 1 document", "MB sent/rank"])


if __name__ == "__main__":
    main()
