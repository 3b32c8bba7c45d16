"""Pure-PyTorch kernels: softmax attention on PyTorch's fused operators, a tile loop, chunked linear attention.

Shapes are [B, H, N, D]. Softmax attention runs PyTorch's fused attention operators with lse out and
their backward (sdpa.py) on blocks that hold only visible pairs: one block per document (varlen
style), query blocks of a window's band (each one masked block on CPU; on CUDA split into the window's
edge, the keys all its rows see, and the diagonal), and per query block the keys before it (unmasked)
apart from the diagonal block (`is_causal`). What those operators cannot express runs the tile loop
(online softmax forward, FlashAttention-2 backward, masked tiles skipped): sigmoid attention, and
float64 on CUDA. Only blocks that need one get a mask (window edges, documents sharing a block, keys
off the diagonal). The Triton kernels expose exactly these signatures.
"""
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from longtrain.kernels import sdpa

BLOCK = 256  # tile of the tile loop
WINDOW_BLOCK = 128  # query rows per block of a window band


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tile_is_masked(q_lo: int, q_hi: int, k_lo: int, k_hi: int, causal: bool, window: int | None) -> bool:
    """True when every (query, key) pair of the tile of positions [q_lo, q_hi) x [k_lo, k_hi) is masked."""
    if causal and k_lo > q_hi - 1:
        return True
    if window is not None and k_hi - 1 <= q_lo - window:
        return True
    return False


def tile_mask(q_pos: Tensor, k_pos: Tensor, causal: bool, window: int | None,
              q_seg: Tensor | None, k_seg: Tensor | None) -> Tensor | None:
    """Boolean mask of allowed pairs, broadcastable to [B, 1, nq, nk], or None."""
    mask = None
    if causal:
        mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        in_window = k_pos[None, :] > q_pos[:, None] - window
        mask = in_window if mask is None else mask & in_window
    if q_seg is not None:
        same_doc = q_seg[:, None, :, None] == k_seg[:, None, None, :]
        mask = same_doc if mask is None else mask & same_doc
    return mask


def uses_fused(q: Tensor, kind: str) -> bool:
    """Softmax attention runs PyTorch's fused operators, except float64 on CUDA (they have no such kernel)."""
    return kind == "softmax" and not (q.is_cuda and q.dtype == torch.float64)


def doc_spans(q_seg: Tensor | None, k_seg: Tensor | None, nq: int, nk: int) -> list[tuple[slice, int, int, int, int]]:
    """(batch rows, qa, qb, ka, kb): each run of one document in the queries, with that document's key span.

    Batch rows are split only where their segment ids differ.
    """
    if q_seg is None:
        return [(slice(None), 0, nq, 0, nk)]
    shared = bool((q_seg == q_seg[:1]).all() and (k_seg == k_seg[:1]).all())
    spans = []
    for rows in [slice(None)] if shared else [slice(b, b + 1) for b in range(q_seg.shape[0])]:
        key_span = {}
        for doc, ka, kb in runs(k_seg[rows][0]):
            lo, hi = key_span.get(doc, (ka, kb))
            key_span[doc] = (min(lo, ka), max(hi, kb))
        spans += [(rows, qa, qb, *key_span[doc]) for doc, qa, qb in runs(q_seg[rows][0]) if doc in key_span]
    return spans


