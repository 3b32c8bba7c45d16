"""Input validation shared by the public ops and the SP entry points: errors name the bad value."""
from torch import Tensor


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor | None = None,
                           window: int | None = None, causal: bool = True) -> None:
    """Raise ValueError naming the offending shape or value."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in [B, H, N]")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if segment_ids is not None and tuple(segment_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != [B, N] = {(q.shape[0], q.shape[2])}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if window is not None and not causal:
        raise ValueError("window attention is causal (i-W < j <= i); got causal=False")


def check_linear_inputs(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, initial_state: Tensor | None,
                        segment_ids: Tensor | None) -> None:
    """Raise ValueError naming the offending shape."""
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k [B, H, N, Dk] and v [B, H, N, Dv] must agree; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, Dk = q.shape
    if log_decay is not None and tuple(log_decay.shape) not in ((B, H, N), (B, H, N, Dk)):
        raise ValueError(f"log_decay shape {tuple(log_decay.shape)} must be [B, H, N] = {(B, H, N)} "
                         f"or [B, H, N, Dk] = {(B, H, N, Dk)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"initial_state shape {tuple(initial_state.shape)} != {(B, H, Dk, v.shape[-1])}")
    if segment_ids is not None and tuple(segment_ids.shape) != (B, N):
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != [B, N] = {(B, N)}")
