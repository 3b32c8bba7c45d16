"""Attention kernels: the torch path and Triton kernels with the same signatures; `auto` picks per device.

`auto` (the default): on CPU the torch path for every op; on CUDA the Triton kernels for every op, as
measured by `make gpu-check` on an H100 (2026-11-27, benchmarks/RESULTS.md): Triton flash attention took
0.87-0.95x the time of SDPA's flash kernel (causal, bf16, forward+backward, N 8k-32k, D 64/128), and
against the torch path (PyTorch's fused operators on visible blocks) 0.60x causal, 0.29x with 16 packed
documents and 0.07x with a 512 window (N=8192); the linear ops' torch path was not timed there. Float64
runs the torch path (the Triton kernels compute in float32 at most), as does softmax attention with head dims
over 256 or unequal for q and v (the flash kernel does not take them), and every op where Triton is not
installed or B * H passes CUDA's 65535 grid rows (the Triton kernels launch one row of programs per batch
and head).
"""
import importlib.util
import os
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor

from longtrain.kernels import reference
from longtrain.kernels.local import local_attention

BACKENDS = ("auto", "torch", "triton")
OPS = ("attention_forward", "attention_backward", "linear_attention_chunked", "sp_correction",
       "sp_correction_backward", "state_combine")
SOFTMAX_OPS = ("attention_forward", "attention_backward")
HAS_TRITON = importlib.util.find_spec("triton") is not None
MAX_GRID_ROWS = 65535  # CUDA's limit on a launch grid's second axis, where the Triton kernels put B * H


def auto_choice(op: str, q: Tensor, v: Tensor | None = None) -> ModuleType:
    """The module `auto` runs `op` with, for its first input q (and v, softmax attention's values)."""
    if q.device.type != "cuda" or not HAS_TRITON or q.dtype == torch.float64:
        return reference
    if q.shape[0] * q.shape[1] > MAX_GRID_ROWS or (op in SOFTMAX_OPS and (q.shape[-1] > 256 or
                                                                          v.shape[-1] != q.shape[-1])):
        return reference
    from longtrain.kernels import triton_backend
    return triton_backend


def auto_op(op: str):
    """`op` dispatched by its inputs: q, v are attention_forward's args 0, 2 and attention_backward's 1, 3."""
    first = 1 if op == "attention_backward" else 0

    def run(*args, **kwargs):
        q, v = args[first], args[first + 2] if op in SOFTMAX_OPS else None
        return getattr(auto_choice(op, q, v), op)(*args, **kwargs)
    return run


# FUSED_LINEAR_BACKWARD: the Triton linear op's backward is one fused call (see triton_backend); only a
# scheduling hint to the SP code, so a GPU machine running CPU tensors stays exact.
AUTO = SimpleNamespace(**{op: auto_op(op) for op in OPS},
                       FUSED_LINEAR_BACKWARD=torch.cuda.is_available() and HAS_TRITON)


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
