"""Faults as a cluster user meets them, on CPU/gloo: damaged checkpoints, stop signals, a killed worker."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from longtrain.config import load_config
from longtrain.launch.cli import main as cli
from longtrain.trainer.checkpoint import damage
from longtrain.trainer.train import train

pytestmark = pytest.mark.slow
TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=32", "model.chunk_size=8",
         "data.seq_len=32", "data.batch_size=4", "data.mqar_pairs=4", "data.mqar_vocab=32", "train.warmup_steps=2",
         "train.log_every=1", "train.eval_every=0", "run.progress=false", "wandb.mode=disabled"]


def steps_logged(run_dir) -> list[int]:
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "train/loss" in r]


def losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def checkpoint(run_dir, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def run_once(run_dir, *overrides):
    train(load_config(TINY, SMALL + ["parallel.sp_size=1", f"run.dir={run_dir}", *overrides]))


def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    full, run = tmp_path / "full", tmp_path / "run"
    run_once(full, "train.steps=6")
    run_once(run, "train.steps=4", "train.save_every=2")
    newest, previous = checkpoint(run, 4), checkpoint(run, 2)
    shard = os.path.join(newest, "__0_0.distcp")
    size = os.path.getsize(shard)
    os.truncate(shard, size // 2)
    os.remove(run / "metrics.jsonl")
    capsys.readouterr()
    run_once(run, "train.steps=6")
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "step_0000000" in line] == [
        f"warning: checkpoint {newest} is damaged (__0_0.distcp has {size // 2} bytes, the manifest says {size}); "
        f"resuming from {previous}"]
    assert "Traceback" not in err
    resumed, reference = losses(run), losses(full)
    assert sorted(resumed) == [3, 4, 5, 6] and all(resumed[s] == reference[s] for s in resumed)
    # the damaged one is set aside, so keeping the last 2 keeps the new save and the intact one before it
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002", "step_00000004.damaged", "step_00000006"]


def test_a_changed_byte_is_caught_and_strict_resume_stops_with_one_line(tmp_path, capsys):
    run_once(tmp_path, "train.steps=2", "train.save_every=1")
    assert damage(checkpoint(tmp_path, 2)) is None
    shard = os.path.join(checkpoint(tmp_path, 2), "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 1
    open(shard, "wb").write(data)
    assert damage(checkpoint(tmp_path, 2)) == "__0_0.distcp does not match its sha256"
    os.rename(os.path.join(checkpoint(tmp_path, 1), ".metadata"), os.path.join(tmp_path, "moved"))
    assert damage(checkpoint(tmp_path, 1)) == ".metadata is missing"
    os.rename(os.path.join(tmp_path, "moved"), os.path.join(checkpoint(tmp_path, 1), ".metadata"))
    capsys.readouterr()
    args = ["train", TINY, *SMALL, "parallel.sp_size=1", f"run.dir={tmp_path}", "train.steps=3"]
    assert cli([*args, "run.resume=strict"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: checkpoint {checkpoint(tmp_path, 2)} is damaged (__0_0.distcp does not match its "
                   f"sha256) and run.resume=strict\n")
    os.remove(os.path.join(checkpoint(tmp_path, 1), "manifest.json"))  # nothing intact left
    assert cli(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no intact checkpoint" in err[0] and "run.resume=false" in err[0]


def launch(run_dir, *overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "longtrain", "launch", "--nproc", "2", TINY, f"run.dir={run_dir}", *SMALL, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(job, run_dir, step: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while max(steps_logged(run_dir), default=0) < step:
        assert job.poll() is None, job.stdout.read()
        assert time.time() < deadline, "training did not reach step {step}"
        time.sleep(0.05)


def process_tree(pid: int) -> dict[int, list[int]]:
    """Children of every process, from ps."""
    children = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    return children


def descendants(pid: int) -> set[int]:
    children, found, todo = process_tree(pid), set(), [pid]
    while todo:
        found.add(todo[-1])
        todo += children.get(todo.pop(), [])
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids still running (zombies count as gone)."""
    running = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    running.add(pid)
        except OSError:  # gone, and reaped
            continue
    return running


LONG_STEP = ["data.seq_len=512", "data.batch_size=16", "model.d_model=64", "model.chunk_size=32"]


