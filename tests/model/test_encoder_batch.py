"""Cross-stream batching: `forward_chunk_batch` over B streams equals each stream's own
`forward_chunk` loop (outputs and caches), for streams of different lengths that
start at different rounds (caches of different lengths, left-padded), a stream
shorter than one window, streams whose last window is short (right-padded), and a
bounded attention cache; conformer (MoE / dense, both conv padding modes) and
transformer (abs_pos); eager and TorchScript."""
import pytest
import torch

from test_encoder_common import FEAT, tiny_conformer, tiny_transformer
from wenet_moe.export.verify import chunk_windows

ATOL = 1e-5

# (frames, first round): shorter than one window (19 frames at chunk 4), last window
# short, exact windows, long; starting at rounds 0, 0, 1, 2, 3
STREAMS = [(60, 0), (12, 1), (83, 0), (19, 2), (141, 3)]


def _encoders():
    moe = dict(mlp_type="moe", n_expert=4, n_expert_activated=2)
    return {
        "conformer-moe": tiny_conformer(**moe),
        "conformer-dense-pad-input": tiny_conformer(cnn_module_pad="input"),
        "conformer-batch-norm": tiny_conformer(cnn_module_norm="batch_norm", **moe),
        "transformer-abs-pos": tiny_transformer(),
    }


def run_alone(enc, xs, chunk, required):
    """[(out (T', D), att (blocks, H, T_c, 2dk), cnn (blocks, 1, D, k-1))] per chunk."""
    sub, rc = enc.embed.subsampling_rate, enc.embed.right_context
    att = torch.zeros(0, 0, 0, 0)
    cnn = torch.zeros(0, 0, 0, 0)
    offset, steps = 0, []
    for start, end in chunk_windows(xs.size(0), chunk, sub, rc):
        out, att, cnn = enc.forward_chunk(xs[start:end].unsqueeze(0), offset, required, att, cnn)
        offset += out.size(1)
        steps.append((out[0], att, cnn))
    return steps


