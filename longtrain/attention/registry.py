"""Mixer registry: a name in the config maps to one class; unknown names list the known ones."""
from dataclasses import dataclass

from torch import nn

from longtrain.attention.gated_softmax import GatedSoftmaxAttention
from longtrain.attention.gla import GatedLinearAttention
from longtrain.attention.lightning import LightningAttention
from longtrain.attention.linear import LinearAttention
from longtrain.attention.mamba2 import Mamba2Attention
from longtrain.attention.retention import Retention
from longtrain.attention.sigmoid import SigmoidAttention
from longtrain.attention.softmax import SoftmaxAttention, WindowAttention

MIXERS: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxAttention,
    "window": WindowAttention,
    "gated_softmax": GatedSoftmaxAttention,
    "sigmoid": SigmoidAttention,
    "linear": LinearAttention,
    "lightning": LightningAttention,
    "retention": Retention,
    "gla": GatedLinearAttention,
    "mamba2": Mamba2Attention,
}
SOFTMAX_FAMILY = ("softmax", "window", "gated_softmax", "sigmoid")
LINEAR_FAMILY = ("linear", "lightning", "retention", "gla", "mamba2")


@dataclass
class MixerOptions:
    """Mixer hyper-parameters shared through the model config; each mixer reads the ones it uses."""
    n_kv_heads: int | None = None
    window: int | None = None
    feature_map: str | None = None
    gate_rank: int = 16
    chunk_size: int = 64
    rope_base: float = 10000.0


def check_mixer(name: str) -> None:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known mixers: {', '.join(MIXERS)}")


def build_mixer(name: str, d_model: int, n_heads: int, opts: MixerOptions | None = None) -> nn.Module:
    """Instantiate the mixer registered as `name`."""
    check_mixer(name)
    return MIXERS[name](d_model, n_heads, opts or MixerOptions())
