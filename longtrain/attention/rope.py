"""Rotary position embedding at explicit global positions (so sharded tokens rotate like unsharded ones)."""
import torch
from torch import Tensor


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate x [B, H, N, D] (D even, half-split convention) by angles positions[n] * base^(-2i/D)."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [N, D/2]; fp64 stays exact at 1e6 tokens
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
