"""Kernel backend "triton": the fused kernels behind the reference's signatures.

The state-only pass used by the SP algorithms (linear_state_chunked) stays the torch reference: it is
one O(N Dk Dv) product per slice, already a pair of matmuls.
"""
from longtrain.kernels.flash_attn import attention_backward, attention_forward
from longtrain.kernels.linear_attn import linear_attention_chunked
from longtrain.kernels.linear_sp import sp_correction, sp_correction_backward, state_combine
from longtrain.kernels.reference import linear_state_chunked

__all__ = ["attention_backward", "attention_forward", "linear_attention_chunked", "linear_state_chunked",
           "sp_correction", "sp_correction_backward", "state_combine"]
