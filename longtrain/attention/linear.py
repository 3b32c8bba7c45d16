"""Linear attention with a feature map and output norm; the base of the decayed linear mixers."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.attention.context import AttnContext
from longtrain.attention.norm import RMSNorm
from longtrain.attention.ops import linear_attention
from longtrain.parallel import sp_linear_attention

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu": lambda x: F.elu(x) + 1,
    "relu": F.relu,
    "silu": F.silu,
}


class LinearAttention(nn.Module):
    """x [B, N, d_model] -> [B, N, d_model] through S_t = diag(a_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t.

    Subclasses choose the feature map and the decay (`log_decay`), and may gate the output.
    """
    default_feature_map = "elu"

    def __init__(self, d_model: int, n_heads: int, opts) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must divide by n_heads {n_heads}")
        feature_map = opts.feature_map or self.default_feature_map
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}; known: {', '.join(FEATURE_MAPS)}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.feature = FEATURE_MAPS[feature_map]
        self.chunk_size = opts.chunk_size
        self.wqkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def log_decay(self, x: Tensor) -> Tensor | None:
        """Per-token log decay: None, [B, H, N] or [B, H, N, Dk]; plain linear attention has none."""
        return None

    def gate(self, out: Tensor, x: Tensor) -> Tensor:
        """Hook for output gating on [B, N, H, D]; none by default."""
        return out

    def scale_keys(self, k: Tensor, x: Tensor) -> Tensor:
        """Hook to rescale keys per token (Mamba2's dt); identity by default."""
        return k

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.wqkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.feature(q), self.scale_keys(self.feature(k), x)
        log_decay = self.log_decay(x)
        if ctx.sp is not None:
            out = sp_linear_attention(q, k, v, group=ctx.sp.group, algorithm=ctx.sp.linear_algorithm,
                                      log_decay=log_decay, segment_ids=ctx.segment_ids,
                                      zeco_blocks=ctx.sp.zeco_blocks, chunk_size=self.chunk_size,
                                      layout=ctx.sp.layout, backend=ctx.backend, doc_gates=ctx.doc_gates)
        else:
            out, _ = linear_attention(q, k, v, log_decay=log_decay, segment_ids=ctx.segment_ids,
                                      chunk_size=self.chunk_size, backend=ctx.backend)
        out = self.gate(self.out_norm(out.transpose(1, 2)), x)  # [B, N, H, D]
        return self.wo(out.reshape(B, N, -1))


def head_decay(log_rates: Tensor, x: Tensor) -> Tensor:
    """Broadcast fixed per-head log decays [H] to [B, H, N] for input x [B, N, d]."""
    return log_rates.to(x.dtype)[None, :, None].expand(x.shape[0], -1, x.shape[1])


class SwishGate(nn.Module):
    """out * silu(x W_g), the output gate of RetNet, GLA and Mamba2."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.wg = nn.Linear(d_model, d_model, bias=False)

    def forward(self, out: Tensor, x: Tensor) -> Tensor:
        return out * F.silu(self.wg(x)).view_as(out)


def alibi_slopes(n_heads: int) -> Tensor:
    """Geometric per-head rates 2^(-8 (h+1) / H) (ALiBi slopes, used by lightning attention)."""
    return torch.tensor([2 ** (-8 * (h + 1) / n_heads) for h in range(n_heads)])
