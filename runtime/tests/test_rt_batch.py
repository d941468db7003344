"""Cross-stream batching in the runtime: `encoder_batch.onnx` of a real wenet-moe
export (a tiny U2++ MoE Conformer, random weights) advances several streams in one
encoder call, and every stream gets what it gets decoded alone through
`encoder.onnx`: the same encoder outputs (within 1e-5) and the same events.

The streams differ in length (one shorter than a window, several ending
mid-chunk), start at different times (their attention caches hold histories of
different lengths in the same call), and one configuration bounds the cache
(`max_left_chunks`), so long and short histories meet. Tokens are compared in
`ctc_greedy` mode, whose best path the CTC head decides by an asserted margin
(far above the ~1e-6 by which batch sizes move the sums)."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import time
import urllib.request

import numpy as np
import onnx
import pytest
import torch

import rt_tiny_model as T
from rt_fixtures import ServerProcess, stream_decode, tiny_moe_conf
from wenet_moe.export import onnx_export
from wenet_moe.export.common import export_metadata, write_symbol_tables
from wenet_moe.export.quantize import int8_experts
from wenet_moe.model import build_model
from wenet_moe_runtime.client import stream_samples
from wenet_moe_runtime.decoder import DecodeOptions, StreamingDecoder, advance_many
from wenet_moe_runtime.model import ModelError, OnnxAsrModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CHUNK = 4
ATOL = 1e-5
MIN_GAP_NATS = 1e-3     # smallest top-1 minus top-2 CTC log-prob the greedy path may see
STEP = 1600             # samples fed per tick (0.1 s)
# (token ids, seed, first tick): 0.12 s (shorter than one 19-frame window), streams
# ending mid-chunk, and streams joining 1 and 3 ticks late
STREAMS = [(None, 0, 0), ([2, 3], 1, 0), ([4, 5, 6], 2, 1), ([7], 3, 3), ([3, 6, 2, 5], 4, 2)]


def _wavs():
    out = []
    for ids, seed, first in STREAMS:
        wav = T.synth([2], seed=seed)[:1920] if ids is None else \
            T.synth(ids, seed=seed, tail_s=0.1 + 0.013 * seed)
        out.append((wav, first))
    return out


@pytest.fixture(scope="module")
def batch_exports(tmp_path_factory):
    """Exports 'full' (chunk 4, unlimited left context) and 'left2' (2 left chunks) of
    a random-weight tiny MoE Conformer whose CTC head is sharpened (x20) and never
    emits <unk> or <sos/eos>."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("batch")
    (root / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    vocab = len(T.units())
    conf = tiny_moe_conf(str(root / "units.txt"), vocab)
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(conf)).eval()
    with torch.no_grad():
        model.ctc.ctc_lo.weight.mul_(20.0)
        model.ctc.ctc_lo.bias[1] = -1e3          # <unk> and <sos/eos> never win
        model.ctc.ctc_lo.bias[vocab - 1] = -1e3
    onnx_export.set_feature_dim(model, 80)
    dirs = {}
    for name, left in (("full", -1), ("left2", 2)):
        # the runtime's graphs only (export_loaded also writes model.onnx and
        # model_streaming.onnx, which this test does not read)
        dirs[name] = str(root / name)
        os.makedirs(dirs[name])
        meta = export_metadata(model, conf, conf, CHUNK, left, 0.3)
        meta["cnn_module_kernel"] = str(onnx_export.cache_shapes(model)[1][3] + 1)
        write_symbol_tables(conf, dirs[name])
        path = lambda n: os.path.join(dirs[name], n)  # noqa: E731
        onnx_export.export_encoder(model, path("encoder.onnx"), CHUNK, left, meta)
        onnx_export.export_encoder_batch(model, path("encoder_batch.onnx"), CHUNK, left, meta)
        onnx_export.export_ctc(model, path("ctc.onnx"), meta)
        onnx_export.export_decoder(model, path("decoder.onnx"), 0.3, meta)
    # 'int8x': 'full' with int8 experts (export --expert_precision int8)
    dirs["int8x"] = str(root / "int8x")
    shutil.copytree(dirs["full"], dirs["int8x"])
    for name in ("encoder.onnx", "encoder_batch.onnx"):
        proto = onnx.load(os.path.join(dirs["int8x"], name))
        assert int8_experts(proto) > 0
        onnx_export.save_onnx(proto, os.path.join(dirs["int8x"], name), check=False)
    return dirs


