"""Chunk-by-chunk streaming with caches equals the whole-utterance forward with the
same chunk mask; context checks; explicit forward_chunk cache semantics."""
import pytest
import torch

from test_encoder_common import FEAT, tiny_conformer, tiny_transformer

TOL = 1e-5


def full_and_streaming(enc, xs, chunk, left):
    with torch.no_grad():
        full, masks = enc(xs, torch.tensor([xs.size(1)]), chunk, left)
        stream, smasks = enc.forward_chunk_by_chunk(xs, chunk, left)
    assert masks.all() and smasks.shape == (1, 1, stream.size(1))
    return full, stream


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("left", [-1, 2])
def test_conformer_conv2d_streaming_equals_full(chunk, left):
    enc = tiny_conformer()
    xs = torch.randn(1, 157, FEAT)
    full, stream = full_and_streaming(enc, xs, chunk, left)
    assert full.shape == stream.shape == (1, 38, 16)
    assert (full - stream).abs().max().item() <= TOL


@pytest.mark.parametrize("input_layer,frames,out", [("conv2d6", 131, 21), ("conv2d8", 143, 17)])
def test_conformer_x6_x8_streaming_equals_full(input_layer, frames, out):
    enc = tiny_conformer(input_layer=input_layer, cnn_module_norm="batch_norm")
    xs = torch.randn(1, frames, FEAT)
    for chunk, left in [(4, -1), (3, 1)]:
        full, stream = full_and_streaming(enc, xs, chunk, left)
        assert full.shape == stream.shape == (1, out, 16)
        assert (full - stream).abs().max().item() <= TOL


def test_transformer_and_abs_pos_streaming_equals_full():
    for enc in [tiny_transformer(), tiny_conformer(pos_enc_layer_type="abs_pos",
                                                   selfattention_layer_type="selfattn",
                                                   macaron_style=False)]:
        xs = torch.randn(1, 90, FEAT)
        full, stream = full_and_streaming(enc, xs, 4, 2)
        assert (full - stream).abs().max().item() <= TOL


def test_full_context_sees_the_future_and_chunks_do_not():
    enc = tiny_conformer()
    xs = torch.randn(1, 79, FEAT)  # the last output frame uses input frames 72..78
    xs2 = xs.clone()
    xs2[0, -1] += 3.0
    lens = torch.tensor([79])
    with torch.no_grad():
        a, _ = enc(xs, lens, -1)
        b, _ = enc(xs2, lens, -1)
        assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4
        a, _ = enc(xs, lens, 4, -1)
        b, _ = enc(xs2, lens, 4, -1)
        assert torch.equal(a[0, :16], b[0, :16])
        assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4


def test_left_chunks_limit_the_past():
    enc = tiny_conformer(use_cnn_module=False)  # the conv would carry the past along
    xs = torch.randn(1, 120, FEAT)
    xs2 = xs.clone()
    xs2[0, :4] += 3.0  # changes output frame 0 only
    lens = torch.tensor([120])
    with torch.no_grad():
        a, _ = enc(xs, lens, 4, 1)
        b, _ = enc(xs2, lens, 4, 1)
        # one left chunk per block: with 2 blocks chunk c depends on chunks c-2..c
        assert torch.equal(a[0, 12:], b[0, 12:])
        assert (a[0, 8:12] - b[0, 8:12]).abs().max() > 1e-4
        a, _ = enc(xs, lens, 4, -1)
        b, _ = enc(xs2, lens, 4, -1)
        assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4


def test_required_cache_size_semantics():
    enc = tiny_conformer()
    xs = torch.randn(1, 27, FEAT)  # 6 output frames
    with torch.no_grad():
        for required, kept in [(-1, 6), (0, 0), (4, 4), (10, 6)]:
            out, att, cnn = enc.forward_chunk(xs, 0, required)
            assert out.shape == (1, 6, 16)
            assert att.shape == (2, 2, kept, 16)
            assert cnn.shape == (2, 1, 16, 3)
        out2, att2, _ = enc.forward_chunk(xs, 6, -1, att, cnn)
        assert att2.shape == (2, 2, 12, 16)


def test_runtime_style_fixed_cache_with_att_mask():
    """ONNX runtime style: a fixed-size zero cache from the start, with att_mask
    blocking the slots not filled yet; equals the chunk/left-chunk full forward."""
    enc = tiny_conformer()
    chunk, left = 4, 2
    required = chunk * left
    sub, rc = enc.embed.subsampling_rate, enc.embed.right_context
    window, stride = (chunk - 1) * sub + rc + 1, sub * chunk
    xs = torch.randn(1, 6 * stride + rc - sub + 1, FEAT)
    att = torch.zeros(2, 2, required, 16)
    cnn = torch.zeros(2, 1, 16, 3)
    outs, offset = [], 0
    with torch.no_grad():
        for k, start in enumerate(range(0, xs.size(1) - rc, stride)):
            mask = torch.ones(1, 1, required + chunk, dtype=torch.bool)
            mask[:, :, :max(required - k * chunk, 0)] = False
            y, att, cnn = enc.forward_chunk(xs[:, start:start + window], offset, required,
                                            att, cnn, mask)
            assert att.shape == (2, 2, required, 16)
            outs.append(y)
            offset += y.size(1)
        full, _ = enc(xs, torch.tensor([xs.size(1)]), chunk, left)
    stream = torch.cat(outs, 1)
    assert stream.shape == full.shape == (1, 24, 16)
    assert (stream - full).abs().max().item() <= TOL


def test_chunk_by_chunk_errors():
    enc = tiny_conformer()
    with pytest.raises(ValueError, match="decoding_chunk_size must be > 0"):
        enc.forward_chunk_by_chunk(torch.randn(1, 30, FEAT), 0, -1)
    with pytest.raises(ValueError, match="one utterance"):
        enc.forward_chunk_by_chunk(torch.randn(2, 30, FEAT), 4, -1)
    with pytest.raises(ValueError, match="streaming encoder"):
        tiny_conformer(use_dynamic_chunk=False).forward_chunk_by_chunk(
            torch.randn(1, 30, FEAT), 4, -1)
