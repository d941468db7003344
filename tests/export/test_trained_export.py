"""A tiny MoE model trained in the test (a few hundred steps on synthetic tone
"speech": each token is a tone of its own pitch) and exported with int8:

* the model decides its greedy CTC output by a wide margin (asserted), so fp32 ONNX
  equals torch and int8 equals fp32 on every utterance;
* the export's int8 accuracy gate, run on the training wavs (`int8_verify_data`),
  passes with fp32 deciding most frames, its counts equal an independent
  recomputation, and it rejects an int8 model whose weights were destroyed
  (ONNX and TorchScript), leaving the previous export untouched;
* TorchScript `final.int8.zip` loads, agrees with fp32 within the gate, is smaller;
* sherpa-onnx loads model.onnx (OfflineRecognizer.from_wenet_ctc) and
  model_streaming.onnx (OnlineRecognizer.from_wenet_ctc) and returns our own greedy
  CTC text on the same wavs, features configured identically on both sides
  (kaldi-native-fbank, snip_edges=False, high_freq=-400, dither 0).
"""
import contextlib
import copy
import json
import os

import numpy as np
import pytest
import sherpa_onnx
import torch

from fixture_margins import greedy_ctc_margin, greedy_ctc_stable, jittered, perturbations
from wenet_moe.config import save_yaml
from wenet_moe.data.audio import write_wav
from wenet_moe.data.features import fbank_options
from wenet_moe.export.verify import session
from wenet_moe.model import build_model
from wenet_moe_runtime.ctc_search import ctc_greedy_search
from wenet_moe_runtime.features import compute_fbank
from wenet_moe_runtime.symbols import SymbolTable

pytestmark = pytest.mark.slow

SR = 16000
CHARS = "一二三四五六七八"
UNITS = ["<blank>", "<unk>"] + list(CHARS) + ["<sos/eos>"]
CHUNK, LEFT = 4, 2
STEPS = 300


def tone_utterance(ids, rng):
    """float32 samples in [-1, 1]: silence, one 0.1-0.16 s tone per token (pitch by
    token), short gaps, trailing silence long enough for sherpa's last chunk."""
    parts = [rng.normal(0, 1e-3, int(SR * rng.uniform(0.15, 0.3)))]
    for i in ids:
        n = int(SR * rng.uniform(0.10, 0.16))
        t = np.arange(n) / SR
        env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        parts.append(0.3 * env * np.sin(2 * np.pi * (250.0 + 220.0 * (i - 2)) * t))
        parts.append(rng.normal(0, 1e-3, int(SR * rng.uniform(0.04, 0.08))))
    parts.append(rng.normal(0, 1e-3, int(SR * 0.7)))
    return np.concatenate(parts).astype(np.float32)


