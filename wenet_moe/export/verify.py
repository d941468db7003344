"""Self-verification of an export: the exported graphs against eager PyTorch on
random inputs whose lengths differ from the tracing example (1-frame chunks, long
inputs, batches with padding, n-best lists of many lengths).

`compare` is the one tolerance rule: every element must satisfy
|got - want| <= atol + rtol * |want|, except that at most max(1, 1e-5 * size)
elements may miss it by less than 10x (the isolated rounding outliers of WeNet
issue #1827); anything else raises ParityError naming the largest difference.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ATOL = 1e-4
RTOL = 1e-4


class ParityError(RuntimeError):
    """An exported graph disagrees with PyTorch."""


def compare(name: str, got: np.ndarray, want: np.ndarray, atol: float = ATOL,
            rtol: float = RTOL) -> float:
    """Check `got` against the reference `want`; returns max |got - want|."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        raise ParityError(f"{name}: shape {got.shape} != PyTorch {want.shape}")
    if got.size == 0:
        return 0.0
    if got.dtype == np.bool_ or np.issubdtype(got.dtype, np.integer):
        bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        if bad.size:
            i = int(bad[0])
            raise ParityError(f"{name}: {bad.size}/{got.size} elements differ, first at flat "
                              f"index {i}: {got.reshape(-1)[i]} vs PyTorch {want.reshape(-1)[i]}")
        return 0.0
    g = got.astype(np.float64).reshape(-1)
    w = want.astype(np.float64).reshape(-1)
    same = (g == w) | (np.isnan(g) & np.isnan(w))
    diff = np.where(same, 0.0, np.abs(g - w))
    diff = np.where(np.isnan(diff), np.inf, diff)
    bound = atol + rtol * np.abs(np.where(np.isfinite(w), w, 0.0))
    worst = int(np.argmax(diff))
    max_diff = float(diff[worst])
    missed = int(np.count_nonzero(diff > bound))
    allowed = max(1, int(1e-5 * g.size))
    if missed > allowed or np.any(diff > 10.0 * bound):
        index = np.unravel_index(worst, got.shape)
        raise ParityError(
            f"{name}: max |diff| {max_diff:.3g} at {tuple(int(i) for i in index)} "
            f"(got {g[worst]:.6g}, PyTorch {w[worst]:.6g}); {missed}/{g.size} elements "
            f"beyond atol {atol:g} + rtol {rtol:g} * |ref|")
    return max_diff


