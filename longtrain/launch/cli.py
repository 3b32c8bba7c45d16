"""`longtrain train|launch|slurm|prepare|bench`: the command line. Training lives in longtrain.trainer."""
import argparse
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from longtrain.config import Config, ConfigError, load_config
from longtrain.launch.slurm import slurm_script, write_script
from longtrain.launch.torchrun import rdzv_id_for, torchrun_command
from longtrain.trainer.checkpoint import CheckpointError

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # a stop request, to every process


def check_data(data) -> None:
    """data.path exists and is not empty (the loader, drawn from by check_model_and_sample, checks its length)."""
    if data.source not in ("bin", "text"):
        return
    if not os.path.exists(data.path):
        raise ConfigError(f"data.path={data.path!r} does not exist")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(data.path) for f in files) \
        if os.path.isdir(data.path) else os.path.getsize(data.path)
    if size == 0:
        raise ConfigError(f"data.path={data.path!r} is empty")


def check_model_and_sample(cfg: Config) -> None:
    """The model builds (on the meta device: no memory) and one training sample can be drawn, so a bad head count,
    mixer option or a sample that does not fit data.seq_len is one line here, not a traceback from every rank.
    A text source is not drawn from: that would tokenize its whole corpus here (its loader checks its length)."""
    import torch
    from longtrain.trainer.data import DataLoader
    from longtrain.trainer.model import LM
    try:
        with torch.device("meta"):
            LM(cfg.model)
        if cfg.data.source != "text":
            DataLoader(cfg.data).sample(0)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_checked(args, world: int) -> Config:
    """The config, with everything checkable before a worker starts for `world` processes; ConfigError names the
    key and value."""
    cfg = load_config(args.config, args.overrides, world)
    check_data(cfg.data)
    check_model_and_sample(cfg)
    return cfg


def cmd_train(args) -> int:
    cfg = load_checked(args, int(os.environ.get("WORLD_SIZE", "1")))
    from longtrain.trainer.train import train
    train(cfg)
    return 0


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run `cmd` in its own process group, forward SIGTERM/SIGINT/SIGUSR1 to that group, wait for it to end."""
    procs = []

    def forward(signum, frame):
        try:
            os.killpg(procs[0].pid, signum)
        except (IndexError, ProcessLookupError):  # not started yet (it will be told nothing), or already gone
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        return procs[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_launch(args) -> int:
    if args.nnodes > 1 and not args.rdzv:
        raise ConfigError(f"--nnodes {args.nnodes} needs --rdzv HOST:PORT (the c10d rendezvous on the first node)")
    cfg = load_checked(args, args.nproc * args.nnodes)  # fail here, not in N workers
    cmd = torchrun_command(args.config, args.overrides, args.nproc, args.nnodes, args.rdzv, args.max_restarts,
                           rdzv_id_for(cfg.run.dir), cfg.run.stop_timeout)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return run_forwarding_signals(cmd, env)


def cmd_slurm(args) -> int:
    cfg = load_checked(args, args.nodes * args.gpus_per_node)
    paths = {"run.dir": cfg.run.dir, "data.path": cfg.data.path, "data.tokenizer": cfg.data.tokenizer}
    overrides = [item for item in args.overrides if item.split("=", 1)[0] not in paths]
    overrides += [f"{key}={os.path.abspath(path)}" for key, path in paths.items() if path]  # jobs start elsewhere
    text = slurm_script(args.config, overrides, args.nodes, args.gpus_per_node, args.partition, args.time,
                        args.account, os.path.abspath(args.output), args.max_restarts, args.cpus_per_task,
                        args.python, cfg.run.stop_timeout, args.signal_lead)
    path = write_script(text, args.output)
    if not args.submit:
        print(path)
        return 0
    if shutil.which("sbatch") is None:
        print(f"sbatch not found; the script is at {path}", file=sys.stderr)
        return 1
    return subprocess.call(["sbatch", path])


def cmd_plot(args) -> int:
    from longtrain.trainer.plot import plot_run
    if not os.path.exists(os.path.join(args.run_dir, "metrics.jsonl")):
        raise ConfigError(f"{args.run_dir} has no metrics.jsonl")
    path = plot_run(args.run_dir)
    if path is None:
        print("matplotlib is not installed: pip install matplotlib", file=sys.stderr)
        return 1
    print(path)
    return 0


BENCHMARKS = ("sp_softmax", "sp_linear", "kernels")


def cmd_bench(args) -> int:
    """Run benchmarks/<name>.py of this checkout with the remaining arguments."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", f"{args.name}.py")
    if not os.path.exists(script):
        print(f"{script} not found: the benchmarks ship with the repository checkout, not the package",
              file=sys.stderr)
        return 1
    env = dict(os.environ, TRITON_INTERPRET="1") if "--smoke" in args.args else None  # the CPU interpreter check
    return subprocess.call([sys.executable, os.path.abspath(script), *args.args], env=env)


