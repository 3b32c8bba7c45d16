"""Peak memory per rank: the head + loss (full logits vs chunked), and one training step vs N and P.

CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) of a fresh process during the measured work, minus
its RSS just before it (a step: the second one, so AdamW state and one-off setup are in the baseline), with
glibc told to return every freed block of 64 KiB or more to the system (mallopt M_MMAP_THRESHOLD): RSS then
follows the live tensors, as the GPU's max_memory_allocated does, not the heap glibc keeps for reuse. CUDA: a
step's torch.cuda.max_memory_allocated (all of it: the bf16 GPU estimate counts parameters and AdamW state), a
loss's minus memory_allocated before. Every row prints the closed form of longtrain.trainer.memory_model beside it,
and the step table ends with each series' slope per local token and the longest N under --cap-gb per rank.
    python benchmarks/memory.py loss                                  # N/P = 16k tokens, vocab 32k, d 256
    python benchmarks/memory.py step --p 1 2                          # table + benchmarks/memory.png
    python benchmarks/memory.py step --p 2 --modes off block --models "tiny hybrid" --repo /tmp/mem_base
                                                                      # another tree (no estimate column)
"""
import argparse
import ctypes
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import plot, print_table  # noqa: E402
from longtrain.config import load_config  # noqa: E402
from longtrain.parallel.spawn import run_distributed  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = {"tiny hybrid": [], "softmax": ["model.pattern=softmax"]}  # configs/tiny.yaml: gla*3,softmax, ZeCO + ring
MODES = {"off": [], "block": ["model.activation_checkpointing=true"],
         "mixer": ["model.activation_checkpointing=true", "model.checkpoint_mode=mixer"],
         "offload": ["train.offload_activations=true"]}
MB = 2 ** 20
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1


def return_freed_memory() -> None:
    """glibc: serve blocks >= 64 KiB with mmap and trim the heap above 64 KiB, so RSS drops when tensors die."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 16)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 16)


def mark(device: torch.device) -> int:
    """Reset the peak and return the memory in use now (bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return status_kb("VmRSS") * 1024


def peak(device: torch.device) -> int:
    """Peak memory since mark() (bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return status_kb("VmHWM") * 1024


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def loss_worker(rank, world, tokens, vocab, d, chunk):
    """Peak bytes of forward + backward of the head and loss on random h [tokens, d]."""
    from longtrain.trainer.model import LMHead
    return_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    head = LMHead(d, vocab, chunk).to(device)
    h = torch.randn(1, tokens, d, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens), device=device)
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
    before = mark(device)
    loss, _ = head(h, targets, mask)
    loss.backward()
    return peak(device) - before


def step_worker(rank, world, root, overrides):
    """Peak bytes of a training step after a first one; on CPU above the RSS then (model, AdamW state, one-off
    setup). root: the tree whose configs/tiny.yaml runs (first on sys.path)."""
    from longtrain.trainer.train import Trainer
    return_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(load_config(os.path.join(root, "configs", "tiny.yaml"), overrides + [f"run.dir={tmp}"]))
        trainer.train_step()
        before = mark(trainer.device)
        trainer.train_step()
        return peak(trainer.device) - (before if trainer.device.type == "cpu" else 0)


def loss_table(args) -> list[dict]:
    """Full logits vs chunked head + loss at one size."""
    from longtrain.trainer.memory_model import loss_bytes
    rows = []
    for chunk in (0, args.chunk):
        measured = run_distributed(loss_worker, 1, args.tokens, args.vocab, args.d, chunk)[0]
        rows.append({"loss": "chunked" if chunk else "full logits", "chunk": chunk, "tokens": args.tokens,
                     "vocab": args.vocab, "d": args.d, "peak MB": measured / MB,
                     "estimate MB": loss_bytes(args.tokens, args.d, args.vocab, chunk) / MB})
    for row in rows:
        row["vs full"] = row["peak MB"] / rows[0]["peak MB"]
    return rows


def step_table(args) -> list[dict]:
    """One row per model x checkpointing x P x N: measured peak per rank and the closed form (this tree only)."""
    from longtrain.trainer.memory_model import step_memory
    root = os.path.abspath(args.repo or ROOT)
    sys.path.insert(0, root)  # spawned ranks start from this sys.path: they import that tree's longtrain
    rows = []
    for model in args.models:
        mixers = MODELS[model]
        for mode in args.modes:
            for world in args.p:
                for n in args.n:
                    overrides = mixers + MODES[mode] + [
                        f"data.seq_len={n}", "data.batch_size=1", f"parallel.sp_size={world}", "train.eval_every=0",
                        "train.engine=fsdp", "run.resume=false", "run.progress=false", "wandb.mode=disabled"]
                    try:
                        measured = max(run_distributed(step_worker, world, root, overrides, timeout=1800))
                    except RuntimeError as e:  # a failing configuration is a row, not the end of the sweep
                        print(f"{model} {mode} P={world} N={n} failed: {str(e).strip().splitlines()[-1]}")
                        measured = float("nan")
                    cuda = torch.cuda.is_available()
                    estimate = float("nan") if args.repo else step_memory(
                        load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides), world,
                        elem=2 if cuda else 4, gpu=cuda)["total"]
                    rows.append({"model": model, "checkpointing": mode, "P": world, "N": n, "N/P": n // world,
                                 "peak MB/rank": measured / MB, "estimate MB": estimate / MB,
                                 "estimate/peak": estimate / measured})
                    print(rows[-1], flush=True)
    return rows


def line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) through (x, y) points."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def slopes(rows: list[dict], cap_mb: float) -> list[dict]:
    """Per series (model, checkpointing, P): MB per local token measured and estimated, and the longest N whose
    step stays under cap_mb per rank on the measured line and on the estimate's."""
    out = []
    for key in sorted({(r["model"], r["checkpointing"], r["P"]) for r in rows}):
        series = [r for r in rows if (r["model"], r["checkpointing"], r["P"]) == key and r["peak MB/rank"] > 0]
        if len({r["N"] for r in series}) < 2:
            continue
        a, b = line([(r["N/P"], r["peak MB/rank"]) for r in series])
        ea, eb = line([(r["N/P"], r["estimate MB"]) for r in series])
        world = key[2]
        out.append({"model": key[0], "checkpointing": key[1], "P": world, "KB/token": a * 1024,
                    "estimate KB/token": ea * 1024, "estimate/measured": ea / a,
                    f"longest N at {cap_mb / 1024:g} GB": int(world * (cap_mb - b) / a),
                    "estimate longest N": int(world * (cap_mb - eb) / ea) if not math.isnan(ea) else float("nan")})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["loss", "step"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--n", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--p", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", default="benchmarks/memory.png")
    p.add_argument("--repo", help="measure another source tree (e.g. an old commit's git archive); no estimate")
    p.add_argument("--cap-gb", type=float, default=4.0, help="per-rank cap for the longest N")
    args = p.parse_args()
    if args.what == "loss":
        print_table(loss_table(args), ["loss", "chunk", "tokens", "vocab", "d", "peak MB", "estimate MB", "vs full"])
        return
    rows = step_table(args)
    print_table(rows, ["model", "checkpointing", "P", "N", "N/P", "peak MB/rank", "estimate MB", "estimate/peak"])
    lines = slopes(rows, args.cap_gb * 1024)
    if lines:
        print_table(lines, list(lines[0]))
    plot(rows, "N", "peak MB/rank", ["model", "checkpointing", "P"], args.out, "peak memory per rank, one step")


if __name__ == "__main__":
    main()