def test_sigterm_to_the_launcher_checkpoints_the_running_step_and_leaves_no_process(tmp_path):
    job = launch(tmp_path, "train.steps=100000", "train.save_every=0", "run.stop_timeout=120", *LONG_STEP)
    wait_for_step(job, tmp_path, 1)
    running = max(steps_logged(tmp_path)) + 1  # the step under way when the signal arrives
    tree = descendants(job.pid)
    assert len(tree) >= 4  # launcher, torchrun, two workers
    job.send_signal(signal.SIGTERM)
    out = job.communicate(timeout=120)[0]
    assert "Traceback" not in out, out
    last = max(steps_logged(tmp_path))
    assert last >= running and os.listdir(tmp_path / "checkpoints") == [f"step_{last:08d}"], out
    assert f"stop requested: step {last} saved in {checkpoint(tmp_path, last)}" in out
    assert not alive(tree)
    restart = launch(tmp_path, f"train.steps={last + 1}", *LONG_STEP)
    out = restart.communicate(timeout=120)[0]
    assert restart.returncode == 0 and f"resumed from {checkpoint(tmp_path, last)}" in out, out
    assert steps_logged(tmp_path)[-1] == last + 1


SLOW_STEP = ["data.seq_len=6144", "data.batch_size=16", "model.d_model=64", "model.n_layers=20", "model.chunk_size=32",
             "model.activation_checkpointing=true"]  # about 50 s per step on 2 CPU cores


def test_sigterm_during_a_step_longer_than_torchruns_30_s_window_checkpoints_it(tmp_path):
    """run.stop_timeout, not torchrun's default 30 s, bounds the stop: the step under way and its save finish."""
    job = launch(tmp_path, "train.steps=100000", "train.save_every=0", "run.stop_timeout=300", *SLOW_STEP)
    deadline = time.time() + 60
    while not (tmp_path / "config.yaml").exists():  # written by the trainer before its first step
        assert time.time() < deadline and job.poll() is None, "training did not start"
        time.sleep(0.2)
    time.sleep(5)  # into step 1
    tree = descendants(job.pid)
    start = time.time()
    job.send_signal(signal.SIGTERM)
    out = job.communicate(timeout=300)[0]
    assert time.time() - start > 30, "the step took under 30 s: make SLOW_STEP slower"
    assert "Traceback" not in out and steps_logged(tmp_path) == [1], out
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000001"], out
    assert not alive(tree)
    restart = launch(tmp_path, "train.steps=1", *SLOW_STEP)
    out = restart.communicate(timeout=120)[0]
    assert restart.returncode == 0 and f"resumed from {checkpoint(tmp_path, 1)}" in out, out


def test_kill_9_of_one_worker_ends_every_process_and_the_restart_resumes(tmp_path):
    job = launch(tmp_path, "train.steps=100000", "train.save_every=2")
    wait_for_step(job, tmp_path, 5)
    children = process_tree(job.pid)
    torchrun = children[job.pid][0]
    tree = descendants(job.pid)
    os.kill(children[torchrun][1], signal.SIGKILL)
    out = job.communicate(timeout=30)[0]
    assert "Traceback" not in out, out  # the survivors stop with one line at most
    assert job.returncode != 0
    deadline = time.time() + 30
    while alive(tree) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(tree)
    newest = max(int(name[5:]) for name in os.listdir(tmp_path / "checkpoints") if not name.endswith(".tmp"))
    restart = launch(tmp_path, f"train.steps={newest + 1}")
    out = restart.communicate(timeout=120)[0]
    assert restart.returncode == 0 and f"resumed from {checkpoint(tmp_path, newest)}" in out, out


def test_a_stop_timeout_shorter_than_a_step_kills_the_workers_without_a_checkpoint(tmp_path):
    """run.stop_timeout really bounds the stop: a 1 s budget for a multi-second step ends it unsaved."""
    job = launch(tmp_path, "train.steps=100000", "train.save_every=0", "run.stop_timeout=1", "data.seq_len=8192",
                 *LONG_STEP[1:])
    wait_for_step(job, tmp_path, 1)
    time.sleep(1)  # into step 2 (several seconds): a signal between steps would be honoured at once, in budget
    tree = descendants(job.pid)
    job.send_signal(signal.SIGTERM)
    start = time.time()
    out = job.communicate(timeout=60)[0]
    assert time.time() - start < 15 and "stop requested" not in out, out
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")
    assert not alive(tree)
