"""Shared benchmark plumbing: timing a forward+backward on every rank, tables, plots."""
import resource
import time

import argparse

import torch
import torch.distributed as dist

from longtrain.parallel import comm
from longtrain.parallel.spawn import run_distributed
from longtrain.plan.calibrate import seconds


def barrier_seconds(fn) -> float:
    """Seconds from a barrier to the barrier after fn() on every rank (synchronized on CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start


def time_fwd_bwd(step, repeats: int, device: torch.device) -> tuple[float, int, float]:
    """Median seconds of step() (forward + backward) after one warm-up, bytes sent per call, peak memory MB.

    On CPU, peak memory is the process's max RSS so far: run sizes in ascending order.
    """
    step()
    comm.reset_counters()
    times = [seconds(step, device) for _ in range(repeats)]
    sent = sum(comm.BYTES_SENT.values()) // repeats
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10
    return sorted(times)[len(times) // 2], sent, peak


def print_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of rows (dicts) in the given column order; printed and returned."""
    text = "\n".join([table_header(columns)] + [table_line(row, columns) for row in rows])
    print(text)
    return text


def table_header(columns: list[str]) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def table_line(row: dict, columns: list[str]) -> str:
    return "| " + " | ".join(fmt(row[c]) for c in columns) + " |"


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def plot(rows: list[dict], x: str, y: str, series: list[str], path: str, title: str) -> None:
    """One line per distinct value of the `series` columns; log-log axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({tuple(r[s] for s in series) for r in rows})
    for key in keys:
        pts = sorted((r[x], r[y]) for r in rows if tuple(r[s] for s in series) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="/".join(map(str, key)))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def sweep_args(n: list[int], algorithms: list[str], head_dim: int, out: str) -> argparse.Namespace:
    """The command line every SP benchmark shares, with its own defaults."""
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=n)
    p.add_argument("--p", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--algorithms", nargs="+", default=algorithms)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=head_dim)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=out)
    return p.parse_args()


def sweep(worker, args: argparse.Namespace) -> list[dict]:
    """Rows of worker(rank, world, algorithms, sizes, heads, head_dim, repeats) on rank 0, for every P in args.p
    (P = 1 runs the single-device path, algorithm "none")."""
    rows = []
    for world in args.p:
        algorithms = ["none"] if world == 1 else args.algorithms
        rows += run_distributed(worker, world, algorithms, args.n, args.heads, args.head_dim, args.repeats)[0]
    return rows
