"""benchmarks/gpu_check.py's plumbing on CPU: every step reported, a cut or failed step keeps its output.

The GPU machine is lent for minutes at a time, so what gpu_check does around its steps (time limits, logs,
the report rewritten after each step into $OUT) must work before it ever runs there.
"""
import importlib.util
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_step_is_reported_and_a_cut_step_keeps_what_it_printed(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(gpu_check, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(gpu_check, "MEMORY_N", [])
    py = sys.executable
    monkeypatch.setattr(gpu_check, "steps", lambda out_dir: [
        ("prints a table", [py, "-c", "print('| a | 1 |')"], 30, {}),
        ("cut by its limit", [py, "-c", "import time; print('| b | 2 |'); time.sleep(60)"], 3, {}),
        ("fails", [py, "-c", "import os, sys; print('boom', os.environ['STEP_ENV']); sys.exit(3)"], 30,
         {"STEP_ENV": "seen"})])
    for name in ("PYTHONPATH", "PYTHONUNBUFFERED"):  # main sets them for its steps; restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--results", str(tmp_path / "RESULTS.md")])
    gpu_check.main()
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert (tmp_path / "RESULTS.md").read_text() == report
    assert "## GPU check on Fake GPU" in report and "(still running)" not in report
    assert "| prints a table | ok |" in report and "| a | 1 |" in report
    assert "| cut by its limit | FAILED |" in report and "| b | 2 |" in report and "timed out after 3 s" in report
    assert "| fails | FAILED |" in report and "boom seen" in report
    assert sorted(os.listdir(tmp_path / "out" / "logs")) == ["0.log", "1.log", "2.log"]
