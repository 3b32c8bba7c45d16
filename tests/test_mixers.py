"""Every registered mixer: its published equations, shape, causality, document isolation, gradients reach every
parameter."""
import math

import pytest
import torch

from longtrain.attention import MIXERS, AttnContext, MixerOptions, build_mixer
from longtrain.attention.registry import SOFTMAX_FAMILY

OPTS = MixerOptions(n_kv_heads=2, window=6, chunk_size=8)


def make(name, seed=0):
    torch.manual_seed(seed)
    return build_mixer(name, 32, 4, OPTS).double()


@pytest.mark.parametrize("name", list(MIXERS))
def test_shape_and_causality(name):
    mixer = make(name)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    out = mixer(x, AttnContext.single(20))
    assert out.shape == x.shape
    t = 11
    x2 = x.clone()
    x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
    out2 = mixer(x2, AttnContext.single(20))
    torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], atol=1e-12, rtol=0)
    assert (out2[:, t + 1:] - out[:, t + 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("name", list(MIXERS))
def test_documents_are_isolated(name):
    """With segment_ids, a document's outputs equal running that document alone (at its own positions)."""
    mixer = make(name)
    x = torch.randn(1, 24, 32, dtype=torch.float64)
    seg = torch.tensor([[0] * 9 + [1] * 15])
    packed = mixer(x, AttnContext(torch.arange(24), 24, seg))
    x_other = x.clone()
    x_other[:, :9] = torch.randn_like(x_other[:, :9])
    packed_other = mixer(x_other, AttnContext(torch.arange(24), 24, seg))
    torch.testing.assert_close(packed_other[:, 9:], packed[:, 9:], atol=1e-12, rtol=0)
    first_alone = mixer(x[:, :9], AttnContext(torch.arange(9), 24))
    torch.testing.assert_close(packed[:, :9], first_alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(MIXERS))
def test_gradient_reaches_every_parameter(name):
    mixer = make(name)
    x = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    mixer(x, AttnContext.single(16)).pow(2).sum().backward()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert x.grad.abs().sum() > 0


def test_unknown_mixer_lists_known_names():
    with pytest.raises(ValueError, match="unknown mixer 'softmx'; known mixers: softmax, window"):
        build_mixer("softmx", 32, 4)


def heads(x, weight, n_heads):
    """x [B, N, d] @ weight^T -> [B, H, N, D]."""
    B, N, _ = x.shape
    return (x @ weight.T).view(B, N, n_heads, -1).transpose(1, 2)


def rotate(x, base):
    """RoPE as complex rotation: channel pair (i, i + D/2) of token n turns by n * base^(-2i/D)."""
    half = x.shape[-1] // 2
    frequencies = base ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    angle = torch.arange(x.shape[2], dtype=torch.float64)[:, None] * frequencies
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], -1)


def softmax_family_spec(mixer, x, name):
    """Causal attention over all earlier tokens (window: the last W), GQA heads sharing K/V in groups, then W_o."""
    B, N, _ = x.shape
    H, Hkv = mixer.n_heads, mixer.n_kv_heads
    q = rotate(heads(x, mixer.wq.weight, H), mixer.rope_base)
    k, v = heads(x, mixer.wkv.weight, 2 * Hkv).chunk(2, 1)
    k, v = rotate(k, mixer.rope_base).repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    visible = (j <= i) & ((j > i - OPTS.window) if name == "window" else True)
    if name == "sigmoid":  # Ramapuram et al.: sigmoid(s - log N), no normaliser
        weights = torch.sigmoid(scores - math.log(N)) * visible
    else:
        weights = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
    out = (weights @ v).transpose(1, 2)  # [B, N, H, D]
    if name == "gated_softmax":  # Qiu et al.: elementwise sigmoid gate from the layer input
        out = out * torch.sigmoid(x @ mixer.wg.weight.T + mixer.wg.bias).view_as(out)
    return out.reshape(B, N, -1) @ mixer.wo.weight.T


FEATURE_MAPS = {"elu": lambda t: torch.nn.functional.elu(t) + 1, "silu": torch.nn.functional.silu,
                "relu": torch.relu, "identity": lambda t: t}


