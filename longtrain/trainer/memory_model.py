"""Closed-form memory per rank of one training step, in bytes, for planning N and P before running.

Counts live tensors at the step's peak, from the code: the floats each block keeps per local token from its
forward to its backward (tests/test_memory.py checks them against autograd's saved tensors), what the SP
functions keep on ctx beside them, the one layer being recomputed or differentiated, the head + loss, and the
model state. The backward runs the layers last to first and frees each layer's tensors as it goes, so the peak
is the larger of the end of the forward and, for some layer i, the layers below i plus i's working set.

CPU (gpu=False, fp32): bytes a step adds to a model that has trained a step (parameters and AdamW state are
there already): gradients, activations, loss; the benchmark compares it with the peak RSS.
GPU (gpu=True): the whole device memory, assuming FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduce)
under bf16 autocast: fp32 sharded parameters, gradients and two AdamW states (16 bytes per parameter / world),
the bf16 parameters of the root and of two blocks gathered at once (one prefetched) and one block's unsharded
gradients, activations at `elem` bytes each (norms and states run in fp32 under autocast: a few percent more).
Not measured on a GPU yet. The Triton kernels keep less inside the linear mixers (no decay tiles).
"""
import dataclasses
import math

import torch
from omegaconf import OmegaConf

from longtrain.attention import LINEAR_FAMILY
from longtrain.config import Config, ModelConfig, layer_mixers
from longtrain.parallel import STATE_PASSING_SP
from longtrain.parallel.sharding import num_chunks
from longtrain.trainer.model import LM, mlp_hidden

PER_CHANNEL_DECAY = ("gla",)  # decay [B, H, N, Dk]: its chunked path factors the decay level by level
LOCAL_PASS_FLOATS = 6  # x d: q, k, v, log decay, local output and cumulative decay, kept on ctx by LASP/ZeCO


def block_floats(cfg: ModelConfig) -> float:
    """Per token, what a block saves besides its mixer: two RMSNorms (input, output, 1/rms) and
    SwiGLU (input, gate|up, silu(gate), product)."""
    d, h = cfg.d_model, mlp_hidden(cfg)
    return 2 * (2 * d + 1) + d + 4 * h


def mixer_floats(cfg: ModelConfig, mixer: str) -> float:
    """Per token, what one mixer saves for backward (torch kernels, one device)."""
    d, H, C = cfg.d_model, cfg.n_heads, cfg.chunk_size
    D = d // H
    if mixer in PER_CHANNEL_DECAY:  # secondary chunking: log2(C) levels of half-chunk products
        C = 1 << (C - 1).bit_length()  # the kernel rounds the chunk up to a power of two
        # per level the decayed q and k halves and their exp factors (~2.5 d), the [L, L] scores (H C / 4 over
        # all levels), ~19.5 [N, d] projections, gates and chunk views, the state entering each chunk [H, Dk, Dv]
        return 2.5 * d * math.log2(C) + H * C / 4 + 19.5 * d + H * D * D / C
    if mixer in LINEAR_FAMILY:  # scalar decay: [C, C] decay gaps and their exp
        return 2 * C * H + 22 * d + H * D * D / C
    kv = (cfg.n_kv_heads or H) * D
    # input, q and k|v projections, q and k after RoPE, RoPE cos/sin [N, D/2] x 4, lse [H]; the attention output
    # [B, N, H, D] is the output projection's saved input, stored once
    return d + (d + 2 * kv) + (d + kv) + 2 * D + H


def state_passing(cfg: Config, mixer: str) -> bool:
    return cfg.parallel.sp_size > 1 and mixer in LINEAR_FAMILY and cfg.parallel.linear_sp in STATE_PASSING_SP


def sp_floats(cfg: Config, mixer: str) -> tuple[float, float]:
    """Per token, what the layer's SP function adds to the one-device mixer: (saved, kept on ctx past a
    checkpoint). LASP/ZeCO: local output, cumulative decay and corrected output (3 d) saved, the LocalPass
    (LOCAL_PASS_FLOATS d) on ctx, except under saved-tensor hooks (checkpointing, offload), where they keep only
    their inputs, through the hooks. Ring: its fp32 output (d). Buffers in flight: sp_transient_bytes."""
    d, p = cfg.model.d_model, cfg.parallel
    if state_passing(cfg, mixer):
        if cfg.model.activation_checkpointing or cfg.train.offload_activations:
            return 0.0, 0.0
        return 3 * d, LOCAL_PASS_FLOATS * d
    return (d, 0.0) if p.sp_size > 1 and mixer not in LINEAR_FAMILY and p.softmax_sp == "ring" else (0.0, 0.0)


def layer_floats(cfg: Config, mixer: str, offload: bool) -> tuple[float, float]:
    """Per token, (resident, working) of one layer: what it keeps between its forward and its backward, and what
    it adds while it is recomputed and differentiated."""
    m = cfg.model
    block, mix, d = block_floats(m), mixer_floats(m, mixer), m.d_model
    sp, escaped = sp_floats(cfg, mixer)
    mlp = block - (2 * d + 1)  # the MLP half of the block, differentiated (and freed) before the mixer
    if not m.activation_checkpointing:
        if offload:  # saved tensors wait in host memory; the LocalPass on ctx stays
            return escaped, block + mix + sp
        return block + mix + sp, 0.0
    if m.checkpoint_mode == "block":  # the block input stays, the whole block is recomputed
        if state_passing(cfg, mixer):  # its local pass is rebuilt in its own backward, after the MLP's is done
            return d, block - mlp + mix
        return d + escaped, block + mix + sp
    if offload:  # mixer mode: the rest of the block is offloaded, the mixer recomputed
        return escaped, block - mlp + mix + sp
    return block + escaped, mix + sp - mlp


