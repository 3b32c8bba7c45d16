"""Closed-form time, communication and memory of the SP algorithms, per attention op and per training step.

Notation: B sequences of N tokens per micro-batch, P ranks in the SP group, n = N / P local tokens, H query and
Hkv key/value heads of dimension D (linear: Dk, Dv), C the linear chunk, e bytes per activation element,
4 bytes per state / lse / gradient accumulator element (they are float32), t(x) = alpha + x / beta the time of
one message of x bytes on the level's link (hardware.py), F_* achieved FLOP/s.

Compute (forward FLOPs of one op on one rank):
  softmax  4 D H B pairs / P x imbalance      pairs: causal N(N+1)/2; window w: sum_i min(i+1, w); documents
                                              sum_d L_d(L_d+1)/2 (per sequence); imbalance (2P-1)/P for a
                                              causal mask on the contiguous layout (the last rank's share), else 1
           backward 2.5x (recomputed scores and probabilities, dS, dQ, dK, dV)
  linear   B n H (2 C Dk + 2 C Dv + 4 Dk Dv)    intra-chunk scores q k^T and their values, state readout q S and
                                              update k^T v; backward 2x
Communication per op and rank (bytes sent; forward / backward) and its time:
  ring       (P-1) x 2 B Hkv n D e  /  the same plus P hops of dK, dV in fp32
             each hop runs beside one step's compute: T = c_0 + sum_{i>0} max(c_i + m, t(hop)) [+ the last dK/dV
             hop]; m merges the step's partial (out, lse) in fp32: 4 passes over B n H (D+1) floats; the work
             spreads over the busiest rank's steps with work (a window or packed documents leave the others
             the hop alone)
  allgather  (P-1) x 2 B Hkv n D e  /  the same again (re-gathered) plus (P-1) x 2 B Hkv n D 4 reduce-scattered
             not overlapped: T = c + (P-1) t(shard)
  ulysses    (P-1)/P x B n (2 H + 2 Hkv) D e each way (q, k, v in, the output back; mirrored in backward)
             not overlapped: T = c(H/P heads, full N) + 4 t_a2a
  usp        ulysses inside groups of U, then ring over P/U ranks with H/U heads
  lasp1      hops x B H Dk Dv 4, a serial chain (hops = P-1 contiguous, 2(P-1) zigzag): T = c + sum t(state)
  lasp2      (P-1) x chunks x B H (Dk Dv + Dk|1) 4 all-gathered / (P-1) x chunks x B H Dk Dv 4; forward
             overlapped with the intra-chunk products: T = c + max(0, t_ag - c_intra); backward see below
  zeco       as lasp1 in K blocks forwarded on arrival: t_scan = sum_h t_h(S/K) + (K-1) max_h t_h(S/K),
             forward overlapped as lasp2's: T = c + max(0, t_scan - c_intra); backward see below
             Backward of both: with a fused chunked backward (Triton, the GPU default) the exchange comes first,
             T = c + t; otherwise (the torch path) it runs beside the local backward through the outputs and the
             gradients through M and A follow in a second autograd call, which revisits the state's share s of
             the backward (s = 2 Dk Dv / (2 C Dk + 2 C Dv + 4 Dk Dv)): T = c (1 + s) + max(0, t - c (1 - s))
Every op adds its fixed software cost: steps x the profile's step_overhead of the algorithm (host work, calls,
launches; measured by `longtrain calibrate`), steps = the ring's steps with work for ring (of P) and usp (of P/U),
hops for lasp1/zeco, else 1.
A message crosses nodes when the SP group spans nodes (ranks of a group are consecutive): a ring then runs at the
inter-node speed; a chain pays inter-node time only on the hops that cross a node boundary.

A training step (step_cost) adds the GEMMs (2 x weights FLOPs per token forward, 2x that backward, at
F_matmul), elementwise work (24 d e bytes per token and layer forward, 2x backward, at the memory bandwidth),
the recompute of activation checkpointing (block: the whole forward again, SP communication included; mixer:
the mixers' forward), the head and loss, FSDP2's parameter all-gathers (bf16, forward and backward) and
gradient reduce-scatter (fp32) over all dp x sp ranks, overlapped with compute (only the excess is exposed),
and the AdamW update (memory-bound). Memory per GPU is trainer.memory_model.step_memory plus the transient
SP buffers (memory_model.sp_transient_bytes).
"""
import bisect
import itertools
import math
from dataclasses import dataclass, field, replace

