"""The engine interface: all the training loop asks of a data-parallel engine (FSDP2, DDP or one process, DeepSpeed).

The loop forwards through `engine.model`, then calls backward per micro-batch, step once per optimizer step, and
save / load for checkpoints; it never asks which engine it drives. Every engine averages gradients over all dp x sp
ranks, so backward scales the loss by the world size: the average is then the exact gradient of the global
token-mean loss.
"""
from contextlib import nullcontext
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from longtrain.trainer.checkpoint import (load_checkpoint, load_deepspeed_checkpoint, save_checkpoint,
                                         save_deepspeed_checkpoint)


class Engine(Protocol):
    """A model wrapped for data parallelism with its optimizer; `model` runs forward, train() and eval()."""
    model: nn.Module
    can_drop_partial_step: bool  # False: a stop waits for the step boundary (the engine counts micro-steps itself)

    def backward(self, loss_sum: torch.Tensor, total_tokens: float, last_micro: bool) -> None:
        """Backward of this micro-batch's share of the global token-mean loss; gradients sync on the last one."""

    def step(self, lr: float) -> float:
        """Set the learning rate, clip, update, zero the gradients; returns the pre-clip gradient norm."""

    def zero_grad(self) -> None:
        """Drop the gradients of a partial step."""

    def save(self, run_dir: str, step: int, extra: dict, keep_last: int, rank0: bool) -> str:
        """Checkpoint model, optimizer and `extra` for `step` under run_dir; returns the final path."""

    def load(self, path: str, extra: dict) -> dict:
        """Load the checkpoint at `path`; returns its `extra` (shaped like the given one)."""


class TorchEngine:
    """torch AdamW, clip_grad_norm_ and DCP checkpoints around `model`; `lm` is the bare module underneath."""
    can_drop_partial_step = True

    def __init__(self, model: nn.Module, lm: nn.Module, optimizer: torch.optim.Optimizer, world: int,
                 grad_clip: float) -> None:
        self.model, self.lm, self.optimizer = model, lm, optimizer
        self.world, self.grad_clip = world, grad_clip

    def backward(self, loss_sum: torch.Tensor, total_tokens: float, last_micro: bool) -> None:
        loss = loss_sum * (self.world / total_tokens)
        with self.gradient_sync(last_micro):
            loss.backward()

    def gradient_sync(self, last_micro: bool):
        """Context for one micro-batch's backward that reduces gradients only when last_micro."""
        raise NotImplementedError

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lm.parameters(), self.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.item()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, run_dir: str, step: int, extra: dict, keep_last: int, rank0: bool) -> str:
        return save_checkpoint(run_dir, step, self.lm, self.optimizer, extra, keep_last, rank0)

    def load(self, path: str, extra: dict) -> dict:
        return load_checkpoint(path, self.lm, self.optimizer, extra)


class DDPEngine(TorchEngine):
    """DDP, or one process (`model` is then the bare module and nothing is reduced)."""

    def gradient_sync(self, last_micro: bool):
        """DDP all-reduces in the last micro-batch's backward only (no_sync before it)."""
        if last_micro or not isinstance(self.model, DistributedDataParallel):
            return nullcontext()
        return self.model.no_sync()


class FSDPEngine(TorchEngine):
    """FSDP2 (`fully_shard`): `model` is `lm` itself, its parameters DTensor shards."""

    def gradient_sync(self, last_micro: bool):
        """FSDP2 reduce-scatters in the last micro-batch's backward only."""
        self.model.set_requires_gradient_sync(last_micro)
        return nullcontext()


class DeepSpeedEngine:
    """deepspeed.initialize's engine: its optimizer, accumulation counter, clipping, gradient norm and checkpoints."""
    can_drop_partial_step = False  # it counts micro-steps itself, so a step once begun must finish

    def __init__(self, ds, world: int, grad_accum: int) -> None:
        self.model, self.ds = ds, ds
        self.world, self.grad_accum = world, grad_accum

    def backward(self, loss_sum: torch.Tensor, total_tokens: float, last_micro: bool) -> None:
        """DeepSpeed divides the loss by its accumulation steps (undone here) and steps after every micro-batch,
        updating at the accumulation boundary only; the last micro-batch's step is `step`."""
        loss = loss_sum * (self.world / total_tokens)
        self.ds.backward(loss * self.grad_accum)
        if not last_micro:
            self.ds.step()

    def step(self, lr: float) -> float:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        # without ZeRO (fp32) DeepSpeed clips but keeps no norm: take the reduced gradients' norm before its step
        own_norm = None
        if self.ds.zero_optimization_stage() == 0:
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            own_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = own_norm if norm is None else norm
        return float("nan") if norm is None else float(norm)

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def save(self, run_dir: str, step: int, extra: dict, keep_last: int, rank0: bool) -> str:
        return save_deepspeed_checkpoint(run_dir, step, self.ds, extra, keep_last, rank0)

    def load(self, path: str, extra: dict) -> dict:
        return load_deepspeed_checkpoint(path, self.ds)
