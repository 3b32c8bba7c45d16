"""Checkpoints with torch.distributed.checkpoint: write to step_N.tmp, rename when complete, keep the last K.

Model and optimizer state are saved as full (replicated) tensors keyed by parameter name, so a checkpoint
written at one parallel layout loads into another (SP=2 -> SP=1, DP=2, ...).
"""
import os
import re
import shutil

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

STEP_DIR = re.compile(r"^step_(\d+)$")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every fully written checkpoint, oldest first; *.tmp directories never count."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := STEP_DIR.match(name))]
    return sorted(found)


def begin(run_dir: str, step: int, rank0: bool) -> tuple[str, str]:
    """(tmp, final) paths of the checkpoint for `step`, with any stale tmp removed."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    return tmp, final


def commit(run_dir: str, tmp: str, final: str, keep_last: int, rank0: bool) -> str:
    """Once every rank has written: rename tmp -> final (the completion marker), drop all but the last K."""
    barrier()
    if rank0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    barrier()
    return final


def save_checkpoint(run_dir: str, step: int, model: nn.Module, optimizer, extra: dict, keep_last: int,
                    rank0: bool) -> str:
    """Save model, optimizer and `extra` (step, data position, RNG) for `step`; returns the final path."""
    tmp, final = begin(run_dir, step, rank0)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             "extra": extra}
    dcp.save(state, checkpoint_id=tmp)
    return commit(run_dir, tmp, final, keep_last, rank0)


def save_deepspeed_checkpoint(run_dir: str, step: int, engine, extra: dict, keep_last: int, rank0: bool) -> str:
    """DeepSpeed's own (ZeRO-partitioned) checkpoint, with the same tmp -> final completion rule."""
    tmp, final = begin(run_dir, step, rank0)
    engine.save_checkpoint(tmp, tag="ds", client_state={"extra": extra})
    return commit(run_dir, tmp, final, keep_last, rank0)


def load_deepspeed_checkpoint(run_dir: str, engine) -> dict:
    """Load the newest complete DeepSpeed checkpoint into the engine; returns its `extra`."""
    _, path = complete_checkpoints(run_dir)[-1]
    _, client_state = engine.load_checkpoint(path, tag="ds")
    return client_state["extra"]


def load_latest_checkpoint(run_dir: str, model: nn.Module, optimizer, extra_template: dict) -> dict | None:
    """Load the newest complete checkpoint into model/optimizer; returns its `extra`, or None if none exists."""
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    _, path = found[-1]
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             "extra": extra_template}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return state["extra"]
