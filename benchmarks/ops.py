"""Every core op against SDPA causal at the same shape: forward+backward time, ratios, and a plot of time vs N.

    python benchmarks/ops.py                                  # CPU, fp32, B=1, H=4, D=64 (a few minutes)
    python benchmarks/ops.py --n 1024 4096 --linear-n 16384 --repeats 5 --backend torch --threads 1
    python benchmarks/ops.py --n 8192 --linear-n --ops causal "window 512"   # one ratio only

Ops take turns within each N and the best of `repeats` counts, so load from other processes hits
every op alike. On shared cores, --threads 1 measures the work: with 2 threads every operator call
waits for both threads, which other processes delay. The targets of issue 11 are checked at the end.
"""
import argparse
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from common import plot, print_table, seconds  # noqa: E402
from longtrain.attention import linear_attention, softmax_attention  # noqa: E402

SOFTMAX_OPS = ("sdpa causal", "causal", "docs 512", "window 512")
LINEAR_OPS = ("gla", "scalar decay", "no decay")
FAMILIES = {"softmax": SOFTMAX_OPS, "linear": LINEAR_OPS}  # --ops shorthands


def make_step(op: str, n: int, heads: int, dim: int, backend: str, device: torch.device, dtype: torch.dtype):
    """A closure running op's forward+backward once at length n."""
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    seg = (torch.arange(n, device=device) // 512)[None]
    decay = {"gla": (1, heads, n, dim), "scalar decay": (1, heads, n)}.get(op)
    g = None if decay is None else (-0.1 * torch.rand(*decay, device=device)).requires_grad_()
    def sdpa_causal():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if device.type == "cuda" else nullcontext():  # one baseline
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    run = {
        "sdpa causal": sdpa_causal,
        "causal": lambda: softmax_attention(q, k, v, backend=backend)[0],
        "docs 512": lambda: softmax_attention(q, k, v, segment_ids=seg, backend=backend)[0],
        "window 512": lambda: softmax_attention(q, k, v, window=512, backend=backend)[0],
    }.get(op, lambda: linear_attention(q, k, v, log_decay=g, backend=backend)[0])
    return lambda: run().sum().backward()


def best_times(steps: dict, repeats: int, device: torch.device) -> dict:
    """Best seconds of each step over `repeats` rounds (after one warm-up round); steps take turns."""
    best = {name: float("inf") for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            elapsed = seconds(step, device)
            if round_:
                best[name] = min(best[name], elapsed)
    return best


def check_targets(ms: dict) -> list[str]:
    """Issue 11's ratios from {(op, N): ms}, as lines 'name: value (target)'; missing sizes are skipped."""
    checks = [("causal / sdpa causal, N=4096", ("causal", 4096), ("sdpa causal", 4096), 1.3),
              ("docs 16x512 / causal, N=8192", ("docs 512", 8192), ("causal", 8192), 0.15),
              ("window 512 / causal, N=8192", ("window 512", 8192), ("causal", 8192), 0.2),
              ("gla / sdpa causal, N=8192", ("gla", 8192), ("sdpa causal", 8192), 0.5),
              ("gla N=16384 / N=4096", ("gla", 16384), ("gla", 4096), 4.5)]
    lines = []
    for name, num, den, target in checks:
        if num in ms and den in ms:
            ratio = ms[num] / ms[den]
            lines.append(f"{name}: {ratio:.3f} (target <= {target}: {'met' if ratio <= target else 'MISSED'})")
    print("\n".join(lines))
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--linear-n", type=int, nargs="*", default=[16384], help="extra sizes for the linear ops only")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="inputs' dtype (default: bfloat16 on a GPU, as training runs there; float32 on CPU)")
    p.add_argument("--ops", nargs="+", default=list(SOFTMAX_OPS + LINEAR_OPS),
                   choices=SOFTMAX_OPS + LINEAR_OPS + tuple(FAMILIES), help="ops to run, or a family's (default: all)")
    p.add_argument("--out", default="benchmarks/ops.png")
    args = p.parse_args()
    args.ops = [op for name in args.ops for op in FAMILIES.get(name, (name,))]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows, ms = [], {}
    for n in sorted(set(args.n + args.linear_n)):
        ops = [op for op in args.ops if op in LINEAR_OPS or n in args.n]
        steps = {op: make_step(op, n, args.heads, args.head_dim, args.backend, device, dtype) for op in ops}
        best = best_times(steps, args.repeats, device)
        ms.update({(op, n): best[op] * 1e3 for op in ops})
        for op in ops:
            sdpa = ms.get(("sdpa causal", n))
            rows.append({"op": op, "N": n, "ms": ms[(op, n)],
                         "x sdpa causal": float("nan") if sdpa is None else ms[(op, n)] / sdpa})
    print_table(rows, ["op", "N", "ms", "x sdpa causal"])
    check_targets(ms)
    plot(rows, "N", "ms", ["op"], args.out, f"forward+backward, B=1, H={args.heads}, D={args.head_dim}, {device.type}, "
         f"{str(dtype)[6:]}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
