"""The per-forward context every mixer receives: positions, documents and the SP setup."""
from dataclasses import dataclass

import torch
from torch import Tensor

from longtrain.parallel.context import SPContext


@dataclass
class AttnContext:
    """positions [N_local] are the global positions of this rank's tokens (RoPE); seq_len is the global N.

    doc_gates: which SP chunks continue the previous chunk's document (parallel.document_gates), gathered
    once per step for every linear layer; doc_spans: each SP chunk's first and last document id
    (parallel.sequence_spans), for ring attention to skip chunk pairs; None without documents or SP.
    """
    positions: Tensor
    seq_len: int
    segment_ids: Tensor | None = None
    sp: SPContext | None = None
    backend: str = "torch"
    doc_gates: Tensor | None = None
    doc_spans: list | None = None

    @staticmethod
    def single(n: int, device=None, segment_ids: Tensor | None = None, backend: str = "torch") -> "AttnContext":
        """Context for an unsharded sequence of n tokens on one device."""
        return AttnContext(torch.arange(n, device=device), n, segment_ids, None, backend)
