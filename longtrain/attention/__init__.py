"""Attention mixers and the two core operations they share."""
from longtrain.attention.context import AttnContext
from longtrain.attention.ops import linear_attention, merge_attention, sigmoid_attention, softmax_attention
from longtrain.attention.registry import (LINEAR_FAMILY, MIXERS, SOFTMAX_FAMILY, MixerOptions, build_mixer,
                                          check_mixer)

__all__ = ["AttnContext", "LINEAR_FAMILY", "MIXERS", "MixerOptions", "SOFTMAX_FAMILY", "build_mixer", "check_mixer",
           "linear_attention", "merge_attention", "sigmoid_attention", "softmax_attention"]
