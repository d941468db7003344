"""Multi-head attention: naive reference, masks, cache, TorchScript."""
import math

import pytest
import torch

from wenet_moe.layers.attention import MultiHeadedAttention, RelPositionMultiHeadedAttention
from wenet_moe.layers.embedding import RelPositionalEncoding


def naive_attention(att, query, key, value, mask, pos_emb=None):
    """Per-batch, per-head loop with explicit formulas (independent of the module)."""
    b, t1, d = query.shape
    h, dk = att.h, att.d_k
    out = torch.zeros(b, t1, d)
    for n in range(b):
        q = query[n] @ att.linear_q.weight.T + att.linear_q.bias
        k = key[n] @ att.linear_k.weight.T + att.linear_k.bias
        v = value[n] @ att.linear_v.weight.T + att.linear_v.bias
        heads = []
        for i in range(h):
            sl = slice(i * dk, (i + 1) * dk)
            if pos_emb is None:
                s = q[:, sl] @ k[:, sl].T
            else:
                p = pos_emb[0] @ att.linear_pos.weight.T
                s = (q[:, sl] + att.pos_bias_u[i]) @ k[:, sl].T \
                    + (q[:, sl] + att.pos_bias_v[i]) @ p[:, sl].T
            s = s / math.sqrt(dk)
            m = mask[n].expand(t1, -1)
            s = s.masked_fill(~m, float("-inf"))
            heads.append(torch.softmax(s, -1) @ v[:, sl])
        out[n] = torch.cat(heads, -1) @ att.linear_out.weight.T + att.linear_out.bias
    return out


def lengths_mask(lens, t):
    return (torch.arange(t).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)).unsqueeze(1)


@pytest.mark.parametrize("rel", [False, True])
def test_matches_naive_with_padding_mask(rel):
    att = (RelPositionMultiHeadedAttention if rel else MultiHeadedAttention)(4, 16, 0.0).eval()
    q = torch.randn(2, 5, 16)
    kv = torch.randn(2, 7, 16)
    mask = lengths_mask([7, 4], 7)
    pos = torch.randn(1, 7, 16) if rel else torch.empty(0)
    out, cache = att(q, kv, kv, mask, pos)
    ref = naive_attention(att, q, kv, kv, mask, pos if rel else None)
    assert torch.allclose(out, ref, atol=1e-5)
    assert cache.shape == (2, 4, 7, 8)


def test_masked_keys_do_not_matter_and_no_mask_means_all():
    att = MultiHeadedAttention(2, 8, 0.0).eval()
    x = torch.randn(1, 6, 8)
    mask = lengths_mask([4], 6)
    y1, _ = att(x, x, x, mask)
    x2 = x.clone()
    x2[:, 4:] = 100.0
    y2, _ = att(x2[:, :4], x2, x2, mask)
    assert torch.allclose(y1[:, :4], y2, atol=1e-6)
    full, _ = att(x, x, x, torch.ones(1, 6, 6, dtype=torch.bool))
    none, _ = att(x, x, x)
    assert torch.allclose(full, none, atol=1e-6)


def test_fully_masked_row_is_finite_with_finite_grads():
    att = RelPositionMultiHeadedAttention(2, 8, 0.0)
    x = torch.randn(1, 3, 8, requires_grad=True)
    mask = torch.tensor([[[True, False, False], [False, False, False], [True, True, False]]])
    y, _ = att(x, x, x, mask, torch.randn(1, 3, 8))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(att.pos_bias_u.grad).all()


@pytest.mark.parametrize("rel", [False, True])
def test_cache_equals_concatenated_sequence(rel):
    """Attention of chunk 2 over (cache of chunk 1, chunk 2) == attention of the same
    queries over the concatenated sequence."""
    att = (RelPositionMultiHeadedAttention if rel else MultiHeadedAttention)(4, 16, 0.0).eval()
    enc = RelPositionalEncoding(16, 0.0)
    x = torch.randn(1, 9, 16)
    a, b = x[:, :5], x[:, 5:]
    no_mask = torch.ones((0, 0, 0), dtype=torch.bool)
    _, cache = att(a, a, a, no_mask, enc.position_encoding(0, 5))
    assert cache.shape == (1, 4, 5, 8)
    y_chunk, new_cache = att(b, b, b, no_mask, enc.position_encoding(0, 9), cache)
    assert new_cache.shape == (1, 4, 9, 8)
    y_full, full_cache = att(b, x, x, no_mask, enc.position_encoding(0, 9))
    assert torch.allclose(y_chunk, y_full, atol=1e-5)
    assert torch.allclose(new_cache, full_cache, atol=1e-6)
    # a streaming att_mask longer than the keys is cut; blocking the first cached
    # key equals dropping it from the sequence
    m = torch.ones(1, 1, 9, dtype=torch.bool)
    m[..., 0] = False
    y_m, _ = att(b, b, b, m, enc.position_encoding(0, 9), cache)
    y_drop, _ = att(b, x[:, 1:], x[:, 1:], no_mask, enc.position_encoding(1, 8))
    assert torch.allclose(y_m, y_drop, atol=1e-5)


def test_scripted_equals_eager():
    att = RelPositionMultiHeadedAttention(2, 8, 0.0).eval()
    s = torch.jit.script(att)
    x = torch.randn(1, 4, 8)
    pos = torch.randn(1, 7, 8)
    cache = torch.randn(1, 2, 3, 8)
    mask = torch.ones(1, 1, 7, dtype=torch.bool)
    y1, c1 = att(x, x, x, mask, pos, cache)
    y2, c2 = s(x, x, x, mask, pos, cache)
    assert torch.allclose(y1, y2, atol=1e-6) and torch.equal(c1, c2)
    m = torch.jit.script(MultiHeadedAttention(2, 8, 0.0).eval())
    assert m(x, x, x)[0].shape == (1, 4, 8)


def test_bad_head_count():
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadedAttention(3, 16, 0.0)
