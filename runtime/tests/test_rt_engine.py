"""Decoder engine on a tiny trained export: streaming == offline, encoder chunks and
rescoring scores against torch, endpointing, continuous decoding, decode CLI."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from rt_fixtures import CHUNK, stream_decode, TRAIN_SET
from wenet_moe_runtime.decoder import DecodeOptions, StreamingDecoder
from wenet_moe_runtime.endpoint import CtcEndpoint, EndpointConfig
from wenet_moe_runtime.model import ModelError, OnnxAsrModel
from wenet_moe_runtime.offline import decode_samples, encode_utterance
from wenet_moe_runtime.wavio import read_wav

TEXTS = ["你好世界", "语音你", "好界音世你", "世世语", "音语界好", "你语好"]


stream = stream_decode


@pytest.mark.parametrize("export", ["full", "left2"])
def test_streaming_final_equals_offline_rescoring(tiny_exports, test_wavs, export):
    model = OnnxAsrModel(tiny_exports[export])
    opts = DecodeOptions(nbest=3)
    for i, text in enumerate(TEXTS):
        samples, _ = read_wav(test_wavs[f"u{i}"])
        offline = decode_samples(model, samples, opts)
        _, events = stream(model, samples, opts, step=1234)
        kinds = [k for k, _ in events]
        assert kinds[-2:] == ["final", "speech_end"] and kinds.count("final") == 1
        assert "partial" in kinds
        final = events[-2][1]
        assert final == offline            # whole n-best, scores order and word pieces
        assert final[0]["sentence"] == text
        assert [p["word"] for p in final[0]["word_pieces"]] == list(text)


def test_int8_export_decodes(tiny_exports, test_wavs):
    model = OnnxAsrModel(tiny_exports["full"], int8=True)
    assert model.paths["encoder"].endswith("encoder.int8.onnx")
    for i, text in enumerate(TEXTS):
        samples, _ = read_wav(test_wavs[f"u{i}"])
        offline = decode_samples(model, samples, DecodeOptions(nbest=3))
        assert offline[0]["sentence"] == text
        _, events = stream(model, samples, DecodeOptions(nbest=3))
        assert events[-2][1] == offline   # CTC per chunk on both sides: identical


def _torch_encoder(tiny_exports, feats, left_chunks, offset):
    import rt_tiny_model as T
    enc = tiny_exports["torch_model"].encoder
    t_out = (feats.shape[0] - T.RC - 1) // T.SUB + 1
    idx = torch.arange(t_out)
    ci, cj = idx[:, None] // CHUNK, idx[None, :] // CHUNK
    mask = cj <= ci
    if left_chunks > 0:
        mask &= cj >= ci - left_chunks
    with torch.no_grad():
        out, _, _ = enc(torch.from_numpy(feats)[None], torch.tensor(offset), torch.tensor(-1),
                        torch.zeros(enc.blocks, enc.head, 0, 2 * enc.d // enc.head),
                        torch.zeros(enc.blocks, 1, enc.d, enc.kernel - 1), mask[None])
    return out[0].numpy()


@pytest.mark.parametrize("export,left,offset", [("full", -1, 0), ("left2", 2, 2 * CHUNK)])
def test_encoder_chunk_loop_matches_torch_full_sequence(tiny_exports, test_wavs, export,
                                                        left, offset):
    """The runtime's chunk loop (windows, overlap, att/cnn caches, offsets, masks)
    equals one torch forward over the whole utterance with a block-causal mask."""
    from rt_fixtures import fbank_fn
    _, fbank = fbank_fn()
    model = OnnxAsrModel(tiny_exports[export])
    samples, _ = read_wav(test_wavs["u2"])
    feats = np.asarray(fbank(samples), np.float32)
    ours = encode_utterance(model, feats, CHUNK)
    ref = _torch_encoder(tiny_exports, feats, left, offset)
    assert ours.shape == ref.shape and ours.shape[0] > 3 * CHUNK
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-3)


def test_rescoring_scores_match_torch(tiny_exports, test_wavs):
    model = OnnxAsrModel(tiny_exports["full"])
    tm = tiny_exports["torch_model"]
    enc_out = np.random.default_rng(0).normal(size=(30, 32)).astype(np.float32)
    hyps = [[2, 3, 4], [5], [], [7, 6, 5, 4, 3]]
    rw = 0.4
    ours = model.attention_scores(hyps, enc_out, rw)
    eos = tm.sos
    with torch.no_grad():
        for h, got in zip(hyps, ours):
            ys = torch.tensor([[eos] + h])
            l2r, r2l = tm.decoder(ys, torch.tensor([len(h) + 1]),
                                  torch.from_numpy(enc_out)[None], torch.tensor(rw))
            gold, gold_r = h + [eos], h[::-1] + [eos]
            fwd = sum(float(l2r[0, j, t]) for j, t in enumerate(gold))
            bwd = sum(float(r2l[0, j, t]) for j, t in enumerate(gold_r))
            assert math.isclose(got, (1 - rw) * fwd + rw * bwd, rel_tol=1e-4, abs_tol=1e-3)


def test_continuous_decoding_two_sentences(tiny_exports, test_wavs):
    model = OnnxAsrModel(tiny_exports["full"])
    samples, _ = read_wav(test_wavs["two"])
    _, events = stream(model, samples, DecodeOptions(continuous_decoding=True, nbest=2))
    finals = [e[1] for e in events if e[0] == "final"]
    assert [f[0]["sentence"] for f in finals] == ["你好世界", "语音你"]
    assert [k for k, _ in events][-1] == "speech_end"
    # second sentence starts after 0.3 + 4 * 0.28 + 0.3 + 1.5 + 0.3 = 3.52 s
    starts = [p["start"] for p in finals[1][0]["word_pieces"]]
    assert 3300 <= starts[0] <= 3900 and starts == sorted(starts)
    # Without continuous decoding the endpoint ends the stream after the first one.
    dec, events = stream(model, samples, DecodeOptions(continuous_decoding=False))
    assert [k for k, _ in events if k != "partial"] == ["final", "speech_end"]
    assert events[-2][1][0]["sentence"] == "你好世界" and dec.stopped


def test_rule1_long_silence_gives_empty_final_then_continues(tiny_exports, test_wavs):
    model = OnnxAsrModel(tiny_exports["full"])
    speech, _ = read_wav(test_wavs["u0"])
    samples = np.concatenate([np.zeros(16000 * 6, np.int16), speech])
    _, events = stream(model, samples, DecodeOptions(continuous_decoding=True), step=8000)
    finals = [e[1][0]["sentence"] for e in events if e[0] == "final"]
    assert finals == ["", "你好世界"]


def _lp(blank_prob, n, vocab=5):
    row = np.full(vocab, (1 - blank_prob) / (vocab - 1))
    row[0] = blank_prob
    return np.log(np.tile(row, (n, 1)))


def test_endpoint_rules():
    ep = CtcEndpoint(EndpointConfig(), frame_ms=40)
    ep.update(_lp(0.9, 124), 0)                         # 4960 ms of silence
    assert not ep.is_endpoint(False)
    ep.update(_lp(0.9, 1), 0)                           # 5000 ms: rule 1
    assert ep.is_endpoint(False) and ep.trailing_silence_ms == 5000
    ep.reset()
    ep.update(_lp(0.1, 10), 0)
    ep.update(_lp(0.81, 24), 0)                         # 960 ms after speech
    assert not ep.is_endpoint(True)
    ep.update(_lp(0.79, 1), 0)                          # 0.79 is speech: silence restarts
    assert ep.trailing_silence_ms == 0
    ep.update(_lp(0.95, 25), 0)                         # 1000 ms: rule 2
    assert ep.is_endpoint(True) and not ep.is_endpoint(False)
    ep.reset()
    ep.update(_lp(0.1, 499), 0)
    assert not ep.is_endpoint(True)
    ep.update(_lp(0.1, 1), 0)                           # 20000 ms: rule 3
    assert ep.is_endpoint(True) and not ep.is_endpoint(False)
    off = CtcEndpoint(EndpointConfig(enabled=False), 40)
    off.update(_lp(0.99, 1000), 0)
    assert not off.is_endpoint(False)


def test_decode_cli_writes_key_text(tiny_exports, test_wavs, tmp_path):
    scp = tmp_path / "wav.scp"
    scp.write_text("".join(f"utt{i} {test_wavs[f'u{i}']}\n" for i in range(3)))
    result = tmp_path / "out" / "text"
    cmd = [sys.executable, "-m", "wenet_moe_runtime.decode", "--model_dir", tiny_exports["full"],
           "--wav_scp", str(scp), "--result", str(result), "--mode", "ctc_prefix_beam"]
    subprocess.run(cmd, check=True, timeout=120)
    assert result.read_text().splitlines() == [f"utt{i} {TEXTS[i]}" for i in range(3)]
    assert sorted(os.listdir(result.parent)) == ["text"]   # no temporary left behind
    scp.write_text(f"utt0 {test_wavs['u0']}\nbroken_line_without_path\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{scp}:2: expected 'key wav_path'" in proc.stderr
    assert result.read_text().splitlines()[0] == "utt0 你好世界"   # old output untouched


def test_model_errors_name_file_and_key(tiny_exports, tmp_path):
    with pytest.raises(ModelError, match="model directory does not exist"):
        OnnxAsrModel(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_exports["full"], broken)
    m = onnx.load(str(broken / "encoder.onnx"))
    keep = [p for p in m.metadata_props if p.key != "head"]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    onnx.save(m, str(broken / "encoder.onnx"))
    with pytest.raises(ModelError, match=r"encoder\.onnx: metadata key 'head' is missing"):
        OnnxAsrModel(str(broken))
    os.remove(broken / "ctc.onnx")
    with pytest.raises(ModelError, match=r"ctc\.onnx: model file not found"):
        OnnxAsrModel(str(broken))


@pytest.mark.parametrize("int8", [False, True])
def test_advance_many_equals_streams_advanced_alone(tiny_exports, test_wavs, int8):
    from wenet_moe_runtime.decoder import advance_many
    model = OnnxAsrModel(tiny_exports["full"], int8=int8)
    wavs = [read_wav(test_wavs[f"u{i}"])[0] for i in range(3)]
    opts = DecodeOptions(nbest=2)
    alone = [stream(model, w, opts, step=3200)[1] for w in wavs]
    decs = [StreamingDecoder(model, opts) for _ in wavs]
    together = [[] for _ in wavs]
    longest = max(len(w) for w in wavs)
    for k in range(0, longest + 3200, 3200):
        for d, w in zip(decs, wavs):
            if k < len(w):
                d.accept_waveform(w[k: k + 3200])
            elif not d.input_done:
                d.input_finished()
        for acc, ev in zip(together, advance_many(decs)):
            acc.extend(ev)
    assert [e for e in together] == alone
    assert [e[-2][1][0]["sentence"] for e in together] == TEXTS[:3]