def config(tmp):
    units = os.path.join(tmp, "units.txt")
    with open(units, "w", encoding="utf-8") as f:
        f.writelines(f"{s} {i}\n" for i, s in enumerate(UNITS))
    enc = {"output_size": 32, "attention_heads": 2, "linear_units": 32, "num_blocks": 2,
           "cnn_module_kernel": 4, "causal": True, "use_dynamic_chunk": True,
           "cnn_module_norm": "layer_norm", "input_layer": "conv2d", "dropout_rate": 0.0,
           "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0, "mlp_type": "moe",
           "n_expert": 4, "n_expert_activated": 2}
    dec = {"attention_heads": 2, "linear_units": 32, "num_blocks": 1, "r_num_blocks": 1,
           "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
           "self_attention_dropout_rate": 0.0, "src_attention_dropout_rate": 0.0,
           "mlp_type": "moe", "n_expert": 4, "n_expert_activated": 2}
    return {"input_dim": 80, "output_dim": len(UNITS), "encoder": "conformer",
            "encoder_conf": enc, "decoder": "bitransformer", "decoder_conf": dec,
            "moe_conf": {"router": "topk"}, "ctc": "ctc", "ctc_conf": {"ctc_blank_id": 0},
            "cmvn": "global_cmvn",
            "cmvn_conf": {"cmvn_file": os.path.join(tmp, "global_cmvn"), "is_json_cmvn": True},
            "model": "asr_model",
            "model_conf": {"ctc_weight": 0.5, "reverse_weight": 0.3, "lsm_weight": 0.0,
                           "length_normalized_loss": False},
            "tokenizer": "char",
            "tokenizer_conf": {"symbol_table_path": units, "split_with_space": False},
            "dataset_conf": {"fbank_conf": {"num_mel_bins": 80, "frame_shift": 10,
                                            "frame_length": 25, "dither": 0.0}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("trained"))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    conf = config(tmp)
    opts = fbank_options(conf["dataset_conf"]["fbank_conf"], SR)
    texts = [list(rng.integers(2, 2 + len(CHARS), rng.integers(2, 6))) for _ in range(24)]
    wavs = [tone_utterance(t, rng) for t in texts]
    feats = [compute_fbank(w, SR, opts) for w in wavs]
    stacked = np.concatenate(feats[:16]).astype(np.float64)
    with open(conf["cmvn_conf"]["cmvn_file"], "w") as f:
        json.dump({"mean_stat": stacked.sum(0).tolist(), "var_stat": (stacked ** 2).sum(0).tolist(),
                   "frame_num": int(stacked.shape[0])}, f)
    model = build_model(copy.deepcopy(conf))
    x = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(f) for f in feats[:16]], batch_first=True)
    x_lens = torch.tensor([f.shape[0] for f in feats[:16]])
    y = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in texts[:16]], batch_first=True,
                                        padding_value=-1)
    y_lens = torch.tensor([len(t) for t in texts[:16]])
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        loss = model(x, x_lens, y, y_lens)["loss"]
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optim.step()
    model.eval()
    save_yaml(conf, os.path.join(tmp, "train.yaml"))
    torch.save({"model": model.state_dict()}, os.path.join(tmp, "final.pt"))
    data_list = os.path.join(tmp, "data.list")
    with open(data_list, "w", encoding="utf-8") as f:
        for k, (wav, text) in enumerate(zip(wavs, texts)):
            path = os.path.join(tmp, f"utt{k}.wav")
            write_wav(path, wav, SR)
            f.write(json.dumps({"key": f"utt{k}", "wav": path,
                                "txt": "".join(CHARS[i - 2] for i in text)}) + "\n")
    from wenet_moe.export import export_model
    out = os.path.join(tmp, "onnx")
    report = export_model(os.path.join(tmp, "train.yaml"), os.path.join(tmp, "final.pt"), out,
                          "onnx", CHUNK, LEFT, "int8", int8_verify_data=data_list)
    return model, texts, wavs, feats, out, report, tmp


def log_probs_onnx(sess, feat):
    lp, _ = sess.run(None, {"x": feat[None], "x_lens": np.array([feat.shape[0]], np.int64)})
    return lp[0]