def cmd_plan(args) -> int:
    from longtrain.plan.cost import Mask
    from longtrain.plan.hardware import load_profile
    from longtrain.plan.planner import distinct, parse_tokens, print_plans, search, shortfall, write_plan
    cfg = load_config(args.config, args.overrides)
    seq = parse_tokens(args.seq) if args.seq else cfg.data.seq_len
    if seq <= 0 or args.gpus <= 0:
        raise ConfigError(f"--seq and --gpus must be > 0, got --seq {seq} --gpus {args.gpus}")
    if args.doc_len is not None and not 0 < args.doc_len <= seq:
        raise ConfigError(f"--doc-len must be in 1..{seq} (the sequence), got {args.doc_len}")
    batch = args.batch or max(1, 2 ** 22 // seq)
    try:
        hw = load_profile(args.profile)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mask = None
    if args.doc_len:
        mask = Mask("documents", doc_lengths=[args.doc_len] * (seq // args.doc_len) + [seq % args.doc_len] * (
            seq % args.doc_len > 0))
    plans = search(cfg, hw, args.gpus, seq, batch, mask)
    title = (f"{args.config}: {seq:,} tokens x {batch} sequences per step on {args.gpus} GPUs ({hw.name}); "
             f"memory limit {plans[0].limit / 2 ** 30:.0f} GB per GPU")
    fitting = [p for p in plans if p.fits]
    print_plans(distinct(fitting or plans), args.top, title)
    if not fitting:
        print(shortfall(plans))
        return 1
    if args.write:
        write_plan(cfg, fitting[0], args.write, shlex.join(["longtrain", "plan", *sys.argv[2:]]))
        nodes, left = divmod(args.gpus, hw.gpus_per_node)
        if args.gpus <= hw.gpus_per_node:
            print(f"wrote {args.write}: run it with `longtrain launch --nproc {args.gpus} {args.write}`")
        elif not left:
            print(f"wrote {args.write}: run it with `longtrain slurm --nodes {nodes} --gpus-per-node "
                  f"{hw.gpus_per_node} {args.write}`")
        else:
            print(f"wrote {args.write}: {args.gpus} GPUs are not whole nodes of {hw.gpus_per_node}; launch it on "
                  f"nodes whose GPUs per node divide {args.gpus}")
    return 0


def cmd_calibrate(args) -> int:
    from omegaconf import OmegaConf
    from longtrain.plan.calibrate import calibrate, default_lengths
    from longtrain.plan.hardware import to_dict
    import torch
    lengths = args.lengths or default_lengths(torch.cuda.is_available())
    hw = calibrate(args.nproc, args.base, args.name, lengths, max(lengths))
    if os.environ.get("RANK", "0") == "0":
        with open(args.out, "w") as f:
            f.write(f"# Measured by `longtrain calibrate` on {time.strftime('%Y-%m-%d')}; base {args.base}\n")
            f.write(OmegaConf.to_yaml(to_dict(hw)))
        print(f"wrote {args.out}: use it with `longtrain plan CONFIG --profile {args.out}`")
    return 0


def cmd_prepare(args) -> int:
    from longtrain.trainer.data import prepare, text_files
    if not os.path.exists(args.input) or not text_files(args.input):
        why = "has no files" if os.path.isdir(args.input) else "does not exist"
        raise ConfigError(f"prepare: input {args.input!r} {why}")
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        raise ConfigError(f"prepare: --tokenizer {args.tokenizer!r} is not a file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise ConfigError(f"prepare: the folder of output {args.output!r} does not exist")
    stream = prepare(args.input, args.output, args.tokenizer, args.eos_id)
    print(f"wrote {len(stream)} tokens to {args.output}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtrain", description="Long-context LM training with sequence parallelism.")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train in this process (or under torchrun)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="key=value config overrides")
    train.set_defaults(fn=cmd_train)
    launch = sub.add_parser("launch", help="start torchrun with N processes per node")
    launch.add_argument("--nproc", type=int, required=True)
    launch.add_argument("--nnodes", type=int, default=1)
    launch.add_argument("--rdzv", default=None, help="HOST:PORT of the c10d rendezvous (multi-node)")
    launch.add_argument("--max-restarts", type=int, default=0)
    launch.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    launch.add_argument("config")
    launch.add_argument("overrides", nargs="*")
    launch.set_defaults(fn=cmd_launch)
    slurm = sub.add_parser("slurm", help="write (and with --submit, submit) a multi-node sbatch script")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True)
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--output", default="slurm", help="directory for the script and the job logs")
    slurm.add_argument("--max-restarts", type=int, default=3)
    slurm.add_argument("--cpus-per-task", type=int, default=None,
                       help="CPUs per node's task (default: whole nodes, --exclusive)")
    slurm.add_argument("--signal-lead", type=int, default=None,
                       help="seconds before the time limit to checkpoint and requeue (default: run.stop_timeout + 60)")
    slurm.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    slurm.add_argument("--submit", action="store_true")
    slurm.add_argument("config")
    slurm.add_argument("overrides", nargs="*")
    slurm.set_defaults(fn=cmd_slurm)
    bench = sub.add_parser("bench", help="run a benchmark of benchmarks/ (sp_softmax, sp_linear, kernels)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(fn=cmd_bench)
    plot = sub.add_parser("plot", help="PNG of loss, eval accuracy, tokens/s and memory vs step of a run")
    plot.add_argument("run_dir")
    plot.set_defaults(fn=cmd_plot)
    plan = sub.add_parser("plan", help="the fastest parallel plans that fit, from the cost model")
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--seq", default=None, help="tokens per sequence, e.g. 32K or 1M (default: data.seq_len)")
    plan.add_argument("--batch", type=int, default=None,
                      help="sequences per optimizer step (default: 4M tokens' worth, at least 1)")
    plan.add_argument("--profile", default="h100-nvlink-ib", help="a shipped profile name or a calibrated YAML")
    plan.add_argument("--doc-len", type=int, default=None, help="packed documents of this many tokens")
    plan.add_argument("--top", type=int, default=8)
    plan.add_argument("--write", default=None, help="write the best plan as a config file")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*")
    plan.set_defaults(fn=cmd_plan)
    calib = sub.add_parser("calibrate", help="measure FLOP/s and collectives into a hardware profile")
    calib.add_argument("--nproc", type=int, default=2, help="local processes (ignored under torchrun)")
    calib.add_argument("--base", default="h100-nvlink-ib", help="profile whose unmeasured figures are kept")
    calib.add_argument("--name", default="calibrated")
    calib.add_argument("--lengths", type=int, nargs="*", default=None, help="attention lengths to time")
    calib.add_argument("--out", default="calibrated.yaml")
    calib.set_defaults(fn=cmd_calibrate)
    prep = sub.add_parser("prepare", help="tokenize text files into a .bin token stream")
    prep.add_argument("input")
    prep.add_argument("output")
    prep.add_argument("--tokenizer", default=None, help="local tokenizer.json (byte-level when omitted)")
    prep.add_argument("--eos-id", type=int, default=256)
    prep.set_defaults(fn=cmd_prepare)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """parse_args, with key=value overrides allowed after the options too (`launch CONFIG --nproc 2 a.b=1`)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        p.parse_args(argv)  # argparse's own one-line error and exit code 2
    if extra:
        args.overrides += extra
    return args


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted")


def main(argv: list[str] | None = None) -> int:
    """The command line's exit code. As a program (argv None) under torchrun, the worker then exits at once:
    at interpreter teardown a distributed library's thread can still run and abort the process (SIGABRT, seen
    now and then after runs that ended well), which torchrun and SLURM would take for a failure."""
    code = run(argv)
    if argv is None and "RANK" in os.environ:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(argv: list[str] | None) -> int:
    args = parse(argv)
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError) as e:
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 says it first when it fails alike,
            time.sleep(5)  # and torchrun ends this rank before it repeats it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a rank whose peer died: the failing rank printed the error, not every survivor
        if "RANK" not in os.environ or not any(s in str(e) for s in PEER_GONE):
            raise
        if os.environ["RANK"] == "0":
            print("error: rank 0 stopped: another rank failed (its error, if any, is above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
