"""The two core operations every mixer and every SP algorithm is built on, plus the partial merge."""
import math

from torch import Tensor

from longtrain.kernels import get_backend, local_attention
from longtrain.kernels.checks import check_attention_inputs, check_linear_inputs
from longtrain.kernels.reference import merge_partials

merge_attention = merge_partials


def default_scale(q: Tensor, scale: float | None) -> float:
    """scale=None means 1/sqrt(head_dim of q)."""
    return 1 / math.sqrt(q.shape[-1]) if scale is None else scale


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
                      segment_ids: Tensor | None = None, kv_segment_ids: Tensor | None = None,
                      scale: float | None = None, q_start: int = 0, k_start: int = 0,
                      backend: str = "torch") -> tuple[Tensor, Tensor]:
    """Blockwise softmax attention. q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] -> (out like q, lse [B, Hq, Nq]).

    lse is float32 (float64 for float64 inputs), -inf for rows that see no key (their output is 0).

    q_start/k_start are global positions of the first query/key; kv_segment_ids defaults to segment_ids.
    """
    check_attention_inputs(q, k, v, segment_ids, window, causal)
    k_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    return local_attention(q, k, v, backend=get_backend(backend), scale=default_scale(q, scale),
                           causal=causal, window=window, q_seg=segment_ids, k_seg=k_seg, q_start=q_start,
                           k_start=k_start)


def sigmoid_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
                      segment_ids: Tensor | None = None, kv_segment_ids: Tensor | None = None,
                      scale: float | None = None, bias: float | None = None, q_start: int = 0, k_start: int = 0,
                      backend: str = "torch") -> Tensor:
    """Sigmoid attention: out_i = sum_j sigmoid(q_i k_j * scale + bias) v_j; bias defaults to -log(Nk)."""
    check_attention_inputs(q, k, v, segment_ids, window, causal)
    k_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    bias = -math.log(k.shape[2]) if bias is None else bias
    out, _ = local_attention(q, k, v, backend=get_backend(backend), scale=default_scale(q, scale),
                             causal=causal, window=window, q_seg=segment_ids, k_seg=k_seg, q_start=q_start,
                             k_start=k_start, kind="sigmoid", sigmoid_bias=bias)
    return out


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor | None = None,
                     initial_state: Tensor | None = None, output_final_state: bool = False,
                     scale: float | None = None, segment_ids: Tensor | None = None, chunk_size: int = 64,
                     backend: str = "torch") -> tuple[Tensor, Tensor | None]:
    """Chunked linear attention S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

    log_decay g: None, [B, H, N] or [B, H, N, Dk], values <= 0. segment_ids reset the state at each
    document start after token 0 (initial_state feeds the first document). final_state is float32.
    """
    check_linear_inputs(q, k, v, log_decay, initial_state, segment_ids)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return get_backend(backend).linear_attention_chunked(q, k, v, scale=default_scale(q, scale), log_decay=log_decay,
                                                         initial_state=initial_state,
                                                         output_final_state=output_final_state,
                                                         segment_ids=segment_ids, chunk_size=chunk_size)