def test_model_learned_and_int8_agrees_with_fp32(trained):
    """Every equality here is implied by an asserted margin: the fp32 greedy output is
    stable under log-prob perturbations up to 1 nat (measured >= 3.0 on all 24
    utterances), torch and ONNX differ by < 1e-4 (measured 5e-6), and int8 differs
    from fp32 by less than half the margin on each utterance (measured: margin >= 4.8x
    twice the int8 deviation of 0.06-0.46)."""
    model, texts, wavs, feats, out = trained[:5]
    fp32, int8 = session(os.path.join(out, "model.onnx")), session(os.path.join(out, "model.int8.onnx"))
    hyp32, hyp8 = [], []
    for i, f in enumerate(feats):
        lp32, lp8 = log_probs_onnx(fp32, f), log_probs_onnx(int8, f)
        with torch.no_grad():
            enc, _ = model.encode(torch.from_numpy(f)[None], torch.tensor([f.shape[0]]))
            lp_torch = model.ctc_activation(enc)[0].numpy()
        assert np.abs(lp32 - lp_torch).max() < 1e-4, i
        assert greedy_ctc_stable(lp32, 1.0), i
        int8_dev = float(np.abs(lp32 - lp8).max())
        assert greedy_ctc_stable(lp32, 2 * int8_dev), (i, int8_dev)   # int8 cannot change the output
        hyp32.append(ctc_greedy_search(lp32)[0])
        hyp8.append(ctc_greedy_search(lp8)[0])
    with torch.no_grad():
        ours = [model.decode(["ctc_greedy_search"], torch.from_numpy(f)[None],
                             torch.tensor([f.shape[0]]))["ctc_greedy_search"][0] for f in feats]
    assert hyp32 == ours  # fp32 ONNX = the toolkit's own greedy decoding
    correct = [h == [int(i) for i in t] for h, t in zip(hyp32, texts)]
    print(f"\nfp32 exact utterances: training {sum(correct[:16])}/16, held out {sum(correct[16:])}/8")
    assert all(correct[:16])              # measured: 16/16 and 8/8
    assert sum(correct[16:]) >= 6
    assert hyp8 == hyp32
    # the same outputs with weights jittered by 1e-3, with 1 or 2 threads, with oneDNN off
    for name, ctx in perturbations() + [("jittered weights", None)]:
        net = jittered(model, 1e-3) if ctx is None else model
        with ctx if ctx is not None else contextlib.nullcontext(), torch.no_grad():
            got = [net.decode(["ctc_greedy_search"], torch.from_numpy(f)[None],
                              torch.tensor([f.shape[0]]))["ctc_greedy_search"][0] for f in feats]
        assert got == hyp32, name


