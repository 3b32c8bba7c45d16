"""The math every linear-attention SP algorithm shares: a local pass, the state scan, the correction.

Rank r holds a contiguous slice. With zero initial state it computes its outputs, its final state M_r
[B, H, Dk, Dv] and its total decay A_r ([B, H, Dk] or [B, H, 1]; 0 where a document starts inside the
slice). The true incoming state is the exclusive scan S_{r+1} = gate_{r+1} (A_r S_r + M_r), S_0 = 0,
where gate_r = 0 when rank r's first token starts a new document. Each output then gets
o_t += (scale q_t exp(cumsum g)_t [no reset up to t]) S_r. Backward runs the scan in reverse:
W_r = gate_r (dS_r + A_r W_{r+1}) flows to rank r-1; dM_r = W_{r+1}, dA_r = sum_v S_r * W_{r+1}.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from longtrain.kernels.reference import acc_dtype, decay_shape, resets_from_segments
from longtrain.parallel.comm import all_gather


@dataclass
class LocalPass:
    """Leaves (detached inputs) and the graph roots of one rank's local computation."""
    inputs: list
    out: Tensor        # [B, H, N/P, Dv] local outputs with zero incoming state
    state: Tensor      # M_r [B, H, Dk, Dv]
    decay: Tensor      # A_r [B, H, Dk or 1]
    q_decayed: Tensor  # scale * q * exp(cumsum g) * no-reset mask, [B, H, N/P, Dk]


def slice_decay(q: Tensor, log_decay: Tensor | None, segment_ids: Tensor | None, scale: float):
    """(A_r, q_decayed) of this slice from the cumulative log decay and the document resets."""
    b = decay_shape(log_decay, q).cumsum(2)  # [B, H, N, Dk|1]
    reset = resets_from_segments(segment_ids, q.shape[2], q.device)
    from_state = 1.0 if reset is None else (reset.long().cumsum(1) == 0).to(b.dtype)[:, None, :, None]
    q_decayed = q.to(b.dtype) * scale * torch.exp(b) * from_state
    decay = torch.exp(b[:, :, -1])
    if reset is not None:
        decay = decay * from_state[:, :, -1]
    return decay, q_decayed


def local_pass(q, k, v, log_decay, segment_ids, scale: float, chunk_size: int, backend, state_first=None) -> LocalPass:
    """Run the slice with zero initial state under autograd, from detached copies of the inputs.

    `state_first(state, decay)` is called as soon as M_r and A_r exist, before the output pass, so an
    algorithm can start its communication and overlap it with the intra-slice compute.
    """
    inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (q, k, v, log_decay)]
    q, k, v, log_decay = inputs
    with torch.enable_grad():
        decay, q_decayed = slice_decay(q, log_decay, segment_ids, scale)
        state = backend.linear_state_chunked(k, v, log_decay=log_decay, segment_ids=segment_ids,
                                             chunk_size=chunk_size)
        if state_first is not None:
            state_first(state.detach(), decay.detach())
        out, _ = backend.linear_attention_chunked(q, k, v, scale=scale, log_decay=log_decay,
                                                  segment_ids=segment_ids, chunk_size=chunk_size)
    return LocalPass(inputs, out, state, decay, q_decayed)


def combine(decay: Tensor, state_in: Tensor, state: Tensor) -> Tensor:
    """The state combine A * S_in + M, A [B, H, Dk|1] scaling the rows of S [B, H, Dk, Dv]."""
    return decay[..., None] * state_in + state


def decay_grad(decay: Tensor, state_in: Tensor, w_next: Tensor) -> Tensor:
    """dA from dL/d(A S_in) = w_next: sum over Dv (and over Dk for a scalar decay)."""
    grad = (state_in * w_next).sum(-1)
    return grad.sum(-1, keepdim=True) if decay.shape[-1] == 1 else grad


def document_gates(segment_ids: Tensor | None, group) -> Tensor | None:
    """gate[p, b] = 1 if rank p's first token continues rank p-1's last document (gate[0] = 0); [P, B]."""
    if segment_ids is None:
        return None
    ends, _ = all_gather(torch.stack([segment_ids[:, 0], segment_ids[:, -1]], 1), group, "linear_gates")  # [P, B, 2]
    gates = torch.zeros(ends.shape[0], ends.shape[1], dtype=torch.bool, device=ends.device)
    gates[1:] = ends[1:, :, 0] == ends[:-1, :, 1]
    return gates


def gate_of(gates: Tensor | None, p: int, like: Tensor) -> Tensor | float:
    """Rank p's gate broadcastable to [B, H, Dk, Dv] (1.0 without documents)."""
    if gates is None:
        return 1.0
    return gates[p].to(like.dtype)[:, None, None, None]


def finish_forward(ctx, lp: LocalPass, state_in: Tensor, q: Tensor, saved: list) -> Tensor:
    """out = out_local + q_decayed @ S_in; keeps the local graph on ctx for the backward."""
    ctx.lp, ctx.state_in = lp, state_in
    ctx.saved_extra = saved
    return (lp.out.detach().to(state_in.dtype) + lp.q_decayed.detach() @ state_in).to(q.dtype)


def local_backward(lp: LocalPass, dout: Tensor, state_in: Tensor, w_next: Tensor | None):
    """Gradients of q, k, v, log_decay given dout and the state gradient W_{r+1} from the next rank."""
    dt = state_in.dtype
    roots, grads = [lp.out, lp.q_decayed], [dout.to(lp.out.dtype), dout.to(dt) @ state_in.transpose(-1, -2)]
    if w_next is not None:
        roots += [lp.state, lp.decay]
        grads += [w_next, decay_grad(lp.decay, state_in, w_next)]
    keep = [i for i, root in enumerate(roots) if root.requires_grad]
    roots, grads = [roots[i] for i in keep], [grads[i] for i in keep]
    leaves = [t for t in lp.inputs if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(roots, leaves, grads, allow_unused=True))
    return tuple(next(found) if t is not None and t.requires_grad else None for t in lp.inputs)


def state_grad_local(lp: LocalPass, dout: Tensor) -> Tensor:
    """dL/dS_in from this rank's own correction term: q_decayed^T @ dout, [B, H, Dk, Dv]."""
    return lp.q_decayed.detach().transpose(-1, -2) @ dout.to(lp.q_decayed.dtype)


def zero_state(q: Tensor, v: Tensor) -> Tensor:
    return q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=acc_dtype(q))

