"""Attention kernels: the torch path and Triton kernels with the same signatures; `auto` picks per device.

`auto` (the default): on CPU the torch path for every op; on CUDA the Triton kernels for linear
attention and its SP steps, and the torch path for softmax attention (PyTorch's fused flash /
memory-efficient operators). This CUDA split is a choice, not yet a measurement: no GPU has run
`make gpu-check` on this code; revisit it with that check's numbers.
"""
import os
from types import ModuleType, SimpleNamespace

import torch

from longtrain.kernels import reference
from longtrain.kernels.local import local_attention

BACKENDS = ("auto", "torch", "triton")
OPS = ("attention_forward", "attention_backward", "linear_attention_chunked", "sp_correction",
       "sp_correction_backward", "state_combine")
SOFTMAX_OPS = ("attention_forward", "attention_backward")


def auto_choice(op: str, device: torch.device) -> ModuleType:
    """The module `auto` runs `op` with for inputs on `device`."""
    if device.type != "cuda" or op in SOFTMAX_OPS:
        return reference
    from longtrain.kernels import triton_backend
    return triton_backend


def auto_op(op: str):
    """`op` dispatched by the device of its first tensor argument."""
    def run(*args, **kwargs):
        return getattr(auto_choice(op, args[0].device), op)(*args, **kwargs)
    return run


# FUSED_LINEAR_BACKWARD: the Triton linear op's backward is one fused call (see triton_backend); only a
# scheduling hint to the SP code, so a GPU machine running CPU tensors stays exact.
AUTO = SimpleNamespace(**{op: auto_op(op) for op in OPS}, FUSED_LINEAR_BACKWARD=torch.cuda.is_available())


def get_backend(name: str) -> ModuleType | SimpleNamespace:
    """The kernels for `name`: attention_forward/backward, linear_attention_chunked, the SP steps."""
    if name == "auto":
        return AUTO
    if name == "torch":
        return reference
    if name == "triton":
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("kernel backend 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels "
                             "in Triton's CPU interpreter (slow; for tests)")
        from longtrain.kernels import triton_backend
        return triton_backend
    raise ValueError(f"unknown kernel backend {name!r}; known: {', '.join(BACKENDS)}")


__all__ = ["AUTO", "BACKENDS", "auto_choice", "get_backend", "local_attention", "reference"]