def runs(seg: Tensor) -> list[tuple[int, int, int]]:
    """(id, start, end) of each run of equal ids in seg [N]."""
    ids, counts = torch.unique_consecutive(seg, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [(doc, end - n, end) for doc, n, end in zip(ids.tolist(), counts.tolist(), ends)]


def splits_band(device: torch.device, window: int | None) -> bool:
    """Whether a window band's query block runs as three blocks (the window's edge, keys all its rows see, the
    diagonal) or one masked block. CUDA's flash kernel skips the diagonal's masked tiles and needs no bias on
    the unmasked keys; the CPU operator computes key blocks of up to 512 in full whatever the mask, so there
    one masked call costs the same pairs without two more calls and their merges, while its mask stays small
    enough to be cached and shared by every query block (one batched call)."""
    masked = WINDOW_BLOCK * ((window or 0) + WINDOW_BLOCK)
    return device.type == "cuda" or masked > CACHED_MASK_ELEMENTS


def attention_blocks(nq: int, nk: int, q_start: int, k_start: int, causal: bool, window: int | None,
                     q_seg: Tensor | None, k_seg: Tensor | None,
                     split_band: bool) -> list[tuple[slice, int, int, int, int]]:
    """(batch rows, qa, qb, ka, kb) blocks covering every visible pair: per document, per query block of a
    window band; each query block's keys split into the window's edge, keys all its rows see, and the diagonal
    (a window band's only with split_band)."""
    if nq == 0 or nk == 0:
        return []
    step = nq if window is None else WINDOW_BLOCK
    split = window is None or split_band
    blocks = []
    for rows, qa0, qb0, ka0, kb0 in doc_spans(q_seg, k_seg, nq, nk):
        for qa in range(qa0, qb0, step):
            qb = min(qa + step, qb0)
            ka = ka0 if window is None else max(ka0, q_start + qa - window + 1 - k_start)
            kb = min(kb0, q_start + qb - k_start) if causal else kb0
            seen_by_all = ka if window is None else q_start + qb - window - k_start
            diagonal = q_start + qa - k_start if causal else kb
            cuts = [ka] + sorted(min(max(c, ka), kb) for c in (seen_by_all, diagonal) if split) + [kb]
            blocks += [(rows, qa, qb, a, b) for a, b in zip(cuts, cuts[1:]) if a < b]
    return blocks


def block_mask(rows: slice, qa: int, qb: int, ka: int, kb: int, q_start: int, k_start: int, causal: bool,
               window: int | None, q_seg: Tensor | None, k_seg: Tensor | None, device) -> tuple[Tensor | None, bool]:
    """(mask [B|1, 1, nq, nk] or None, is_causal): the cheapest exact form of one block's mask."""
    qs = None if q_seg is None else q_seg[rows, qa:qb]
    ks = None if k_seg is None else k_seg[rows, ka:kb]
    one_doc = qs is None or bool((qs == qs[:, :1]).all() and (ks == qs[:, :1]).all())
    qp, kp = q_start + qa, k_start + ka
    if one_doc and (window is None or kp > qp + (qb - qa) - 1 - window):
        if not causal or kp + (kb - ka) - 1 <= qp:
            return None, False
        if qp == kp and qb - qa == kb - ka:
            return None, True
    small = (qb - qa) * (kb - ka) <= CACHED_MASK_ELEMENTS  # equal small blocks share one mask; large ones are built
    mask = (cached_position_mask if small else position_mask)(qp - kp, qb - qa, kb - ka, causal, window, device)
    if qs is not None:
        mask = mask & (qs[:, None, :, None] == ks[:, None, None, :])
    return mask, False


CACHED_MASK_ELEMENTS = 1 << 22  # 4 MB of bool per cached mask at most: 64 of them stay well under a GPU's memory


def position_mask(offset: int, nq: int, nk: int, causal: bool, window: int | None, device) -> Tensor:
    """[1, 1, nq, nk] causal/window mask of queries at offset + i against keys at j."""
    mask = tile_mask(torch.arange(offset, offset + nq, device=device), torch.arange(nk, device=device), causal,
                     window, None, None)
    return torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device) if mask is None else mask[None, None]


cached_position_mask = functools.lru_cache(maxsize=64)(position_mask)


def block_groups(q: Tensor, k: Tensor, q_start: int, k_start: int, causal: bool, window: int | None,
                 q_seg: Tensor | None, k_seg: Tensor | None) -> list[tuple[Tensor | None, bool, list]]:
    """(mask, is_causal, blocks): blocks of one shape and one mask, to run as one batched operator call
    (equal documents, a window band's blocks): fewer calls hold up best when other processes share the cores."""
    groups = {}
    for rows, qa, qb, ka, kb in attention_blocks(q.shape[2], k.shape[2], q_start, k_start, causal, window, q_seg,
                                                 k_seg, splits_band(q.device, window)):
        mask, is_causal = block_mask(rows, qa, qb, ka, kb, q_start, k_start, causal, window, q_seg, k_seg, q.device)
        key = (qb - qa, kb - ka, is_causal, id(mask))  # position masks are cached: equal blocks share one
        groups.setdefault(key, (mask, is_causal, []))[2].append((rows, qa, qb, ka, kb))
    return [group for group in groups.values() if group[0] is None or group[0].any()]


