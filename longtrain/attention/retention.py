"""RetNet retention: linear attention with fixed per-head decay gamma_h = 1 - 2^(-5-h) and a swish gate."""
import torch
from torch import Tensor

from longtrain.attention.linear import LinearAttention, SwishGate, head_decay


class Retention(LinearAttention):
    """Identity features (scores q k^T / sqrt(d)), decay gamma_h, per-head RMS norm, swish output gate."""
    default_feature_map = "identity"

    def __init__(self, d_model: int, n_heads: int, opts) -> None:
        super().__init__(d_model, n_heads, opts)
        gammas = 1 - 2.0 ** (-5 - torch.arange(n_heads, dtype=torch.float64))
        self.register_buffer("log_rates", torch.log(gammas), persistent=False)  # float64: exact in fp64 runs too
        self.out_gate = SwishGate(d_model)

    def log_decay(self, x: Tensor) -> Tensor:
        return head_decay(self.log_rates, x)

    def gate(self, out: Tensor, x: Tensor) -> Tensor:
        return self.out_gate(out, x)
