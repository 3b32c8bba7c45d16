"""parallelize(model, mesh, cfg, ...): activation checkpointing and offload on the blocks, then FSDP2 or DDP;
build_engine puts the result and its optimizer (or DeepSpeed ZeRO's engine) behind the one Engine interface.

SP ranks hold different tokens of the same sequences, so gradients must be summed over sp as well as
dp: every engine reduces over the whole world (FSDP2 shards over all dp x sp ranks, as torchtitan does
for context parallelism), and the loss is normalised by the global token count times the world size
so that the engines' averaging turns into the exact sum.
"""
import os
from functools import partial

import torch
from torch import nn
from torch.autograd.graph import save_on_cpu
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from longtrain.parallel.mesh import Mesh
from longtrain.trainer.engine import DDPEngine, DeepSpeedEngine, Engine, FSDPEngine


def build_engine(lm: nn.Module, mesh: Mesh, cfg, device: torch.device, bf16: bool) -> Engine:
    """parallelize the bare model `lm`, then the engine that drives it: DeepSpeed with its own AdamW, or FSDP2, DDP
    or one process with torch's AdamW."""
    model = parallelize(lm, mesh, cfg, device, bf16)
    world, t = mesh.dp_size * mesh.sp_size, cfg.train
    groups = param_groups(lm, t.weight_decay)
    if t.engine == "deepspeed":
        return DeepSpeedEngine(init_deepspeed(lm, groups, cfg, bf16, device), world, t.grad_accum)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")
    if isinstance(model, FSDPModule):
        return FSDPEngine(model, lm, optimizer, world, t.grad_clip)
    return DDPEngine(model, lm, optimizer, world, t.grad_clip)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, norms and biases do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def parallelize(model: nn.Module, mesh: Mesh, cfg, device: torch.device, bf16: bool) -> nn.Module:
    """Checkpointing (model.activation_checkpointing, model.checkpoint_mode), offload (train.offload_activations),
    compile (train.compile), then FSDP2 or DDP over all dp x sp ranks; build_engine builds DeepSpeed's engine."""
    if cfg.model.activation_checkpointing:
        apply_checkpointing(model, cfg.model.checkpoint_mode)
    if cfg.train.offload_activations and not (cfg.model.activation_checkpointing and
                                              cfg.model.checkpoint_mode == "block"):
        apply_offload(model)  # blocks recomputed whole save only their input: nothing to move
    if cfg.train.compile:
        apply_compile(model)
    if mesh.dp_size * mesh.sp_size == 1 or cfg.train.engine == "deepspeed":
        return model
    if cfg.train.engine == "fsdp":
        return wrap_fsdp(model, mesh.device_mesh._flatten("dp_sp"), bf16)  # one dim over all dp x sp ranks
    return wrap_ddp(model, device)


def apply_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute in backward each block (mode "block") or only each token mixer (mode "mixer").

    The module's forward itself is checkpointed, so parameter names stay and FSDP2's hooks stay outside.
    """
    for block in model.blocks:
        module = block if mode == "block" else block.mixer
        module.forward = partial(checkpoint, module.forward, use_reentrant=False)


def apply_offload(model: nn.Module) -> None:
    """Tensors each block saves for backward wait in CPU memory (torch's saved-tensor hooks, save_on_cpu)."""
    for block in model.blocks:
        block.register_forward_pre_hook(enter_offload)
        block.register_forward_hook(leave_offload)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block's norm + MLP, one graph that every block reuses (torchtitan compiles whole blocks).
    The mixers stay eager: their SP communication and Triton kernels are outside what dynamo traces in one graph."""
    for block in model.blocks:
        block.feed_forward = torch.compile(block.feed_forward, fullgraph=True)


def enter_offload(module: nn.Module, args) -> None:
    module.offload_ctx = save_on_cpu(pin_memory=torch.cuda.is_available())
    module.offload_ctx.__enter__()


def leave_offload(module: nn.Module, args, output) -> None:
    module.offload_ctx.__exit__(None, None, None)


def wrap_fsdp(model: nn.Module, mesh: DeviceMesh, bf16: bool) -> nn.Module:
    """fully_shard each block, then the root, over the 1-D mesh; bf16 gathers and fp32 reduces with bf16."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the default group (all ranks)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def deepspeed_config(cfg, bf16: bool) -> dict:
    """DeepSpeed's config built from ours: its AdamW (torch implementation), ZeRO stage, clipping, accumulation."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2 ** 31,
    }


def init_deepspeed(model: nn.Module, groups: list[dict], cfg, bf16: bool, device: torch.device):
    """deepspeed.initialize over the existing process group; returns the DeepSpeed engine."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=deepspeed_config(cfg, bf16), dist_init_required=False)
    return engine