class RecordingDecoder(StreamingDecoder):
    """Keeps every chunk's encoder output and CTC log-posteriors."""

    def __init__(self, model, opts):
        self.hiddens, self.log_probs_seen = [], []
        super().__init__(model, opts)

    def encoded(self, hidden):
        self.hiddens.append(hidden)
        return super().encoded(hidden)

    def consume(self, log_probs):
        self.log_probs_seen.append(log_probs)
        return super().consume(log_probs)


def _alone(model, wav, opts):
    return stream_decode(model, wav, opts, STEP, decoder_class=RecordingDecoder)


def _together(model, wavs, opts):
    """All streams fed STEP samples per tick from their first tick on, advanced
    together with one `advance_many` per tick."""
    decs = [RecordingDecoder(model, opts) for _ in wavs]
    events = [[] for _ in wavs]
    for tick in range(200):
        started = []
        for i, (wav, first) in enumerate(wavs):
            k = (tick - first) * STEP
            if k < 0:
                continue
            started.append(i)
            if k < len(wav):
                decs[i].accept_waveform(wav[k: k + STEP])
            elif not decs[i].input_done:
                decs[i].input_finished()
        for i, ev in zip(started, advance_many([decs[i] for i in started])):
            events[i].extend(ev)
        if all(d.stopped for d in decs):
            break
    return decs, events


@pytest.mark.parametrize("export,max_left_chunks", [("full", -1), ("left2", -1), ("full", 2),
                                                    ("int8x", -1)])
def test_advance_many_batched_equals_streams_alone(batch_exports, export, max_left_chunks):
    opts = DecodeOptions(mode="ctc_greedy", max_left_chunks=max_left_chunks)
    single = OnnxAsrModel(batch_exports[export], batch_encoder=False)
    batched = OnnxAsrModel(batch_exports[export], batch_encoder=True)
    assert batched.batched and not single.batched
    wavs = _wavs()
    alone = [_alone(single, w, opts) for w, _ in wavs]
    decs, events = _together(batched, wavs, opts)
    # the cases the test is about
    chunks = [len(d.hiddens) for d, _ in alone]
    assert chunks[0] == 1 and alone[0][0].hiddens[0].shape[0] < CHUNK   # one short window
    assert sum(d.hiddens[-1].shape[0] < CHUNK for d, _ in alone) >= 3     # ending mid-chunk
    if max_left_chunks > 0:
        caches = [d.state.att_cache.shape[2] for d, _ in alone]
        assert max(caches) == CHUNK * max_left_chunks and min(caches) < max(caches)
    gaps = [np.diff(np.sort(lp, axis=1)[:, -2:], axis=1).min()
            for d, _ in alone for lp in d.log_probs_seen]
    assert min(gaps) >= MIN_GAP_NATS, min(gaps)
    assert any(e[0] == "final" and e[1][0]["sentence"] for _, ev in alone for e in ev)
    # streams really shared encoder calls, and each got what it gets alone
    assert batched.batched_calls > 0 and batched.batched_streams >= 2 * batched.batched_calls
    assert single.batched_calls == 0
    assert [len(d.hiddens) for d in decs] == chunks
    for b, ((want, want_events), got, got_events) in enumerate(zip(alone, decs, events)):
        for k, (h1, h2) in enumerate(zip(want.hiddens, got.hiddens)):
            assert h1.shape == h2.shape, (b, k)
            _close(export, h1, h2, (b, k))
        _close(export, want.state.att_cache, got.state.att_cache, b)
        if export != "int8x":
            assert got_events == want_events, b


def _close(export, want, got, where):
    """fp32: within ATOL. int8 experts quantize each activation row on its own, so
    batching keeps rows apart too, but a batch-size-dependent ~1e-7 difference
    upstream can move one activation across an int8 rounding boundary (one step,
    ~1e-2): all but a few values within ATOL, none beyond 0.05."""
    diff = np.abs(want - got)
    if export != "int8x":
        assert diff.max() <= ATOL, (where, diff.max())
    else:
        assert diff.max() <= 0.05 and (diff <= ATOL).mean() >= 0.99, (where, diff.max())


