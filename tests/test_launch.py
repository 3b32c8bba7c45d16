"""The launchers: torchrun command lines, and the SLURM script run for real with a fake SLURM on CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from longtrain.launch.cli import main as cli
from longtrain.launch.torchrun import torchrun_command

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
FAST = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.chunk_size=8", "data.seq_len=32",
        "data.batch_size=2", "data.mqar_pairs=4", "data.mqar_vocab=32", "model.vocab_size=32", "train.steps=2",
        "train.eval_every=0", "train.log_every=1", "train.save_every=2", "run.progress=false", "wandb.mode=disabled"]


def test_torchrun_command_single_and_multi_node():
    single = torchrun_command("c.yaml", ["train.steps=3"], nproc=4, stop_timeout=77)
    assert single[1:4] == ["-m", "longtrain.launch.torchrun", "--nproc-per-node=4"] and "--standalone" in single
    assert "--shutdown-timeout=77" in single and "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in single
    assert single[-5:] == ["-m", "longtrain", "train", "c.yaml", "train.steps=3"]
    multi = torchrun_command("c.yaml", [], nproc=8, nnodes=2, rdzv="head:29500", max_restarts=2, rdzv_id="run-a")
    assert "--nnodes=2" in multi and "--rdzv-backend=c10d" in multi and "--rdzv-endpoint=head:29500" in multi
    assert "--max-restarts=2" in multi and "--standalone" not in multi and "--rdzv-id=run-a" in multi
    with pytest.raises(ValueError, match="--rdzv"):
        torchrun_command("c.yaml", [], nproc=8, nnodes=2)
    one_node_at_an_endpoint = torchrun_command("c.yaml", [], nproc=8, rdzv="head:29500")
    assert "--standalone" not in one_node_at_an_endpoint and "--rdzv-endpoint=head:29500" in one_node_at_an_endpoint


def test_plan_packs_documents_of_doc_len_and_a_shorter_last_one(monkeypatch, capsys):
    """--doc-len 300 at --seq 1000: documents 300, 300, 300, 100; --doc-len equal to --seq: one document."""
    from longtrain.plan import planner
    masks, search = [], planner.search
    monkeypatch.setattr(planner, "search", lambda *args: masks.append(args[-1]) or search(*args))
    for doc_len in (300, 1000):
        assert cli(["plan", "--gpus", "2", "--seq", "1000", "--doc-len", str(doc_len), TINY]) == 0
    assert [m.doc_lengths for m in masks] == [[300, 300, 300, 100], [1000]]
    assert "--doc-len" not in capsys.readouterr().err


def test_overrides_may_follow_the_options(capsys):
    assert cli(["launch", TINY, "--nproc", "2", "--dry-run", "train.steps=3", "run.stop_timeout=450"]) == 0
    assert "train.steps=3 run.stop_timeout=450" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli(["launch", TINY, "--nproc", "2", "--no-such-option"])
    assert stop.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_launch_dry_run_prints_the_command(capsys):
    assert cli(["launch", "--nproc", "2", "--dry-run", TINY, "train.steps=3", "run.stop_timeout=450"]) == 0
    out = capsys.readouterr().out
    assert "longtrain.launch.torchrun" in out and "--nproc-per-node=2" in out and "train.steps=3" in out
    assert "--shutdown-timeout=450" in out


def rdzv_id_of(capsys, *overrides) -> str:
    assert cli(["launch", "--nproc", "2", "--nnodes", "2", "--rdzv", "head:29500", "--dry-run", TINY, *overrides]) == 0
    return next(a for a in capsys.readouterr().out.split() if a.startswith("--rdzv-id="))


def test_multi_node_rendezvous_id_is_the_same_per_run_and_differs_between_runs(capsys):
    assert rdzv_id_of(capsys, "run.dir=runs/a") == rdzv_id_of(capsys, "run.dir=runs/a", "train.steps=7")
    assert rdzv_id_of(capsys, "run.dir=runs/a") != rdzv_id_of(capsys, "run.dir=runs/b")


def bad_inputs(tmp_path) -> list[tuple[list[str], str]]:
    """(command line, what its one error line must say) for each input checkable before a worker starts."""
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "short.bin").write_bytes(bytes(20))  # 10 uint16 tokens
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "bad.yaml").write_text("model:\n  d_model: [1,\n")
    (tmp_path / "empty").mkdir()
    launch = ["launch", "--nproc", "2"]
    return [(["launch", "--nproc", "3", TINY, "parallel.sp_size=3"], "(parallel.sp_size=3, zigzag)"),  # 6 parts of 128
            ([*launch, TINY, "parallel.sp_size=3"], "parallel.sp_size=3 does not divide the world size 2"),  # first
            ([*launch, "--dry-run", TINY, "parallel.sp_size=3", "data.seq_len=132"],
             "parallel.sp_size=3 does not divide the world size 2"),
            ([*launch, TINY, "data.seq_len=127", "parallel.layout=contiguous"],
             "data.seq_len=127 does not split into 2 equal chunks"),
            ([*launch, TINY, "data.seq_len=130", "parallel.layout=zigzag", "parallel.linear_sp=lasp2"],
             "data.seq_len=130 does not split into 4 equal chunks"),
            (["train", TINY], "parallel.sp_size=2 does not divide the world size 1: start it with `longtrain launch"),
            ([*launch, str(tmp_path / "missing.yaml")], f"config file '{tmp_path}/missing.yaml' not found"),
            ([*launch, TINY, "data.source=bin", f"data.path={tmp_path}/none.bin"], "none.bin' does not exist"),
            ([*launch, TINY, "data.source=bin", f"data.path={tmp_path}/empty.bin"], "empty.bin' is empty"),
            ([*launch, TINY, "data.source=bin", f"data.path={tmp_path}/short.bin"],
             "short.bin' holds 10 tokens, fewer than data.seq_len+1 = 129"),
            ([*launch, TINY, "train.lr=-1"], "train.lr must be > 0, got -1.0"),
            ([*launch, TINY, "train.steps=0"], "train.steps must be > 0, got 0"),
            ([*launch, TINY, "train.log_every=0"], "train.log_every must be > 0, got 0"),
            ([*launch, TINY, "model.n_heads=3"], "model.d_model=64 must divide by model.n_heads=3"),
            ([*launch, TINY, "model.n_kv_heads=3"], "model.n_heads=4 must divide by model.n_kv_heads=3"),
            ([*launch, TINY, "model.pattern=gla*x,softmax"], "model.pattern='gla*x,softmax': 'gla*x' is not mixer"),
            ([*launch, TINY, "model.pattern=gla*0"], "'gla*0' is not mixer or mixer*count (count >= 1)"),
            ([*launch, TINY, "train.steps=abc"], "override 'train.steps=abc': bad value: Value 'abc' of type"),
            ([*launch, TINY, "model=3"], "override 'model=3': bad value:"),
            ([*launch, str(tmp_path / "bad.yaml")], "bad.yaml' is not valid YAML"),
            ([*launch, TINY, "parallel.zeco_blocks=0"], "parallel.zeco_blocks must be >= 1"),
            (["prepare", str(tmp_path / "none"), "x.bin"], "prepare: input"),
            (["prepare", str(tmp_path / "empty"), "x.bin"], "empty' has no files"),
            (["prepare", str(tmp_path / "short.txt"), str(tmp_path / "no" / "x.bin")], "the folder of output"),
            ([*launch, TINY, "model.feature_map=cosh"], "unknown feature_map 'cosh'"),
            ([*launch, TINY, "parallel.softmax_sp=ulysses", "model.n_kv_heads=1"],
             "ulysses needs query heads (4) and kv heads (1) divisible by its degree 2"),
            ([*launch, TINY, "parallel.linear_sp=ulysses", "model.n_heads=1"],
             "ulysses needs query heads (1) and kv heads (1) divisible by its degree 2"),
            ([*launch, TINY, "data.mqar_pairs=40"], "data.mqar_pairs=40 do not fit data.mqar_vocab=64"),
            ([*launch, TINY, "data.source=passkey", "data.seq_len=32"], "data.seq_len=32 is too short"),
            (["train", TINY, "parallel.sp_size=1", "data.source=text", f"data.path={tmp_path}/short.txt",
              f"run.dir={tmp_path}/run"], "holds 10 tokens, fewer than data.seq_len+1 = 129"),
            ([*launch, "--nnodes", "2", TINY], "--nnodes 2 needs --rdzv"),
            (["train", TINY, "parallel.sp_size=1", "run.resume=maybe"], "run.resume='maybe' is not one of")]


def test_each_bad_input_is_one_line_and_exit_code_2_before_any_worker(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", None)  # starting torchrun would fail the test
    for argv, message in bad_inputs(tmp_path):
        assert cli(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and message in err and err.startswith("error: "), (argv, err)


@pytest.mark.parametrize("dtype, bad", [("uint16", 32), ("int32", -1)])
def test_token_ids_outside_the_vocabulary_stop_with_one_line(tmp_path, capsys, dtype, bad):
    ids = np.arange(1000) % 32  # ids of a 32-token vocabulary, one of them out of it
    ids[5] = bad
    ids.astype(dtype).tofile(tmp_path / "ids.bin")
    argv = ["train", TINY, "parallel.sp_size=1", *FAST, "data.source=bin", f"data.path={tmp_path}/ids.bin",
            f"data.bin_dtype={dtype}", f"run.dir={tmp_path}/run"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: the data holds token id {bad}, outside model.vocab_size=32 (data.source='bin')\n", err


def test_a_bad_input_from_the_shell_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "longtrain", "train", TINY], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: parallel.sp_size=2")


@pytest.mark.slow
def test_an_error_inside_the_workers_prints_once(tmp_path):
    """`longtrain train` under torchrun itself (as in the SLURM script): every rank fails, rank 0 alone says why."""
    cmd = torchrun_command(TINY, [f"run.dir={tmp_path}", "parallel.sp_size=3", "data.seq_len=132"], nproc=2)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in out, out  # the worker's own exit code for a bad input
    assert out.count("parallel.sp_size=3 does not divide the world size 2") == 1, out


def test_launch_rejects_a_bad_config_before_starting(capsys):
    assert cli(["launch", "--nproc", "2", TINY, "model.n_layer=3"]) == 2
    assert "did you mean model.n_layers" in capsys.readouterr().err


def fake_slurm_bin(tmp_path):
    """scontrol and srun stand-ins: hostnames -> localhost; srun runs its command once (one node) and, as the
    real srun does, answers TERM or HUP by SIGKILLing every process of the task and forwards any other signal."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo localhost; else echo "$@" '
                                      '>> "$FAKE_SLURM_LOG"; fi\n')
    (bin_dir / "srun").write_text("""#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
setsid "$@" &
task=$!
trap 'kill -KILL -- -$task' TERM HUP
trap 'kill -USR1 $task' USR1
trap 'kill -INT $task' INT
status=0
while kill -0 $task 2>/dev/null; do wait $task; status=$?; done
exit $status
""")
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
def test_time_limit_signal_checkpoints_a_step_longer_than_30_s_then_requeues(tmp_path):
    """USR1 to the batch shell (SLURM's --signal=B:USR1) -> USR1 through srun and torchrun -> the running step,
    longer than torchrun's default 30 s shutdown window, finishes -> checkpoint -> requeue."""
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm"
    slow_step = ["model.n_layers=20", "model.d_model=64", "model.chunk_size=32", "data.seq_len=6144",
                 "data.batch_size=16", "model.activation_checkpointing=true"]  # about 50 s per step on 2 CPU cores
    overrides = [o for o in FAST if not o.startswith(("train.steps", "train.save_every", "model.", "data.seq_len",
                                                      "data.batch_size"))]
    assert cli(["slurm", "--nodes", "1", "--gpus-per-node", "2", "--output", str(out), TINY, f"run.dir={run_dir}",
                *overrides, *slow_step, "train.steps=100000", "train.save_every=0"]) == 0
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{fake_slurm_bin(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n1",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="77", FAKE_SLURM_LOG=str(log))
    job = subprocess.Popen(["bash", str(next(out.glob("*.sbatch")))], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").exists():  # written by the trainer before its first step
        assert time.time() < deadline and job.poll() is None, "training did not start"
        time.sleep(0.2)
    time.sleep(5)  # into step 1
    start = time.time()
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=300) == 0
    assert time.time() - start > 30, "the step took under 30 s: make slow_step slower"
    assert log.read_text().split() == ["requeue", "77"]
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps == [1] and os.listdir(run_dir / "checkpoints") == ["step_00000001"]  # the step under way, saved


def test_slurm_script_resources_stop_budget_and_absolute_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["slurm", "--nodes", "2", "--gpus-per-node", "4", "--output", "out", TINY, "run.dir=runs/x",
            "run.stop_timeout=200"]
    np.zeros(1000, dtype=np.uint16).tofile(tmp_path / "d.bin")
    assert cli([*args, "data.source=bin", "data.path=d.bin"]) == 0
    script = next((tmp_path / "out").glob("*.sbatch")).read_text()
    assert f"data.path={tmp_path}/d.bin" in script and "data.path=d.bin" not in script  # jobs start elsewhere
    for old in (tmp_path / "out").glob("*.sbatch"):
        old.unlink()
    assert cli(args) == 0
    script = next((tmp_path / "out").glob("*.sbatch")).read_text()
    assert "#SBATCH --exclusive" in script and "#SBATCH --cpus-per-task" not in script
    # one torchrun per node, which starts a worker per GPU and meets the other nodes' torchruns
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "--nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node=4" in script
    assert "#SBATCH --signal=B:USR1@260" in script and "--shutdown-timeout=200" in script
    assert f"run.dir={tmp_path}/runs/x" in script
    for old in (tmp_path / "out").glob("*.sbatch"):
        old.unlink()
    assert cli([*args[:1], "--cpus-per-task", "48", "--signal-lead", "400", *args[1:]]) == 0
    script = next((tmp_path / "out").glob("*.sbatch")).read_text()
    assert "#SBATCH --cpus-per-task=48" in script and "--exclusive" not in script
    assert "#SBATCH --signal=B:USR1@400" in script
    assert cli([*args, "parallel.sp_size=3", "data.seq_len=129"]) == 2  # 8 GPUs in groups of 3


def test_bench_runs_a_benchmark_script():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # --smoke sets it
    done = subprocess.run([sys.executable, "-m", "longtrain", "bench", "kernels", "--smoke"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "flash attention max err" in done.stdout
