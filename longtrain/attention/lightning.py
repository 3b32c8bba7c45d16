"""Lightning attention (TransNormerLLM): linear attention with a fixed per-head exponential decay."""
from torch import Tensor

from longtrain.attention.linear import LinearAttention, alibi_slopes, head_decay


class LightningAttention(LinearAttention):
    """SiLU features, decay exp(-slope_h) with ALiBi-style slopes, RMS output norm."""
    default_feature_map = "silu"

    def __init__(self, d_model: int, n_heads: int, opts) -> None:
        super().__init__(d_model, n_heads, opts)
        self.register_buffer("log_rates", -alibi_slopes(n_heads), persistent=False)

    def log_decay(self, x: Tensor) -> Tensor:
        return head_decay(self.log_rates, x)
