"""Checkpoints with torch.distributed.checkpoint: write to step_N.tmp, rename when complete, keep the last K.

Model and optimizer state are saved as full (replicated) tensors keyed by parameter name, so a checkpoint
written at one parallel layout loads into another (SP=2 -> SP=1, DP=2, ...). Once every rank has written,
rank 0 adds manifest.json (size and sha256 of every file) last; resume loads the newest checkpoint whose
files match their manifest.
"""
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No checkpoint that can be trusted where one is required (run.resume=strict, or all damaged)."""


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


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: str) -> None:
    """manifest.json in `path`: bytes and sha256 of every file below it."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = {"bytes": os.path.getsize(full), "sha256": sha256(full)}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)


def damage(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when every file matches its manifest."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return f"no readable {MANIFEST}"
    for name, want in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != want["bytes"]:
            return f"{name} has {os.path.getsize(full)} bytes, the manifest says {want['bytes']}"
        if sha256(full) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def newest_intact(run_dir: str, strict: bool = False) -> str | None:
    """Path of the newest checkpoint that verifies, warning once per damaged newer one; None if there is none."""
    damaged = []
    for _, path in reversed(complete_checkpoints(run_dir)):
        why = damage(path)
        if why is None:
            for bad, bad_why in damaged:  # set aside, so new saves (lower steps) are not pruned in their favour
                os.replace(bad, bad + ".damaged")
                print(f"warning: checkpoint {bad} is damaged ({bad_why}); resuming from {path}", file=sys.stderr)
            return path
        if strict:
            raise CheckpointError(f"checkpoint {path} is damaged ({why}) and run.resume=strict")
        damaged.append((path, why))
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {run_dir}: {damaged[0][0]} is damaged ({damaged[0][1]}), "
                              f"and so are all older ones; set run.resume=false to start over")
    return None


def not_empty(path: str) -> bool:
    if os.path.isdir(path):
        return bool(os.listdir(path))
    return os.path.exists(path) and os.path.getsize(path) > 0


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.png", "config.yaml", "wandb_id.txt", "wandb", "profile")


def set_aside_earlier_run(run_dir: str) -> None:
    """A run that starts from step 0 (run.resume=false, or no checkpoint to resume) moves an earlier run's outputs
    into run_dir/superseded_<time>_*/: neither lost nor mixed with its own (a later resume would pick the earlier
    run's higher steps, wandb would continue its run)."""
    if not any(not_empty(os.path.join(run_dir, name)) for name in ("checkpoints", "metrics.jsonl")):
        return
    aside = tempfile.mkdtemp(prefix=time.strftime("superseded_%Y%m%d-%H%M%S_"), dir=run_dir)
    for name in RUN_OUTPUTS:
        if os.path.exists(os.path.join(run_dir, name)):
            os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    print(f"a new run from step 0: the earlier run's outputs moved to {aside}")


def resume_path(run_dir: str, strict: bool, rank0: bool) -> str | None:
    """Rank 0 picks the checkpoint to resume from (`newest_intact`); every rank gets its choice or its error."""
    choice = [None]
    if rank0:
        try:
            choice[0] = newest_intact(run_dir, strict)
        except CheckpointError as e:
            choice[0] = e
        except Exception as e:  # e.g. an unreadable file: every rank stops with it, none waits for rank 0
            choice[0] = CheckpointError(f"cannot read the checkpoints in {run_dir}: {e}")
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], CheckpointError):
        raise choice[0]
    return choice[0]


def begin(run_dir: str, step: int, rank0: bool) -> tuple[str, str]:
    """(tmp, final) paths of the checkpoint for `step`, with any stale tmp removed."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    return tmp, final


def commit(run_dir: str, tmp: str, final: str, keep_last: int, rank0: bool) -> str:
    """Once every rank has written: add the manifest, rename tmp -> final, drop all but the last K."""
    barrier()
    if rank0:
        write_manifest(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        older = [path for _, path in complete_checkpoints(run_dir) if path < final]
        for old in older[:max(0, len(older) - keep_last + 1)] if keep_last > 0 else []:
            shutil.rmtree(old)
    barrier()
    return final


@contextmanager
def one_process_quiet():
    """DCP warns on every call that it runs in a single process, as `longtrain train` without torchrun does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(run_dir: str, step: int, model: nn.Module, optimizer, extra: dict, keep_last: int,
                    rank0: bool) -> str:
    """Save model, optimizer and `extra` (step, data position, RNG) for `step`; returns the final path."""
    tmp, final = begin(run_dir, step, rank0)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             "extra": extra}
    with one_process_quiet():
        dcp.save(state, checkpoint_id=tmp)
    return commit(run_dir, tmp, final, keep_last, rank0)


def save_deepspeed_checkpoint(run_dir: str, step: int, engine, extra: dict, keep_last: int, rank0: bool) -> str:
    """DeepSpeed's own (ZeRO-partitioned) checkpoint, with the same tmp -> final completion rule."""
    tmp, final = begin(run_dir, step, rank0)
    engine.save_checkpoint(tmp, tag="ds", client_state={"extra": extra})
    return commit(run_dir, tmp, final, keep_last, rank0)


def check_format(path: str, deepspeed: bool) -> None:
    """A checkpoint loads only into the kind of engine that wrote it: DeepSpeed's own format or DCP."""
    if os.path.isdir(os.path.join(path, "ds")) != deepspeed:
        writer, reader = ("fsdp/ddp", "deepspeed") if deepspeed else ("deepspeed", "fsdp/ddp")
        raise CheckpointError(f"checkpoint {path} was written by train.engine={writer} and cannot load into "
                              f"train.engine={reader}; resume with the engine that wrote it, or use a new run.dir")


def load_deepspeed_checkpoint(path: str, engine) -> dict:
    """Load the DeepSpeed checkpoint at `path` into the engine; returns its `extra`."""
    check_format(path, deepspeed=True)
    _, client_state = engine.load_checkpoint(path, tag="ds")
    return client_state["extra"]


def load_checkpoint(path: str, model: nn.Module, optimizer, extra_template: dict) -> dict:
    """Load the checkpoint at `path` into model/optimizer; returns its `extra`."""
    check_format(path, deepspeed=False)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
             "extra": extra_template}
    with one_process_quiet():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return state["extra"]
