"""The math every linear-attention SP algorithm shares: a local pass, the state scan, the correction.

Rank r holds a contiguous slice, or the two zigzag chunks r and 2P-1-r; the same math then runs over
the 2P chunks in sequence order. With zero initial state it computes its outputs, its final state M_r
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
from longtrain.parallel.comm import all_gather, group_size
from longtrain.parallel.sharding import by_chunk, chunk_ids


@dataclass
class LocalPass:
    """Leaves (detached inputs) and the graph roots of one rank's local computation."""
    inputs: list
    out: Tensor                # [B, H, N/P, Dv] local outputs with zero incoming state
    state: Tensor              # M_r [B, H, Dk, Dv]
    decay: Tensor              # A_r [B, H, Dk or 1]
    b: Tensor                  # cumulative log decay over the slice [B, H, N/P, Dk or 1]
    from_state: Tensor | None  # [B, N/P] 1 until the slice's first document start, None without documents
    scale: float
    backend: object


def slice_decay(q: Tensor, log_decay: Tensor | None, segment_ids: Tensor | None):
    """(A_r, cumulative decay b, no-document-start-yet mask) of this slice."""
    b = decay_shape(log_decay, q).cumsum(2)  # [B, H, N, Dk|1]
    reset = resets_from_segments(segment_ids, q.shape[2], q.device)
    decay = torch.exp(b[:, :, -1])
    if reset is None:
        return decay, b, None
    from_state = (reset.long().cumsum(1) == 0).to(b.dtype)
    return decay * from_state[:, -1, None, None], b, from_state


def local_pass(q, k, v, log_decay, segment_ids, scale: float, chunk_size: int, backend, state_first=None) -> LocalPass:
    """Run the slice with zero initial state under autograd, from detached copies of the inputs.

    One chunked pass gives both the outputs and M_r. `state_first(state, decay)` is called as soon as
    M_r and A_r exist, before the output products, so an algorithm can start its communication and
    overlap it with the intra-slice compute.
    """
    inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (q, k, v, log_decay)]
    q, k, v, log_decay = inputs
    with torch.enable_grad():
        decay, b, from_state = slice_decay(q, log_decay, segment_ids)
        hook = None if state_first is None else (lambda state: state_first(state.detach(), decay.detach()))
        out, state = backend.linear_attention_chunked(q, k, v, scale=scale, log_decay=log_decay,
                                                      segment_ids=segment_ids, chunk_size=chunk_size,
                                                      output_final_state=True, on_final_state=hook)
    return LocalPass(inputs, out, state, decay, b, from_state, scale, backend)


def narrow(t: Tensor | None, off: int, n: int, dim: int = 2) -> Tensor | None:
    return None if t is None else t.narrow(dim, off, n)


def local_passes(q, k, v, log_decay, segment_ids, scale: float, chunk_size: int, backend, chunks: list,
                 on_summaries=None) -> list[LocalPass]:
    """local_pass of each chunk this rank holds ((offset, start, length) from local_chunks).

    on_summaries([(M_c, A_c) of every own chunk]) runs as soon as the last chunk's M exists, before its output
    products, so the algorithm's communication overlaps them.
    """
    lps = []
    for i, (off, _, n) in enumerate(chunks):
        hook = None
        if on_summaries is not None and i == len(chunks) - 1:
            done = [(lp.state.detach(), lp.decay.detach()) for lp in lps]
            hook = lambda state, decay, done=done: on_summaries(done + [(state, decay)])
        lps.append(local_pass(narrow(q, off, n), narrow(k, off, n), narrow(v, off, n), narrow(log_decay, off, n),
                              narrow(segment_ids, off, n, 1), scale, chunk_size, backend, state_first=hook))
    return lps


def combine(backend, decay: Tensor, state_in: Tensor, state: Tensor) -> Tensor:
    """The state combine A * S_in + M, A [B, H, Dk|1] scaling the rows of S [B, H, Dk, Dv]."""
    return backend.state_combine(decay, state_in, state).to(state.dtype)


def decay_grad(decay: Tensor, state_in: Tensor, w_next: Tensor) -> Tensor:
    """dA from dL/d(A S_in) = w_next: sum over Dv (and over Dk for a scalar decay)."""
    grad = (state_in * w_next).sum(-1)
    return grad.sum(-1, keepdim=True) if decay.shape[-1] == 1 else grad


def document_gates(segment_ids: Tensor | None, group, layout: str = "contiguous") -> Tensor | None:
    """gate[c, b] = 1 if global chunk c's first token continues chunk c-1's last document (gate[0] = 0); [C, B].

    Chunks are the ranks' slices (contiguous) or the 2P zigzag chunks; one tiny all-gather of boundary ids.
    """
    if segment_ids is None:
        return None
    P = group_size(group)
    parts = segment_ids.chunk(len(chunk_ids(P, 0, layout)), 1)
    ends, _ = all_gather(torch.stack([torch.stack([p[:, 0], p[:, -1]], 1) for p in parts]), group, "linear_gates")
    ends = torch.stack(by_chunk(ends, P, layout))  # [C, B, 2] first/last document id of each global chunk
    gates = torch.zeros(ends.shape[0], ends.shape[1], dtype=torch.bool, device=ends.device)
    gates[1:] = ends[1:, :, 0] == ends[:-1, :, 1]
    return gates


def gate_of(gates: Tensor | None, p: int, like: Tensor) -> Tensor | float:
    """Rank p's gate broadcastable to [B, H, Dk, Dv] (1.0 without documents)."""
    if gates is None:
        return 1.0
    return gates[p].to(like.dtype)[:, None, None, None]