def saved_floats_per_token(cfg: Config, offload: bool = False) -> float:
    """Floats per local token alive at the step's peak: the end of the forward, or the backward of layer i with
    the layers below it still resident; plus the gradients in flight (residual stream and MLP hidden layer)."""
    layers = [layer_floats(cfg, name, offload) for name in layer_mixers(cfg.model)]
    below, peak = 0.0, sum(r for r, _ in layers)
    for resident, working in layers:
        below += resident
        peak = max(peak, below + working)
    return peak + cfg.model.d_model + mlp_hidden(cfg.model)


def loss_bytes(tokens: int, d: int, vocab: int, chunk: int, elem: int = 4) -> float:
    """Head + loss: chunked keeps h and lse per token and ~3 [chunk, vocab] buffers; the plain path
    keeps full logits, their log-softmax and their gradient, [tokens, vocab] each."""
    if chunk:
        return elem * (tokens * (d + 1) + 3 * min(chunk, tokens) * vocab)
    return elem * 3 * tokens * vocab


META_MODELS: dict[str, LM] = {}
PARAMS: dict[int, tuple[int, int]] = {}


def meta_model(cfg: ModelConfig) -> LM:
    """longtrain.trainer.model.LM of a model config on the meta device (no memory), built once per config: the
    planner asks thousands of times, its candidates differing in checkpointing, which LM does not read."""
    cfg = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    key = repr(dataclasses.replace(cfg, activation_checkpointing=False, checkpoint_mode="block"))
    if key not in META_MODELS:
        with torch.device("meta"):
            META_MODELS[key] = LM(cfg)
    return META_MODELS[key]


def num_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, the largest block's) of the model."""
    lm = meta_model(cfg)
    if id(lm) not in PARAMS:
        block = max(sum(p.numel() for p in b.parameters()) for b in lm.blocks)
        PARAMS[id(lm)] = sum(p.numel() for p in lm.parameters()), block
    return PARAMS[id(lm)]


def state_bytes(cfg: Config, world: int, elem: int, gpu: bool) -> dict[str, float]:
    """Parameters, gradients and AdamW state per rank (FSDP2 shards them over all `world` ranks)."""
    n, block = num_params(cfg.model)
    shard = world if cfg.train.engine == "fsdp" and world > 1 else 1
    # FSDP2 accumulates unsharded fp32 gradients over the micro-batches before the last (no reduce-scatter)
    accumulated = 4 * n if shard > 1 and cfg.train.grad_accum > 1 else 0.0
    if not gpu:  # fp32, above the model and its AdamW state
        return {"grads": 4 * n / shard + accumulated}
    out = {"params": 4 * n / shard, "grads+adam": 12 * n / shard + accumulated}
    if shard > 1:  # bf16 root + two blocks gathered, one block's unsharded gradients before the reduce-scatter
        out["gathered"] = elem * (n - len(layer_mixers(cfg.model)) * block + 2 * block) + (elem + 4) * block
    elif elem < 4:  # autocast's low-precision weight copies, cached for the whole forward
        out["gathered"] = elem * n
    return out


def sp_transient_bytes(cfg: Config, elem: int = 2) -> float:
    """The largest SP buffer alive at once beyond the saved activations: gathered K/V and their fp32 gradients
    (allgather), full-sequence heads (ulysses, usp), gathered states (lasp2); states, lse and gradients in fp32."""
    m, p, P = cfg.model, cfg.parallel, cfg.parallel.sp_size
    if P == 1:
        return 0.0
    B, N, D = cfg.data.batch_size, cfg.data.seq_len, m.d_model // m.n_heads
    kv = m.n_kv_heads or m.n_heads
    out = 0.0
    for mixer in set(layer_mixers(m)):
        if mixer in LINEAR_FAMILY:
            if p.linear_sp == "lasp2":
                out = max(out, num_chunks(P, p.layout) * B * m.n_heads * D * (D + 1) * 4)
            elif p.linear_sp == "ulysses":
                out = max(out, B * N / P * m.n_heads * D * 5 * elem)
        elif p.softmax_sp == "allgather":
            out = max(out, B * N * kv * D * 2 * (elem + 4))
        elif p.softmax_sp in ("ulysses", "usp"):
            out = max(out, B * N / P * (2 * m.n_heads + 2 * kv) * D * elem)
        elif p.softmax_sp == "ring":
            out = max(out, B * N / P * kv * D * 2 * (2 * elem + 4))  # K/V sent + received, dK/dV (fp32)
    return out


def step_memory(cfg: Config, world: int, elem: int = 4, gpu: bool = False) -> dict[str, float]:
    """Bytes per rank of one training step by component, and their sum "total".

    world: all dp x sp ranks. gpu: device memory (see the module docstring), where train.offload_activations
    moves the saved tensors to the host; on CPU they stay in RSS, so offload changes nothing.
    """
    m, sp = cfg.model, cfg.parallel.sp_size
    tokens = cfg.data.batch_size * cfg.data.seq_len // sp  # local tokens per micro-batch
    offload = gpu and cfg.train.offload_activations
    out = state_bytes(cfg, world, elem, gpu)
    out["activations"] = elem * tokens * (saved_floats_per_token(cfg, offload) + 3 * m.d_model)  # + embedding, norm
    out["loss"] = loss_bytes(tokens, m.d_model, m.vocab_size, m.loss_chunk, elem) - elem * tokens * m.d_model  # h: norm
    out["total"] = sum(out.values())
    return out
