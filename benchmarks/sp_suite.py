"""SP benchmark suite on the axes of the Long-Context Attention Benchmark, measured against the cost model.

Axes: mask x N x P x algorithm, zigzag layout. Masks: causal, sliding window of N/8, packed documents of uniform
lengths (8 x N/8), packed documents with a long tail (one of N/2, then 16 of N/32), sigmoid attention (causal;
the cost model predicts it as causal softmax). Softmax family: ring, allgather, ulysses, usp with
U = min(--ulysses, P) (at P = U that is Ulysses and a one-rank ring). Linear family (GLA-style per-channel
decay): lasp1, lasp2, zeco with K blocks, on the causal and document masks (its cost model has no mask).
Per row: forward and backward seconds (median of --repeats after a warm-up, each phase timed barrier to barrier
over all ranks), bytes sent per rank (mean over ranks of comm.BYTES_SENT during one call), peak memory per rank
(max over ranks; CUDA: max_memory_allocated above memory_allocated before; CPU: VmHWM above VmRSS before, as
benchmarks/memory.py, after malloc_trim, a lower bound since the allocator can reuse freed pages), and
longtrain.plan.cost's prediction of time and bytes. Ring gets doc_spans from the full ids and the linear
algorithms doc_gates computed before the timing, as a trainer passes them once per step.

Hardware profile: each world of P ranks first measures what its ranks achieve together (calibrate.py's GEMM,
attention per block length, chunked linear attention, copy bandwidth, each algorithm's fixed time per step from
a tiny op: calibrate.step_overheads). Messages between processes on one machine are nearly free, so every rank
then delays its messages as a link of --latency-ms and --gbps GB/s would
(comm.set_link), and the profile's intra links are the measured ones in series with that link. The default,
0.2 ms and 0.5 GB/s, makes one K/V hop of the default sizes 1-4 ms: visible beside the compute, not dominant.
With --gbps 0 (the default under torchrun on GPUs) nothing is delayed and the links are measured
(calibrate.collective_links) as the profile's intra links.

Validation: within each (family, mask, N, P) group, every algorithm's fwd+bwd time over the group's fastest,
measured vs predicted; the predicted ranking and fastest against the measured (predictions within 5% tie).
--repeat-of CSV scores an earlier run's measured times the same way: how well a measurement predicts itself.
Writes <out>.csv, <out>.md (table and validation), <out>_{throughput,bytes,memory}_{softmax,linear}.png (causal
mask, per algorithm and P) and <out>_predicted.png (measured vs predicted ms, with y = x).
    python benchmarks/sp_suite.py                                 # CPU, gloo, fp32: N 1024 2048, P 2 4, H=4, D=64
    torchrun --nproc-per-node 8 benchmarks/sp_suite.py --full     # GPUs, NCCL, bf16: P = world, N 8k-64k
"""
import argparse
import ctypes
import csv
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import barrier_seconds, plot, print_table  # noqa: E402
from memory import mark, peak  # noqa: E402
from longtrain.parallel import comm, document_gates, sequence_spans, shard_sequence  # noqa: E402
from longtrain.parallel import sp_linear_attention, sp_softmax_attention  # noqa: E402
from longtrain.parallel.spawn import run_distributed  # noqa: E402
from longtrain.plan.calibrate import collective_links, compute_figures, step_overheads, to_profile  # noqa: E402
from longtrain.plan.cost import Mask, OpShape, linear_op_cost, softmax_op_cost  # noqa: E402
from longtrain.plan.hardware import Hardware, Link, load_profile  # noqa: E402

SOFTMAX = ["ring", "allgather", "ulysses", "usp"]
LINEAR = ["lasp1", "lasp2", "zeco"]
MASKS = ["causal", "window", "docs_uniform", "docs_longtail", "sigmoid"]
LINEAR_MASKS = ("causal", "docs_uniform", "docs_longtail")
LIBC = ctypes.CDLL("libc.so.6")
TIE = 0.05  # predicted times this close are a tie
COLUMNS = ["family", "mask", "N", "P", "algorithm", "fwd_ms", "bwd_ms", "pred_fwd_ms", "pred_bwd_ms", "fwd_bytes",
           "bwd_bytes", "pred_fwd_bytes", "pred_bwd_bytes", "peak_mb", "tokens_per_s"]