def session(path: str):
    """A single-threaded CPU onnxruntime session (quiet); for a `<graph>.kernel`
    directory, the runtime's `ExpertSplitEncoder` of it (the same interface)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if os.path.isdir(path):
        from wenet_moe_runtime.expert_encoder import ExpertSplitEncoder
        return ExpertSplitEncoder(path, opts, threads=1)
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def feature_dim(model: torch.nn.Module) -> int:
    from wenet_moe.export.onnx_export import _feature_dim
    return _feature_dim(model)


def chunk_windows(num_frames: int, chunk: int, subsampling: int, right_context: int
                  ) -> List[Tuple[int, int]]:
    """(start, end) input-frame windows of a streaming loop: window
    (chunk-1)*subsampling + right_context + 1, stride chunk*subsampling; the last
    window may be shorter (it still yields >= 1 output frame)."""
    context = right_context + 1
    stride = subsampling * chunk
    window = (chunk - 1) * subsampling + context
    return [(s, min(s + window, num_frames)) for s in range(0, num_frames - context + 1, stride)]


def _mask(cache_t: int, t_out: int, valid_cache: int) -> np.ndarray:
    """att_mask (1, 1, cache_t + t_out): cache slots not yet filled are False."""
    mask = np.ones((1, 1, cache_t + t_out), dtype=bool)
    mask[:, :, : max(cache_t - valid_cache, 0)] = False
    return mask


def stream_encoder(model: torch.nn.Module, sess, xs: torch.Tensor, chunk: int, required: int,
                   names: Sequence[str], scalar_offsets: bool = True, with_ctc: bool = False,
                   zero_cache: bool = True) -> Tuple[float, int]:
    """Run `sess` (encoder.onnx or model_streaming.onnx) chunk by chunk over xs
    (1, T, F) with its own caches, beside the eager forward_chunk with the eager
    caches; compare output and caches at every chunk.

    With `zero_cache` and required > 0 the caches start as real zeros of the
    required size hidden by att_mask, positions starting at `required` (WeNet's
    and sherpa-onnx's runtimes); otherwise they start empty (T_cache = 0).
    Returns (largest difference, number of chunks).
    """
    from wenet_moe.export.onnx_export import cache_shapes

    enc = model.encoder
    att_shape, cnn_shape = cache_shapes(model)
    cache_t = required if (zero_cache and required > 0) else 0
    att = torch.zeros(att_shape[0], att_shape[1], cache_t, att_shape[3])
    cnn = torch.zeros(cnn_shape)
    o_att, o_cnn = _np(att), _np(cnn)
    offset, valid = cache_t, 0
    worst = 0.0
    windows = chunk_windows(xs.size(1), chunk, enc.embed.subsampling_rate, enc.embed.right_context)
    for k, (start, end) in enumerate(windows):
        x = xs[:, start:end]
        t_out = (x.size(1) - enc.embed.right_context - 1) // enc.embed.subsampling_rate + 1
        mask = _mask(att.size(2), t_out, valid if cache_t > 0 else att.size(2))
        with torch.no_grad():
            out, att, cnn = enc.forward_chunk(x, offset, required, att, cnn, torch.from_numpy(mask))
            if with_ctc:
                out = model.ctc_activation(out)
        shape = () if scalar_offsets else (1,)
        feeds = dict(zip(names, [_np(x), np.full(shape, offset, np.int64),
                                 np.full(shape, required, np.int64), o_att, o_cnn,
                                 _mask(o_att.shape[2], t_out,
                                       valid if cache_t > 0 else o_att.shape[2])]))
        got, o_att, o_cnn = sess.run(None, feeds)
        tag = f"chunk {k} (frames {start}:{end}, chunk {chunk}, required_cache_size {required})"
        worst = max(worst, compare(f"{names[0]} output, {tag}", got, _np(out)),
                    compare(f"att cache, {tag}", o_att, _np(att)),
                    compare(f"cnn cache, {tag}", o_cnn, _np(cnn)))
        offset += out.size(1)
        valid += out.size(1)
    return worst, len(windows)


def verify_encoder(model, path: str, chunk_size: int, left_chunks: int, seed: int = 0,
                   sherpa: bool = False) -> Dict[str, float]:
    """Streaming loops over encoder.onnx (or model_streaming.onnx with `sherpa`):
    the export's chunk/left chunks, 1-frame chunks with unlimited history, and an
    odd chunk with a cache size that is not a multiple of it; long utterances."""
    from wenet_moe.export.onnx_export import ENCODER_INPUTS, STREAMING_INPUTS

    sess = session(path)
    names = STREAMING_INPUTS if sherpa else ENCODER_INPUTS
    chunk = chunk_size if chunk_size > 0 else 16
    left = left_chunks if left_chunks > 0 else 2
    cases = [(chunk, chunk * left, True, 37 + 5 * chunk * model.subsampling_rate()),
             (1, -1 if not sherpa else 3, True, 61), (3, 5, not sherpa, 150)]
    if not sherpa:
        cases.append((chunk, chunk * left, False, 301))
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for chunk_i, required, zero_cache, frames in cases:
        xs = torch.randn(1, frames, feature_dim(model), generator=gen)
        worst, n = stream_encoder(model, sess, xs, chunk_i, required, names,
                                  scalar_offsets=not sherpa, with_ctc=sherpa,
                                  zero_cache=zero_cache)
        report[f"{os.path.basename(path)} chunk={chunk_i} required={required} "
               f"{'zero' if zero_cache else 'empty'}-cache x{n}"] = worst
    return report


def verify_ctc(model, path: str, seed: int = 0) -> Dict[str, float]:
    sess = session(path)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch, t in [(1, 1), (1, 2), (1, 23), (2, 150)]:
        h = torch.randn(batch, t, model.encoder.output_size(), generator=gen)
        with torch.no_grad():
            want = model.ctc_activation(h)
        worst = max(worst, compare(f"ctc.onnx probs (B={batch}, T={t})",
                                   sess.run(None, {"hidden": _np(h)})[0], _np(want)))
    return {"ctc.onnx": worst}


def offline_reference(model, x: torch.Tensor, lens: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager (log_probs (N, T', V), lens (N,)) of the full-context encoder + CTC."""
    with torch.no_grad():
        out, mask = model.encoder(x, lens, -1, -1)
        return model.ctc_activation(out), mask.squeeze(1).sum(1)


def verify_offline(model, path: str, lengths: Sequence[int], seed: int = 0) -> Dict[str, float]:
    """model.onnx at each length (batch 1) and once as a padded batch of all lengths
    (valid frames compared)."""
    sess = session(path)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    feats = [torch.randn(t, feature_dim(model), generator=gen) for t in lengths]
    for f in feats:
        x, lens = f.unsqueeze(0), torch.tensor([f.size(0)])
        want, want_lens = offline_reference(model, x, lens)
        got, got_lens = sess.run(None, {"x": _np(x), "x_lens": _np(lens)})
        worst = max(worst, compare(f"model.onnx log_probs (T={f.size(0)})", got, _np(want)))
        compare(f"model.onnx log_probs_lens (T={f.size(0)})", got_lens, _np(want_lens))
    x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    lens = torch.tensor([f.size(0) for f in feats])
    want, want_lens = offline_reference(model, x, lens)
    got, got_lens = sess.run(None, {"x": _np(x), "x_lens": _np(lens)})
    compare("model.onnx log_probs_lens (batch)", got_lens, _np(want_lens))
    for b, n in enumerate(_np(want_lens)):
        worst = max(worst, compare(f"model.onnx log_probs (batch item {b}, T={lengths[b]})",
                                   got[b, :n], _np(want[b, :n])))
    return {f"model.onnx x{len(lengths)} lengths + batch": worst}


def random_hyps(model, gen: torch.Generator, num: int, max_len: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hyps (num, L) with <sos> first and <eos> padding, hyps_lens (num,)) with
    lengths 1..max_len (1 = <sos> only)."""
    lens = torch.randint(1, max_len + 1, (num,), generator=gen)
    lens[0] = max_len
    hyps = torch.randint(0, model.vocab_size, (num, max_len), generator=gen)
    hyps[:, 0] = model.sos_symbol()
    pos = torch.arange(max_len).unsqueeze(0)
    hyps = torch.where(pos < lens.unsqueeze(1), hyps, torch.full_like(hyps, model.eos_symbol()))
    return hyps, lens


def verify_decoder(model, path: str, reverse_weight: float, seed: int = 0) -> Dict[str, float]:
    """decoder.onnx for n-best sizes 1..10, hypothesis lengths 1..12, encoder
    lengths 1..60, reverse_weight 0 and the export's."""
    sess = session(path)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    weights = sorted({0.0, float(reverse_weight)})
    for num, max_len, t in [(1, 1, 1), (4, 6, 13), (10, 12, 60), (3, 2, 7)]:
        enc_out = torch.randn(1, t, model.encoder.output_size(), generator=gen)
        hyps, lens = random_hyps(model, gen, num, max_len)
        for rw in weights:
            with torch.no_grad():
                want = model.forward_attention_decoder(hyps, lens, enc_out, rw)
            got = sess.run(None, {"hyps": _np(hyps), "hyps_lens": _np(lens),
                                  "encoder_out": _np(enc_out),
                                  "reverse_weight": np.array(rw, dtype=np.float32)})
            tag = f"(N={num}, L={max_len}, T={t}, reverse_weight={rw})"
            worst = max(worst, compare(f"decoder.onnx score {tag}", got[0], _np(want[0])),
                        compare(f"decoder.onnx r_score {tag}", got[1], _np(want[1])))
    return {"decoder.onnx": worst}


def nbest_like(model, gen: torch.Generator, num: int, max_len: int) -> List[List[int]]:
    """`num` hypotheses (no <sos>/<eos>) of lengths 0..max_len that share prefixes and
    suffixes as an n-best list does: each is an earlier one with a token changed,
    inserted or dropped, or a fresh one."""
    hyps = [torch.randint(0, model.vocab_size, (max_len,), generator=gen).tolist()]
    while len(hyps) < num:
        base = list(hyps[int(torch.randint(0, len(hyps), (1,), generator=gen))])
        kind = int(torch.randint(0, 4, (1,), generator=gen))
        pos = int(torch.randint(0, len(base) + 1, (1,), generator=gen))
        token = int(torch.randint(0, model.vocab_size, (1,), generator=gen))
        if kind == 0 and pos < len(base):
            base[pos] = token
        elif kind == 1 and len(base) < max_len:
            base.insert(pos, token)
        elif kind == 2 and base:
            del base[min(pos, len(base) - 1)]
        else:
            base = torch.randint(0, model.vocab_size, (int(torch.randint(0, max_len + 1, (1,),
                                 generator=gen)),), generator=gen).tolist()
        hyps.append(base)
    return hyps


def flat_scores(model, hyps: Sequence[Sequence[int]], enc_out: torch.Tensor, reverse: bool
                ) -> np.ndarray:
    """(N,) float64 decoder scores (tokens then <eos>) of `hyps` by the eager
    `forward_attention_decoder` (one padded row per hypothesis)."""
    lens = torch.tensor([len(h) + 1 for h in hyps])
    width = int(lens.max())
    pad = torch.full((len(hyps), width), model.eos_symbol(), dtype=torch.long)
    pad[:, 0] = model.sos_symbol()
    for i, h in enumerate(hyps):
        pad[i, 1:len(h) + 1] = torch.tensor(h, dtype=torch.long)
    with torch.no_grad():
        l2r, r2l = model.forward_attention_decoder(pad, lens, enc_out, 1.0 if reverse else 0.0)
    logp = (r2l if reverse else l2r).double().numpy()
    out = np.zeros(len(hyps))
    for i, h in enumerate(hyps):
        seq = (list(h)[::-1] if reverse else list(h)) + [model.eos_symbol()]
        out[i] = sum(logp[i, j, t] for j, t in enumerate(seq))
    return out


def verify_decoder_tree(model, path: str, seed: int = 0) -> Dict[str, float]:
    """decoder_tree.onnx against the eager `forward_attention_decoder_tree` for one and
    two utterances' n-best lists (1..10 hypotheses, lengths 0..12, encoder lengths
    1..60), and the hypotheses' scores read off its trees against their scores by the
    eager padded decoder (`flat_scores`, the WeNet-interface decoder.onnx's math)."""
    from wenet_moe_runtime.prefix_tree import DECODER_TREE_INPUTS, decoder_tree_feeds

    sess = session(path)
    gen = torch.Generator().manual_seed(seed)
    sos, eos = model.sos_symbol(), model.eos_symbol()
    worst = {"graph": 0.0, "scores": 0.0}
    for groups, max_len, t in [((1,), 1, 1), ((10,), 12, 60), ((4, 7), 6, 13), ((3,), 0, 7)]:
        hyps: List[List[int]] = []
        owners: List[int] = []
        for m, num in enumerate(groups):
            hyps += nbest_like(model, gen, num, max_len)
            owners += [m] * num
        enc_out = torch.randn(len(groups), t, model.encoder.output_size(), generator=gen)
        feeds, *trees = decoder_tree_feeds(hyps, owners, sos, eos, enc_out.numpy())
        with torch.no_grad():
            want = model.forward_attention_decoder_tree(*(torch.from_numpy(feeds[name])
                                                          for name in DECODER_TREE_INPUTS))
        got = sess.run(None, feeds)
        tag = f"(n-best {groups}, L <= {max_len}, T={t})"
        worst["graph"] = max(worst["graph"], compare(f"decoder_tree.onnx score {tag}", got[0],
                                                     _np(want[0])),
                             compare(f"decoder_tree.onnx r_score {tag}", got[1], _np(want[1])))
        directions = [False, True] if model.is_bidirectional_decoder() else [False]
        for reverse in directions:
            tree_scores = trees[int(reverse)].scores(got[int(reverse)], len(hyps))
            for m in range(len(groups)):
                mine = [i for i, o in enumerate(owners) if o == m]
                worst["scores"] = max(worst["scores"], compare(
                    f"decoder_tree.onnx {'r2l' if reverse else 'l2r'} hypothesis scores {tag}",
                    tree_scores[mine], flat_scores(model, [hyps[i] for i in mine],
                                                   enc_out[m:m + 1], reverse), atol=1e-3))
    return {"decoder_tree.onnx": worst["graph"], "decoder_tree.onnx scores": worst["scores"]}


OFFLINE_LENGTHS = (7, 8, 11, 19, 30, 67, 101, 256, 403, 1000)


def verify_onnx(model, out_dir: str, chunk_size: int, left_chunks: int, reverse_weight: float,
                lengths: Optional[Sequence[int]] = None, seed: int = 0) -> Dict[str, float]:
    """All five fp32 graphs of an export directory; returns {check: max |diff|}."""
    report: Dict[str, float] = {}
    report.update(verify_ctc(model, os.path.join(out_dir, "ctc.onnx"), seed))
    report.update(verify_offline(model, os.path.join(out_dir, "model.onnx"),
                                 lengths or OFFLINE_LENGTHS, seed))
    report.update(verify_encoder(model, os.path.join(out_dir, "encoder.onnx"), chunk_size,
                                 left_chunks, seed))
    report.update(verify_encoder(model, os.path.join(out_dir, "model_streaming.onnx"),
                                 chunk_size, left_chunks, seed, sherpa=True))
    report.update(verify_decoder(model, os.path.join(out_dir, "decoder.onnx"),
                                 reverse_weight, seed))
    return report


def stream_encoder_batch(model: torch.nn.Module, sess, feats: Sequence[torch.Tensor],
                         first_rounds: Sequence[int], chunk: int, required: int,
                         zero_cache: bool) -> Tuple[float, int]:
    """Run `sess` (encoder_batch.onnx) over several streams, one call per round for
    the streams with a window ready (stream b joins at round first_rounds[b]), and
    each stream alone through the eager `forward_chunk`; compare every stream's
    output, attention cache (its last frames) and conv cache at every chunk.

    Caches are left-padded to the longest history of the round and short last
    windows right-padded, as the runtime does. Returns (largest difference, calls).
    """
    from wenet_moe.export.onnx_export import cache_shapes

    enc = model.encoder
    sub, rc = enc.embed.subsampling_rate, enc.embed.right_context
    att_shape, cnn_shape = cache_shapes(model)
    cache_t0 = required if (zero_cache and required > 0) else 0
    n = len(feats)
    windows = [chunk_windows(f.size(0), chunk, sub, rc) for f in feats]
    att = [torch.zeros(att_shape[0], att_shape[1], cache_t0, att_shape[3]) for _ in feats]
    cnn = [torch.zeros(cnn_shape) for _ in feats]
    o_att = [_np(a) for a in att]
    o_cnn = [_np(c) for c in cnn]
    offsets, valid = [cache_t0] * n, [0] * n
    worst, calls = 0.0, 0
    last_round = max(first + len(w) for first, w in zip(first_rounds, windows))
    for rnd in range(last_round):
        ready = [b for b in range(n) if 0 <= rnd - first_rounds[b] < len(windows[b])]
        if not ready:
            continue
        xs = [feats[b][slice(*windows[b][rnd - first_rounds[b]])] for b in ready]
        t_in = max(x.size(0) for x in xs)
        t_out = (t_in - rc - 1) // sub + 1
        outs = [(x.size(0) - rc - 1) // sub + 1 for x in xs]
        cache_t = max(o_att[b].shape[2] for b in ready)
        chunk_in = np.zeros((len(ready), t_in, xs[0].size(1)), np.float32)
        b_att = np.zeros((len(ready), att_shape[0], att_shape[1], cache_t, att_shape[3]),
                         np.float32)
        b_mask = np.zeros((len(ready), 1, cache_t + t_out), dtype=bool)
        want = []
        for r, b in enumerate(ready):
            x = xs[r]
            chunk_in[r, :x.size(0)] = _np(x)
            held = o_att[b].shape[2]
            b_att[r, :, :, cache_t - held:] = o_att[b]
            seen = min(valid[b], held) if cache_t0 > 0 else held
            b_mask[r, 0, cache_t - seen: cache_t + outs[r]] = True
            mask = _mask(att[b].size(2), outs[r], valid[b] if cache_t0 > 0 else att[b].size(2))
            with torch.no_grad():
                out, att[b], cnn[b] = enc.forward_chunk(x.unsqueeze(0), offsets[b], required,
                                                        att[b], cnn[b], torch.from_numpy(mask))
            want.append(out[0])
        feeds = {"chunk": chunk_in,
                 "chunk_lens": np.array([x.size(0) for x in xs], np.int64),
                 "offsets": np.array([offsets[b] for b in ready], np.int64),
                 "required_cache_size": np.array(required, np.int64), "att_cache": b_att,
                 "cnn_cache": np.stack([o_cnn[b][:, 0] for b in ready]), "att_mask": b_mask}
        got, got_lens, r_att, r_cnn = sess.run(None, feeds)
        calls += 1
        tag = (f"round {rnd} (streams {ready}, chunk {chunk}, required_cache_size {required}, "
               f"{'zero' if cache_t0 else 'empty'}-cache)")
        compare(f"encoder_batch.onnx out_lens, {tag}", got_lens, np.array(outs, np.int64))
        for r, b in enumerate(ready):
            keep = min(o_att[b].shape[2] + outs[r], r_att.shape[3])
            o_att[b] = r_att[r, :, :, r_att.shape[3] - keep:]
            o_cnn[b] = r_cnn[r][:, None]
            worst = max(worst,
                        compare(f"encoder_batch.onnx output of stream {b}, {tag}",
                                got[r, :outs[r]], _np(want[r])),
                        compare(f"encoder_batch.onnx att cache of stream {b}, {tag}",
                                o_att[b], _np(att[b])),
                        compare(f"encoder_batch.onnx cnn cache of stream {b}, {tag}",
                                o_cnn[b], _np(cnn[b])))
            offsets[b] += outs[r]
            valid[b] += outs[r]
    return worst, calls


def verify_encoder_batch(model, path: str, chunk_size: int, left_chunks: int,
                         seed: int = 0) -> Dict[str, float]:
    """encoder_batch.onnx against each stream's eager `forward_chunk`: five streams
    of different lengths (one shorter than a window, last windows cut short) joining
    at different rounds (histories of different lengths), at the export's chunk and
    left chunks (zero-filled caches as the runtime's), 1-frame chunks with unlimited
    history, and an odd chunk with a bounded cache."""
    sess = session(path)
    chunk = chunk_size if chunk_size > 0 else 16
    left = left_chunks if left_chunks > 0 else 2
    sub = model.subsampling_rate()
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for chunk_i, required, zero_cache in [(chunk, chunk * left if left_chunks > 0 else -1, True),
                                          (1, -1, False), (3, 5, False)]:
        window = (chunk_i - 1) * sub + model.right_context() + 1
        lengths = [window + 3 * sub * chunk_i + 2, window - 2, window, 2 * window + 5,
                   window + 7 * sub * chunk_i]
        feats = [torch.randn(t, feature_dim(model), generator=gen) for t in lengths]
        worst, calls = stream_encoder_batch(model, sess, feats, [0, 0, 1, 2, 3], chunk_i,
                                            required, zero_cache)
        report[f"{os.path.basename(path)} chunk={chunk_i} required={required} 5 streams "
               f"x{calls} calls"] = worst
    return report