def run_batched(forward, enc, streams, chunk, required, att_shape, cnn_shape):
    """The streams advanced together, one `forward_chunk_batch` call per round over
    the streams with a window ready; returns the per-stream steps as run_alone."""
    sub, rc = enc.embed.subsampling_rate, enc.embed.right_context
    windows = [chunk_windows(xs.size(0), chunk, sub, rc) for xs, _ in streams]
    att = [torch.zeros(att_shape[0], att_shape[1], 0, att_shape[3]) for _ in streams]
    cnn = [torch.zeros(cnn_shape) for _ in streams]
    offsets = [0] * len(streams)
    steps = [[] for _ in streams]
    calls = 0
    for rnd in range(64):
        ready = [b for b, (_, first) in enumerate(streams)
                 if first <= rnd and rnd - first < len(windows[b])]
        if not ready:
            if rnd > max(first for _, first in streams):
                break
            continue
        wins = [streams[b][0][slice(*windows[b][rnd - streams[b][1]])] for b in ready]
        t_in = max(w.size(0) for w in wins)
        xs = torch.stack([torch.nn.functional.pad(w, (0, 0, 0, t_in - w.size(0))) for w in wins])
        lens = torch.tensor([w.size(0) for w in wins])
        t_out = (t_in - rc - 1) // sub + 1
        out_lens = [(n - rc - 1) // sub + 1 for n in lens.tolist()]
        cache_t = max(att[b].size(2) for b in ready)
        a = torch.zeros(len(ready), att_shape[0], att_shape[1], cache_t, att_shape[3])
        mask = torch.zeros(len(ready), 1, cache_t + t_out, dtype=torch.bool)
        for r, b in enumerate(ready):
            n = att[b].size(2)
            a[r, :, :, cache_t - n:] = att[b]
            mask[r, 0, cache_t - n: cache_t + out_lens[r]] = True
        c = torch.stack([cnn[b][:, 0] for b in ready])
        out, got_lens, new_att, new_cnn = forward(
            xs, lens, torch.tensor([offsets[b] for b in ready]), required, a, c, mask)
        calls += 1
        assert got_lens.tolist() == out_lens
        for r, b in enumerate(ready):
            keep = min(att[b].size(2) + out_lens[r], new_att.size(3))
            att[b] = new_att[r, :, :, new_att.size(3) - keep:]
            cnn[b] = new_cnn[r].unsqueeze(1)
            offsets[b] += out_lens[r]
            steps[b].append((out[r, :out_lens[r]], att[b], cnn[b]))
    return steps, calls


def _close(name, got, want):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    assert diff <= ATOL, (name, diff)


def _check(enc, forward, chunk, required):
    gen = torch.Generator().manual_seed(0)
    streams = [(torch.randn(n, FEAT, generator=gen), first) for n, first in STREAMS]
    from wenet_moe.export.onnx_export import cache_shapes, set_feature_dim

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = enc

    holder = Holder()
    set_feature_dim(holder, FEAT)
    att_shape, cnn_shape = cache_shapes(holder)
    with torch.no_grad():
        alone = [run_alone(enc, xs, chunk, required) for xs, _ in streams]
        together, calls = run_batched(forward, enc, streams, chunk, required, att_shape, cnn_shape)
    assert [len(s) for s in alone] == [len(s) for s in together]
    if chunk == 4:  # stream 1: one short (padded) window; stream 3: exactly one window
        assert len(alone[1]) == 1 and len(alone[3]) == 1
    assert calls < sum(len(s) for s in alone)          # streams really shared calls
    for b, (want, got) in enumerate(zip(alone, together)):
        for k, ((o1, a1, c1), (o2, a2, c2)) in enumerate(zip(want, got)):
            _close(f"stream {b} chunk {k} output", o2, o1)
            _close(f"stream {b} chunk {k} att cache", a2, a1)
            _close(f"stream {b} chunk {k} cnn cache", c2, c1)


@pytest.mark.parametrize("name", list(_encoders()))
@pytest.mark.parametrize("chunk,required", [(4, -1), (4, 8), (3, 5), (1, 2)])
def test_batched_chunks_equal_streams_alone(name, chunk, required):
    torch.manual_seed(0)
    enc = _encoders()[name]
    _check(enc, enc.forward_chunk_batch, chunk, required)


def test_scripted_batched_chunks_equal_streams_alone():
    torch.manual_seed(0)
    enc = _encoders()["conformer-moe"]
    scripted = torch.jit.script(enc)
    _check(enc, scripted.forward_chunk_batch, 4, -1)


def test_short_chunk_conv_cache_comes_from_last_valid_frames():
    """A padded tail must not reach the new conv cache: garbage in the padding changes
    nothing, and the cache differs from the padded tail's (the check can fail)."""
    torch.manual_seed(0)
    enc = _encoders()["conformer-moe"]
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(2, 19, FEAT, generator=gen)
    lens = torch.tensor([19, 11])
    blocks, heads, d = enc.num_blocks, enc.attention_heads, enc.output_size()
    att = torch.zeros(2, blocks, heads, 0, 2 * d // heads)
    cnn = torch.zeros(2, blocks, d, 3)
    mask = torch.ones(2, 1, 4, dtype=torch.bool)
    mask[1, 0, 2:] = False
    with torch.no_grad():
        out, out_lens, new_att, new_cnn = enc.forward_chunk_batch(
            xs, lens, torch.tensor([0, 0]), -1, att, cnn, mask)
        xs2 = xs.clone()
        xs2[1, 11:] = 50.0
        out2, _, new_att2, new_cnn2 = enc.forward_chunk_batch(
            xs2, lens, torch.tensor([0, 0]), -1, att, cnn, mask)
        _, att1, cnn1 = enc.forward_chunk(xs[1:, :11], 0, -1)
        _, _, cnn_tail = enc.forward_chunk(xs2[1:], 0, -1)  # the padded tail's cache
    assert out_lens.tolist() == [4, 2]
    _close("valid output", out2[1, :2], out[1, :2])
    _close("conv cache", new_cnn2[1], new_cnn[1])
    _close("conv cache alone", new_cnn[1], cnn1[:, 0])
    _close("att cache alone", new_att[1, :, :, 2:], att1)
    assert (new_cnn[1] - cnn_tail[:, 0]).abs().max() > 1e-3


def test_bad_shapes_name_the_argument():
    enc = _encoders()["conformer-moe"]
    xs = torch.zeros(2, 19, FEAT)
    with pytest.raises(ValueError, match="chunk_lens"):
        enc.forward_chunk_batch(xs, torch.tensor([19]), torch.tensor([0, 0]), -1,
                                torch.zeros(2, 2, 2, 0, 16), torch.zeros(2, 2, 16, 3),
                                torch.ones(2, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="att_cache"):
        enc.forward_chunk_batch(xs, torch.tensor([19, 19]), torch.tensor([0, 0]), -1,
                                torch.zeros(2, 2, 0, 16), torch.zeros(2, 2, 16, 3),
                                torch.ones(2, 1, 4, dtype=torch.bool))
