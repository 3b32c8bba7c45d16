"""One device's attention as autograd ops, running a backend's blockwise forward and backward."""
import torch
from torch import Tensor


class LocalAttention(torch.autograd.Function):
    """(out, lse) = attention(q, k, v) with the backend's hand-written blockwise backward (no N x N saved)."""

    @staticmethod
    def forward(ctx, q, k, v, q_seg, k_seg, backend, opts):
        out, lse = backend.attention_forward(q, k, v, q_seg=q_seg, k_seg=k_seg, **opts)
        out = out.to(q.dtype)  # saved as returned; [B, N, H, D] in memory, so the output projection saves it too
        ctx.save_for_backward(q, k, v, out, lse, q_seg, k_seg)
        ctx.backend, ctx.opts = backend, opts
        ctx.set_materialize_grads(False)  # dlse stays None when lse is unused (the fused backward's fast path)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, q_seg, k_seg = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = ctx.backend.attention_backward(dout, q, k, v, out, lse, q_seg=q_seg, k_seg=k_seg,
                                                    dlse=dlse, **ctx.opts)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def local_attention(q: Tensor, k: Tensor, v: Tensor, *, backend, scale: float, causal: bool = True,
                    window: int | None = None, q_seg: Tensor | None = None, k_seg: Tensor | None = None,
                    q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                    sigmoid_bias: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """Differentiable attention on one device; returns (out in q.dtype, lse float32/64 or None)."""
    opts = dict(scale=scale, causal=causal, window=window, q_start=q_start, k_start=k_start, kind=kind,
                sigmoid_bias=sigmoid_bias)
    return LocalAttention.apply(q, k, v, q_seg, k_seg, backend, opts)