def test_batched_model_holds_one_encoder_and_runs_single_streams_exactly(batch_exports):
    """With the batched graph, encoder.onnx is not loaded (the encoder's weights are
    held once) and a lone stream runs as a batch of one: its chunks and caches equal
    encoder.onnx's, counted as single calls."""
    opts = DecodeOptions(mode="ctc_greedy")
    single = OnnxAsrModel(batch_exports["full"], batch_encoder=False)
    batched = OnnxAsrModel(batch_exports["full"], batch_encoder=True)
    assert "encoder" not in batched.sessions and "encoder_batch" in batched.sessions
    assert "encoder" in single.sessions and "encoder_batch" not in single.sessions
    wav = _wavs()[1][0]
    want, want_events = _alone(single, wav, opts)
    got, got_events = _alone(batched, wav, opts)
    assert len(want.hiddens) == len(got.hiddens) >= 2
    for h1, h2 in zip(want.hiddens, got.hiddens):
        assert h1.shape == h2.shape and np.abs(h1 - h2).max() <= ATOL
    assert np.abs(want.state.att_cache - got.state.att_cache).max() <= ATOL
    assert got_events == want_events
    assert batched.batched_calls == 0 and batched.single_calls == len(got.hiddens)


def test_batched_graph_can_be_turned_off_and_must_match_the_export(batch_exports, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(batch_exports["full"], d)
    assert OnnxAsrModel(d, batch_encoder=True).batched
    assert not OnnxAsrModel(d).batched   # off by default (offline tools)
    assert not OnnxAsrModel(d, batch_encoder=False).batched
    path = os.path.join(d, "encoder_batch.onnx")
    proto = onnx.load(path)
    for p in proto.metadata_props:
        if p.key == "config_hash":
            p.value = "0123456789abcdef"
    onnx.save(proto, path)
    # the batched graph loads first (in place of encoder.onnx): the next graph is named
    with pytest.raises(ModelError, match=r"ctc\.onnx: config_hash \w+ differs from "
                                         r"0123456789abcdef of \S*encoder_batch\.onnx"):
        OnnxAsrModel(d, batch_encoder=True)
    OnnxAsrModel(d, batch_encoder=False)  # not loaded, not checked
    os.remove(path)
    assert not OnnxAsrModel(d, batch_encoder=True).batched   # exports without it: stream by stream


def test_server_batches_concurrent_streams_like_solo_decoding(batch_exports):
    """Concurrent streams through the server take the batched encoder (its counters
    say so) and get exactly the final results of each stream decoded alone."""
    opts = DecodeOptions(mode="ctc_greedy")
    single = OnnxAsrModel(batch_exports["full"], batch_encoder=False)
    wavs = [np.concatenate([w] * 3) for w, _ in _wavs()[1:]] * 2
    solo = [[e[1] for e in stream_decode(single, w, opts)[1] if e[0] == "final"] for w in wavs]
    srv = ServerProcess(batch_exports["full"], ["--mode", "ctc_greedy", "--max_batch", "8",
                                                "--max_chunks_per_job", "1",
                                                "--batch_wait_ms", "200"])
    try:
        async def go():
            return await asyncio.gather(*[stream_samples(srv.url, w, chunk_ms=100)
                                          for w in wavs])
        results = asyncio.run(asyncio.wait_for(go(), 120))
        health = json.loads(urllib.request.urlopen(srv.url.replace("ws:", "http:") + "/health",
                                                   timeout=10).read())
    finally:
        srv.stop()
    assert all(r.speech_end and not r.failures for r in results)
    assert [r.finals for r in results] == solo
    assert any(f[0]["sentence"] for s in solo for f in s)
    assert health["batched_encoder"] and health["max_batch"] == 8
    assert health["batch_wait_ms"] == 200.0 and isinstance(health["held_batches"], int)
    assert health["encoder_batched_calls"] > 0
    assert health["encoder_batched_streams"] >= 2 * health["encoder_batched_calls"]
    # CPU inside the sessions: encoder and CTC ran, the decoder never (ctc_greedy)
    cpu = health["session_cpu_s"]
    assert cpu["encoder"] > 0 and cpu["ctc"] > 0 and cpu["decoder"] == 0


def test_session_cpu_counts_each_part(batch_exports):
    """`session_cpu_s` adds the calling thread's CPU time of each session run to its
    part: decoding with rescoring charges encoder, CTC and decoder; a second decode
    adds to each."""
    from wenet_moe_runtime.offline import decode_samples
    model = OnnxAsrModel(batch_exports["full"])
    wav = _wavs()[1][0]
    decode_samples(model, wav, DecodeOptions(mode="attention_rescoring"))
    first = dict(model.session_cpu_s)
    assert all(first[part] > 0 for part in ("encoder", "ctc", "decoder")), first
    decode_samples(model, wav, DecodeOptions(mode="ctc_greedy"))
    second = model.session_cpu_s
    assert second["encoder"] > first["encoder"] and second["ctc"] > first["ctc"]
    assert second["decoder"] == first["decoder"]


def test_may_complete_chunk_is_an_upper_bound(batch_exports):
    """`may_complete_chunk(n)` is False only when feeding n samples leaves no encoder
    window ready (checked over random piece sizes through whole utterances), and it
    is not always True: most small pieces are known not to complete a chunk."""
    model = OnnxAsrModel(batch_exports["full"], batch_encoder=True)
    rng = np.random.default_rng(3)
    said_no = 0
    for wav, _ in _wavs()[1:4]:
        dec = StreamingDecoder(model, DecodeOptions(mode="ctc_greedy"))
        pos = 0
        while pos < wav.shape[0]:
            n = int(rng.integers(1, 3200))
            piece = wav[pos: pos + n]
            maybe = dec.may_complete_chunk(piece.shape[0])
            dec.accept_waveform(piece)
            if not maybe:
                said_no += 1
                assert not dec.chunk_ready()
            while dec.chunk_ready():
                dec.consume(model.ctc_log_probs(dec.encode(dec.next_chunk())))
            pos += n
    assert said_no > 10


def test_workers_hold_jobs_only_while_another_stream_may_join(batch_exports):
    """With `batch_wait_s`, a job that completes an encoder chunk waits in the queue
    only while another open stream could bring one: a lone stream is never held; with
    a second open stream the first stream's chunk waits until the second one's
    arrives, and both run in one batched encoder call; a job that only adds audio
    (b's first 100 samples) and a job that ends its stream are never held."""
    from wenet_moe_runtime.batching import InferenceWorkers
    model = OnnxAsrModel(batch_exports["full"], batch_encoder=True)
    opts = DecodeOptions(mode="ctc_greedy")
    wav = _wavs()[2][0]
    workers = InferenceWorkers(num_workers=2, max_batch=4, batch_wait_s=30.0)
    try:
        async def lone():
            dec = StreamingDecoder(model, opts)
            await workers.submit(dec, wav[:8000])        # a chunk ready, nobody else open
            return await workers.submit(dec, wav[8000:], finish=True)
        asyncio.run(asyncio.wait_for(lone(), 20))
        assert workers.held_batches == 0 and model.batched_calls == 0

        async def pair():
            a, b = StreamingDecoder(model, opts), StreamingDecoder(model, opts)
            start = time.monotonic()
            await workers.submit(b, wav[:100])           # b is open, no chunk yet: not held
            light_s = time.monotonic() - start
            first = asyncio.ensure_future(workers.submit(a, wav[:8000]))
            await asyncio.sleep(0.5)
            held = not first.done() and len(workers._urgent) == 1   # a waits for company
            second = asyncio.ensure_future(workers.submit(b, wav[100:8000]))
            await asyncio.gather(first, second)
            offsets = (a.state.offset, b.state.offset)
            # a final job goes at once although b is open without a job queued
            start = time.monotonic()
            await workers.submit(a, wav[8000:16000], finish=True)
            return offsets, held, light_s, time.monotonic() - start
        offsets, held, light_s, final_s = asyncio.run(asyncio.wait_for(pair(), 20))
        assert held
        assert model.batched_calls >= 1 and model.batched_streams >= 2
        assert offsets[0] == offsets[1] > 0              # both advanced by the same chunks
        assert light_s < 10.0 and final_s < 10.0         # not held for the 30 s
        assert workers.held_batches == 0                 # nothing waited out its 30 s
    finally:
        workers.shutdown()


@pytest.mark.parametrize("export", ["full", "left2"])
def test_decode_many_equals_utterances_alone(batch_exports, export):
    """Whole utterances advanced together (`encode_many` / `decode_many`: the chunks of
    all utterances that still have one in one encoder_batch.onnx call per step) give
    each utterance's `encode_chunks` outputs within ATOL and its `decode_samples`
    text; utterances of different lengths drop out as they end."""
    from wenet_moe_runtime.offline import (decode_many, decode_samples, encode_chunks, encode_many,
                                           utterance_fbank)
    opts = DecodeOptions(mode="ctc_greedy", chunk_size=CHUNK)
    single = OnnxAsrModel(batch_exports[export], batch_encoder=False)
    batched = OnnxAsrModel(batch_exports[export], batch_encoder=True, max_encoder_batch=3)
    wavs = [w for w, _ in _wavs()]
    feats = [utterance_fbank(single, w) for w in wavs]
    alone = [encode_chunks(single, f, CHUNK) for f in feats]
    lengths = [len(a) for a in alone]
    assert len(set(lengths)) >= 3 and min(lengths) == 1, lengths
    together = encode_many(batched, feats, CHUNK)
    assert [len(t) for t in together] == lengths
    for b, (want, got) in enumerate(zip(alone, together)):
        for k, (h1, h2) in enumerate(zip(want, got)):
            assert h1.shape == h2.shape and np.abs(h1 - h2).max() <= ATOL, (b, k)
    # at most 3 streams per call (max_encoder_batch), and the steps shared calls
    assert batched.batched_calls > 0
    assert batched.batched_streams <= 3 * batched.batched_calls
    calls = batched.batched_calls + batched.single_calls
    assert calls < sum(lengths)
    texts = [n[0]["sentence"] for n in decode_many(batched, wavs, opts)]
    assert texts == [decode_samples(single, w, opts)[0]["sentence"] for w in wavs]
    assert sum(bool(t) for t in texts) >= 3
    assert encode_many(batched, [], CHUNK) == []


def test_decode_cli_batch_size_writes_the_same_text_in_scp_order(batch_exports, tmp_path):
    """`python -m wenet_moe_runtime.decode --batch_size 3`: the lines of --batch_size 1,
    in wav.scp order (the batch runs longest files first); an export without
    encoder_batch.onnx decodes one by one, with a note; a bad --batch_size is an error."""
    import subprocess
    import sys

    from wenet_moe_runtime.wavio import write_wav
    scp = []
    for i, (wav, _) in enumerate(_wavs()):
        path = str(tmp_path / f"u{i}.wav")
        write_wav(path, wav)
        scp.append(f"utt{i} {path}\n")
    (tmp_path / "wav.scp").write_text("".join(scp), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    plain = tmp_path / "no_batch_graph"
    shutil.copytree(batch_exports["full"], plain)
    os.unlink(plain / "encoder_batch.onnx")

    def decode(out, *extra, model_dir=batch_exports["full"]):
        return subprocess.run([sys.executable, "-m", "wenet_moe_runtime.decode", "--model_dir",
                               str(model_dir), "--wav_scp", str(tmp_path / "wav.scp"),
                               "--result", str(tmp_path / out), "--mode", "ctc_greedy",
                               "--chunk_size", str(CHUNK), *extra],
                              capture_output=True, text=True, env=env)

    for out, extra in (("one.txt", []), ("three.txt", ["--batch_size", "3"])):
        r = decode(out, *extra)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    one = (tmp_path / "one.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split()[0] for line in one] == [f"utt{i}" for i in range(len(scp))]
    assert (tmp_path / "three.txt").read_text(encoding="utf-8").splitlines() == one
    assert sum(bool(line.split()[1:]) for line in one) >= 3
    r = decode("plain.txt", "--batch_size", "3", model_dir=plain)
    assert r.returncode == 0 and "has no batched encoder" in r.stderr, r.stderr
    assert (tmp_path / "plain.txt").read_text(encoding="utf-8").splitlines() == one
    r = decode("bad.txt", "--batch_size", "0")
    assert r.returncode == 1 and "--batch_size must be >= 1, got 0" in r.stderr
    assert not (tmp_path / "bad.txt").exists()
    # unreadable wavs are skipped, named and counted; the others decode as before
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00not a wav")
    good = (tmp_path / "wav.scp").read_text(encoding="utf-8")
    (tmp_path / "wav.scp").write_text(f"gone {tmp_path / 'missing.wav'}\n" + good
                                      + f"junk {tmp_path / 'broken.wav'}\n", encoding="utf-8")
    for batch in ("1", "3"):
        r = decode(f"skip{batch}.txt", "--batch_size", batch)
        assert r.returncode == 0, r.stderr
        warnings = r.stderr.strip().splitlines()
        assert len(warnings) == 3, warnings
        assert any(w.startswith("warning: gone: skipped:") and "missing.wav" in w for w in warnings)
        assert any(w.startswith("warning: junk: skipped:") and "broken.wav" in w for w in warnings)
        assert warnings[-1] == f"warning: 2 of {len(scp) + 2} wavs could not be read and were skipped"
        assert (tmp_path / f"skip{batch}.txt").read_text(encoding="utf-8").splitlines() == one
