"""The launchers: torchrun command lines, and the SLURM script run for real with a fake SLURM on CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from longtrain.launch.cli import main as cli
from longtrain.launch.torchrun import torchrun_command

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
FAST = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.chunk_size=8", "data.seq_len=32",
        "data.batch_size=2", "data.mqar_pairs=4", "data.mqar_vocab=32", "model.vocab_size=32", "train.steps=2",
        "train.eval_every=0", "train.log_every=1", "train.save_every=2", "run.progress=false", "wandb.mode=disabled"]


def test_torchrun_command_single_and_multi_node():
    single = torchrun_command("c.yaml", ["train.steps=3"], nproc=4)
    assert single[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=4"] and "--standalone" in single
    assert single[-5:] == ["-m", "longtrain", "train", "c.yaml", "train.steps=3"]
    multi = torchrun_command("c.yaml", [], nproc=8, nnodes=2, rdzv="head:29500", max_restarts=2)
    assert "--nnodes=2" in multi and "--rdzv-backend=c10d" in multi and "--rdzv-endpoint=head:29500" in multi
    assert "--max-restarts=2" in multi and "--standalone" not in multi
    with pytest.raises(ValueError, match="--rdzv"):
        torchrun_command("c.yaml", [], nproc=8, nnodes=2)


def test_launch_dry_run_prints_the_command(capsys):
    assert cli(["launch", "--nproc", "2", "--dry-run", TINY, "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc-per-node=2" in out and "train.steps=3" in out


def test_launch_rejects_a_bad_config_before_starting(capsys):
    assert cli(["launch", "--nproc", "2", TINY, "model.n_layer=3"]) == 2
    assert "did you mean model.n_layers" in capsys.readouterr().err


def fake_slurm_bin(tmp_path):
    """scontrol and srun stand-ins: hostnames -> localhost, srun runs its command once (one node)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" '
                                      '>> "$FAKE_SLURM_LOG"; fi\n')
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_slurm_script_runs_torchrun_with_a_fake_slurm(tmp_path):
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm"
    assert cli(["slurm", "--nodes", "1", "--gpus-per-node", "2", "--time", "0:10:00", "--output", str(out), TINY,
                f"run.dir={run_dir}", *FAST]) == 0
    script = next(out.glob("*.sbatch"))
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = dict(os.environ, PATH=f"{fake_slurm_bin(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1]",
               SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_JOB_ID="4242", FAKE_SLURM_LOG=str(tmp_path / "log"))
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps == [1, 2]
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()


def test_slurm_submit_without_sbatch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli(["slurm", "--nodes", "2", "--gpus-per-node", "8", "--output", str(tmp_path), "--submit", TINY]) == 1
    assert "sbatch not found" in capsys.readouterr().err


def test_module_entry_point_and_console_script():
    script = os.path.join(os.path.dirname(sys.executable), "longtrain")
    for cmd in ([sys.executable, "-m", "longtrain", "--help"], [script, "--help"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0 and "launch" in done.stdout and "slurm" in done.stdout, cmd


@pytest.mark.slow
def test_time_limit_signal_checkpoints_then_requeues(tmp_path):
    """USR1 to the batch shell (SLURM's --signal=B:USR1) -> SIGTERM through torchrun -> checkpoint -> requeue."""
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm"
    overrides = [o for o in FAST if not o.startswith(("train.steps", "train.save_every"))]
    assert cli(["slurm", "--nodes", "1", "--gpus-per-node", "2", "--output", str(out), TINY, f"run.dir={run_dir}",
                *overrides, "train.steps=100000", "train.save_every=0"]) == 0
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{fake_slurm_bin(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n1",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="77", FAKE_SLURM_LOG=str(log))
    job = subprocess.Popen(["bash", str(next(out.glob("*.sbatch")))], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or os.path.getsize(run_dir / "metrics.jsonl") == 0:
        assert time.time() < deadline and job.poll() is None, "training did not start"
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=120) == 0
    assert log.read_text().split() == ["requeue", "77"]
    saved = os.listdir(run_dir / "checkpoints")
    assert len(saved) == 1 and saved[0].startswith("step_")


def test_bench_runs_a_benchmark_script():
    done = subprocess.run([sys.executable, "-m", "longtrain", "bench", "kernels", "--smoke"], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "flash attention max err" in done.stdout