def queries_disjoint(groups: list) -> bool:
    """True when no query row is in two blocks: each group's result is final, no merge needed."""
    blocks = [(block[0].start, block[1]) for _, _, group in groups for block in group]
    return len(set(blocks)) == len(blocks)


def stack(x: Tensor, group: list, lo: int) -> Tensor:
    """x[rows, :, lo:hi] of every block of the group (lo, hi: its query or key range) along the batch dim.

    Evenly spaced blocks of a one-row batch (equal documents, a window band) are a strided view, not a copy.
    """
    parts = [x[block[0], :, block[lo]:block[lo + 1]] for block in group]
    starts = [block[lo] for block in group]
    steps = {b - a for a, b in zip(starts, starts[1:])}
    evenly_spaced = len(steps) == 1 and min(steps) >= 0
    if evenly_spaced and x.shape[0] == 1 and all(b[0] == slice(None) for b in group):
        shape, stride = (len(parts), *parts[0].shape[1:]), (steps.pop() * x.stride(2), *x.stride()[1:])
        return x.as_strided(shape, stride, x.storage_offset() + starts[0] * x.stride(2))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def flat_index(group: list, lo: int, n: int, batch: int, device) -> Tensor:
    """Row indices b * n + i of the group's queries (lo=1) or keys (lo=3), in the order stack puts them."""
    starts = [b * n + block[lo] for block in group for b in range(batch)[block[0]]]
    size = group[0][lo + 1] - group[0][lo]
    return (torch.tensor(starts, device=device)[:, None] + torch.arange(size, device=device)).flatten()


def flat(x: Tensor) -> Tensor:
    """[G, H, n, ...] -> [G * n, H, ...], rows in flat_index order."""
    return x.transpose(1, 2).flatten(0, 1)


