"""Softmax attention with a head-specific elementwise sigmoid gate on its output (Qiu et al. 2025)."""
from torch import Tensor, nn

from longtrain.attention.softmax import SoftmaxAttention


class GatedSoftmaxAttention(SoftmaxAttention):
    """out_h <- out_h * sigmoid(x W_g,h): the gate is computed from the layer input, per head and channel."""

    def __init__(self, d_model: int, n_heads: int, opts) -> None:
        super().__init__(d_model, n_heads, opts)
        self.wg = nn.Linear(d_model, n_heads * self.head_dim)

    def gate(self, out: Tensor, x: Tensor) -> Tensor:
        return out * self.wg(x).view_as(out).sigmoid()
