"""Gated linear attention (Yang et al. 2024): data-dependent per-channel decay from a low-rank gate."""
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.attention.linear import LinearAttention, SwishGate


class GatedLinearAttention(LinearAttention):
    """log_decay = logsigmoid(x W1 W2) / 16 per key channel, [B, H, N, Dk]; swish output gate."""
    default_feature_map = "identity"

    def __init__(self, d_model: int, n_heads: int, opts) -> None:
        super().__init__(d_model, n_heads, opts)
        self.gate_down = nn.Linear(d_model, opts.gate_rank, bias=False)
        self.gate_up = nn.Linear(opts.gate_rank, d_model)
        self.out_gate = SwishGate(d_model)

    def log_decay(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        logits = self.gate_up(self.gate_down(x)).view(B, N, self.n_heads, self.head_dim)
        return (F.logsigmoid(logits) / 16).transpose(1, 2)

    def gate(self, out: Tensor, x: Tensor) -> Tensor:
        return self.out_gate(out, x)
