"""Metrics: console progress on rank 0, a JSONL file in the run directory, and wandb (offline by default)."""
import json
import os
import resource
import uuid

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the current GPU, or None (CPU, unknown GPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_steps_after(path: str, step: int) -> None:
    """Keep the records of steps <= `step`: a run resumed there (after a kill) repeats the later ones."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.endswith("}\n") and json.loads(line)["step"] <= step]  # not torn
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class MetricsLogger:
    """Writes one JSON object per logged step; rank 0 alone prints and talks to wandb."""

    def __init__(self, run_dir: str, rank0: bool, config: dict, wandb_cfg, run_name: str, total_steps: int,
                 progress: bool = True, start_step: int = 0) -> None:
        self.rank0 = rank0
        self.console = Console(highlight=False, soft_wrap=True)
        self.progress = None
        if rank0 and progress:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=self.console, transient=True)
            self.task = self.progress.add_task("train", total=total_steps)
            self.progress.start()
        self.file = None
        if rank0:
            path = os.path.join(run_dir, "metrics.jsonl")
            drop_steps_after(path, start_step)
            self.file = open(path, "a")
        self.wandb = None
        if rank0 and wandb_cfg.mode != "disabled":
            import wandb
            id_path = os.path.join(run_dir, "wandb_id.txt")
            run_id = open(id_path).read().strip() if os.path.exists(id_path) else uuid.uuid4().hex[:8]
            with open(id_path, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity,
                                    name=wandb_cfg.name or run_name, group=wandb_cfg.group or run_name,
                                    config=config, dir=run_dir, mode=wandb_cfg.mode, id=run_id, resume="allow",
                                    settings=wandb.Settings(quiet=True))

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.rank0:
            return
        record = {"step": step, **{f"{prefix}/{k}" if "/" not in k else k: v for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        shown = " | ".join(f"{SHORT.get(k.split('/')[-1], k.split('/')[-1])} {fmt(v)}" for k, v in record.items()
                           if k != "step" and not k.startswith("comm/"))
        self.console.print(f"[bold]{prefix:5s}[/bold] step {step:5d} | {shown}")

    def advance(self, step: int) -> None:
        """Move the progress bar to `step`."""
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


SHORT = {"grad_norm": "gnorm", "tokens_per_s": "tok/s", "step_time_s": "s/step", "peak_mem_gb": "mem GB"}


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
