"""The GPU check (`make gpu-check`, under 8 minutes on one H100/H200): runs, measures, appends to RESULTS.md.

1. tests/test_triton.py compiled on the GPU (bf16 tests and the torch backend's CUDA operators included), one
   flash tile config (LONGTRAIN_TRITON_AUTOTUNE=0) and 16 pytest-xdist workers, as compiling is most of it
   (about 190 s on an H100 with 14)
2. benchmarks/kernels.py at D=64 (the config's head dim): Triton GLA vs fla's chunk_gla (when installed), then
   Triton flash attention vs SDPA flash; rows print as measured
3. benchmarks/ops.py: every op vs SDPA causal, bf16, through `auto`; then the softmax ops on the torch path
   (PyTorch's fused operators): with step 2 the data behind `auto`'s CUDA choice per op
4. 30 training steps of configs/h100_hybrid_32k.yaml: tokens/s, MFU, peak memory; step 25 traced by
   torch.profiler, its GPU time by kernel in the report (the logged step 30 is not traced)
5. peak memory of one training step with activation checkpointing (one flash tile config: no autotuning per
   N) at N = 128k, 256k, ... up to the first N that does not fit (or the time left), beside
   trainer.memory_model's estimate

Each step is a subprocess under the time left; a failed or cut step is reported with what it printed and the
rest still run. It runs on the GPU machine's own python3 (its torch and Triton), with no venv and no network:
what that python lacks (omegaconf; pytest-xdist; fla-core for the chunk_gla baseline) travels as wheels in
.whl/, which `make gpu-wheels` fills here and this script installs into /tmp before the first step. The report
so far (gpu_check.md, rewritten after each step), the running step's log (current_step.log), the finished
steps' logs (logs.tar.gz) and the plots go to $OUT when set (the device tool brings that folder back, at most 8
files, even from a run cut by its time limit), else to runs/gpu_check/out.
    python3 benchmarks/gpu_check.py             # on a GPU machine (what `make gpu-check` runs)
    python3 benchmarks/gpu_check.py --dry-run   # print the commands (any machine)
"""
import argparse
import collections
import datetime
import glob
import gzip
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import torch

BUDGET_S = 480
PY = sys.executable
WHEELS = ".whl"
SITE = "/tmp/longtrain-site"
RUNS = "runs/gpu_check"  # training run dirs, removed first: a leftover one would resume instead of start
LOGS = os.path.join(RUNS, "logs")  # one file per step; out_dir gets them as one logs.tar.gz
CONFIG = "configs/h100_hybrid_32k.yaml"
PROFILE = "h100-nvlink-ib"  # the cost model's hardware profile the measurements are set beside
COMMON = ["wandb.mode=disabled", "train.save_every=0", "train.save_last=false", "train.eval_every=0"]
MEMORY_N = [131072, 262144, 524288, 1048576]  # until one does not fit (or the time is up)
MEMORY = ["train.grad_accum=1", "model.activation_checkpointing=true"]  # the config's step, made to reach long N


def train_cmd(run_dir: str, *overrides: str) -> list[str]:
    return [PY, "-m", "longtrain", "train", CONFIG, f"run.dir={run_dir}", *COMMON, *overrides]


def steps(out_dir: str) -> list[tuple[str, list[str], float, dict]]:
    """(name, command, seconds allowed, extra environment) of each step; first an offline install of the carried
    .whl/*.whl into SITE when there are any."""
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    install = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target",
               SITE, *wheels]
    xdist = any("pytest_xdist" in w for w in wheels) or importlib.util.find_spec("xdist") is not None
    one_config = {"LONGTRAIN_TRITON_AUTOTUNE": "0"}
    return ([("carried wheels", install, 60, {})] if wheels else []) + [
        ("triton tests (compiled)", [PY, "-m", "pytest", "-q", "--durations=10", *(["-n", "16"] if xdist else []),
                                     "tests/test_triton.py"], 180, one_config),
        ("benchmarks/kernels.py", [PY, "benchmarks/kernels.py", "--n", "8192", "32768", "--d", "64",
                                   "--out", os.path.join(out_dir, "kernels_gpu.png")], 80, {}),
        ("benchmarks/ops.py", [PY, "benchmarks/ops.py", "--n", "4096", "8192", "16384", "--linear-n", "65536",
                               "--out", os.path.join(out_dir, "ops_gpu.png")], 30, {}),
        ("benchmarks/ops.py, softmax on the torch path",
         [PY, "benchmarks/ops.py", "--n", "8192", "16384", "--linear-n", "--backend", "torch", "--ops", "softmax",
          "--out", os.path.join(out_dir, "ops_torch_gpu.png")], 30, {}),
        ("train 30 steps, N=32k", train_cmd(f"{RUNS}/train", "train.steps=30", "train.log_every=10",
                                            "train.profile_step=25"), 120, {}),
    ]