from longtrain.attention import LINEAR_FAMILY
from longtrain.parallel.sharding import chunk_ids, num_chunks
from longtrain.parallel.zeco import num_blocks
from longtrain.plan.hardware import Hardware, Link
from longtrain.trainer.memory_model import PER_CHANNEL_DECAY, meta_model, sp_transient_bytes, step_memory
from longtrain.trainer.model import LM

STATE_ELEM = 4  # float32 states, lse and gradient accumulators
SEG_ELEM = 8  # int64 segment ids travel with K/V when documents are packed


@dataclass
class Mask:
    """The attention mask of one sequence: causal, a causal window, or causal within packed documents."""
    kind: str = "causal"  # causal | window | documents
    window: int | None = None
    doc_lengths: list[int] | None = None  # documents: their lengths, summing to N

    def pairs(self, N: int) -> float:
        """Visible (query, key) pairs of one sequence of N tokens."""
        if self.kind == "window":
            w = min(self.window, N)
            return w * (w + 1) / 2 + (N - w) * w
        if self.kind == "documents":
            return sum(L * (L + 1) / 2 for L in self.doc_lengths)
        return N * (N + 1) / 2


@dataclass
class OpShape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int | None = None  # linear: Dv (Dk = head_dim); None: head_dim
    chunk: int = 64
    per_channel_decay: bool = True  # linear: decay [B, H, Dk] (GLA) rather than [B, H, 1]
    elem: int = 2  # bytes per activation element
    state_elem: int = STATE_ELEM  # bytes per state element sent by the linear algorithms (longtrain: float32)

    @property
    def dv(self) -> int:
        return self.value_dim or self.head_dim


@dataclass
class OpCost:
    """One attention op on one rank: seconds (communication included, overlap applied), bytes sent, compute."""
    fwd_s: float
    bwd_s: float
    fwd_bytes: float
    bwd_bytes: float
    fwd_compute_s: float
    bwd_compute_s: float
    fwd_comm_s: float  # communication time if nothing overlapped
    bwd_comm_s: float


def imbalance(mask: Mask, layout: str, P: int) -> float:
    """The busiest rank's causal work over the mean: contiguous causal shards give the last rank (2P-1)/P."""
    return (2 * P - 1) / P if layout == "contiguous" and mask.kind == "causal" and P > 1 else 1.0


def inter_node(P: int, hw: Hardware) -> bool:
    return P > hw.gpus_per_node


