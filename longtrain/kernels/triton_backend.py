"""Kernel backend "triton": the fused kernels behind the reference's signatures."""
from longtrain.kernels.flash_attn import attention_backward, attention_forward
from longtrain.kernels.linear_attn import linear_attention_chunked
from longtrain.kernels.linear_sp import sp_correction, sp_correction_backward, state_combine

# The chunked linear op has one fused backward for (out, final state): SP algorithms do not split it in two
# autograd calls (that would run the kernels twice), so their state scan does not overlap the local backward.
FUSED_LINEAR_BACKWARD = True

__all__ = ["FUSED_LINEAR_BACKWARD", "attention_backward", "attention_forward", "linear_attention_chunked",
           "sp_correction", "sp_correction_backward", "state_combine"]
