"""LLaMA-style decoder whose per-layer token mixer comes from the registry."""
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.attention import LINEAR_FAMILY, AttnContext, MixerOptions, build_mixer
from longtrain.attention.norm import RMSNorm
from longtrain.config import ModelConfig, layer_mixers
from longtrain.trainer.loss import linear_cross_entropy


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, -1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, mixer: str, d_model: int, n_heads: int, hidden: int, opts: MixerOptions) -> None:
        super().__init__()
        self.mixer_name = mixer
        self.attn_norm = RMSNorm(d_model, eps=1e-6)
        self.mixer = build_mixer(mixer, d_model, n_heads, opts)
        self.mlp_norm = RMSNorm(d_model, eps=1e-6)
        self.mlp = SwiGLU(d_model, hidden)

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        x = x + self.mixer(self.attn_norm(x), ctx)
        return self.feed_forward(x)

    def feed_forward(self, x: Tensor) -> Tensor:
        """x + mlp(norm(x)): the part of the block that `train.compile` hands to torch.compile."""
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Linear):
    """h -> logits; given targets, the loss instead: (sum of masked token losses, correct argmax count).

    loss_chunk > 0 computes head and loss over chunks of that many tokens (never the full logits);
    0 builds the full logits and calls F.cross_entropy on their fp32 copy.
    """

    def __init__(self, d_model: int, vocab_size: int, loss_chunk: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)
        self.loss_chunk = loss_chunk

    def forward(self, h: Tensor, targets: Tensor | None = None, mask: Tensor | None = None):
        if targets is None:
            return super().forward(h)
        if self.loss_chunk:
            return linear_cross_entropy(h, self.weight, targets, mask, self.loss_chunk)
        logits = super().forward(h).float()  # [B, N, V]
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        correct = ((logits.argmax(-1) == targets) & mask).sum()
        return (losses * mask.flatten()).sum(), correct


def mlp_hidden(cfg: ModelConfig) -> int:
    return cfg.mlp_hidden or 32 * -(-int(8 * cfg.d_model / 3) // 32)


class LM(nn.Module):
    """tokens [B, N_local] -> logits [B, N_local, vocab], or with targets the loss (see LMHead);
    ctx carries positions, documents and SP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mixers = layer_mixers(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(m, cfg.d_model, cfg.n_heads, mlp_hidden(cfg), cfg) for m in self.mixers)
        self.norm = RMSNorm(cfg.d_model, eps=1e-6)
        self.head = LMHead(cfg.d_model, cfg.vocab_size, cfg.loss_chunk)
        self.apply(self.init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, ctx: AttnContext, targets: Tensor | None = None,
                loss_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, ctx)
        return self.head(self.norm(x), targets, loss_mask)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def matmul_params(self) -> int:
        """Weights that multiply activations: every matrix but the embedding table, which counts when tied (as the head)."""
        return sum(p.numel() for p in self.parameters()
                   if p.dim() >= 2 and (p is not self.embed.weight or self.cfg.tie_embeddings))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul params plus each mixer family's sequence-length term (fwd + bwd)."""
        flops = 6.0 * self.matmul_params()
        d, cfg = self.cfg.d_model, self.cfg
        head_dim = d // cfg.n_heads
        for name in self.mixers:
            if name in LINEAR_FAMILY:
                # state update k^T v and readout q S (2 * 2 * d * head_dim), intra-chunk scores and values (2 * C * d)
                flops += 3 * (4 * d * head_dim + 2 * cfg.chunk_size * d)
            else:
                w = min(seq_len, cfg.window) if name == "window" else seq_len
                keys = (w * w / 2 + (seq_len - w) * w) / seq_len  # per query on average: N/2 causal, ~w in a window
                flops += 3 * (2 * 2 * d * keys)  # q k^T and p v over the visible keys
        return flops
