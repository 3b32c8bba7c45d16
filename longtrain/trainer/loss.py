"""LM head + cross-entropy over chunks of tokens: the logits [N, vocab] never exist at once.

Forward keeps only the log-sum-exp per token; backward recomputes each chunk's logits and turns them into
dlogits = (softmax - onehot(target)) * weight, then dh = dlogits W and dW += dlogits^T h.
"""
import torch
from torch import Tensor

IGNORE_INDEX = -100  # as F.cross_entropy: these targets count for nothing


class LinearCrossEntropy(torch.autograd.Function):
    """(sum_t w_t * CE(h_t W^T, y_t), number of tokens with w_t > 0 whose argmax is y_t); one [C, V] chunk at a time."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, w: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        # h [T, d], weight [V, d], targets [T] int64 (ignored ones already 0), w [T] float (0 where not counted)
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16/fp32 inputs, fp64 for fp64
        lse = torch.empty(h.shape[0], dtype=acc, device=h.device)
        loss = torch.zeros((), dtype=acc, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk] @ weight.T).to(acc)  # [C, V]
            y, w_c = targets[s:s + chunk], w[s:s + chunk]
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            loss += ((lse[s:s + chunk] - logits.gather(1, y[:, None]).squeeze(1)) * w_c).sum()
            correct += ((logits.argmax(-1) == y) & (w_c > 0)).sum()
        ctx.save_for_backward(h, weight, targets, w, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct: Tensor):
        h, weight, targets, w, lse = ctx.saved_tensors
        chunk, acc = ctx.chunk, lse.dtype
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)  # summed over chunks in fp32/fp64
        for s in range(0, h.shape[0], chunk):
            h_c = h[s:s + chunk]
            dlogits = (h_c @ weight.T).to(acc).sub_(lse[s:s + chunk, None]).exp_()  # softmax [C, V]
            dlogits[torch.arange(h_c.shape[0], device=h.device), targets[s:s + chunk]] -= 1
            dlogits = dlogits.mul_((grad_loss * w[s:s + chunk])[:, None]).to(h.dtype)
            grad_h[s:s + chunk] = dlogits @ weight
            grad_w += (dlogits.T @ h_c).to(acc)
        return grad_h, grad_w.to(weight.dtype), None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(sum of mask * CE(h @ weight^T, targets), count of correct argmax under mask), chunk tokens at a time.

    h [..., d], weight [V, d], targets/mask [...]; equals F.cross_entropy(F.linear(h, weight).float(), targets,
    reduction="none") times mask, summed, with targets == -100 ignored. Under autocast, h and weight are cast to
    the autocast dtype as nn.Linear would.
    """
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    targets, h = targets.flatten(), h.flatten(0, -2)
    valid = mask.flatten().bool() & (targets != IGNORE_INDEX)
    w = valid.to(torch.promote_types(h.dtype, torch.float32))
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(h, weight, targets.masked_fill(~valid, 0), w, chunk)
