"""The GPU check (`make gpu-check`, under 8 minutes on one H100/H200): runs, measures, appends to RESULTS.md.

1. tests/test_triton.py compiled on the GPU (bf16 tests and the torch backend's CUDA operators included)
2. benchmarks/kernels.py: Triton vs SDPA flash, and vs fla's chunk_gla when installed
3. benchmarks/ops.py: every op vs SDPA causal
4. 30 training steps of configs/h100_hybrid_32k.yaml: tokens/s, MFU, peak memory
5. peak memory of one training step at N = 32k, 64k, 128k, ... up to the first N that does not fit

Each step is a subprocess under the time left; a failed step is reported and the rest still run. It runs on
the GPU machine's own python3 (its torch and Triton), with no venv and no network: what that python lacks
(omegaconf; fla-core for the chunk_gla baseline) travels as wheels in .whl/, which `make gpu-wheels` fills
here and this script installs into /tmp before the first step.
    python3 benchmarks/gpu_check.py             # on a GPU machine (what `make gpu-check` runs)
    python3 benchmarks/gpu_check.py --dry-run   # print the commands (any machine)
"""
import argparse
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import torch

BUDGET_S = 450
PY = sys.executable
WHEELS = ".whl"
SITE = "/tmp/longtrain-site"
CONFIG = "configs/h100_hybrid_32k.yaml"
COMMON = ["wandb.mode=disabled", "train.save_every=0", "train.eval_every=0"]


def train_cmd(run_dir: str, *overrides: str) -> list[str]:
    return [PY, "-m", "longtrain", "train", CONFIG, f"run.dir={run_dir}", *COMMON, *overrides]


STEPS = [
    ("triton tests (compiled)", [PY, "-m", "pytest", "-q", "tests/test_triton.py"], 150),
    ("benchmarks/kernels.py", [PY, "benchmarks/kernels.py", "--n", "8192", "32768", "--d", "64", "128",
                               "--out", "benchmarks/kernels_gpu.png"], 90),
    ("benchmarks/ops.py", [PY, "benchmarks/ops.py", "--n", "4096", "8192", "16384", "--linear-n", "65536",
                           "--out", "benchmarks/ops_gpu.png"], 60),
    ("train 30 steps, N=32k", train_cmd("runs/gpu_check/train", "train.steps=30", "train.log_every=10"), 120),
]
MEMORY_N = [32768, 65536, 131072, 262144, 524288]


def steps() -> list[tuple[str, list[str], float]]:
    """STEPS, after an offline install of the carried .whl/*.whl into SITE when there are any."""
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    install = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target",
               SITE, *wheels]
    return ([("carried wheels", install, 60)] if wheels else []) + STEPS


def run(cmd: list[str], timeout: float) -> tuple[bool, float, str]:
    """(succeeded, seconds, output) of one command."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
        ok, out = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, out = False, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
    return ok, time.perf_counter() - t0, out if isinstance(out, str) else out.decode()


def last_metrics(run_dir: str) -> dict:
    """The last train record of run_dir/metrics.jsonl ({} if none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    records = [json.loads(line) for line in open(path) if '"train/' in line]
    return records[-1] if records else {}


def memory_cell(ok: bool, peak_gb: float | None, output: str) -> str:
    if ok and peak_gb:
        return f"{peak_gb:.1f}"
    return "does not fit" if "out of memory" in output.lower() else "FAILED"


def tables(output: str) -> str:
    """The markdown table lines and target lines a benchmark printed."""
    return "\n".join(line for line in output.splitlines() if line.startswith("|") or "target" in line)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    args = p.parse_args()
    if args.dry_run:
        for name, cmd, limit in steps():
            print(f"{name} (<= {limit} s): {' '.join(cmd)}")
        print("peak memory:", " ".join(train_cmd("runs/gpu_check/mem_N", "train.steps=1", "train.grad_accum=1",
                                                 "train.log_every=1", "data.seq_len=N")))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (use --dry-run to see the commands)")
    shutil.rmtree("runs/gpu_check", ignore_errors=True)  # a leftover run dir would resume instead of start
    os.environ["PYTHONPATH"] = os.pathsep.join([SITE, os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(
        os.pathsep))])  # the steps import the carried packages and the repository
    start, report, details = time.perf_counter(), [], []
    left = lambda: BUDGET_S - (time.perf_counter() - start)  # noqa: E731
    for name, cmd, limit in steps():
        ok, seconds, out = run(cmd, min(limit, left()))
        print(f"{name}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s)", flush=True)
        report.append(f"| {name} | {'ok' if ok else 'FAILED'} | {seconds:.0f} |")
        details.append(f"{name}:\n\n{tables(out) if ok else out[-2000:]}\n")
    m = last_metrics("runs/gpu_check/train")
    train = (f"tokens/s {m.get('train/tokens_per_s', float('nan')):.0f}, MFU {m.get('train/mfu', float('nan')):.3f}, "
             f"peak memory {m.get('train/peak_mem_gb', float('nan')):.1f} GB (step {m.get('step')})")
    memory = []
    for n in MEMORY_N:
        if left() < 30:
            memory.append(f"| {n} | not run (time budget) |")
            break
        run_dir = f"runs/gpu_check/mem_{n}"
        ok, _, out = run(train_cmd(run_dir, "train.steps=1", "train.grad_accum=1", "train.log_every=1",
                                   f"data.seq_len={n}"), min(90, left()))
        memory.append(f"| {n} | {memory_cell(ok, last_metrics(run_dir).get('train/peak_mem_gb'), out)} |")
        if not ok:
            break
    device = torch.cuda.get_device_name()
    section = "\n".join([
        f"\n## GPU check on {device}, {datetime.date.today()}\n",
        f"`make gpu-check`: torch {torch.__version__}, {time.perf_counter() - start:.0f} s in all.\n",
        "| step | result | s |", "|---|---|---|", *report, "",
        f"Training, {CONFIG}, 30 steps at N=32k: {train}.\n",
        "Peak memory of one training step (grad_accum 1):\n", "| N | peak GB |", "|---|---|", *memory, "",
        *details])
    with open(args.results, "a") as f:
        f.write(section)
    print(section)


if __name__ == "__main__":
    main()
