"""Bounded work and memory of the streaming engine (issue 12): streaming greedy search
equals offline greedy, fbank frames are freed, a segment that decodes nothing is
restarted at rule 3, `max_left_chunks` caps the attention cache, and the inference
workers serve streams round robin in slices."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from rt_fixtures import CHUNK, stream_decode
from wenet_moe_runtime.batching import InferenceWorkers
from wenet_moe_runtime.ctc_search import CtcGreedySearch, CtcPrefixBeamSearch, ctc_greedy_search
from wenet_moe_runtime.decoder import DecodeOptions, StreamingDecoder
from wenet_moe_runtime.endpoint import EndpointConfig
from wenet_moe_runtime.model import OnnxAsrModel
from wenet_moe_runtime.offline import decode_samples
from wenet_moe_runtime.wavio import read_wav

TEXTS = ["你好世界", "语音你", "好界音世你", "世世语", "音语界好", "你语好"]


stream = stream_decode


def test_incremental_greedy_equals_one_shot_for_any_chunking():
    rng = np.random.default_rng(0)
    for trial in range(40):
        t, v = int(rng.integers(1, 60)), 6
        # Long runs of a few tokens, so that runs (and their peaks) span chunk borders.
        ids = np.repeat(rng.integers(0, 3, size=t), rng.integers(1, 5, size=t))[:t]
        lp = rng.normal(size=(t, v))
        lp[np.arange(t), ids] += 4.0 + rng.random(t)
        lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
        blank = trial % 2
        ref_tokens, ref_times = ctc_greedy_search(lp, blank)
        search = CtcGreedySearch(blank)
        cuts = np.sort(rng.choice(np.arange(1, t + 1), size=min(t, 4), replace=False))
        start = 0
        for c in list(cuts) + [t]:
            search.advance(lp[start:c])
            start = c
        (tokens, score, times), = search.nbest(3)
        assert (tokens, times) == (ref_tokens, ref_times)
        assert score == pytest.approx(float(lp.max(axis=1).sum()), abs=1e-9)
    search.reset()
    assert search.nbest() == [([], 0.0, [])]


def test_streaming_greedy_equals_offline_greedy(tiny_exports, test_wavs):
    model = OnnxAsrModel(tiny_exports["full"])
    opts = DecodeOptions(mode="ctc_greedy", nbest=3)
    for i, text in enumerate(TEXTS):
        samples, _ = read_wav(test_wavs[f"u{i}"])
        offline = decode_samples(model, samples, opts)
        dec, events = stream(model, samples, opts, step=1111 + 500 * i)
        assert isinstance(dec.search, CtcGreedySearch)
        assert events[-2][1] == offline and len(offline) == 1   # one path, word pieces equal
        assert offline[0]["sentence"] == text
        assert dec.encoder_outs == []                            # only rescoring keeps them
    dec, _ = stream(model, samples, DecodeOptions(mode="ctc_prefix_beam"))
    assert isinstance(dec.search, CtcPrefixBeamSearch)


def test_fbank_frames_are_freed_once_read(tiny_exports, test_wavs):
    model = OnnxAsrModel(tiny_exports["full"])
    speech = [read_wav(test_wavs[f"u{i}"])[0] for i in range(6)]
    samples = np.concatenate(speech * 3)
    dec = StreamingDecoder(model, DecodeOptions(mode="ctc_prefix_beam", continuous_decoding=True))
    held = []
    for k in range(0, len(samples), 4000):
        dec.accept_waveform(samples[k: k + 4000])
        dec.advance()
        held.append(dec.fbank.num_frames_ready - dec.frames_freed)
    window = (CHUNK - 1) * model.info.subsampling_rate + model.info.right_context + 1
    assert dec.frames_read > 1500 and dec.frames_freed == dec.frames_read
    assert max(held) <= window + 4000 // 160 + 1          # never more than a window + one feed
    with pytest.raises(RuntimeError, match="already removed"):
        dec.fbank.get_frames(0, 1)


def test_segment_that_decodes_nothing_is_restarted_at_rule3(tiny_exports):
    """No frame counts as silence (threshold above 1), so rules 1 and 2 never fire on
    silence that decodes nothing: only the forced restart bounds the segment."""
    model = OnnxAsrModel(tiny_exports["full"])
    endpoint = EndpointConfig(blank_threshold=1.01, rule3_max_utterance_ms=2000)
    frames_per_segment = 2000 // model.info.frame_ms
    for cont in (True, False):
        opts = DecodeOptions(mode="ctc_greedy", continuous_decoding=cont, endpoint=endpoint)
        dec = StreamingDecoder(model, opts)
        events, longest = [], 0
        for _ in range(12):     # 12 s of silence
            dec.accept_waveform(np.zeros(16000, np.int16))
            events += dec.advance()
            longest = max(longest, dec.state.att_cache.shape[2])
        assert events == [] and not dec.stopped
        assert dec.forced_resets >= 5
        assert longest <= frames_per_segment + CHUNK
    # With rule 3 off nothing restarts the segment and its cache grows: the restart is
    # what bounded it above.
    off = DecodeOptions(mode="ctc_greedy", endpoint=EndpointConfig(blank_threshold=1.01,
                                                                   rule3_max_utterance_ms=0))
    dec = StreamingDecoder(model, off)
    for _ in range(6):
        dec.accept_waveform(np.zeros(16000, np.int16))
        dec.advance()
    assert dec.forced_resets == 0 and dec.state.att_cache.shape[2] >= 6000 // model.info.frame_ms - CHUNK


def test_max_left_chunks_bounds_cache_and_equals_torch_left_context(tiny_exports, test_wavs):
    """Serving a full-context export with --max_left_chunks 2 keeps 2 chunks of
    attention cache and computes what the torch encoder computes with 2 left chunks."""
    from rt_fixtures import fbank_fn
    from test_rt_engine import _torch_encoder
    model = OnnxAsrModel(tiny_exports["full"])
    samples, _ = read_wav(test_wavs["u2"])
    opts = DecodeOptions(max_left_chunks=2, endpoint=EndpointConfig(enabled=False))
    dec = StreamingDecoder(model, opts)
    sizes = []
    for k in range(0, len(samples), 1000):
        dec.accept_waveform(samples[k: k + 1000])
        dec.advance()
        sizes.append(dec.state.att_cache.shape[2])
    assert max(sizes) == 2 * CHUNK
    ours = np.concatenate(dec.encoder_outs, axis=0)
    _, fbank = fbank_fn()
    feats = np.asarray(fbank(samples), np.float32)
    ref = _torch_encoder(tiny_exports, feats, 2, 0)[: ours.shape[0]]
    assert ours.shape[0] > 4 * CHUNK
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-3)
    full = _torch_encoder(tiny_exports, feats, -1, 0)[: ours.shape[0]]
    assert np.abs(full - ref).max() > 1e-2    # the cap does change what is attended to


def test_workers_serve_streams_round_robin_in_slices(tiny_exports, test_wavs):
    """A minute of audio submitted at once does not hold the worker: a short stream
    submitted just after it finishes while the long one is still near its start, and
    slicing changes no result."""
    model = OnnxAsrModel(tiny_exports["full"])
    speech = [read_wav(test_wavs[f"u{i}"])[0] for i in range(6)]
    long_audio = np.concatenate(speech * 9)        # about 60 s
    short = speech[1]
    opts = DecodeOptions(mode="ctc_prefix_beam", continuous_decoding=True)
    chunk_samples = CHUNK * model.info.subsampling_rate * 160

    async def go(slice_samples):
        workers = InferenceWorkers(num_workers=1, slice_samples=2 * chunk_samples)
        workers.slice_samples = slice_samples
        long_dec, short_dec = StreamingDecoder(model, opts), StreamingDecoder(model, opts)
        long_job = asyncio.ensure_future(workers.submit(long_dec, long_audio, finish=True))
        await asyncio.sleep(0)                      # the long stream is queued first
        short_events = await workers.submit(short_dec, short, finish=True)
        fed_when_short_done = long_dec.samples_received
        long_events = await long_job
        workers.shutdown()
        return short_events, long_events, fed_when_short_done, workers.jobs_run

    short_ev, long_ev, fed, jobs = asyncio.run(asyncio.wait_for(go(2 * chunk_samples), 300))
    assert fed < len(long_audio) // 10
    assert jobs >= len(long_audio) // (2 * chunk_samples)
    _, short_alone = stream(model, short, opts, step=len(short))
    _, long_alone = stream(model, long_audio, opts, step=len(long_audio))
    assert short_ev == short_alone and long_ev == long_alone
    assert [e[1][0]["sentence"] for e in short_ev if e[0] == "final"] == [TEXTS[1]]
    # Unsliced, the short stream waits for the whole minute.
    _, _, fed, jobs = asyncio.run(asyncio.wait_for(go(0), 300))
    assert fed == len(long_audio) and jobs == 2



def test_urgent_jobs_go_before_backlogged_slices_which_take_turns(tiny_exports, test_wavs):
    """Order in which one worker runs the queued jobs: while it is held on a first job,
    three streams queue a minute each (a backlog) and a real-time stream queues one
    slice. The real-time slice runs next; the backlogged streams then take turns one
    slice each (round robin). Without `urgent` it waits behind one slice of each."""
    import threading
    model = OnnxAsrModel(tiny_exports["full"])
    speech = [read_wav(test_wavs[f"u{i}"])[0] for i in range(6)]
    long_audio = np.concatenate(speech * 9)
    opts = DecodeOptions(mode="ctc_prefix_beam", continuous_decoding=True)
    step = 2 * CHUNK * model.info.subsampling_rate * 160

    class Logged(StreamingDecoder):
        def __init__(self, name, log, gate=None):
            super().__init__(model, opts)
            self.name, self.log, self.gate = name, log, gate

        def accept_waveform(self, pcm):
            if self.gate is not None:
                self.gate.wait(60)
            self.log.append(self.name)
            super().accept_waveform(pcm)

    async def go(urgent):
        workers = InferenceWorkers(num_workers=1, slice_samples=step)
        log, gate = [], threading.Event()
        held = asyncio.ensure_future(workers.submit(Logged("H", log, gate), speech[0][:step]))
        longs = [asyncio.ensure_future(workers.submit(Logged(f"L{k}", log), long_audio, urgent=False))
                 for k in range(3)]
        await asyncio.sleep(0)                       # the backlog is queued
        short = asyncio.ensure_future(workers.submit(Logged("S", log), speech[1][:step], urgent=urgent))
        await asyncio.sleep(0)
        gate.set()
        await held
        await short
        while len(log) < 15:
            await asyncio.sleep(0.01)
        for job in longs:
            job.cancel()
        workers.shutdown()
        return log
    log = asyncio.run(asyncio.wait_for(go(True), 300))
    assert log[:2] == ["H", "S"]
    assert log[2:11] == ["L0", "L1", "L2"] * 3
    log = asyncio.run(asyncio.wait_for(go(False), 300))
    assert log[:5] == ["H", "L0", "L1", "L2", "S"]


def test_backlog_never_takes_the_last_worker(tiny_exports, test_wavs):
    """Two workers; backlogged streams whose slices block (held by a gate) occupy one
    worker at most, so a real-time stream's job is decoded while they are held."""
    import threading
    model = OnnxAsrModel(tiny_exports["full"])
    speech = read_wav(test_wavs["u0"])[0]
    opts = DecodeOptions(mode="ctc_prefix_beam")
    gate = threading.Event()

    class Held(StreamingDecoder):
        def accept_waveform(self, pcm):
            gate.wait(120)
            super().accept_waveform(pcm)

    async def go():
        workers = InferenceWorkers(num_workers=2)
        held = [asyncio.ensure_future(workers.submit(Held(model, opts), speech, urgent=False))
                for _ in range(3)]
        await asyncio.sleep(0)
        events = await asyncio.wait_for(
            workers.submit(StreamingDecoder(model, opts), speech, finish=True), 60)
        still_held = not any(job.done() for job in held)
        gate.set()
        await asyncio.gather(*held)
        workers.shutdown()
        return events, still_held
    events, still_held = asyncio.run(asyncio.wait_for(go(), 120))
    assert still_held and events[-2][1][0]["sentence"] == TEXTS[0]
