"""Data-parallel engines around the model: FSDP2, DDP or DeepSpeed ZeRO, reducing over every dp x sp rank.

SP ranks hold different tokens of the same sequences, so gradients must be summed over sp as well as
dp: every engine reduces over the whole world (FSDP2 shards over all dp x sp ranks, as torchtitan does
for context parallelism), and the loss is normalised by the global token count times the world size
so that the engines' averaging turns into the exact sum.
"""
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

ENGINES = ("fsdp", "ddp", "deepspeed")


def wrap_fsdp(model: nn.Module, device_type: str) -> nn.Module:
    """fully_shard each block, then the root, over a 1-D mesh of all ranks."""
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp_sp",))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
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


def init_deepspeed(model: nn.Module, param_groups: list, cfg, bf16: bool, device: torch.device):
    """deepspeed.initialize over the existing process group; returns the DeepSpeed engine."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups,
                                           config=deepspeed_config(cfg, bf16), dist_init_required=False)
    return engine
