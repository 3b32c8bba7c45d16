"""Closed-form memory per rank of one training step, in bytes, for planning N and P before running.

Counts what the torch kernels (the CPU path) keep: parameters, gradients and AdamW state (sharded by FSDP2),
the tensors each block saves for backward per local token, the SP buffers in flight and the head + loss. The
floats saved per token per layer are counted from the code (tests/test_memory.py checks them against torch's
saved-tensor hooks); the Triton kernels keep less inside the linear mixers (no decay tiles).
"""
import math

import torch
from omegaconf import OmegaConf

from longtrain.attention import LINEAR_FAMILY
from longtrain.config import Config, ModelConfig, layer_mixers
from longtrain.trainer.model import LM, mlp_hidden

PER_CHANNEL_DECAY = ("gla",)  # decay [B, H, N, Dk]: its chunked path factors the decay level by level


def block_floats(cfg: ModelConfig) -> float:
    """Per token, what a block saves besides its mixer: two RMSNorms (input, output, 1/rms) and
    SwiGLU (input, gate|up, silu(gate), product)."""
    d, h = cfg.d_model, mlp_hidden(cfg)
    return 2 * (2 * d + 1) + d + 4 * h


def mixer_floats(cfg: ModelConfig, mixer: str) -> float:
    """Per token, what one mixer saves for backward (torch kernels)."""
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


def saved_floats_per_token(cfg: ModelConfig) -> float:
    """All layers' saved floats per local token with checkpointing as configured, plus the one layer being
    recomputed or differentiated (the backward working set)."""
    per_layer = [block_floats(cfg) + mixer_floats(cfg, m) for m in layer_mixers(cfg)]
    d = cfg.d_model
    if not cfg.activation_checkpointing:
        return sum(per_layer) + max(per_layer)
    if cfg.checkpoint_mode == "block":  # each block keeps its input; one block recomputed at a time
        return len(per_layer) * d + 2 * max(per_layer)
    mixers = [mixer_floats(cfg, m) for m in layer_mixers(cfg)]  # mixer mode: the rest stays, one mixer recomputed
    return len(mixers) * (block_floats(cfg) + d) + max(per_layer) + max(mixers)


def loss_bytes(tokens: int, d: int, vocab: int, chunk: int, elem: int = 4) -> float:
    """Head + loss: chunked keeps h and lse per token and ~3 [chunk, vocab] buffers; the plain path
    keeps full logits, their log-softmax and their gradient, [tokens, vocab] each."""
    if chunk:
        return elem * (tokens * (d + 1) + 3 * min(chunk, tokens) * vocab)
    return elem * 3 * tokens * vocab


PARAMS: dict[str, int] = {}


def num_params(cfg: ModelConfig) -> int:
    """Parameter count of longtrain.trainer.model.LM (built on the meta device: no memory; once per model)."""
    key = OmegaConf.to_yaml(cfg) if OmegaConf.is_config(cfg) else repr(cfg)
    if key not in PARAMS:
        with torch.device("meta"):
            PARAMS[key] = sum(p.numel() for p in LM(cfg).parameters())
    return PARAMS[key]


def step_memory(cfg: Config, world: int, elem: int = 4, gpu: bool = False) -> dict[str, float]:
    """Bytes per rank of one training step above the built model, by component, and their sum "total".

    world: all dp x sp ranks (FSDP2 shards gradients and AdamW state over them; DDP and DeepSpeed don't here).
    gpu: device memory, where train.offload_activations moves the saved tensors out; on CPU they stay in RSS.
    """
    m, sp = cfg.model, cfg.parallel.sp_size
    tokens = cfg.data.batch_size * cfg.data.seq_len // sp  # local tokens per micro-batch
    shard = world if cfg.train.engine == "fsdp" else 1
    params = num_params(m) * elem
    d_kv = (m.n_kv_heads or m.n_heads) * (m.d_model // m.n_heads)
    n_softmax = sum(name not in LINEAR_FAMILY for name in layer_mixers(m))
    saved = saved_floats_per_token(m)
    if gpu and cfg.train.offload_activations and not (m.activation_checkpointing and m.checkpoint_mode == "block"):
        saved = max(block_floats(m) + mixer_floats(m, name) for name in layer_mixers(m))  # the working set only
    out = {
        "grads+adam": 3 * params / shard,
        "activations": elem * tokens * (saved + 3 * m.d_model),  # + embedding output, final norm
        "sp_buffers": 0.0 if sp == 1 or not n_softmax else elem * 2 * 2 * tokens * d_kv,  # ring K/V: send + recv
        "loss": loss_bytes(tokens, m.d_model, m.vocab_size, m.loss_chunk, elem),
    }
    out["total"] = sum(out.values())
    return out
