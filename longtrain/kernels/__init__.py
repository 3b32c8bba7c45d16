"""Attention kernels: a torch reference and Triton kernels with the same signatures."""
from types import ModuleType

from longtrain.kernels import reference
from longtrain.kernels.local import local_attention, local_linear_attention

BACKENDS = ("torch",)


def get_backend(name: str) -> ModuleType:
    """The kernel module for `name`: attention_forward/backward, linear_attention_chunked, linear_state_chunked."""
    if name == "torch":
        return reference
    raise ValueError(f"unknown kernel backend {name!r}; known: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "get_backend", "local_attention", "local_linear_attention", "reference"]
