"""`longtrain train|launch|slurm|prepare|bench`: the command line. Training lives in longtrain.trainer."""
import argparse
import os
import shlex
import shutil
import subprocess
import sys

from longtrain.config import ConfigError, load_config
from longtrain.launch.slurm import slurm_script, write_script
from longtrain.launch.torchrun import torchrun_command


def cmd_train(args) -> int:
    from longtrain.trainer.train import train
    train(load_config(args.config, args.overrides))
    return 0


def cmd_launch(args) -> int:
    load_config(args.config, args.overrides)  # fail here, not in N workers
    cmd = torchrun_command(args.config, args.overrides, args.nproc, args.nnodes, args.rdzv, args.max_restarts)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def cmd_slurm(args) -> int:
    load_config(args.config, args.overrides)
    text = slurm_script(args.config, args.overrides, args.nodes, args.gpus_per_node, args.partition, args.time,
                        args.account, os.path.abspath(args.output), args.max_restarts, python=args.python)
    path = write_script(text, args.output)
    if not args.submit:
        print(path)
        return 0
    if shutil.which("sbatch") is None:
        print(f"sbatch not found; the script is at {path}", file=sys.stderr)
        return 1
    return subprocess.call(["sbatch", path])


BENCHMARKS = ("sp_softmax", "sp_linear", "kernels")


def cmd_bench(args) -> int:
    """Run benchmarks/<name>.py of this checkout with the remaining arguments."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", f"{args.name}.py")
    if not os.path.exists(script):
        print(f"{script} not found: the benchmarks ship with the repository checkout, not the package",
              file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, os.path.abspath(script), *args.args])


def cmd_prepare(args) -> int:
    from longtrain.trainer.data import prepare
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
    slurm.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    slurm.add_argument("--submit", action="store_true")
    slurm.add_argument("config")
    slurm.add_argument("overrides", nargs="*")
    slurm.set_defaults(fn=cmd_slurm)
    bench = sub.add_parser("bench", help="run a benchmark of benchmarks/ (sp_softmax, sp_linear, kernels)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(fn=cmd_bench)
    prep = sub.add_parser("prepare", help="tokenize text files into a .bin token stream")
    prep.add_argument("input")
    prep.add_argument("output")
    prep.add_argument("--tokenizer", default=None, help="local tokenizer.json (byte-level when omitted)")
    prep.add_argument("--eos-id", type=int, default=256)
    prep.set_defaults(fn=cmd_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
