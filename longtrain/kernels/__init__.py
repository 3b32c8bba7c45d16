"""Attention kernels: a torch reference and Triton kernels with the same signatures."""
import os
from types import ModuleType

import torch

from longtrain.kernels import reference
from longtrain.kernels.local import local_attention

BACKENDS = ("torch", "triton")


def get_backend(name: str) -> ModuleType:
    """The kernel module for `name`: attention_forward/backward, linear_attention_chunked, the SP steps."""
    if name == "torch":
        return reference
    if name == "triton":
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("kernel backend 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels "
                             "in Triton's CPU interpreter (slow; for tests)")
        from longtrain.kernels import triton_backend
        return triton_backend
    raise ValueError(f"unknown kernel backend {name!r}; known: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "get_backend", "local_attention", "reference"]
