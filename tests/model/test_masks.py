"""Masks against naive constructions; dynamic-chunk training statistics."""
import pytest
import torch

from wenet_moe.model.masks import (add_optional_chunk_mask, make_non_pad_mask, make_pad_mask,
                                   subsequent_chunk_mask, subsequent_mask)


def naive_chunk_mask(size, chunk, left):
    m = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        start_chunk = i // chunk
        first = 0 if left < 0 else max(0, (start_chunk - left) * chunk)
        last = min(size, (start_chunk + 1) * chunk)
        m[i, first:last] = True
    return m


def test_pad_masks():
    lens = torch.tensor([5, 3, 1])
    ref = torch.tensor([[j >= n for j in range(5)] for n in [5, 3, 1]])
    assert torch.equal(make_pad_mask(lens), ref)
    assert torch.equal(make_non_pad_mask(lens), ~ref)
    assert make_pad_mask(lens, 7).shape == (3, 7) and make_pad_mask(lens, 7)[0, 5:].all()
    assert torch.equal(make_pad_mask(lens, 4), ref[:, :4])


def test_subsequent_mask():
    ref = torch.tensor([[j <= i for j in range(6)] for i in range(6)])
    assert torch.equal(subsequent_mask(6), ref)


@pytest.mark.parametrize("size,chunk,left", [(10, 3, -1), (10, 3, 0), (10, 3, 2), (7, 1, 1),
                                             (16, 4, 1), (5, 8, -1), (9, 9, 0)])
def test_subsequent_chunk_mask(size, chunk, left):
    assert torch.equal(subsequent_chunk_mask(size, chunk, left), naive_chunk_mask(size, chunk, left))


def pad(lens, t):
    return make_non_pad_mask(torch.tensor(lens), t).unsqueeze(1)


def test_decoding_and_static_modes():
    xs = torch.zeros(2, 12, 4)
    masks = pad([12, 9], 12)
    full = add_optional_chunk_mask(xs, masks, True, False, -1, 0, -1)
    assert torch.equal(full, masks.expand(2, 12, 12))
    chunk = add_optional_chunk_mask(xs, masks, True, False, 4, 0, 1)
    assert torch.equal(chunk, masks & naive_chunk_mask(12, 4, 1))
    static = add_optional_chunk_mask(xs, masks, False, False, 0, 5, 1)
    assert torch.equal(static, masks & naive_chunk_mask(12, 5, 1))
    plain = add_optional_chunk_mask(xs, masks, False, False, 0, 0, -1)
    assert torch.equal(plain, masks)


def chunk_of(mask):
    """Recover (chunk size, full-context?) from a (L, L) block mask."""
    row0 = mask[0]
    return int(row0.sum()), bool(mask.all())


def test_dynamic_training_draws():
    torch.manual_seed(1234)
    length = 100
    xs = torch.zeros(1, length, 4)
    masks = pad([length], length)
    n, full, sizes = 400, 0, []
    for _ in range(n):
        m = add_optional_chunk_mask(xs, masks, True, False, 0, 0, -1, True, 25)[0]
        size, is_full = chunk_of(m)
        if is_full:
            full += 1
        else:
            sizes.append(size)
            assert torch.equal(m, naive_chunk_mask(length, size, -1))
    assert 0.4 < full / n < 0.6
    assert min(sizes) >= 1 and max(sizes) <= 25
    assert len(set(sizes)) > 15


def test_dynamic_left_chunks_and_no_full_context():
    torch.manual_seed(7)
    length = 60
    xs = torch.zeros(1, length, 4)
    masks = pad([length], length)
    lefts = set()
    for _ in range(200):
        m = add_optional_chunk_mask(xs, masks, True, True, 0, 0, -1, False, 25)[0]
        assert not m.all()
        size = int(m[0].sum())
        last = m[length - 1]
        visible_chunks = (int(last.sum()) - (length - (length - 1) // size * size)) // size
        lefts.add(visible_chunks)
        assert torch.equal(m, naive_chunk_mask(length, size, visible_chunks))
    assert len(lefts) > 3


def test_scriptable():
    s = torch.jit.script(add_optional_chunk_mask)
    xs = torch.zeros(2, 12, 4)
    masks = pad([12, 9], 12)
    assert torch.equal(s(xs, masks, True, False, 4, 0, 1, True, 25),
                       add_optional_chunk_mask(xs, masks, True, False, 4, 0, 1))
    torch.jit.script(make_pad_mask)