def chain_links(hops: int, P: int, hw: Hardware, layout: str) -> list[Link]:
    """The link of each hop of a rank chain (0 -> 1 -> ... and, zigzag, back): inter-node where it crosses nodes."""
    ranks = list(range(P)) + (list(range(P - 1, -1, -1)) if layout == "zigzag" else [])
    pairs = [(a, b) for a, b in zip(ranks, ranks[1:]) if a != b][:hops]
    return [hw.link("p2p", a // hw.gpus_per_node != b // hw.gpus_per_node) for a, b in pairs]


ATTENTION_BWD_RATIO = 2.5  # backward over forward FLOPs: recomputed scores, dV, dP, dQ, dK (5 matmuls vs 2)


def attention_flop_count(shape: OpShape, pairs: float) -> float:
    """Forward FLOPs of softmax attention over `pairs` visible (query, key) pairs per sequence: q k^T and P V."""
    return 4 * shape.head_dim * shape.heads * shape.batch * pairs


def linear_flop_count(shape: OpShape, tokens: float) -> tuple[float, float]:
    """Forward FLOPs of chunked linear attention over `tokens` (tokens times heads): (intra-chunk, through the
    state). The backward does twice the sum."""
    dk, dv, C = shape.head_dim, shape.dv, shape.chunk
    intra = tokens * (2 * C * dk + 2 * C * dv)  # scores q k^T of the chunk and their values (causal half kept)
    inter = tokens * 4 * dk * dv  # readout q S and update k^T v
    return intra, inter


def softmax_compute(shape: OpShape, P: int, mask: Mask, layout: str, hw: Hardware, block: float) -> tuple[float, float]:
    """(forward, backward) seconds of one rank's attention FLOPs, at the kernels' speed for `block`-token blocks."""
    flops = attention_flop_count(shape, mask.pairs(shape.seq) / P * imbalance(mask, layout, P))
    if mask.kind == "documents":
        block = min(block, sum(mask.doc_lengths) / len(mask.doc_lengths))
    return flops / hw.attention_flops(block, False), ATTENTION_BWD_RATIO * flops / hw.attention_flops(block, True)


def ring_cost(shape: OpShape, P: int, mask: Mask, layout: str, hw: Hardware, spans_nodes: bool | None = None
              ) -> OpCost:
    n = shape.seq / P
    kv = 2 * shape.batch * shape.kv_heads * n * shape.head_dim
    seg = shape.batch * n * SEG_ELEM if mask.kind == "documents" else 0
    hop_bytes = kv * shape.elem + seg
    grad_bytes = kv * STATE_ELEM
    link = hw.link("p2p", inter_node(P, hw) if spans_nodes is None else spans_nodes)
    c_fwd, c_bwd = softmax_compute(shape, P, mask, layout, hw, n)
    steps = ring_steps_with_work(mask, P, layout, shape.seq)
    merge = 4 * shape.batch * n * shape.heads * (shape.head_dim + 1) * STATE_ELEM / hw.memory_bandwidth
    fwd = bwd = 0.0
    for i in range(P):
        share = 1 / steps if i < steps else 0.0
        hop = link.time(hop_bytes) if i > 0 else 0.0
        fwd += max(c_fwd * share + (merge if 0 < i < steps else 0.0), hop)
        bwd += max(c_bwd * share, hop + (link.time(grad_bytes) if i > 0 else 0.0))
    bwd += link.time(grad_bytes) if P > 1 else 0.0  # the last dK/dV hop home
    return OpCost(fwd, bwd, (P - 1) * hop_bytes, (P - 1) * hop_bytes + (P if P > 1 else 0) * grad_bytes, c_fwd,
                  c_bwd, (P - 1) * link.time(hop_bytes),
                  (P - 1) * link.time(hop_bytes) + P * link.time(grad_bytes) if P > 1 else 0.0)


def ring_steps_with_work(mask: Mask, P: int, layout: str, N: int) -> int:
    """Ring steps that carry attention work on the busiest rank: all of them, but a window reaches only the
    nearby chunks and packed documents only the chunks that share one (ring.chunk_pairs' rule)."""
    chunks = num_chunks(P, layout)
    if mask.kind == "window":
        reach = 1 + math.ceil((mask.window - 1) / (N / chunks))  # chunks each chunk's queries see, its own included
        return min(P, 2 * reach - 1 if layout == "zigzag" else reach)  # zigzag: ranks r-reach+1 .. r+reach-1
    if mask.kind != "documents":
        return P
    ends, size = list(itertools.accumulate(mask.doc_lengths)), N / chunks
    docs = [(bisect.bisect_right(ends, c * size), bisect.bisect_right(ends, (c + 1) * size - 1))
            for c in range(chunks)]  # the first and last document of each chunk

    def work(q_chunk: int, k_chunk: int) -> bool:  # causal, and a document in both
        return k_chunk <= q_chunk and docs[k_chunk][1] >= docs[q_chunk][0]

    return max(sum(any(work(qc, kc) for qc in chunk_ids(P, r, layout) for kc in chunk_ids(P, (r - s) % P, layout))
                   for s in range(P)) for r in range(P))


def allgather_cost(shape: OpShape, P: int, mask: Mask, layout: str, hw: Hardware) -> OpCost:
    n = shape.seq / P
    shard = 2 * shape.batch * shape.kv_heads * n * shape.head_dim
    seg = shape.batch * n * SEG_ELEM if mask.kind == "documents" else 0
    gather = hw.link("all_gather", inter_node(P, hw))
    scatter = hw.link("reduce_scatter", inter_node(P, hw))
    c_fwd, c_bwd = softmax_compute(shape, P, mask, layout, hw, n)
    t_gather = (P - 1) * gather.time(shard * shape.elem) + (P - 1) * gather.time(seg) * (seg > 0)
    t_scatter = 2 * (P - 1) * scatter.time(shard / 2 * STATE_ELEM)
    fwd_bytes = (P - 1) * (shard * shape.elem + seg)
    bwd_bytes = (P - 1) * shard * shape.elem + (P - 1) * shard * STATE_ELEM  # K/V gathered again, dK/dV scattered
    t_bwd_comm = (P - 1) * gather.time(shard * shape.elem) + t_scatter
    return OpCost(c_fwd + t_gather, c_bwd + t_bwd_comm, fwd_bytes, bwd_bytes, c_fwd, c_bwd, t_gather, t_bwd_comm)


def ids_gather(shape: OpShape, P: int, mask: Mask, hw: Hardware) -> tuple[float, float]:
    """(bytes sent, seconds) of Ulysses' all-gather of packed documents' ids, forward only; none without documents."""
    if mask.kind != "documents":
        return 0.0, 0.0
    shard = shape.batch * shape.seq / P * SEG_ELEM
    return (P - 1) * shard, (P - 1) * hw.link("all_gather", inter_node(P, hw)).time(shard)


def ulysses_cost(shape: OpShape, P: int, mask: Mask, hw: Hardware) -> OpCost:
    n = shape.seq / P
    one_way = shape.batch * n * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads) * shape.elem * (P - 1) / P
    seg, t_seg = ids_gather(shape, P, mask, hw)
    link = hw.link("all_to_all", inter_node(P, hw))
    c_fwd, c_bwd = softmax_compute(shape, P, mask, "zigzag", hw, shape.seq)
    per_tensor = [shape.heads, shape.kv_heads, shape.kv_heads, shape.heads]
    t_comm = sum(link.time(shape.batch * n * shape.head_dim * h * shape.elem * (P - 1) / P) for h in per_tensor)
    return OpCost(c_fwd + t_comm + t_seg, c_bwd + t_comm, one_way + seg, one_way, c_fwd, c_bwd, t_comm + t_seg,
                  t_comm)


def usp_cost(shape: OpShape, P: int, U: int, mask: Mask, layout: str, hw: Hardware) -> OpCost:
    """Ulysses over U consecutive ranks, then ring over the P/U ranks sharing an index, with H/U heads each."""
    gathered = replace(shape, seq=shape.seq * U // P)
    uly = ulysses_cost(gathered, U, mask, hw)  # only its communication: the ring computes
    heads = replace(shape, heads=shape.heads // U, kv_heads=shape.kv_heads // U)
    ring = ring_cost(heads, P // U, mask, layout, hw, spans_nodes=inter_node(P, hw))
    # with documents, the ring gathers each chunk's first/last id and monotonicity (3 int64 per row) first
    spans = (P // U - 1) * chunks_per_rank(layout) * shape.batch * 3 * SEG_ELEM if mask.kind == "documents" else 0
    return OpCost(ring.fwd_s + uly.fwd_comm_s, ring.bwd_s + uly.bwd_comm_s, uly.fwd_bytes + ring.fwd_bytes + spans,
                  uly.bwd_bytes + ring.bwd_bytes, ring.fwd_compute_s, ring.bwd_compute_s,
                  ring.fwd_comm_s + uly.fwd_comm_s, ring.bwd_comm_s + uly.bwd_comm_s)


def softmax_op_cost(algorithm: str, shape: OpShape, P: int, hw: Hardware, mask: Mask | None = None,
                    layout: str = "zigzag", ulysses: int = 1) -> OpCost:
    """One softmax-family attention op per rank under `algorithm` (ring, allgather, ulysses, usp, none)."""
    mask = mask or Mask()
    if algorithm == "none" or P == 1:
        c_fwd, c_bwd = softmax_compute(shape, 1, mask, layout, hw, shape.seq)
        return OpCost(c_fwd, c_bwd, 0, 0, c_fwd, c_bwd, 0, 0)
    if algorithm == "ring":
        cost = ring_cost(shape, P, mask, layout, hw)
    elif algorithm == "allgather":
        cost = allgather_cost(shape, P, mask, layout, hw)
    elif algorithm == "ulysses":
        cost = ulysses_cost(shape, P, mask, hw)
    elif algorithm == "usp":
        cost = usp_cost(shape, P, ulysses, mask, layout, hw)
    else:
        raise ValueError(f"unknown softmax SP algorithm {algorithm!r}")
    steps = sp_steps(algorithm, P, layout, ulysses, mask, shape.seq)
    return with_overhead(cost, hw, overhead_key(algorithm, False), steps)


def sp_steps(algorithm: str, P: int, layout: str = "zigzag", ulysses: int = 1, mask: Mask | None = None,
             N: int = 0) -> int:
    """Steps of an SP op that each pay the algorithm's fixed overhead: the ring's steps with attention work (of P
    for ring, of P/U for usp; a step without work only forwards K/V), chain hops, or one round."""
    if algorithm in ("ring", "usp"):
        ring = P if algorithm == "ring" else P // ulysses
        return ring_steps_with_work(mask or Mask(), ring, layout, N)
    if algorithm in ("lasp1", "zeco"):
        return chain_hops(P, layout)
    return 1


def overhead_key(algorithm: str, linear: bool) -> str:
    """The profile's step_overhead entry of an algorithm: its name, linear Ulysses apart from softmax Ulysses."""
    return "linear_ulysses" if linear and algorithm == "ulysses" else algorithm


def with_overhead(cost: OpCost, hw: Hardware, key: str, steps: int) -> OpCost:
    """cost plus `steps` times the profile's fixed per-step time under `key` (overhead_key). Added, not overlapped:
    right where the host work is the compute (CPU) or outlasts it (small blocks); on a GPU with long kernels the
    launches hide behind them, and this overstates the op by at most the overhead."""
    fwd, bwd = hw.step_overhead.get(key, (0.0, 0.0))
    return replace(cost, fwd_s=cost.fwd_s + steps * fwd, bwd_s=cost.bwd_s + steps * bwd)


def linear_compute(shape: OpShape, P: int, hw: Hardware) -> tuple[float, float, float]:
    """(forward, backward, forward intra-chunk) seconds of one rank's chunked linear attention."""
    intra, inter = linear_flop_count(shape, shape.batch * shape.seq / P * shape.heads)
    fwd = (intra + inter) / hw.linear_flops
    return fwd, 2 * fwd, intra / hw.linear_flops


def overlapped_backward(c_bwd: float, t: float, shape: OpShape, hw: Hardware) -> float:
    """LASP-2's and ZeCO's backward with its state exchange t (module docstring): after a fused local backward,
    or beside the torch path's local backward, whose second call revisits the state's share of it."""
    if hw.fused_linear_backward:
        return c_bwd + t
    dk, dv, C = shape.head_dim, shape.dv, shape.chunk
    share = 2 * dk * dv / (2 * C * dk + 2 * C * dv + 4 * dk * dv)
    return c_bwd * (1 + share) + max(0.0, t - c_bwd * (1 - share))


def linear_state_bytes(shape: OpShape) -> float:
    return shape.batch * shape.heads * shape.head_dim * shape.dv * shape.state_elem


def chunks_per_rank(layout: str) -> int:
    return num_chunks(1, layout)


def chain_hops(P: int, layout: str) -> int:
    """Hops of LASP-1's / ZeCO's state chain: 0 -> P-1, and back with zigzag (its second chunks run in reverse)."""
    return chunks_per_rank(layout) * (P - 1)


def scan_time(links: list[Link], message: float, blocks: int) -> float:
    """A chain of hops carrying `message` bytes in `blocks` pieces, each forwarded on arrival (All-Scan)."""
    if not links:
        return 0.0
    piece = message / blocks
    return sum(link.time(piece) for link in links) + (blocks - 1) * max(link.time(piece) for link in links)


def linear_op_cost(algorithm: str, shape: OpShape, P: int, hw: Hardware, layout: str = "zigzag",
                   zeco_blocks: int | None = None, mask: Mask | None = None) -> OpCost:
    """One linear-family attention op per rank under `algorithm` (lasp1, lasp2, zeco, ulysses, none), fixed
    per-step overhead included. The mask matters only to Ulysses, which gathers packed documents' ids."""
    cost = linear_op_time(algorithm, shape, P, hw, layout, zeco_blocks, mask or Mask())
    if algorithm == "none" or P == 1:
        return cost
    return with_overhead(cost, hw, overhead_key(algorithm, True), sp_steps(algorithm, P, layout))


def linear_op_time(algorithm: str, shape: OpShape, P: int, hw: Hardware, layout: str, zeco_blocks: int | None,
                   mask: Mask) -> OpCost:
    """linear_op_cost without the fixed overhead.

    Bytes are the mean per rank; a chain's hops are 2(P-1) with zigzag (0..P-1 and back), P-1 contiguous.
    """
    c_fwd, c_bwd, c_intra = linear_compute(shape, P, hw)
    if algorithm == "none" or P == 1:
        return OpCost(c_fwd, c_bwd, 0, 0, c_fwd, c_bwd, 0, 0)
    S = linear_state_bytes(shape)
    if algorithm in ("lasp1", "zeco"):
        hops = chain_hops(P, layout)
        blocks = 1 if algorithm == "lasp1" else num_blocks(shape.dv, zeco_blocks)
        t = scan_time(chain_links(hops, P, hw, layout), S, blocks)
        fwd, bwd = (c_fwd + t, c_bwd + t) if algorithm == "lasp1" else \
            (c_fwd + max(0.0, t - c_intra), overlapped_backward(c_bwd, t, shape, hw))
        return OpCost(fwd, bwd, hops * S / P, hops * S / P, c_fwd, c_bwd, t, t)
    if algorithm == "lasp2":
        k = chunks_per_rank(layout)
        decay = shape.batch * shape.heads * (shape.head_dim if shape.per_channel_decay else 1) * shape.state_elem
        link = hw.link("all_gather", inter_node(P, hw))
        t_fwd = (P - 1) * link.time(k * (S + decay))
        t_bwd = (P - 1) * link.time(k * S)
        return OpCost(c_fwd + max(0.0, t_fwd - c_intra), overlapped_backward(c_bwd, t_bwd, shape, hw),
                      (P - 1) * k * (S + decay), (P - 1) * k * S, c_fwd, c_bwd, t_fwd, t_bwd)
    if algorithm == "ulysses":
        n = shape.batch * shape.seq / P
        link = hw.link("all_to_all", inter_node(P, hw))
        widths = [shape.heads * shape.head_dim] * 2 + [shape.heads * shape.dv] + \
                 [shape.heads * (shape.head_dim if shape.per_channel_decay else 1)]  # q, k, v, log decay
        t_in = sum(link.time(n * w * shape.elem * (P - 1) / P) for w in widths)
        t_out = link.time(n * shape.heads * shape.dv * shape.elem * (P - 1) / P)
        seg, t_seg = ids_gather(shape, P, mask, hw)
        sent = (P - 1) / P * n * shape.elem * (sum(widths) + shape.heads * shape.dv)
        return OpCost(c_fwd + t_in + t_out + t_seg, c_bwd + t_in + t_out, sent + seg, sent, c_fwd, c_bwd,
                      t_in + t_out + t_seg, t_in + t_out)
    raise ValueError(f"unknown linear SP algorithm {algorithm!r}")


ELEMENTWISE_BYTES = 24  # per token, layer and model dim in the forward: norms, SwiGLU, residuals, RoPE, casts


@dataclass
class StepCost:
    """One optimizer step under a config on `world` GPUs: predicted seconds, throughput and memory per GPU."""
    step_s: float
    tokens_per_s: float
    mfu: float
    memory: dict  # bytes per GPU by component, "total" their sum
    comm_bytes: float  # sent per GPU per step (SP and data-parallel)
    breakdown: dict  # seconds per step by part


def op_shape(cfg, mixer: str, elem: int) -> OpShape:
    """The attention op of `mixer` in cfg's model at the config's micro-batch and sequence length."""
    m = cfg.model
    D = m.d_model // m.n_heads
    kv = m.n_kv_heads or m.n_heads
    if mixer in LINEAR_FAMILY:
        kv = m.n_heads
    return OpShape(cfg.data.batch_size, cfg.data.seq_len, m.n_heads, kv, D, chunk=m.chunk_size,
                   per_channel_decay=mixer in PER_CHANNEL_DECAY, elem=elem)


def mask_of(cfg, mixer: str, mask: Mask | None) -> Mask:
    if mixer == "window":
        return Mask("window", window=cfg.model.window)
    return mask or Mask()


def mixer_cost(cfg, mixer: str, hw: Hardware, mask: Mask | None, elem: int) -> OpCost:
    p, P = cfg.parallel, cfg.parallel.sp_size
    shape = op_shape(cfg, mixer, elem)
    if mixer in LINEAR_FAMILY:
        return linear_op_cost(p.linear_sp, shape, P, hw, p.layout, p.zeco_blocks, mask)
    return softmax_op_cost(p.softmax_sp, shape, P, hw, mask_of(cfg, mixer, mask), p.layout, p.ulysses_size)


@dataclass
class ModelCounts:
    layer_weights: list[tuple[str, int]]  # (mixer, weights that multiply activations) of each layer
    mixer_weights: list[int]  # those of each layer's token mixer (recomputed under mixer checkpointing)
    params: int
    model: LM  # on the meta device, for flops_per_token
    flops: dict[int, float] = field(default_factory=dict)  # training FLOPs per token by sequence length

    def flops_per_token(self, seq: int) -> float:
        if seq not in self.flops:
            self.flops[seq] = self.model.flops_per_token(seq)
        return self.flops[seq]


MODELS: dict[int, ModelCounts] = {}


def model_counts(cfg) -> ModelCounts:
    """The model's counts, from memory_model's meta-device LM (built once per model config)."""
    lm = meta_model(cfg.model)
    key = id(lm)
    if key not in MODELS:
        weights = [(mixer, sum(p.numel() for p in block.parameters() if p.dim() >= 2))
                   for mixer, block in zip(lm.mixers, lm.blocks)]
        mixer_weights = [sum(p.numel() for p in block.mixer.parameters() if p.dim() >= 2) for block in lm.blocks]
        MODELS[key] = ModelCounts(weights, mixer_weights, sum(p.numel() for p in lm.parameters()), lm)
    return MODELS[key]


def data_parallel_time(cfg, hw: Hardware, world: int, params: int) -> tuple[float, float]:
    """(seconds, bytes sent per GPU) of one step's parameter/gradient traffic over all dp x sp ranks: FSDP2
    all-gathers bf16 parameters in every micro-batch's forward and backward and reduce-scatters fp32 gradients
    in the last; DDP all-reduces fp32 gradients once (reduce-scatter + all-gather)."""
    if world == 1:
        return 0.0, 0.0
    spans, accum = world > hw.gpus_per_node, cfg.train.grad_accum
    shard = params / world
    scatter = hw.link("reduce_scatter", spans)
    if cfg.train.engine == "fsdp":
        gather = hw.link("all_gather", spans)
        t = 2 * accum * (world - 1) * gather.time(2 * shard) + (world - 1) * scatter.time(4 * shard)
        return t, (world - 1) * shard * (2 * 2 * accum + 4)
    return 2 * (world - 1) * scatter.time(4 * shard), 2 * (world - 1) * 4 * shard


def step_cost(cfg, hw: Hardware, world: int, mask: Mask | None = None, elem: int = 2) -> StepCost:
    """Predicted step of `cfg` (its parallel, checkpointing, micro-batch and accumulation) on `world` GPUs."""
    m, P = cfg.model, cfg.parallel.sp_size
    tokens = cfg.data.batch_size * cfg.data.seq_len / P  # per GPU and micro-step
    ckpt = m.activation_checkpointing
    fwd = bwd = recompute = comm = 0.0
    counts = model_counts(cfg)
    ops = {mixer: mixer_cost(cfg, mixer, hw, mask, elem) for mixer, _ in counts.layer_weights}
    for (mixer, weights), mixer_weights in zip(counts.layer_weights, counts.mixer_weights):
        op = ops[mixer]
        gemm = 2 * weights * tokens / hw.matmul_flops
        elementwise = ELEMENTWISE_BYTES * m.d_model * elem * tokens / hw.memory_bandwidth
        fwd += op.fwd_s + gemm + elementwise
        bwd += op.bwd_s + 2 * gemm + 2 * elementwise
        if ckpt:
            recompute += op.fwd_s + (gemm + elementwise if m.checkpoint_mode == "block" else
                                     2 * mixer_weights * tokens / hw.matmul_flops)
        comm += op.fwd_bytes * (2 if ckpt else 1) + op.bwd_bytes
    head = 2 * m.d_model * m.vocab_size * tokens / hw.matmul_flops
    compute = fwd + bwd + recompute + 3 * head
    params = counts.params
    accum = cfg.train.grad_accum
    dp_t, dp_bytes = data_parallel_time(cfg, hw, world, params)
    dp_exposed = max(0.0, dp_t - accum * compute)  # overlapped with the step's compute (prefetch, bucketing)
    shard = params / world if cfg.train.engine == "fsdp" else params
    optimizer = 28 * shard / hw.memory_bandwidth  # AdamW reads/writes param, grad, two moments in fp32
    step = accum * compute + dp_exposed + optimizer
    step_tokens = world // P * cfg.data.batch_size * cfg.data.seq_len * accum
    model_flops = counts.flops_per_token(cfg.data.seq_len) * step_tokens
    memory = step_memory(cfg, world, elem=elem, gpu=True)
    memory["sp_transient"] = sp_transient_bytes(cfg, elem)
    memory["total"] += memory["sp_transient"]
    return StepCost(step, step_tokens / step, model_flops / step / (world * hw.peak_flops), memory,
                    accum * comm + dp_bytes,
                    {"forward": accum * fwd, "backward": accum * bwd, "recompute": accum * recompute,
                     "head+loss": accum * 3 * head, "data_parallel_exposed": dp_exposed,
                     "optimizer": optimizer})
