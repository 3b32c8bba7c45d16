"""Build the torchrun command for one node (standalone) or many (c10d rendezvous). Builds, never trains."""
import sys


def torchrun_command(config: str, overrides: list[str], nproc: int, nnodes: int = 1, rdzv: str | None = None,
                     max_restarts: int = 0, rdzv_id: str = "longtrain") -> list[str]:
    """[python, -m, torch.distributed.run, ..., -m, longtrain, train, CONFIG, *overrides]."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    if nnodes == 1 and rdzv is None:
        cmd.append("--standalone")
    else:
        if rdzv is None:
            raise ValueError("--nnodes > 1 needs --rdzv HOST:PORT")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}", f"--rdzv-id={rdzv_id}"]
    return cmd + ["-m", "longtrain", "train", config, *overrides]
