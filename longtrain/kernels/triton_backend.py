"""Kernel backend "triton": the fused kernels behind the reference's signatures."""
from longtrain.kernels.flash_attn import attention_backward, attention_forward
from longtrain.kernels.linear_attn import linear_attention_chunked
from longtrain.kernels.linear_sp import sp_correction, sp_correction_backward, state_combine

__all__ = ["attention_backward", "attention_forward", "linear_attention_chunked", "sp_correction",
           "sp_correction_backward", "state_combine"]