def run(cmd: list[str], timeout: float, env: dict, log: str) -> tuple[str, float, str]:
    """(ok | FAILED | timed out, seconds, output) of one command. Its output goes to `log` as it comes, so a run
    cut short (here or by the device's own limit) keeps it; on timeout its whole process group goes (xdist
    workers too)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
    with open(log) as f:
        out = f.read() + (f"\ntimed out after {timeout:.0f} s" if timed_out else "")
    status = "timed out" if timed_out else "ok" if proc.returncode == 0 else "FAILED"
    return status, time.perf_counter() - t0, out


def last_metrics(run_dir: str) -> dict:
    """The last train record of run_dir/metrics.jsonl ({} if none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    records = []
    for line in open(path):
        try:
            records += [json.loads(line)] if '"train/' in line else []
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            pass
    return records[-1] if records else {}


def predicted(*overrides: str):
    """plan.cost.step_cost of the check's config with overrides on one GPU of the h100 profile: the cost and
    memory models' step time and peak memory, checked on a GPU here for the first time. None (and the reason
    printed) where the repository or its wheels cannot load."""
    sys.path[:0] = [p for p in (SITE, os.getcwd()) if p not in sys.path]
    importlib.invalidate_caches()
    try:
        from longtrain.config import load_config
        from longtrain.plan.cost import step_cost
        from longtrain.plan.hardware import load_profile
        return step_cost(load_config(CONFIG, COMMON + list(overrides)), load_profile(PROFILE), 1)
    except Exception as e:  # the check goes on without the prediction
        print(f"no prediction: {type(e).__name__}: {e}")
        return None


def estimate_gb(n: int) -> str:
    """The memory model's peak for the memory run at N, in GiB as the trainer logs peak_mem_gb."""
    cost = predicted(*MEMORY, f"data.seq_len={n}")
    return "n/a" if cost is None else f"{cost.memory['total'] / 2 ** 30:.1f}"


def kernel_summary(run_dir: str, top: int = 12) -> str:
    """GPU time by kernel in the training run's traced step (rank 0's Chrome trace): the `top` largest, the rest
    as one row, and the kernels' total against the span from the first kernel's start to the last one's end."""
    paths = glob.glob(os.path.join(run_dir, "profile", "step_*", "rank0.json.gz"))
    if not paths:
        return "no trace of a training step"
    with gzip.open(paths[0], "rt") as f:
        kernels = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    if not kernels:
        return "the traced step has no GPU kernels"
    by_name = collections.Counter()
    for e in kernels:
        by_name[e["name"][:90]] += e["dur"] / 1e3  # ms
    total = sum(by_name.values())
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3
    rows = by_name.most_common(top)
    rest = total - sum(ms for _, ms in rows)
    return "\n".join([f"GPU kernels of the traced step: {total:.1f} ms busy over a {span:.1f} ms span "
                      f"({len(kernels)} launches); largest by total time:\n",
                      "| kernel | ms | share |", "|---|---|---|",
                      *(f"| `{name}` | {ms:.2f} | {ms / total:.1%} |" for name, ms in rows),
                      f"| (the other {len(by_name) - len(rows)}) | {rest:.2f} | {rest / total:.1%} |", ""])


def pack_logs(out_dir: str) -> None:
    """LOGS as out_dir/logs.tar.gz, replaced whole: one file back from the device however many steps ran."""
    with tarfile.open(os.path.join(out_dir, "logs.tar.gz.tmp"), "w:gz") as tar:
        tar.add(LOGS, arcname="logs")
    os.replace(os.path.join(out_dir, "logs.tar.gz.tmp"), os.path.join(out_dir, "logs.tar.gz"))


def memory_cell(status: str, peak_gb: float | None, output: str) -> str:
    if status == "ok" and peak_gb:
        return f"{peak_gb:.1f}"
    return "does not fit" if "out of memory" in output.lower() else status


def tables(output: str) -> str:
    """The markdown table lines and target lines a benchmark printed."""
    return "\n".join(line for line in output.splitlines() if line.startswith("|") or "target" in line)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    args = p.parse_args()
    out_dir = os.environ.get("OUT") or f"{RUNS}/out"
    if args.dry_run:
        for name, cmd, limit, env in steps(out_dir):
            print(f"{name} (<= {limit} s):", " ".join([f"{k}={v}" for k, v in env.items()] + cmd))
        print("peak memory:", " ".join(train_cmd(f"{RUNS}/mem_N", "train.steps=1", "train.log_every=1", *MEMORY,
                                                 "data.seq_len=N")))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (use --dry-run to see the commands)")
    shutil.rmtree(RUNS, ignore_errors=True)
    os.makedirs(LOGS)
    os.makedirs(out_dir, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([SITE, os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(
        os.pathsep))])  # the steps import the carried packages and the repository
    os.environ["PYTHONUNBUFFERED"] = "1"  # a step cut by its limit keeps what it printed
    start, report, details, memory = time.perf_counter(), [], [], []
    left = lambda: BUDGET_S - (time.perf_counter() - start)  # noqa: E731

    def save(done: bool) -> str:
        """The report so far, written to out_dir/gpu_check.md (the device tool brings it back even if cut)."""
        text = section(report, details, memory, time.perf_counter() - start, done)
        with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
            f.write(text)
        pack_logs(out_dir)
        return text

    def run_step(cmd: list[str], limit: float, env: dict, log_name: str) -> tuple[str, float, str]:
        """run() with its log in out_dir while it runs (so a cut device run brings it back), then in LOGS."""
        live = os.path.join(out_dir, "current_step.log")
        result = run(cmd, limit, env, live)
        shutil.move(live, os.path.join(LOGS, log_name))
        return result

    for i, (name, cmd, limit, env) in enumerate(steps(out_dir)):
        status, seconds, out = run_step(cmd, min(limit, left()), env, f"{i}.log")
        print(f"{name}: {status} ({seconds:.0f} s)", flush=True)
        report.append(f"| {name} | {status} | {seconds:.0f} |")
        tail = "" if status == "ok" else f"\n```\n{out[-2000:]}\n```\n"
        details.append(f"{name} (logs.tar.gz: logs/{i}.log):\n\n{tables(out)}\n{tail}")
        save(False)
    details.append(kernel_summary(f"{RUNS}/train"))
    for n in MEMORY_N:
        if left() < 30:
            memory.append(f"| {n} | not run (time budget) | {estimate_gb(n)} |")
            break
        run_dir = f"{RUNS}/mem_{n}"
        cmd = train_cmd(run_dir, "train.steps=1", "train.log_every=1", *MEMORY, f"data.seq_len={n}")
        status, _, out = run_step(cmd, min(90, left()), {"LONGTRAIN_TRITON_AUTOTUNE": "0"}, f"mem_{n}.log")
        peak = memory_cell(status, last_metrics(run_dir).get('train/peak_mem_gb'), out)
        memory.append(f"| {n} | {peak} | {estimate_gb(n)} |")
        save(False)
        if status != "ok":
            break
    text = save(True)
    with open(args.results, "a") as f:
        f.write(text)
    print(text)


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def section(report: list[str], details: list[str], memory: list[str], seconds: float, done: bool) -> str:
    """The dated RESULTS.md section of the steps run so far."""
    m, cost = last_metrics(f"{RUNS}/train"), predicted("train.steps=30")
    train = (f"tokens/s {m.get('train/tokens_per_s', float('nan')):.0f}, MFU {m.get('train/mfu', float('nan')):.3f}, "
             f"peak memory {m.get('train/peak_mem_gb', float('nan')):.1f} GiB (step {m.get('step')})")
    if cost is not None:
        train += (f"; the cost model ({PROFILE}) predicts tokens/s {cost.tokens_per_s:.0f}, MFU {cost.mfu:.3f}, "
                  f"peak memory {cost.memory['total'] / 2 ** 30:.1f} GiB")
    return "\n".join([
        f"\n## GPU check on {torch.cuda.get_device_name()}, {datetime.date.today()}\n",
        f"`make gpu-check`: torch {torch.__version__}, triton {triton_version()}, {seconds:.0f} s in all"
        f"{'' if done else ' (still running)'}.\n",
        "| step | result | s |", "|---|---|---|", *report, "",
        f"Training, {CONFIG}, 30 steps at N=32k: {train}.\n",
        "Peak memory of one training step (grad_accum 1, activation checkpointing), GiB, and the memory model's "
        "estimate:\n",
        "| N | peak | estimate |", "|---|---|---|", *memory, "",
        *details])


if __name__ == "__main__":
    main()
