"""Causal softmax attention (MHA/GQA) with RoPE, and its sliding-window variant."""
import math

from torch import Tensor, nn

from longtrain.attention.context import AttnContext
from longtrain.attention.ops import sigmoid_attention, softmax_attention
from longtrain.attention.rope import apply_rope
from longtrain.parallel import sp_softmax_attention


class SoftmaxAttention(nn.Module):
    """x [B, N, d_model] -> [B, N, d_model]; heads run through softmax_attention or its SP variant."""
    kind = "softmax"

    def __init__(self, d_model: int, n_heads: int, opts) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = opts.n_kv_heads or n_heads
        if d_model % n_heads or n_heads % self.n_kv_heads:
            raise ValueError(f"d_model {d_model} must divide by n_heads {n_heads}, "
                             f"and n_heads by n_kv_heads {self.n_kv_heads}")
        self.head_dim = d_model // n_heads
        self.window = None
        self.rope_base = opts.rope_base
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(d_model, 2 * self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        """Core attention on [B, H, N_local, D] heads, local or sequence-parallel."""
        bias = -math.log(ctx.seq_len) if self.kind == "sigmoid" else 0.0
        if ctx.sp is not None:
            out, _ = sp_softmax_attention(q, k, v, group=ctx.sp.group, algorithm=ctx.sp.softmax_algorithm,
                                          layout=ctx.sp.layout, causal=True, window=self.window,
                                          segment_ids=ctx.segment_ids, kind=self.kind, sigmoid_bias=bias,
                                          ulysses_size=ctx.sp.ulysses_size, return_lse=False,
                                          backend=ctx.backend, doc_spans=ctx.doc_spans)
            return out
        if self.kind == "sigmoid":
            return sigmoid_attention(q, k, v, window=self.window, segment_ids=ctx.segment_ids, bias=bias,
                                     backend=ctx.backend)
        return softmax_attention(q, k, v, window=self.window, segment_ids=ctx.segment_ids, backend=ctx.backend)[0]

    def gate(self, out: Tensor, x: Tensor) -> Tensor:
        """Hook for output gating; plain softmax attention has none."""
        return out

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        B, N, _ = x.shape
        q = self.wq(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, N, D]
        k, v = self.wkv(x).view(B, N, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(q, ctx.positions, self.rope_base)
        k = apply_rope(k, ctx.positions, self.rope_base)
        out = self.attend(q, k, v, ctx).transpose(1, 2)  # [B, N, H, D]
        out = self.gate(out, x)
        return self.wo(out.reshape(B, N, -1))


class WindowAttention(SoftmaxAttention):
    """Sliding-window causal softmax attention: query i sees keys i-W < j <= i."""

    def __init__(self, d_model: int, n_heads: int, opts) -> None:
        super().__init__(d_model, n_heads, opts)
        if not opts.window:
            raise ValueError("mixer 'window' needs model.window (a positive number of tokens)")
        self.window = opts.window

