"""Sigmoid attention (Ramapuram et al. 2024): sigmoid(q k^T / sqrt(d) - log n), no normaliser, no lse."""
from longtrain.attention.softmax import SoftmaxAttention


class SigmoidAttention(SoftmaxAttention):
    """Same projections and RoPE as softmax; the core op sums sigmoid-weighted values (bias -log of global N)."""
    kind = "sigmoid"
