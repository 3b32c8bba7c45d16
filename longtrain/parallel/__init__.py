"""Sequence parallelism: sharding, the softmax-family and linear-family SP algorithms, comm accounting."""
import math

from torch import Tensor

from longtrain.kernels import get_backend, local_attention
from longtrain.kernels.checks import check_attention_inputs, check_linear_inputs
from longtrain.parallel.allgather import allgather_attention
from longtrain.parallel.comm import group_size
from longtrain.parallel.context import SPContext
from longtrain.parallel.lasp1 import Lasp1
from longtrain.parallel.lasp2 import Lasp2
from longtrain.parallel.linear_state import document_gates
from longtrain.parallel.ring import ring_attention, sequence_spans
from longtrain.parallel.sharding import (LAYOUTS, local_positions, pad_sequence, shard_sequence,
                                         unshard_sequence)
from longtrain.parallel.ulysses import ulysses_attention, ulysses_linear_attention
from longtrain.parallel.usp import usp_attention
from longtrain.parallel.zeco import ZeCO

SOFTMAX_SP = ("ring", "allgather", "ulysses", "usp", "none")
LINEAR_SP = ("lasp1", "lasp2", "zeco", "ulysses", "none")
STATE_PASSING_SP = ("lasp1", "lasp2", "zeco")  # pass states between ranks, so they need document_gates


def check_algorithm(algorithm: str, known: tuple, P: int) -> None:
    if algorithm not in known:
        raise ValueError(f"unknown SP algorithm {algorithm!r}; known: {', '.join(known)}")
    if algorithm == "none" and P > 1:
        raise ValueError(f"algorithm 'none' needs an SP group of size 1, got {P}")


def sp_softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, algorithm: str = "ring",
                         layout: str = "contiguous", causal: bool = True, window: int | None = None,
                         segment_ids: Tensor | None = None, scale: float | None = None, kind: str = "softmax",
                         sigmoid_bias: float = 0.0, ulysses_size: int = 1, return_lse: bool = True,
                         backend: str = "torch", save_gathered_kv: bool = False,
                         doc_spans: list | None = None) -> tuple[Tensor, Tensor | None]:
    """This rank's shard of single-device softmax (or sigmoid) attention; inputs are shards in `layout`.

    Returns (out [B, Hq, N/P, D], lse [B, Hq, N/P] float32). lse is None for kind="sigmoid" and when
    return_lse=False (the mixers' case: Ulysses and USP then skip sending it back). save_gathered_kv: allgather
    keeps the gathered K/V for backward instead of gathering them again. doc_spans: `sequence_spans(full ids, P,
    layout)` for ring, when the caller has the full ids (a trainer computes them once per step).
    """
    P = group_size(group)
    check_algorithm(algorithm, SOFTMAX_SP, P)
    check_attention_inputs(q, k, v, segment_ids, window, causal)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    kernels = get_backend(backend)
    opts = dict(scale=1 / math.sqrt(q.shape[-1]) if scale is None else scale, causal=causal, window=window,
                kind=kind, sigmoid_bias=sigmoid_bias)
    if algorithm == "none" or (P == 1 and algorithm != "usp"):
        out, lse = local_attention(q, k, v, backend=kernels, q_seg=segment_ids, k_seg=segment_ids, **opts)
    elif algorithm == "ring":
        out, lse = ring_attention(q, k, v, segment_ids, group, layout, kernels, opts, doc_spans)
    elif algorithm == "allgather":
        out, lse = allgather_attention(q, k, v, segment_ids, group, layout, kernels, opts, save_gathered_kv)
    elif algorithm == "usp":
        out, lse = usp_attention(q, k, v, segment_ids, group, layout, ulysses_size, kernels, opts, return_lse)
    else:
        out, lse = ulysses_attention(q, k, v, segment_ids, group, layout, kernels, opts, return_lse)
    return out, (lse if return_lse else None)


def sp_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, algorithm: str = "lasp2",
                        log_decay: Tensor | None = None, segment_ids: Tensor | None = None,
                        scale: float | None = None, zeco_blocks: int | None = None, chunk_size: int = 64,
                        layout: str = "contiguous", backend: str = "torch",
                        doc_gates: Tensor | None = None) -> Tensor:
    """This rank's shard of single-device `linear_attention`; inputs are shards [B, H, N/P, D] in `layout`.

    Every algorithm takes either layout (lasp1 and zeco then scan over ranks 0..P-1 and back).
    doc_gates: `document_gates(segment_ids, group, layout)` when the caller has them (a model computes them
    once per step for all its layers); otherwise they are gathered here.
    """
    P = group_size(group)
    check_algorithm(algorithm, LINEAR_SP, P)
    check_linear_inputs(q, k, v, log_decay, None, segment_ids)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    kernels = get_backend(backend)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if algorithm == "none" or P == 1:
        return kernels.linear_attention_chunked(q, k, v, scale=scale, log_decay=log_decay, segment_ids=segment_ids,
                                                chunk_size=chunk_size)[0]
    if algorithm == "ulysses":
        return ulysses_linear_attention(q, k, v, log_decay, segment_ids, group, layout, kernels, scale, chunk_size)
    if doc_gates is None:
        doc_gates = document_gates(segment_ids, group, layout)
    if algorithm == "lasp1":
        return Lasp1.apply(q, k, v, log_decay, segment_ids, doc_gates, group, scale, chunk_size, kernels, layout)
    if algorithm == "lasp2":
        return Lasp2.apply(q, k, v, log_decay, segment_ids, doc_gates, group, scale, chunk_size, kernels, layout)
    return ZeCO.apply(q, k, v, log_decay, segment_ids, doc_gates, group, scale, chunk_size, kernels, zeco_blocks,
                      layout)


__all__ = ["LAYOUTS", "LINEAR_SP", "SOFTMAX_SP", "STATE_PASSING_SP", "SPContext", "document_gates", "local_positions",
           "pad_sequence", "sequence_spans", "shard_sequence", "sp_linear_attention", "sp_softmax_attention",
           "unshard_sequence"]
