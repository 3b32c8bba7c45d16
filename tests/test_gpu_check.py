"""benchmarks/gpu_check.py's plumbing on CPU: every step reported, a cut or failed step keeps its output.

The GPU machine is lent for minutes at a time, so what gpu_check does around its steps (time limits, logs,
the report rewritten after each step into $OUT) must work before it ever runs there.
"""
import importlib.util
import os
import sys
import tarfile
import time

import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_gpu_check(tmp_path, monkeypatch):
    """gpu_check on a fake GPU, with its runs, $OUT and RESULTS.md under tmp_path; main sets PYTHONPATH and
    PYTHONUNBUFFERED for its steps, restored after the test."""
    gpu_check = load_gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(gpu_check, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(gpu_check, "LOGS", str(tmp_path / "runs" / "logs"))
    for name in ("PYTHONPATH", "PYTHONUNBUFFERED"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--results", str(tmp_path / "RESULTS.md")])
    return gpu_check


def test_every_step_is_reported_and_a_cut_step_keeps_what_it_printed(tmp_path, monkeypatch):
    gpu_check = fake_gpu_check(tmp_path, monkeypatch)
    py = sys.executable
    monkeypatch.setattr(gpu_check, "MEMORY_N", [2048, 4096, 8192])  # fits, does not fit, not tried

    def fake_train(run_dir, *overrides):
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if overrides[-1] == "data.seq_len=2048":
            return [py, "-c", f"import os; os.makedirs({run_dir!r}); open({metrics!r}, 'w').write("
                              "'{\"step\": 1, \"train/peak_mem_gb\": 1.25}')"]
        return [py, "-c", "import sys; print('torch.OutOfMemoryError: CUDA out of memory.'); sys.exit(1)"]

    monkeypatch.setattr(gpu_check, "train_cmd", fake_train)
    monkeypatch.setattr(gpu_check, "steps", lambda out_dir: [
        ("prints a table", [py, "-c", "print('| a | 1 |')"], 30, {}),
        ("cut by its limit", [py, "-c", "import subprocess, sys, time; print('| b | 2 |'); print('worker', "
                                        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']).pid, "
                                        "flush=True); time.sleep(60)"], 3, {}),
        ("fails", [py, "-c", "import os, sys; print('boom', os.environ['STEP_ENV']); sys.exit(3)"], 30,
         {"STEP_ENV": "seen"})])
    gpu_check.main()
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert (tmp_path / "RESULTS.md").read_text() == report
    assert "## GPU check on Fake GPU" in report and "(still running)" not in report
    assert "| prints a table | ok |" in report and "| a | 1 |" in report
    assert "| cut by its limit | timed out |" in report and "| b | 2 |" in report and "timed out after 3 s" in report
    assert "| fails | FAILED |" in report and "boom seen" in report
    assert "| 2048 | 1.2 | " in report and "| 4096 | does not fit | " in report and "| 8192 |" not in report
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.md", "logs.tar.gz"]  # the device returns 8 files
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        logs = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert sorted(logs) == ["logs/0.log", "logs/1.log", "logs/2.log", "logs/mem_2048.log", "logs/mem_4096.log"]
    assert "| b | 2 |" in logs["logs/1.log"] and "out of memory" in logs["logs/mem_4096.log"]
    worker = int(report.split("worker ")[1].split()[0])  # the cut step's own child went with it (SIGKILL: at once)
    for _ in range(20):
        if not alive(worker):
            break
        time.sleep(0.05)
    assert not alive(worker)


def test_the_time_budget_cuts_a_step_with_a_longer_limit(tmp_path, monkeypatch):
    """A step allowed 30 s gets what is left of the whole check's budget (3 s); no memory step starts after it."""
    gpu_check = fake_gpu_check(tmp_path, monkeypatch)
    monkeypatch.setattr(gpu_check, "BUDGET_S", 3)
    monkeypatch.setattr(gpu_check, "steps", lambda out_dir: [
        ("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 30, {})])
    gpu_check.main()
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| slow | timed out |" in report and "timed out after 3 s" in report
    assert f"| {gpu_check.MEMORY_N[0]} | not run (time budget) |" in report


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie, killed but not yet reaped by init, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_predictions_beside_the_measurements():
    """The cost and memory models' figures for the check's runs load here (an import or config error would
    leave the GPU check without them)."""
    gpu_check = load_gpu_check()
    small, large = (float(gpu_check.estimate_gb(n)) for n in (32768, 131072))
    assert 0 < small < large
    cost = gpu_check.predicted("train.steps=30")
    assert cost.tokens_per_s > 0 and 0 < cost.mfu < 1


def test_a_half_written_metrics_line_is_skipped(tmp_path):
    gpu_check = load_gpu_check()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    assert gpu_check.last_metrics(str(tmp_path)) == {"step": 1, "train/loss": 2.0}


def test_kernel_summary_sums_gpu_time_by_kernel(tmp_path):
    """The traced step's kernels by total time, from a Chrome trace as torch.profiler writes it on a GPU."""
    import gzip
    import json

    gpu_check = load_gpu_check()
    assert gpu_check.kernel_summary(str(tmp_path)) == "no trace of a training step"
    trace = tmp_path / "profile" / "step_00000025" / "rank0.json.gz"
    trace.parent.mkdir(parents=True)
    events = [{"cat": "kernel", "name": "flash_fwd", "ts": 100, "dur": 1000},
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9000},
              {"cat": "kernel", "name": "gemm", "ts": 1200, "dur": 3000},
              {"cat": "kernel", "name": "flash_fwd", "ts": 4300, "dur": 500}]
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = gpu_check.kernel_summary(str(tmp_path), top=1)
    assert "4.5 ms busy over a 4.7 ms span (3 launches)" in summary
    assert "| `gemm` | 3.00 | 66.7% |" in summary and "| (the other 1) | 1.50 | 33.3% |" in summary