def linear_family_spec(mixer, x, name, feature_map=None):
    """Token by token: S_t = a_t S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(D); per-head RMS norm, gate, W_o."""
    B, N, _ = x.shape
    H = mixer.n_heads
    q, k, v = heads(x, mixer.wqkv.weight, 3 * H).chunk(3, 1)  # [B, H, N, D]
    D = q.shape[-1]
    phi = FEATURE_MAPS[feature_map or {"linear": "elu", "lightning": "silu"}.get(name, "identity")]
    q, k = phi(q), phi(k)
    h = torch.arange(H, dtype=torch.float64)[None, :, None, None]
    decay = torch.ones(B, H, N, D, dtype=torch.float64)
    if name == "lightning":  # TransNormerLLM: exp(-slope_h), ALiBi slopes 2^(-8 (h+1) / H)
        decay = decay * torch.exp(-2 ** (-8 * (h + 1) / H))
    if name == "retention":  # RetNet: gamma_h = 1 - 2^(-5-h)
        decay = decay * (1 - 2 ** (-5 - h))
    if name == "gla":  # Yang et al.: alpha_t = sigmoid(x W1 W2 + b)^(1/16) per key channel
        logits = x @ mixer.gate_down.weight.T @ mixer.gate_up.weight.T + mixer.gate_up.bias
        decay = torch.sigmoid(logits).pow(1 / 16).view(B, N, H, D).transpose(1, 2)
    if name == "mamba2":  # SSD: S_t = exp(dt_t A) S_{t-1} + dt_t k_t^T v_t, A = -exp(A_log)
        dt = torch.nn.functional.softplus(x @ mixer.w_dt.weight.T + mixer.w_dt.bias).transpose(1, 2)[..., None]
        decay = decay * torch.exp(-dt * torch.exp(mixer.A_log)[None, :, None, None])
        k = k * dt
    state = torch.zeros(B, H, D, D, dtype=torch.float64)
    outs = []
    for t in range(N):
        state = decay[:, :, t, :, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(q[:, :, t, None, :] @ state / D ** 0.5)
    out = torch.cat(outs, 2).transpose(1, 2)  # [B, N, H, D]
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * mixer.out_norm.weight
    if name in ("retention", "gla", "mamba2"):  # swish output gate
        out = out * torch.nn.functional.silu(x @ mixer.out_gate.wg.weight.T).view_as(out)
    return out.reshape(B, N, -1) @ mixer.wo.weight.T


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_matches_its_published_equations(name):
    """Each mixer against its paper's equations written out densely (softmax family) or token by token (linear)."""
    mixer = make(name)
    for p in mixer.parameters():  # away from the init's zeros and ones, so a dropped bias or norm weight shows
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    spec = softmax_family_spec if name in SOFTMAX_FAMILY else linear_family_spec
    torch.testing.assert_close(mixer(x, AttnContext.single(20)), spec(mixer, x, name), atol=1e-10, rtol=0)


@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
def test_linear_attention_with_each_feature_map_matches_its_equations(feature_map):
    torch.manual_seed(0)
    opts = MixerOptions(n_kv_heads=2, window=6, chunk_size=8, feature_map=feature_map)
    mixer = build_mixer("linear", 32, 4, opts).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    torch.testing.assert_close(mixer(x, AttnContext.single(20)), linear_family_spec(mixer, x, "linear", feature_map),
                               atol=1e-10, rtol=0)


def test_bf16_reaches_fused_kernels():
    """Under bf16 autocast no RMSNorm gets an input and a weight of two dtypes (PyTorch's unfused fallback, warned
    once per process: hence a fresh one): every mixer, then the model's training step."""
    import subprocess
    import sys

    script = ("import torch\n"
              "from longtrain.attention import MIXERS, AttnContext, MixerOptions, build_mixer\n"
              "from longtrain.config import load_config\n"
              "from longtrain.trainer.model import LM\n"
              "for name in MIXERS:\n"
              "    mixer = build_mixer(name, 32, 4, MixerOptions(n_kv_heads=2, window=6, chunk_size=8))\n"
              "    with torch.autocast('cpu', torch.bfloat16):\n"
              "        mixer(torch.randn(2, 20, 32), AttnContext.single(20)).float().sum().backward()\n"
              "cfg = load_config(None, ['model.d_model=32', 'model.n_layers=2', 'model.n_heads=2', "
              "'model.vocab_size=40', 'model.pattern=gla,softmax', 'model.chunk_size=8'])\n"
              "tokens = torch.randint(0, 40, (2, 24))\n"
              "with torch.autocast('cpu', torch.bfloat16):\n"
              "    LM(cfg.model)(tokens, AttnContext.single(24), tokens, tokens > 0)[0].backward()\n")
    run = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Mismatch dtype" not in run.stderr, run.stderr
