"""Positional encodings: formula, offsets for streaming, TorchScript."""
import math

import pytest
import torch

from wenet_moe.layers.embedding import (NoPositionalEncoding, PositionalEncoding,
                                        RelPositionalEncoding)


def reference_pe(offset, size, d):
    pe = torch.zeros(size, d)
    for p in range(size):
        for i in range(0, d, 2):
            ang = (p + offset) / (10000 ** (i / d))
            pe[p, i] = math.sin(ang)
            pe[p, i + 1] = math.cos(ang)
    return pe.unsqueeze(0)


def test_formula_and_offset():
    enc = PositionalEncoding(8, 0.0)
    assert torch.allclose(enc.position_encoding(0, 6), reference_pe(0, 6, 8), atol=1e-5)
    assert torch.allclose(enc.position_encoding(37, 4), reference_pe(37, 4, 8), atol=1e-4)
    whole = enc.position_encoding(0, 50)
    assert torch.equal(enc.position_encoding(20, 30), whole[:, 20:])
    # no maximum length
    assert enc.position_encoding(100000, 3).shape == (1, 3, 8)


def test_forward_variants():
    x = torch.randn(2, 5, 8)
    pe = reference_pe(3, 5, 8)
    y, p = PositionalEncoding(8, 0.0)(x, 3)
    assert torch.allclose(y, x * math.sqrt(8) + pe, atol=1e-5)
    assert torch.allclose(p, pe, atol=1e-5)
    y, p = RelPositionalEncoding(8, 0.0)(x, 3)
    assert torch.allclose(y, x * math.sqrt(8), atol=1e-6)
    assert torch.allclose(p, pe, atol=1e-5)
    y, p = NoPositionalEncoding(8, 0.0)(x, 3)
    assert torch.equal(y, x) and p.shape == (1, 5, 8) and not p.any()


def test_odd_dimension_rejected():
    with pytest.raises(ValueError, match="even"):
        RelPositionalEncoding(7, 0.1)


@pytest.mark.parametrize("cls", [PositionalEncoding, RelPositionalEncoding, NoPositionalEncoding])
def test_scriptable(cls):
    enc = cls(8, 0.0).eval()
    s = torch.jit.script(enc)
    x = torch.randn(1, 4, 8)
    assert torch.allclose(s(x, 5)[0], enc(x, 5)[0])
    assert torch.allclose(s.position_encoding(5, 4), enc.position_encoding(5, 4))


def test_low_precision_model_keeps_float32_frequencies():
    enc = RelPositionalEncoding(8, 0.0).to(torch.bfloat16)
    assert torch.allclose(enc.position_encoding(3000, 4), reference_pe(3000, 4, 8), atol=1e-3)
    x = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    y, pos = enc(x, 3000)
    assert y.dtype == pos.dtype == torch.bfloat16
    assert torch.allclose(pos.float(), reference_pe(3000, 4, 8), atol=1e-2)