def correct(lp: LocalPass, state_in: Tensor) -> Tensor:
    """out_local + (scale q exp(b) mask) @ S_in, one fused step of the backend."""
    return lp.backend.sp_correction(lp.out.detach().to(state_in.dtype), lp.inputs[0].detach(), lp.b.detach(),
                                    lp.from_state, lp.scale, state_in)


def correction_backward(lp: LocalPass, dout: Tensor, state_in: Tensor) -> tuple[tuple, Tensor]:
    """((dq, db) of the correction term, dL/dS_in of this rank's own outputs [B, H, Dk, Dv])."""
    dq, db, grad_state = lp.backend.sp_correction_backward(dout, lp.inputs[0].detach(), lp.b.detach(),
                                                           lp.from_state, lp.scale, state_in)
    return (dq, db.to(lp.b.dtype)), grad_state.to(state_in.dtype)


def input_grads(lps: list[LocalPass], roots: list, grads: list, keep_graph: bool) -> list[list]:
    """Per chunk, gradients of its inputs (q, k, v, log_decay; None where not needed), in ONE autograd call:
    under activation checkpointing each call recomputes the whole block, its communication included."""
    keep = [i for i, root in enumerate(roots) if root.requires_grad]
    leaves = [t for lp in lps for t in lp.inputs if t is not None and t.requires_grad]
    if not keep or not leaves:
        return [[None] * len(lp.inputs) for lp in lps]
    found = iter(torch.autograd.grad([roots[i] for i in keep], leaves, [grads[i] for i in keep], allow_unused=True,
                                     retain_graph=keep_graph))
    return [[next(found) if t is not None and t.requires_grad else None for t in lp.inputs] for lp in lps]


def concat(per_chunk: list[list], lps: list[LocalPass]) -> list:
    """This rank's gradients of q, k, v, log_decay: its chunks' gradients concatenated along the sequence (zeros for
    a chunk that got none, None where no chunk did)."""
    out = []
    for j, parts in enumerate(zip(*per_chunk)):
        if all(p is None for p in parts):
            out.append(None)
        else:
            out.append(torch.cat([torch.zeros_like(lp.inputs[j]) if p is None else p for p, lp in zip(parts, lps)], 2))
    return out


def local_backward(lps: list[LocalPass], douts: list, states_in: list, w_nexts: list, corrections: list,
                   keep_graph: bool = False) -> list:
    """Gradients of this rank's q, k, v, log_decay from dout, the corrections' (dq, db) and each chunk's W_{c+1}
    (None: the last chunk, or not known yet; with keep_graph, state_grads adds that part later)."""
    roots, grads = [], []
    for lp, dout, state_in, w_next, (_, db_correction) in zip(lps, douts, states_in, w_nexts, corrections):
        roots += [lp.out, lp.b]
        grads += [dout.to(lp.out.dtype), db_correction]
        if w_next is not None:
            roots += [lp.state, lp.decay]
            grads += [w_next, decay_grad(lp.decay, state_in, w_next)]
    per_chunk = input_grads(lps, roots, grads, keep_graph)
    for grads_c, (dq_correction, _) in zip(per_chunk, corrections):
        if grads_c[0] is not None:
            grads_c[0] = grads_c[0] + dq_correction.to(grads_c[0].dtype)
    return concat(per_chunk, lps)


def state_grads(lps: list[LocalPass], states_in: list, w_nexts: list) -> list:
    """The part of the local backward through each chunk's M and A, given its W_{c+1} (None: no next chunk)."""
    roots, grads = [], []
    for lp, state_in, w_next in zip(lps, states_in, w_nexts):
        if w_next is not None:
            roots += [lp.state, lp.decay]
            grads += [w_next, decay_grad(lp.decay, state_in, w_next)]
    return concat(input_grads(lps, roots, grads, False), lps)


def add_grads(a: list, b: list) -> list:
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]


def overlap_backward(lp: LocalPass) -> bool:
    """Whether the local backward may run as two autograd calls around the state communication (local_backward
    without W while it is in flight, state_grads after). Not with a fused chunked backward (its kernels would run
    twice), nor under saved-tensor hooks: under activation checkpointing every autograd call recomputes the whole
    block, its communication included, so one call after the communication is both cheaper and safe. Called in
    the forward, where the hooks are visible (through torch's private _top_saved_tensors_default_hooks).
    """
    return not getattr(lp.backend, "FUSED_LINEAR_BACKWARD", False) and not hooks_active()


def hooks_active() -> bool:
    """Whether saved-tensor hooks (activation checkpointing, offload) are on (torch's private accessor)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def keep_for_backward(ctx, lps: list[LocalPass], states_in: list, inputs: tuple) -> None:
    """Keep the local passes on ctx; under saved-tensor hooks keep only the inputs (q, k, v, log_decay, segment ids)
    and the incoming states, saved through the hooks so that checkpointing frees them (offload moves them), and
    let backward recompute the local passes (local math, no communication)."""
    if hooks_active():
        ctx.save_for_backward(*inputs, *states_in)
        ctx.lps = None
    else:
        ctx.lps, ctx.states_in = lps, states_in


def take_for_backward(ctx, scale: float, chunk_size: int, backend, chunks: list) -> tuple[list[LocalPass], list]:
    """The local passes and incoming states keep_for_backward kept (recomputed from the inputs if that is all it
    kept); ctx lets go of them, so they are freed with this backward, not when the whole graph goes."""
    if ctx.lps is not None:
        lps, states_in = ctx.lps, ctx.states_in
        ctx.lps = ctx.states_in = None
        return lps, states_in
    q, k, v, log_decay, seg, *states_in = ctx.saved_tensors
    return local_passes(q, k, v, log_decay, seg, scale, chunk_size, backend, chunks), states_in


def zero_state(q: Tensor, v: Tensor) -> Tensor:
    return q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=acc_dtype(q))
