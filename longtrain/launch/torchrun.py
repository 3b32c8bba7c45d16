"""Build the torchrun command for one node (standalone) or many (c10d rendezvous). Builds, never trains.

`python -m longtrain.launch.torchrun ARGS` is torchrun itself, minus the traceback it prints on a stop signal.
"""
import hashlib
import sys

STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun forwards these to the workers


def rdzv_id_for(run_dir: str) -> str:
    """The same on every node of one run (derived from run.dir), different for runs that write elsewhere."""
    return "longtrain-" + hashlib.sha1(run_dir.encode()).hexdigest()[:10]


def torchrun_command(config: str, overrides: list[str], nproc: int, nnodes: int = 1, rdzv: str | None = None,
                     max_restarts: int = 0, rdzv_id: str = "longtrain", stop_timeout: int = 300) -> list[str]:
    """[python, -m, longtrain.launch.torchrun, ..., -m, longtrain, train, CONFIG, *overrides].

    `stop_timeout` is how long torchrun waits for the workers to save and exit after a stop signal.
    """
    cmd = [sys.executable, "-m", "longtrain.launch.torchrun", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", f"--signals-to-handle={STOP_SIGNALS}",
           f"--shutdown-timeout={stop_timeout}"]
    if nnodes == 1 and rdzv is None:
        cmd.append("--standalone")
    else:
        if rdzv is None:
            raise ValueError("--nnodes > 1 needs --rdzv HOST:PORT")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}", f"--rdzv-id={rdzv_id}"]
    return cmd + ["-m", "longtrain", "train", config, *overrides]


def main(argv: list[str] | None = None) -> int:
    """torch.distributed.run with one line instead of a traceback: a stop signal exits 128 + signal (after the
    workers' clean stop), a failed worker with its own exit code (2: a bad input it reported), else 1."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        run.main(argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"error: rank {rank} exited with code {failure.exitcode}; every worker was stopped", file=sys.stderr)
        return failure.exitcode if 0 < failure.exitcode < 128 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
