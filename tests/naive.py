"""Independent, deliberately naive references: full masked matrices, no blocking, no chunking."""
import math

import torch


def naive_mask(nq, nk, q_start=0, k_start=0, causal=True, window=None, q_seg=None, k_seg=None):
    """[B or 1, 1, Nq, Nk] boolean mask of allowed pairs."""
    qp = torch.arange(q_start, q_start + nq)[:, None]
    kp = torch.arange(k_start, k_start + nk)[None, :]
    mask = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        mask &= kp <= qp
    if window is not None:
        mask &= kp > qp - window
    mask = mask[None, None]
    if q_seg is not None:
        mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])
    return mask


def naive_softmax(q, k, v, scale=None, **mask_kw):
    """out, lse from the full score matrix; empty rows give out 0 and lse -inf."""
    scale = scale or 1 / math.sqrt(q.shape[-1])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    mask = naive_mask(q.shape[2], k.shape[2], **mask_kw)
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


def naive_sigmoid(q, k, v, scale=None, bias=None, **mask_kw):
    scale = scale or 1 / math.sqrt(q.shape[-1])
    bias = -math.log(k.shape[2]) if bias is None else bias
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    p = torch.sigmoid(q @ k.transpose(-1, -2) * scale + bias)
    p = p.masked_fill(~naive_mask(q.shape[2], k.shape[2], **mask_kw), 0.0)
    return p @ v
