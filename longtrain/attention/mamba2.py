"""Mamba2-style scalar data-dependent decay: log_decay = -softplus(x W_dt + b) * exp(A_log), keys scaled by dt."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.attention.linear import LinearAttention, SwishGate


class Mamba2Attention(LinearAttention):
    """The SSD recurrence S_t = exp(dt_t A) S_{t-1} + dt_t k_t^T v_t written as linear attention (scalar decay)."""
    default_feature_map = "identity"

    def __init__(self, d_model: int, n_heads: int, opts) -> None:
        super().__init__(d_model, n_heads, opts)
        self.w_dt = nn.Linear(d_model, n_heads)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, n_heads)))
        with torch.no_grad():
            dt = torch.exp(torch.empty(n_heads).uniform_(math.log(1e-3), math.log(1e-1)))
            self.w_dt.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.out_gate = SwishGate(d_model)

    def dt(self, x: Tensor) -> Tensor:
        return F.softplus(self.w_dt(x)).transpose(1, 2)  # [B, H, N]

    def log_decay(self, x: Tensor) -> Tensor:
        return -self.dt(x) * torch.exp(self.A_log)[None, :, None]

    def scale_keys(self, k: Tensor, x: Tensor) -> Tensor:
        return k * self.dt(x)[..., None]

    def gate(self, out: Tensor, x: Tensor) -> Tensor:
        return self.out_gate(out, x)