def fused_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in the compute dtype with Hq heads each (GQA repeated) and one head dim (zero-padded)."""
    dt = q.dtype if q.is_cuda else acc_dtype(q)
    G, width = q.shape[1] // k.shape[1], max(q.shape[-1], v.shape[-1])
    if q.is_cuda:
        width = -(-width // 8) * 8  # CUDA's fused kernels take head dims in multiples of 8
    k, v = (x.repeat_interleave(G, 1) if G > 1 else x for x in (k, v))
    return tuple(pad_head(x.to(dt), width) for x in (q, k, v))


def pad_head(x: Tensor, width: int) -> Tensor:
    """x zero-padded along its last dim to `width` (no copy when it already has it)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True,
                      window: int | None = None, q_seg: Tensor | None = None, k_seg: Tensor | None = None,
                      q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                      sigmoid_bias: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """Attention forward. Returns (out [B, Hq, Nq, Dv] in acc dtype, lse [B, Hq, Nq] or None).

    kind="softmax": lse = logsumexp of the scaled scores (-inf, out 0 for rows that see no key).
    kind="sigmoid": out = sum_j sigmoid(s_ij + sigmoid_bias) v_j over allowed j; no lse.
    """
    if not uses_fused(q, kind):
        return tile_forward(q, k, v, scale=scale, causal=causal, window=window, q_seg=q_seg, k_seg=k_seg,
                            q_start=q_start, k_start=k_start, kind=kind, sigmoid_bias=sigmoid_bias)
    B, Hq, Nq, _ = q.shape
    Dv, dt = v.shape[-1], acc_dtype(q)
    qx, kx, vx = fused_inputs(q, k, v)
    out = q.new_zeros(B * Nq, Hq, qx.shape[-1], dtype=dt)  # rows b * Nq + i: one index op per group
    lse = q.new_full((B * Nq, Hq), -math.inf, dtype=dt)
    groups = block_groups(q, k, q_start, k_start, causal, window, q_seg, k_seg)
    merge = not queries_disjoint(groups)
    for mask, is_causal, group in groups:
        o_grp, lse_grp = sdpa.forward(stack(qx, group, 1), stack(kx, group, 3), stack(vx, group, 3), mask,
                                      is_causal, scale)
        o_grp, lse_grp = o_grp.to(dt), lse_grp.to(dt)
        seen = None if mask is None else mask.any(-1)
        # rows that see no key in this block: out 0, lse -inf (on CUDA unconditionally: asking would sync)
        if seen is not None and (q.is_cuda or not seen.all()):
            o_grp, lse_grp = o_grp.masked_fill(~seen[..., None], 0.0), lse_grp.masked_fill(~seen, -math.inf)
        idx = flat_index(group, 1, Nq, B, q.device)  # rows are unique within a group
        o_grp, lse_grp = flat(o_grp), flat(lse_grp)
        if merge:
            o_grp, lse_grp = merge_partials(out[idx], lse[idx], o_grp, lse_grp)  # exact on empty rows
        out.index_copy_(0, idx, o_grp)
        lse.index_copy_(0, idx, lse_grp)
    return out.view(B, Nq, Hq, -1).transpose(1, 2)[..., :Dv], lse.view(B, Nq, Hq).transpose(1, 2)


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None, lse: Tensor | None, *,
                       scale: float, causal: bool = True, window: int | None = None, q_seg: Tensor | None = None,
                       k_seg: Tensor | None = None, q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                       sigmoid_bias: float = 0.0, delta: Tensor | None = None,
                       dlse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward (FlashAttention-2: recompute P from lse, delta = rowsum(dO * O) - dlse).

    For a ring block, `out`/`lse`/`delta` are the merged (global) values. Returns dq, dk, dv in acc dtype.
    """
    if not uses_fused(q, kind):
        return tile_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, window=window, q_seg=q_seg,
                             k_seg=k_seg, q_start=q_start, k_start=k_start, kind=kind, sigmoid_bias=sigmoid_bias,
                             delta=delta, dlse=dlse)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv, dt = k.shape[1], k.shape[2], v.shape[-1], acc_dtype(q)
    qx, kx, vx = fused_inputs(q, k, v)
    dox = pad_head(dout.to(qx.dtype), qx.shape[-1])
    if out is None or delta is not None or dlse is not None:
        qx, kx, vx, dox, outx = fold_delta(qx, kx, vx, dox, out, delta, dlse)
    else:
        outx = pad_head(out.to(qx.dtype), qx.shape[-1])
    lse = torch.where(torch.isneginf(lse), math.inf, lse).to(dt)  # rows that see no key: P = 0
    W = qx.shape[-1]
    dq, dk, dv = (q.new_zeros(B * n, Hq, W, dtype=dt) for n in (Nq, Nk, Nk))  # rows b * n + i
    for mask, is_causal, group in block_groups(q, k, q_start, k_start, causal, window, q_seg, k_seg):
        grads = sdpa.backward(stack(dox, group, 1), stack(qx, group, 1), stack(kx, group, 3), stack(vx, group, 3),
                              stack(outx, group, 1), stack(lse, group, 1).contiguous(), mask, is_causal, scale)
        k_idx = flat_index(group, 3, Nk, B, q.device)  # keys repeat across blocks: index_add sums them
        dq.index_add_(0, flat_index(group, 1, Nq, B, q.device), flat(grads[0]).to(dt))
        dk.index_add_(0, k_idx, flat(grads[1]).to(dt))
        dv.index_add_(0, k_idx, flat(grads[2]).to(dt))
    dq = dq.view(B, Nq, Hq, W).transpose(1, 2)
    if Hq > Hkv:  # GQA: sum the repeated heads' gradients
        dk, dv = (x.view(B * Nk, Hkv, Hq // Hkv, W).sum(2) for x in (dk, dv))
    dk, dv = (x.view(B, Nk, Hkv, W).transpose(1, 2) for x in (dk, dv))
    return dq[..., :D], dk[..., :D], dv[..., :Dv]


def fold_delta(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, out: Tensor | None, delta: Tensor | None,
               dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Inputs whose fused backward uses a given delta (minus dlse) in place of rowsum(dO * O).

    More head-dim columns (padded to a multiple of 8): 0 in q and k, 1 in v, -delta in dO, and O = 0, so
    dP = dO V^T - delta while rowsum(dO * O) = 0; dq, dk, dv keep their first columns. In bf16/fp16 delta
    takes two columns, its rounding and the rest, so dP - delta keeps float32's precision where dP ~ delta.
    """
    if delta is None:  # in float32 at least: out may come in bf16 (saved as returned), as FlashAttention-2 keeps it
        delta = (dout[..., :out.shape[-1]].to(acc_dtype(out)) * out.to(acc_dtype(out))).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype)
    width, parts = q.shape[-1], 2 if dout.element_size() < 4 else 1
    pad = (0, -(-(width + parts) // 8) * 8 - width)
    q, k, v, dout = (F.pad(x, pad) for x in (q, k, v, dout))
    v[..., width:width + parts] = 1.0
    head = delta.to(dout.dtype)
    dout[..., width] = -head
    if parts == 2:
        dout[..., width + 1] = -(delta - head.to(delta.dtype)).to(dout.dtype)
    return q, k, v, dout, torch.zeros_like(dout)


def key_tiles(q_tile: Tensor, k: Tensor, v: Tensor, qa: int, qb: int, scale: float, causal: bool,
              window: int | None, q_seg: Tensor | None, k_seg: Tensor | None, q_start: int, k_start: int):
    """(ka, kb, v_tile, scaled scores [B, Hkv, G, nq, nk], mask) of every key tile query rows [qa, qb) can see."""
    q_pos = torch.arange(q_start + qa, q_start + qb, device=q_tile.device)
    for ka in range(0, k.shape[2], BLOCK):
        kb = min(ka + BLOCK, k.shape[2])
        if tile_is_masked(q_start + qa, q_start + qb, k_start + ka, k_start + kb, causal, window):
            continue
        scores = q_tile @ k[:, :, None, ka:kb].to(q_tile.dtype).transpose(-1, -2) * scale
        mask = tile_mask(q_pos, torch.arange(k_start + ka, k_start + kb, device=q_tile.device), causal, window,
                         None if q_seg is None else q_seg[:, qa:qb], None if k_seg is None else k_seg[:, ka:kb])
        mask = mask[:, None] if mask is not None and mask.dim() == 4 else mask  # [B, 1, 1, nq, nk]: GQA layout
        yield ka, kb, v[:, :, None, ka:kb].to(q_tile.dtype), scores, mask


def tile_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = True,
                      window: int | None = None, q_seg: Tensor | None = None, k_seg: Tensor | None = None,
                      q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                      sigmoid_bias: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """attention_forward as a tile loop: online softmax, or sigmoid attention."""
    B, Hq, Nq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    dt = acc_dtype(q)
    out = q.new_zeros(B, Hkv, G, Nq, Dv, dtype=dt)
    lse = q.new_full((B, Hkv, G, Nq), -math.inf, dtype=dt) if kind == "softmax" else None
    qg = q.view(B, Hkv, G, Nq, D)
    for qa in range(0, Nq, BLOCK):
        qb = min(qa + BLOCK, Nq)
        q_tile = qg[:, :, :, qa:qb].to(dt)  # [B, Hkv, G, nq, D]
        m = q_tile.new_full(q_tile.shape[:-1], -math.inf)
        row_sum = q_tile.new_zeros(q_tile.shape[:-1])
        acc = q_tile.new_zeros(*q_tile.shape[:-1], Dv)
        for ka, kb, v_tile, s, mask in key_tiles(q_tile, k, v, qa, qb, scale, causal, window, q_seg, k_seg,
                                                 q_start, k_start):
            if kind == "sigmoid":
                p = torch.sigmoid(s + sigmoid_bias)
                if mask is not None:
                    p = p.masked_fill(~mask, 0.0)
                acc = acc + p @ v_tile
                continue
            if mask is not None:
                s = s.masked_fill(~mask, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            row_sum = row_sum * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v_tile
            m = m_new
        if kind == "sigmoid":
            out[:, :, :, qa:qb] = acc
            continue
        out[:, :, :, qa:qb] = torch.where(row_sum[..., None] > 0, acc / row_sum.clamp_min(1e-30)[..., None], 0.0)
        lse[:, :, :, qa:qb] = m + torch.log(row_sum)
    out = out.view(B, Hq, Nq, Dv)
    return out, (None if lse is None else lse.view(B, Hq, Nq))


def tile_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None, lse: Tensor | None, *,
                       scale: float, causal: bool = True, window: int | None = None, q_seg: Tensor | None = None,
                       k_seg: Tensor | None = None, q_start: int = 0, k_start: int = 0, kind: str = "softmax",
                       sigmoid_bias: float = 0.0, delta: Tensor | None = None,
                       dlse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """attention_backward as a tile loop (FlashAttention-2: recompute P from lse, delta = rowsum(dO * O))."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    dt = acc_dtype(q)
    dq = q.new_zeros(B, Hkv, G, Nq, D, dtype=dt)
    dk = q.new_zeros(B, Hkv, Nk, D, dtype=dt)
    dv = q.new_zeros(B, Hkv, Nk, Dv, dtype=dt)
    qg = q.view(B, Hkv, G, Nq, D)
    dog = dout.view(B, Hkv, G, Nq, Dv)
    if kind == "softmax":
        if delta is None:
            delta = (dout.to(dt) * out.to(dt)).sum(-1)
        delta = delta.to(dt).view(B, Hkv, G, Nq)
        if dlse is not None:
            delta = delta - dlse.to(dt).view(B, Hkv, G, Nq)
        lse = lse.to(dt).view(B, Hkv, G, Nq)
        lse = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse)
    for qa in range(0, Nq, BLOCK):
        qb = min(qa + BLOCK, Nq)
        q_tile = qg[:, :, :, qa:qb].to(dt)
        do_tile = dog[:, :, :, qa:qb].to(dt)
        for ka, kb, v_tile, s, mask in key_tiles(q_tile, k, v, qa, qb, scale, causal, window, q_seg, k_seg,
                                                 q_start, k_start):
            k_tile = k[:, :, None, ka:kb].to(dt)
            dp = do_tile @ v_tile.transpose(-1, -2)
            if kind == "sigmoid":
                p = torch.sigmoid(s + sigmoid_bias)
                ds = dp * p * (1 - p)
                if mask is not None:
                    p = p.masked_fill(~mask, 0.0)
                    ds = ds.masked_fill(~mask, 0.0)
            else:
                if mask is not None:
                    s = s.masked_fill(~mask, -math.inf)
                p = torch.exp(s - lse[:, :, :, qa:qb, None])
                ds = p * (dp - delta[:, :, :, qa:qb, None])
            dv[:, :, ka:kb] += (p.transpose(-1, -2) @ do_tile).sum(2)
            dq[:, :, :, qa:qb] += ds @ k_tile * scale
            dk[:, :, ka:kb] += (ds.transpose(-1, -2) @ q_tile).sum(2) * scale
    return dq.view(B, Hq, Nq, D), dk, dv


def merge_partials(out: Tensor, lse: Tensor, out_blk: Tensor, lse_blk: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two softmax partials over disjoint key sets, overflow-safe and NaN-free for empty rows.

    out -= sigmoid(lse_blk - lse) * (out - out_blk); lse = logaddexp(lse, lse_blk).
    """
    diff = torch.where(torch.isneginf(lse_blk), lse_blk, lse_blk - lse)
    weight = torch.sigmoid(diff)[..., None]
    return out - weight * (out - out_blk), torch.logaddexp(lse, lse_blk)


def resets_from_segments(segment_ids: Tensor | None, n: int, device) -> Tensor | None:
    """Document starts inside this call: reset[t] = seg[t] != seg[t-1] for t > 0 (token 0 never resets)."""
    if segment_ids is None:
        return None
    reset = torch.zeros(segment_ids.shape[0], n, dtype=torch.bool, device=device)
    reset[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return reset


def decay_shape(log_decay: Tensor | None, q: Tensor) -> Tensor:
    """log_decay as [B, H, N, Dk or 1] in acc dtype (zeros when None)."""
    B, H, N, _ = q.shape
    if log_decay is None:
        return q.new_zeros(B, H, N, 1, dtype=acc_dtype(q))
    g = log_decay.to(acc_dtype(q))
    return g[..., None] if g.dim() == 3 else g


def chunk_inputs(x: Tensor, C: int) -> Tensor:
    """Zero-pad [B, H, N, D] along N to a multiple of C and view it as [B, H, N/C, C, D]."""
    B, H, N, D = x.shape
    pad = (-N) % C
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(B, H, (N + pad) // C, C, D)


def chunk_resets(segment_ids: Tensor | None, n: int, C: int, device) -> Tensor | None:
    """Per chunk, the number of document starts seen so far inside the chunk (inclusive), [B, 1, nc, C]."""
    reset = resets_from_segments(segment_ids, n, device)
    if reset is None:
        return None
    reset = torch.nn.functional.pad(reset, (0, (-n) % C))
    return reset.view(reset.shape[0], 1, -1, C).long().cumsum(-1)


def chunk_states(ks: Tensor, vs: Tensor, b: Tensor, resets: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each chunk's own final state [B, H, nc, Dk, Dv] and its carry decay [B, H, nc, Dk|1, 1]."""
    b_last = b[:, :, :, -1:]
    to_state, carry = 1.0, 1.0
    if resets is not None:
        to_state = (resets == resets[..., -1:])[..., None].to(b.dtype)  # token in the chunk's last document
        carry = (resets[..., -1] == 0)[..., None].to(b.dtype)  # no document start inside the chunk
    state = (ks * torch.exp(b_last - b) * to_state).transpose(-1, -2) @ vs
    return state, (torch.exp(b_last[:, :, :, 0]) * carry)[..., None]


def scan_states(chunk_state: Tensor, chunk_decay: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """Sequential inter-chunk recurrence; returns (state entering each chunk [B, H, nc, Dk, Dv], final)."""
    state, entering = initial, []
    for decay, own in zip(chunk_decay.unbind(2), chunk_state.unbind(2)):  # unbind: one backward op, not one per chunk
        entering.append(state)
        state = decay * state + own
    return torch.stack(entering, 2), state


def channel_decay_intra(q: Tensor, k: Tensor, v: Tensor, b: Tensor, resets: Tensor | None) -> Tensor:
    """Inside each chunk, o_t = sum_{s <= t, same document} (q_t . (k_s exp(b_t - b_s))) v_s, [B, H, nc, C, Dv].

    Secondary chunking (flash-linear-attention's chunk_gla), applied level by level: blocks of 2L tokens
    pair their second half (queries) with their first half (keys) through the decay factored at r, the
    last key of the first half, exp(b_t - b_r) exp(b_r - b_s): both exponents <= 0, so any decay stays
    finite and each level is two matmuls. Only s = t takes the elementwise form (q_t . k_t). C is 2^n.
    """
    *lead, C, Dk = q.shape
    out = (q * k).sum(-1, keepdim=True) * v  # s = t
    L = 1
    while L < C:
        q2, k2, v2, b2 = (x.view(*lead, C // (2 * L), 2, L, x.shape[-1]) for x in (q, k, v, b))
        b_r = b2[..., 0, -1:, :]  # [B, H, nc, blocks, 1, Dk]
        q_dec = q2[..., 1, :, :] * torch.exp(b2[..., 1, :, :] - b_r)
        k_dec = k2[..., 0, :, :] * torch.exp(b_r - b2[..., 0, :, :])
        scores = q_dec @ k_dec.transpose(-1, -2)  # [B, H, nc, blocks, L, L]: second half x first half
        if resets is not None:
            r2 = resets.view(*resets.shape[:3], C // (2 * L), 2, L)
            scores = scores * (r2[..., 1, :, None] == r2[..., 0, None, :])  # no document start in (s, t]
        o2 = scores @ v2[..., 0, :, :]
        out = out + torch.stack([torch.zeros_like(o2), o2], -3).view_as(out)
        L *= 2
    return out


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, *, scale: float, log_decay: Tensor | None = None,
                             initial_state: Tensor | None = None, output_final_state: bool = False,
                             segment_ids: Tensor | None = None, chunk_size: int = 64,
                             on_final_state: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Chunked linear attention: quadratic inside a chunk, state passing between chunks.

    Every exponent is a cumulative decay difference that is <= 0, so strong decay underflows to 0
    instead of overflowing. Differentiable through torch autograd; O(N) time and memory. chunk_size is
    rounded up to a power of two (per-channel decay halves chunks, channel_decay_intra).
    on_final_state(final.detach()) runs once the final state exists, before the output products (SP
    algorithms start their communication there).
    """
    B, H, N, Dk = q.shape
    dt = acc_dtype(q)
    C = 1 << (chunk_size - 1).bit_length()  # chunk_size rounded up to a power of two
    qs, ks, vs = chunk_inputs(q.to(dt) * scale, C), chunk_inputs(k.to(dt), C), chunk_inputs(v.to(dt), C)
    b = chunk_inputs(decay_shape(log_decay, q), C).cumsum(3)  # cumulative log decay in each chunk
    resets = chunk_resets(segment_ids, N, C, q.device)
    from_state = 1.0 if resets is None else (resets == 0)[..., None].to(dt)  # token continues the incoming state
    chunk_state, chunk_decay = chunk_states(ks, vs, b, resets)
    initial = q.new_zeros(B, H, Dk, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    entering, final = scan_states(chunk_state, chunk_decay, initial)
    if on_final_state is not None:
        on_final_state(final.detach())
    if b.shape[-1] == 1:  # scalar decay: one [C, C] decay matrix per chunk
        pair_ok = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        if resets is not None:
            pair_ok = pair_ok & (resets[..., :, None] == resets[..., None, :])  # no document start in (s, t]
        gap = b[..., :, None, 0] - b[..., None, :, 0]  # [B, H, nc, C, C], <= 0 where t >= s
        intra = (qs @ ks.transpose(-1, -2)) * torch.exp(torch.where(pair_ok, gap, -math.inf)) @ vs
    else:
        intra = channel_decay_intra(qs, ks, vs, b, resets)
    out = intra + (qs * torch.exp(b) * from_state) @ entering
    out = out.view(B, H, -1, v.shape[-1])[:, :, :N].to(q.dtype)
    return out, (final if output_final_state else None)


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, *, scale: float, log_decay: Tensor | None = None,
                               initial_state: Tensor | None = None, output_final_state: bool = False,
                               segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Token-by-token recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t. Tests only."""
    B, H, N, Dk = q.shape
    dt = acc_dtype(q)
    g = decay_shape(log_decay, q)
    reset = resets_from_segments(segment_ids, N, q.device)
    state = q.new_zeros(B, H, Dk, v.shape[-1], dtype=dt) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(N):
        keep = torch.exp(g[:, :, t])[..., None]  # [B, H, Dk|1, 1]
        if reset is not None:
            keep = keep * (~reset[:, t]).to(dt)[:, None, None, None]
        state = keep * state + k[:, :, t, :, None].to(dt) * v[:, :, t, None, :].to(dt)
        outs.append(scale * (q[:, :, t, None, :].to(dt) @ state)[:, :, 0])
    out = torch.stack(outs, 2).to(q.dtype)
    return out, (state if output_final_state else None)


def state_combine(decay: Tensor, state_in: Tensor, state: Tensor) -> Tensor:
    """The SP state combine diag(A) S_in + M: decay [B, H, Dk|1] scales the rows of [B, H, Dk, Dv]."""
    return decay[..., None] * state_in + state


def sp_correction(out: Tensor, q: Tensor, b: Tensor, from_state: Tensor | None, scale: float,
                  state: Tensor) -> Tensor:
    """out + (scale q exp(b) [no document start yet]) @ state; b [B, H, N, Dk|1] is the slice's cumulative decay."""
    q_decayed = q.to(b.dtype) * scale * torch.exp(b)
    if from_state is not None:
        q_decayed = q_decayed * from_state[:, None, :, None]
    return out + q_decayed @ state


def sp_correction_backward(dout: Tensor, q: Tensor, b: Tensor, from_state: Tensor | None, scale: float,
                           state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sp_correction: (dq, db [like b], dstate)."""
    weight = scale * torch.exp(b)
    if from_state is not None:
        weight = weight * from_state[:, None, :, None]
    q_decayed = q.to(b.dtype) * weight
    dout = dout.to(b.dtype)
    dq_decayed = dout @ state.transpose(-1, -2)
    db = q_decayed * dq_decayed
    return dq_decayed * weight, (db.sum(-1, keepdim=True) if b.shape[-1] == 1 else db), \
        q_decayed.transpose(-1, -2) @ dout
