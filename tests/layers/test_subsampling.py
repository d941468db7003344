"""Input layers: lengths, masks, receptive field (right_context), TorchScript."""
import pytest
import torch

from wenet_moe.layers.embedding import PositionalEncoding, RelPositionalEncoding
from wenet_moe.layers.subsampling import INPUT_LAYERS, LinearNoSubsampling

EXPECTED = {"conv2d": (4, 6), "conv2d6": (6, 10), "conv2d8": (8, 14), "linear": (1, 0)}


def make(name, idim=20, odim=8):
    return INPUT_LAYERS[name](idim, odim, 0.0, RelPositionalEncoding(odim, 0.0)).eval()


def out_frames(name, n):
    """Independent length formulas (valid convolutions)."""
    if name == "conv2d":
        return ((n - 1) // 2 - 1) // 2
    if name == "conv2d6":
        return ((n - 1) // 2 - 2) // 3
    if name == "conv2d8":
        return (((n - 1) // 2 - 1) // 2 - 1) // 2
    return n


@pytest.mark.parametrize("name", list(EXPECTED))
def test_rate_context_lengths_and_mask(name):
    layer = make(name)
    assert (layer.subsampling_rate, layer.right_context) == EXPECTED[name]
    lens = [53, 40, 17]
    x = torch.randn(3, 53, 20)
    mask = (torch.arange(53)[None] < torch.tensor(lens)[:, None]).unsqueeze(1)
    y, pos, m = layer(x, mask)
    assert y.shape == (3, out_frames(name, 53), 8)
    assert pos.shape == (1, y.size(1), 8)
    assert m.shape == (3, 1, y.size(1))
    assert m.sum(-1).flatten().tolist() == [out_frames(name, n) for n in lens]
    # valid frames of a padded utterance equal the utterance alone
    for i, n in enumerate(lens):
        alone, _, _ = layer(x[i:i + 1, :n], mask[i:i + 1, :, :n])
        assert torch.allclose(y[i:i + 1, :alone.size(1)], alone, atol=1e-5)


@pytest.mark.parametrize("name", ["conv2d", "conv2d6", "conv2d8"])
def test_receptive_field_is_right_context_plus_one(name):
    layer = make(name)
    s, rc = layer.subsampling_rate, layer.right_context
    x = torch.randn(1, 60, 20)
    mask = torch.ones(1, 1, 60, dtype=torch.bool)
    y, _, _ = layer(x, mask)
    t = 2
    for frame, changes in [(s * t - 1, False), (s * t, True), (s * t + rc, True),
                           (s * t + rc + 1, False)]:
        x2 = x.clone()
        x2[0, frame] += 5.0
        y2, _, _ = layer(x2, mask)
        assert (not torch.allclose(y2[0, t], y[0, t])) == changes, (frame, changes)


def test_offset_shifts_positional_encoding():
    layer = INPUT_LAYERS["conv2d"](20, 8, 0.0, PositionalEncoding(8, 0.0)).eval()
    x = torch.randn(1, 40, 20)
    m = torch.ones(1, 1, 40, dtype=torch.bool)
    _, pos0, _ = layer(x, m, 0)
    _, pos5, _ = layer(x, m, 5)
    assert torch.allclose(pos5[:, :3], layer.position_encoding(5, 3))
    assert not torch.allclose(pos0, pos5)


def test_errors():
    with pytest.raises(ValueError, match="shorter than the 7 frames"):
        make("conv2d")(torch.randn(1, 6, 20), torch.ones(1, 1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="too small"):
        make("conv2d8", idim=6)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_scriptable(name):
    layer = make(name)
    s = torch.jit.script(layer)
    x = torch.randn(2, 30, 20)
    m = torch.ones(2, 1, 30, dtype=torch.bool)
    for a, b in zip(layer(x, m, 3), s(x, m, 3)):
        assert torch.allclose(a, b, atol=1e-6)
    assert s.subsampling_rate == layer.subsampling_rate
    assert torch.allclose(s.position_encoding(3, 4), layer.position_encoding(3, 4))


def test_linear_is_linear_then_layernorm():
    layer = LinearNoSubsampling(5, 4, 0.0, RelPositionalEncoding(4, 0.0)).eval()
    x = torch.randn(1, 3, 5)
    y, _, _ = layer(x, torch.ones(1, 1, 3, dtype=torch.bool))
    h = x @ layer.out[0].weight.T + layer.out[0].bias
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(y, h * 2.0, atol=1e-5)  # xscale = sqrt(4)
