"""RMSNorm whose weight follows its input's dtype."""
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with the weight cast to the input's dtype: a bf16 input under autocast (a mixer's output) with
    the fp32 weight otherwise misses PyTorch's fused kernel for its unfused fallback."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)
