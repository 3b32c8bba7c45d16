"""Every registered mixer: shape, causality, document isolation, gradients reach every parameter."""
import pytest
import torch

from longtrain.attention import MIXERS, AttnContext, MixerOptions, build_mixer

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