def sherpa_streaming_reference(model, feat):
    """Our CTC log-probs (T', V) over sherpa-onnx's streaming schedule: windows of
    (chunk-1)*4+7 frames every chunk*4 frames while processed + window < frames,
    a zero cache of chunk*left frames hidden by the mask, positions from chunk*left."""
    required = CHUNK * LEFT
    window = (CHUNK - 1) * 4 + 7
    enc = model.encoder
    att = torch.zeros(enc.num_blocks, enc.attention_heads, required,
                      2 * enc.output_size() // enc.attention_heads)
    cnn = torch.zeros(enc.num_blocks, 1, enc.output_size(), 3)
    offset, processed, outs = required, 0, []
    with torch.no_grad():
        while processed + window < feat.shape[0]:
            k = offset // CHUNK - LEFT
            mask = torch.ones(1, 1, required + CHUNK, dtype=torch.bool)
            mask[..., :max(required - k * CHUNK, 0)] = False
            x = torch.from_numpy(feat[processed:processed + window])[None]
            y, att, cnn = enc.forward_chunk(x, offset, required, att, cnn, mask)
            outs.append(model.ctc_activation(y)[0].numpy())
            offset += y.size(1)
            processed += CHUNK * 4
    return np.concatenate(outs) if outs else np.zeros((0, len(UNITS)), np.float32)


def test_sherpa_onnx_offline_and_streaming_match_our_greedy_search(trained):
    model, texts, wavs, feats, out = trained[:5]
    table = SymbolTable.read(os.path.join(out, "units.txt"))
    offline = sherpa_onnx.OfflineRecognizer.from_wenet_ctc(
        model=os.path.join(out, "model.onnx"), tokens=os.path.join(out, "tokens.txt"),
        num_threads=1, feature_dim=80)
    online = sherpa_onnx.OnlineRecognizer.from_wenet_ctc(
        tokens=os.path.join(out, "tokens.txt"), model=os.path.join(out, "model_streaming.onnx"),
        chunk_size=CHUNK, num_left_chunks=LEFT, num_threads=1, feature_dim=80)
    same_offline = same_online = 0
    margins = []
    for wav, feat in zip(wavs, feats):
        streamed = sherpa_streaming_reference(model, feat)
        margins.append(greedy_ctc_margin(streamed, hi=5.0))
        with torch.no_grad():
            ours = model.decode(["ctc_greedy_search"], torch.from_numpy(feat)[None],
                                torch.tensor([feat.shape[0]]))["ctc_greedy_search"][0]
        stream = offline.create_stream()
        stream.accept_waveform(SR, wav)
        offline.decode_stream(stream)
        same_offline += stream.result.text == table.detokenize(ours)

        s = online.create_stream()
        s.accept_waveform(SR, wav)
        s.input_finished()
        while online.is_ready(s):
            online.decode_stream(s)
        same_online += online.get_result(s) == table.detokenize(ctc_greedy_search(streamed)[0])
    n = len(wavs)
    print(f"\nsherpa-onnx offline == our greedy on {same_offline}/{n} utterances; "
          f"streaming == our chunked greedy on {same_online}/{n}; streaming greedy margins "
          f"{min(margins):.2f}..{max(margins):.2f} nats")
    # the offline margins are asserted in the test above (>= 1 nat); the streaming ones here
    assert min(margins) >= 1.0
    assert same_offline == n and same_online == n


# ------------------------------------------------------------ int8 accuracy gate
def decided_and_flipped(want, got, margin=1.0):
    """(frames, decided frames, decided frames whose best token differs): fp32
    `want` decides a frame when its best log-prob leads the runner-up by `margin`."""
    ranked = np.sort(want, axis=-1)
    decided = ranked[:, -1] - ranked[:, -2] >= margin
    flipped = decided & (want.argmax(-1) != got.argmax(-1))
    return want.shape[0], int(decided.sum()), int(flipped.sum())


def gate_feats(tmp):
    """Features of the gate's inputs: the first VERIFY_UTTS wavs of data.list as written."""
    from wenet_moe.data.audio import load_audio
    from wenet_moe.export.gate import VERIFY_UTTS

    with open(os.path.join(tmp, "data.list"), encoding="utf-8") as f:
        paths = [json.loads(line)["wav"] for line in f][:VERIFY_UTTS]
    opts = fbank_options({"num_mel_bins": 80, "frame_shift": 10, "frame_length": 25,
                          "dither": 0.0}, SR)
    return [compute_fbank(load_audio(p)[0], SR, opts) for p in paths]


def snapshot(d):
    """relative path -> bytes of every file under `d` (`.kernel/` directories too)."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = f.read()
    return out


def export_args(tmp, out, *extra):
    return ["export", "--config", os.path.join(tmp, "train.yaml"), "--checkpoint",
            os.path.join(tmp, "final.pt"), "--output_dir", out, "--chunk_size", str(CHUNK),
            "--num_decoding_left_chunks", str(LEFT), "--quantize", "int8",
            "--int8_verify_data", os.path.join(tmp, "data.list"), *extra]


def test_int8_gate_passes_on_trained_model_and_counts_match(trained):
    """Every int8 graph passed the gate on real audio with fp32 deciding most frames
    (so the gate measured decisions, not ties); model.int8.onnx's counts equal a
    recomputation from the two graphs' outputs."""
    report, tmp, out = trained[5], trained[6], trained[4]
    for name in ("model.int8.onnx", "encoder.int8.onnx + ctc.int8.onnx",
                 "model_streaming.int8.onnx"):
        print(f"\n{name}: disagreement {report[f'{name} disagreement (decided frames)']:.4f} on "
              f"{report[f'{name} decided frames share']:.1%} decided frames; greedy tokens "
              f"{report[f'{name} greedy token disagreement']:.4f}; max |diff| "
              f"{report[f'{name} max |diff| log-prob']:.3g}")
        assert report[f"{name} disagreement (decided frames)"] <= 0.005
        assert report[f"{name} decided frames share"] >= 0.8
        assert report[f"{name} greedy token disagreement"] <= 0.05
        assert report[f"{name} max |diff| log-prob"] > 0  # int8 really ran, not an fp32 copy
    assert report["decoder.int8.onnx disagreement (decided positions)"] <= 0.02
    assert report["decoder.int8.onnx decided positions share"] >= 0.5

    fp32 = session(os.path.join(out, "model.onnx"))
    int8 = session(os.path.join(out, "model.int8.onnx"))
    frames = decided = flipped = 0
    for feat in gate_feats(tmp):
        feeds = {"x": feat[None], "x_lens": np.array([feat.shape[0]], np.int64)}
        n, d, f = decided_and_flipped(fp32.run(None, feeds)[0][0], int8.run(None, feeds)[0][0])
        frames, decided, flipped = frames + n, decided + d, flipped + f
    assert report["model.int8.onnx decided frames share"] == \
        pytest.approx(decided / frames, abs=1e-12)
    assert report["model.int8.onnx disagreement (decided frames)"] == \
        pytest.approx(flipped / decided, abs=1e-12)


def destroy_int8_weights(path):
    """Shuffle the values of every int8 weight of an ONNX file (a broken quantizer)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    rng = np.random.default_rng(0)
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) >= 16:
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(rng.permutation(w.reshape(-1)).reshape(w.shape),
                                               t.name))
    onnx.save(proto, path)


def test_int8_gate_rejects_destroyed_onnx_weights(trained, tmp_path, monkeypatch, capsys):
    """A quantizer that destroys the int8 weights: the export fails with the gate's
    one-line error, the previous export stays byte for byte; with
    --int8_max_disagreement 1 the same export is accepted."""
    import shutil
    from wenet_moe.cli import main
    from wenet_moe.export import quantize as q8

    tmp, previous = trained[6], trained[4]
    original = q8.quantize_onnx

    def broken(src, dst):
        original(src, dst)
        destroy_int8_weights(dst)
    monkeypatch.setattr(q8, "quantize_onnx", broken)
    out = str(tmp_path / "onnx")
    shutil.copytree(previous, out)
    before = snapshot(out)
    rc = main(export_args(tmp, out))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "int8 accuracy gate: model.int8.onnx: best token differs from fp32 on" in err
    assert "--int8_max_disagreement 0.02" in err and "of " + os.path.join(tmp, "data.list") in err
    rate = float(err.split("decided frames (")[1].split("%")[0]) / 100
    assert rate > 0.2  # destroyed weights are far beyond the gate, not near it
    assert snapshot(out) == before
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith(".export")] == []

    assert main(export_args(tmp, out, "--int8_max_disagreement", "1")) == 0
    assert sorted(snapshot(out)) == sorted(before)
    assert snapshot(out)["model.int8.onnx"] != before["model.int8.onnx"]


@pytest.fixture(scope="module")
def torchscript_int8(trained):
    from wenet_moe.export import export_model

    tmp = trained[6]
    out = os.path.join(tmp, "ts")
    report = export_model(os.path.join(tmp, "train.yaml"), os.path.join(tmp, "final.pt"), out,
                          "torchscript", CHUNK, LEFT, "int8",
                          int8_verify_data=os.path.join(tmp, "data.list"))
    return out, report


def test_torchscript_int8_loads_agrees_with_fp32_and_is_smaller(trained, torchscript_int8):
    out, report = torchscript_int8
    assert sorted(os.listdir(out)) == ["final.int8.zip", "final.zip", "tokens.txt", "units.txt"]
    sizes = {n: os.path.getsize(os.path.join(out, n)) for n in ("final.zip", "final.int8.zip")}
    print(f"\nTorchScript sizes {sizes}")
    assert sizes["final.int8.zip"] < sizes["final.zip"]
    fp32 = torch.jit.load(os.path.join(out, "final.zip")).eval()
    int8 = torch.jit.load(os.path.join(out, "final.int8.zip")).eval()
    assert (int8.subsampling_rate(), int8.right_context()) == (4, 6)
    frames = decided = flipped = same = 0
    feats = gate_feats(trained[6])
    with torch.no_grad():
        for feat in feats:
            x = torch.from_numpy(feat)[None]
            lp = [m.ctc_activation(m.forward_encoder_chunk(x, 0, -1)[0])[0].numpy()
                  for m in (fp32, int8)]
            n, d, f = decided_and_flipped(*lp)
            frames, decided, flipped = frames + n, decided + d, flipped + f
            same += ctc_greedy_search(lp[0])[0] == ctc_greedy_search(lp[1])[0]
    print(f"final.int8.zip: {flipped}/{decided} decided frames differ ({decided}/{frames} "
          f"decided); greedy text equal on {same}/{len(feats)} utterances")
    assert decided >= 0.8 * frames and flipped <= 0.005 * decided
    assert same >= len(feats) - 2
    name = "final.int8.zip full-context CTC"
    assert report[f"{name} decided frames share"] == pytest.approx(decided / frames, abs=1e-12)
    assert report[f"{name} disagreement (decided frames)"] == pytest.approx(flipped / decided,
                                                                             abs=1e-12)
    assert report[f"final.int8.zip chunk-{CHUNK} streaming CTC disagreement "
                  f"(decided frames)"] <= 0.005
    assert report["final.int8.zip forward_attention_decoder disagreement "
                  "(decided positions)"] <= 0.02


def test_torchscript_int8_gate_rejects_destroyed_weights(trained, tmp_path, monkeypatch, capsys):
    """Linear weights shuffled before quantization: rejected, nothing written."""
    from wenet_moe.cli import main
    from wenet_moe.export import torchscript_export as ts

    original = ts.quantize_torchscript

    def broken(model, path, metadata=None):
        bad = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in bad.modules():
                if isinstance(m, torch.nn.Linear):
                    flat = m.weight.reshape(-1)
                    m.weight.copy_(flat[torch.randperm(flat.numel(), generator=gen)]
                                   .reshape(m.weight.shape))
        original(bad, path, metadata)
    monkeypatch.setattr(ts, "quantize_torchscript", broken)
    out = str(tmp_path / "ts")
    # without --int8_verify_data: the gate's CMVN-centred random inputs, on which the
    # trained model decides its frames (blank), still catch the destroyed weights
    args = [a for a in export_args(trained[6], out, "--format", "torchscript")
            if a not in ("--int8_verify_data", os.path.join(trained[6], "data.list"))]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "int8 accuracy gate: final.int8.zip full-context CTC: best token differs" in err
    assert "inputs: 4 random CMVN-centred inputs (no --int8_verify_data)" in err
    assert float(err.split("decided frames (")[1].split("%")[0]) / 100 > 0.2
    assert not os.path.exists(out)
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith(".export")] == []


# ------------------------------------------------------------ int8 MoE experts
def expert_weight_dtypes(path):
    """{initializer name: dtype name} of the MoE expert weights of an ONNX file (named
    `moe<j>/expert<e>/w1..b2` by the export's dispatch rewrite)."""
    import onnx
    from wenet_moe.export.onnx_passes import graphs
    proto = onnx.load(path)
    inits = [t for g in graphs(proto.graph) for t in g.initializer]   # If branches too
    return {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in inits
            if "/expert" in t.name
            and t.name.split("/")[-1] in ("w1", "w2", "w1_quantized", "w2_quantized")}


def test_int8_export_quantizes_every_expert(trained):
    """Every expert matrix of every MoE layer is int8 in each int8 graph (as many as the
    fp32 graph has fp32 ones: 2 per expert per MoE layer of the part it holds)."""
    from wenet_moe.layers.moe import MoEFFN
    model, out = trained[0], trained[4]
    per_layer = {part: [m.n_expert for m in getattr(model, part).modules() if isinstance(m, MoEFFN)]
                 for part in ("encoder", "decoder")}
    assert per_layer["encoder"] and per_layer["decoder"]
    holds = {"encoder": ["encoder"], "model": ["encoder"], "model_streaming": ["encoder"],
             "decoder": ["decoder"]}
    for name, parts in holds.items():
        want = 2 * sum(sum(per_layer[p]) for p in parts)
        fp32 = expert_weight_dtypes(os.path.join(out, f"{name}.onnx"))
        int8 = expert_weight_dtypes(os.path.join(out, f"{name}.int8.onnx"))
        assert len(fp32) == want and set(fp32.values()) == {"FLOAT"}, (name, len(fp32), want)
        assert len(int8) == want and set(int8.values()) == {"INT8"}, (name, int8)
        assert all(n.endswith("_quantized") for n in int8)


def test_int8_gate_rejects_destroyed_expert_weights(trained, tmp_path, monkeypatch, capsys):
    """A quantizer that destroys only the experts' int8 weights (everything else
    intact): the gate rejects the export with its one-line error."""
    import onnx
    from onnx import numpy_helper
    from wenet_moe.cli import main
    from wenet_moe.export import quantize as q8

    tmp = trained[6]
    original = q8.quantize_onnx

    def experts_destroyed(src, dst):
        original(src, dst)
        proto = onnx.load(dst)
        rng = np.random.default_rng(0)
        hit = 0
        from wenet_moe.export.onnx_passes import graphs
        for t in [t for g in graphs(proto.graph) for t in g.initializer]:
            if "/expert" in t.name and t.data_type == onnx.TensorProto.INT8:
                w = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array(
                    rng.permutation(w.reshape(-1)).reshape(w.shape), t.name))
                hit += 1
        # ctc.onnx and the kernel graphs' pieces (their experts run in the C kernel,
        # as w8a8) have no expert weights
        assert hit > 0 or "ctc" in os.path.basename(dst) or ".kernel" in dst
        onnx.save(proto, dst)
    monkeypatch.setattr(q8, "quantize_onnx", experts_destroyed)
    out = str(tmp_path / "onnx")
    rc = main(export_args(tmp, out))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    # the first graph the gate checks that disagrees is named (measured: the decoder,
    # 28 of 178 decided positions; the tiny encoder's CTC decisions, decided by wide
    # margins through the residual paths, survived its destroyed experts)
    import re
    found = re.search(r"int8 accuracy gate: (.+?\.int8\.onnx): best token differs from "
                      r"fp32 on (\d+) of (\d+) decided", err)
    assert found, err
    assert int(found.group(2)) / int(found.group(3)) > 0.05, err  # the default gate is 2%


def test_int8_graphs_quantize_the_strided_convolutions(trained):
    """int8 graphs hold the subsampling's second convolution as an int8 MatMul
    (`onnx_passes.conv_as_matmul`); the Convs left in them are the ones it keeps:
    grouped (depthwise) or with few inputs per output (the first, 1-channel one)."""
    import onnx
    from onnx import numpy_helper
    from wenet_moe.export.onnx_passes import graphs
    out = trained[4]
    for name in ("encoder", "model", "model_streaming"):
        proto = onnx.load(os.path.join(out, f"{name}.int8.onnx"))
        weights = {t.name: t for g in graphs(proto.graph) for t in g.initializer}
        nodes = [n for g in graphs(proto.graph) for n in g.node]
        im2col = [n for n in nodes if n.name.startswith("conv_im2col")]
        assert im2col and all(n.op_type != "MatMul" for n in im2col), name   # quantized
        for node in nodes:
            if node.op_type == "Conv":
                w = numpy_helper.to_array(weights[node.input[1]])
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                assert group > 1 or int(np.prod(w.shape[1:])) < 64, (name, node.name)