TABLE = ["family", "mask", "N", "P", "algorithm", "fwd_ms", "bwd_ms", "pred_fwd_ms", "pred_bwd_ms", "MB/rank",
         "pred MB/rank", "peak_mb"]


def doc_lengths(mask: str, N: int, docs: int) -> list[int] | None:
    """Document lengths of a packed sequence: `docs` equal ones, or one of N/2 and a tail of N/32 each."""
    if mask == "docs_uniform":
        return [N // docs] * docs
    if mask == "docs_longtail":
        return [N // 2] + [N // 32] * 16
    return None


def cost_mask(mask: str, N: int, docs: int) -> Mask:
    """The cost model's Mask of a suite mask (sigmoid: causal)."""
    if mask == "window":
        return Mask("window", window=N // 8)
    if mask.startswith("docs"):
        return Mask("documents", doc_lengths=doc_lengths(mask, N, docs))
    return Mask("causal")


def profile(world: int, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> Hardware:
    """h100-nvlink-ib with the FLOP/s these ranks achieve together and, as the intra links, the measured ones,
    in series with the emulated link when --gbps > 0 (its delay adds to the backend's own time)."""
    lengths = sorted({n // world for n in args.n} | set(args.n))
    measured = compute_figures(device, dtype, lengths, max(args.n) // world, args.heads, args.head_dim)
    hw = to_profile({**measured, "memory": 0.0}, load_profile("h100-nvlink-ib"), world, True, "suite")
    hw.intra = collective_links(device)
    hw.gpus_per_node = max(hw.gpus_per_node, world)
    hw.step_overhead = step_overheads(hw, device, dtype, args.heads, args.head_dim, args.layout, args.ulysses,
                                      args.zeco_blocks, backend="auto")
    if args.gbps:
        hw.intra = {kind: Link(link.latency + args.latency_ms * 1e-3, 1 / (1 / link.bandwidth + 1 / (args.gbps * 1e9)))
                    for kind, link in hw.intra.items()}
    return hw


def measure(call, dout: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """Median fwd/bwd seconds, then one more call for bytes (mean over ranks) and peak memory (max over ranks)."""
    fwd, bwd = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        outs = []
        fwd.append(barrier_seconds(lambda: outs.append(call())))
        bwd.append(barrier_seconds(lambda: outs[0].backward(dout)))
    dist.barrier()
    comm.reset_counters()
    if device.type == "cpu":
        LIBC.malloc_trim(0)  # freed heap pages back to the OS, so this call's allocations raise VmHWM again
    before = mark(device)
    out = call()
    fwd_bytes = sum(comm.BYTES_SENT.values())
    out.backward(dout)
    bwd_bytes = sum(comm.BYTES_SENT.values()) - fwd_bytes
    sums = torch.tensor([fwd_bytes, bwd_bytes], dtype=torch.float64, device=device)
    top = torch.tensor([peak(device) - before], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    P = dist.get_world_size()
    return {"fwd_ms": statistics.median(fwd[1:]) * 1e3, "bwd_ms": statistics.median(bwd[1:]) * 1e3,
            "fwd_bytes": sums[0].item() / P, "bwd_bytes": sums[1].item() / P, "peak_mb": top.item() / 2 ** 20}


def inputs(N: int, kv_heads: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list:
    """This rank's q, k, v, log decay and output gradient [B, H, N/P, D] (k, v: kv_heads)."""
    B, n, D = args.batch, N // dist.get_world_size(), args.head_dim
    shapes = [(B, args.heads, n, D), (B, kv_heads, n, D), (B, kv_heads, n, D)]
    q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes)
    g = (-torch.rand(B, args.heads, n, D, device=device) * 0.1).requires_grad_()
    return [q, k, v, g, torch.randn(B, args.heads, n, D, device=device, dtype=dtype)]


def segments(mask: str, N: int, args: argparse.Namespace, device: torch.device) -> torch.Tensor | None:
    """Full-sequence document ids [B, N] of a packed-documents mask (None otherwise)."""
    lengths = doc_lengths(mask, N, args.docs)
    if lengths is None:
        return None
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return ids[None].expand(args.batch, N)


def softmax_rows(N: int, mask: str, hw: Hardware, args, device, dtype) -> list[dict]:
    """Every softmax-family algorithm on one (N, mask)."""
    group, P = dist.group.WORLD, dist.get_world_size()
    q, k, v, _, dout = inputs(N, args.kv_heads, args, device, dtype)
    full = segments(mask, N, args, device)
    seg = None if full is None else shard_sequence(full, 1, group, args.layout)
    U = min(args.ulysses, P)
    shape = OpShape(args.batch, N, args.heads, args.kv_heads, args.head_dim, chunk=64, per_channel_decay=True,
                    elem=dout.element_size())
    rows = []
    for alg in [a for a in args.algorithms if a in SOFTMAX]:
        opts = dict(group=group, algorithm=alg, layout=args.layout, window=N // 8 if mask == "window" else None,
                    segment_ids=seg, kind="sigmoid" if mask == "sigmoid" else "softmax", ulysses_size=U,
                    return_lse=False, backend="auto", doc_spans=sequence_spans(full, P, args.layout))
        row = measure(lambda: sp_softmax_attention(q, k, v, **opts)[0], dout, args.repeats, device)
        cost = softmax_op_cost(alg, shape, P, hw, cost_mask(mask, N, args.docs), args.layout, ulysses=U)
        rows.append(finish(row, cost, "softmax", mask, N, P, alg, args.batch))
    return rows


def linear_rows(N: int, mask: str, hw: Hardware, args, device, dtype) -> list[dict]:
    """Every linear-family algorithm on one (N, mask); doc_gates computed before the timing."""
    group, P = dist.group.WORLD, dist.get_world_size()
    q, k, v, g, dout = inputs(N, args.heads, args, device, dtype)
    full = segments(mask, N, args, device)
    seg = None if full is None else shard_sequence(full, 1, group, args.layout)
    gates = document_gates(seg, group, args.layout)
    shape = OpShape(args.batch, N, args.heads, args.heads, args.head_dim, chunk=64, per_channel_decay=True,
                    elem=dout.element_size())
    rows = []
    for alg in [a for a in args.algorithms if a in LINEAR]:
        opts = dict(group=group, algorithm=alg, log_decay=g, segment_ids=seg, zeco_blocks=args.zeco_blocks,
                    layout=args.layout, backend="auto", doc_gates=gates)
        row = measure(lambda: sp_linear_attention(q, k, v, **opts), dout, args.repeats, device)
        cost = linear_op_cost(alg, shape, P, hw, args.layout, args.zeco_blocks, cost_mask(mask, N, args.docs))
        rows.append(finish(row, cost, "linear", mask, N, P, alg, args.batch))
    return rows


def finish(row: dict, cost, family: str, mask: str, N: int, P: int, alg: str, batch: int) -> dict:
    """The measured row with its keys, the prediction and the throughput."""
    return {"family": family, "mask": mask, "N": N, "P": P, "algorithm": alg, **row,
            "pred_fwd_ms": cost.fwd_s * 1e3, "pred_bwd_ms": cost.bwd_s * 1e3, "pred_fwd_bytes": cost.fwd_bytes,
            "pred_bwd_bytes": cost.bwd_bytes, "tokens_per_s": batch * N / ((row["fwd_ms"] + row["bwd_ms"]) / 1e3)}


def worker(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """All rows of one world of P ranks: calibrate with no delay, then every (N, mask) under the emulated link."""
    cuda = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(rank)
    comm.set_link()
    hw = profile(world, device, dtype, args)
    if args.gbps:
        comm.set_link(args.latency_ms * 1e-3, args.gbps * 1e9)
    rows = []
    for N in args.n:
        for mask in args.masks:
            rows += softmax_rows(N, mask, hw, args, device, dtype)
            if mask in LINEAR_MASKS:
                rows += linear_rows(N, mask, hw, args, device, dtype)
    comm.set_link()
    return [dict(r, overhead=hw.step_overhead) for r in rows]


def validation(rows: list[dict]) -> tuple[list[dict], str]:
    """Per (family, mask, N, P) group: time over the group's fastest, measured and predicted; and a summary.

    Predictions within TIE of each other are tied (usp is ulysses at P = U; lasp2 and zeco hide their
    communication alike): a ranking matches when every pair the model separates is measured in its order.
    """
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["family"], r["mask"], r["N"], r["P"]), []).append(r)
    out, ranked, fastest = [], 0, 0
    for key, members in groups.items():
        meas = {r["algorithm"]: r["fwd_ms"] + r["bwd_ms"] for r in members}
        pred = {r["algorithm"]: r["pred_fwd_ms"] + r["pred_bwd_ms"] for r in members}
        for alg in meas:
            m, p = meas[alg] / min(meas.values()), pred[alg] / min(pred.values())
            out.append({"family": key[0], "mask": key[1], "N": key[2], "P": key[3], "algorithm": alg,
                        "measured ratio": m, "predicted ratio": p, "within 25%": abs(p / m - 1) <= 0.25})
        ranked += all(meas[a] < meas[b] for a in pred for b in pred if pred[a] * (1 + TIE) < pred[b])
        fastest += pred[min(meas, key=meas.get)] <= min(pred.values()) * (1 + TIE)
    within = sum(r["within 25%"] for r in out)
    scale = statistics.median((r["fwd_ms"] + r["bwd_ms"]) / (r["pred_fwd_ms"] + r["pred_bwd_ms"]) for r in rows)
    summary = (f"ratio to the group's fastest within 25% of the measured: {within}/{len(out)} rows "
               f"({within / len(out):.0%}); predicted ranking matches (ties within {TIE:.0%}): {ranked}/{len(groups)} "
               f"groups; predicted fastest matches: {fastest}/{len(groups)} groups; median measured / predicted "
               f"fwd+bwd time: {scale:.2f}")
    return out, summary


def scatter(rows: list[dict], path: str) -> None:
    """Measured vs predicted ms of every row's forward and backward, log-log, with the y = x line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 6))
    for family, marker in (("softmax", "o"), ("linear", "s")):
        for phase in ("fwd", "bwd"):
            pts = [(r[f"pred_{phase}_ms"], r[f"{phase}_ms"]) for r in rows if r["family"] == family]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=14, label=f"{family} {phase}")
    values = [r[c] for r in rows for c in ("fwd_ms", "bwd_ms", "pred_fwd_ms", "pred_bwd_ms")]
    lo, hi = min(values) * 0.8, max(values) * 1.25
    ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted ms")
    ax.set_ylabel("measured ms")
    ax.set_title("measured vs predicted time per op and rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def write(rows: list[dict], args: argparse.Namespace, header: str) -> None:
    """CSV, markdown (table and validation) and the plots under the --out prefix."""
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({c: r[c] for c in COLUMNS} for r in rows)
    table_rows = [dict(r, **{"MB/rank": (r["fwd_bytes"] + r["bwd_bytes"]) / 2 ** 20,
                             "pred MB/rank": (r["pred_fwd_bytes"] + r["pred_bwd_bytes"]) / 2 ** 20}) for r in rows]
    table = print_table(table_rows, TABLE)
    ratios, summary = validation(rows)
    print(summary)
    ratio_table = print_table(ratios, ["family", "mask", "N", "P", "algorithm", "measured ratio", "predicted ratio",
                                       "within 25%"])
    if args.repeat_of:
        _, floor = validation(as_predicted(rows, args.repeat_of))
        summary += f"\n\n**Noise floor** (the same scores with {args.repeat_of}'s measured times as the prediction): {floor}"
        print(floor)
    with open(f"{args.out}.md", "w") as f:
        f.write(f"{header}\n\n{table}\n\n**Validation**: {summary}\n\n{ratio_table}\n")
    for family in ("softmax", "linear"):
        causal = [dict(r, MB_per_rank=(r["fwd_bytes"] + r["bwd_bytes"]) / 2 ** 20) for r in rows
                  if r["mask"] == "causal" and r["family"] == family]
        plot(causal, "N", "tokens_per_s", ["algorithm", "P"], f"{args.out}_throughput_{family}.png",
             f"{family} family, causal: tokens/s (fwd+bwd)")
        plot(causal, "N", "MB_per_rank", ["algorithm", "P"], f"{args.out}_bytes_{family}.png",
             f"{family} family, causal: MB sent per rank (fwd+bwd)")
        plot(causal, "N", "peak_mb", ["algorithm", "P"], f"{args.out}_memory_{family}.png",
             f"{family} family, causal: peak MB per rank (fwd+bwd)")
    scatter(rows, f"{args.out}_predicted.png")


def overhead_text(rows: list[dict]) -> str:
    """Each world's calibrated step_overhead, for the header."""
    worlds = {r["P"]: r["overhead"] for r in rows}
    return "; ".join(f"P={P}: " + ", ".join(f"{alg} {f * 1e3:.2f} / {b * 1e3:.2f}" for alg, (f, b) in ovh.items())
                     for P, ovh in worlds.items())


def as_predicted(rows: list[dict], path: str) -> list[dict]:
    """rows with an earlier run's measured times (its CSV) as their predictions: what validation scores when
    the 'model' is a repeat of the measurement."""
    def key(r):
        return tuple(str(r[c]) for c in ("family", "mask", "N", "P", "algorithm"))

    with open(path) as f:
        before = {key(r): r for r in csv.DictReader(f)}
    return [dict(r, pred_fwd_ms=float(before[key(r)]["fwd_ms"]), pred_bwd_ms=float(before[key(r)]["bwd_ms"]))
            for r in rows]


def link_text(args: argparse.Namespace) -> str:
    """The links the run used, for the header."""
    if args.gbps:
        return f"emulated link {args.latency_ms} ms + bytes / {args.gbps} GB/s"
    return "measured links"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="real sizes: N 8k-64k, H=16, D=128 (GPUs, torchrun)")
    p.add_argument("--n", type=int, nargs="+")
    p.add_argument("--p", type=int, nargs="+", default=[2, 4], help="CPU worlds (torchrun: its world size)")
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="softmax K/V heads (default: --heads)")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--masks", nargs="+", default=MASKS, choices=MASKS)
    p.add_argument("--algorithms", nargs="+", default=SOFTMAX + LINEAR, choices=SOFTMAX + LINEAR)
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--ulysses", type=int, default=2, help="USP's Ulysses degree U (capped at P)")
    p.add_argument("--zeco-blocks", type=int, default=4)
    p.add_argument("--docs", type=int, default=8, help="documents of docs_uniform")
    p.add_argument("--latency-ms", type=float, default=0.2)
    p.add_argument("--gbps", type=float, help="emulated link GB/s (bytes); 0: real links, measured (default 0.5; "
                                             "0 under torchrun on GPUs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/sp_suite", help="output prefix")
    p.add_argument("--repeat-of", help="an earlier run's CSV of the same rows: also score it as the prediction "
                                       "(the validation's noise floor)")
    args = p.parse_args(argv)
    full = dict(n=[8192, 16384, 32768, 65536], heads=16, head_dim=128)
    quick = dict(n=[1024, 2048], heads=4, head_dim=64)
    for key, value in (full if args.full else quick).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kv_heads = args.kv_heads or args.heads
    if args.gbps is None:
        args.gbps = 0.0 if torch.cuda.is_available() and "RANK" in os.environ else 0.5
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if "RANK" in os.environ:  # torchrun: one world, NCCL on GPUs
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        rows = worker(dist.get_rank(), dist.get_world_size(), args)
        if dist.get_rank():
            return
    else:
        rows = [r for world in args.p for r in run_distributed(worker, world, args, timeout=1800)[0]]
    header = (f"B={args.batch}, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, layout {args.layout}, "
              f"U={args.ulysses}, K={args.zeco_blocks}, {link_text(args)}, {args.repeats} repeats; "
              f"suite {time.perf_counter() - start:.0f} s; calibrated fixed time per step (fwd / bwd ms): "
              f"{overhead_text(rows)}")
    print(header)
    write(rows, args, header)


if __name__ == "__main__":
    main()
