"""The runtime on a real wenet-moe export: a tiny U2++ Conformer with top-2 MoE
FFNs, trained briefly in the test on synthetic utterances, exported by
`wenet_moe.export`, served over loopback. The server's final results equal the
runtime's offline decoding of the same export, which equals the torch model's
own `decode` (CTC prefix beam search and attention rescoring)."""
from __future__ import annotations

import asyncio
import copy
import json

import numpy as np
import pytest
import torch

import rt_tiny_model as T
from rt_fixtures import TRAIN_SET, ServerProcess, tiny_moe_conf
from wenet_moe.data.features import fbank_options
from wenet_moe.export import export_loaded
from wenet_moe.model import build_model
from wenet_moe_runtime.client import stream_samples
from wenet_moe_runtime.ctc_search import CtcPrefixBeamSearch
from wenet_moe_runtime.decoder import DecodeOptions, rescore
from wenet_moe_runtime.features import compute_fbank
from wenet_moe_runtime.model import OnnxAsrModel
from wenet_moe_runtime.offline import decode_samples, encode_chunks

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
CHUNK = 4
CTC_WEIGHT, REVERSE_WEIGHT = 0.5, 0.3
# The trained model must decide every utterance by this much (log score of the best
# hypothesis minus the runner-up's, in CTC prefix beam search and in attention
# rescoring, fp32 and int8): far above the ~1e-3 nats by which torch, ONNX Runtime,
# thread counts and CPU kernels can move a score, so the comparisons below cannot
# depend on the machine.
MARGIN_NATS = 3.0
STEPS = 300


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real")
    (root / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    fbank_conf = {"num_mel_bins": 80, "frame_shift": 10, "frame_length": 25, "dither": 0.0}
    opts = fbank_options(fbank_conf)
    utts = [(T.synth(ids, seed=s, tail_s=t), ids) for ids, s, t in TRAIN_SET]
    feats = [compute_fbank(w.astype(np.float32) / 32768, 16000, opts) for w, _ in utts]
    allf = np.concatenate(feats).astype(np.float64)
    (root / "global_cmvn").write_text(json.dumps(
        {"mean_stat": allf.sum(0).tolist(), "var_stat": (allf ** 2).sum(0).tolist(),
         "frame_num": int(allf.shape[0])}))
    vocab = len(T.units())
    conf = tiny_moe_conf(str(root / "units.txt"), vocab, reverse_weight=REVERSE_WEIGHT,
                         decoder_moe=True, cmvn_file=str(root / "global_cmvn"),
                         fbank_conf=fbank_conf)
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(conf))
    n, t_max = len(feats), max(f.shape[0] for f in feats)
    x = torch.zeros(n, t_max, 80)
    y = torch.full((n, max(len(i) for _, i in utts)), -1, dtype=torch.long)
    for b, (f, (_, ids)) in enumerate(zip(feats, utts)):
        x[b, : f.shape[0]] = torch.from_numpy(f)
        y[b, : len(ids)] = torch.tensor(ids)
    xl = torch.tensor([f.shape[0] for f in feats])
    yl = torch.tensor([len(i) for _, i in utts])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    # The learning rate decays linearly to 0 over the second half, so the run ends
    # settled (with a constant rate the leads still jump by several nats late in
    # training, and where depends on float rounding).
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, 2.0 * (STEPS - step) / STEPS))
    model.train()
    for _ in range(STEPS):
        loss = model(x, xl, y, yl)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    model.eval()
    out = str(root / "export")
    export_loaded(model, copy.deepcopy(conf), copy.deepcopy(conf), out, chunk_size=CHUNK,
                  left_chunks=-1, quantize="int8", reverse_weight=REVERSE_WEIGHT, verify=False)
    return {"dir": out, "model": model, "utts": utts, "feats": feats, "conf": conf,
            "root": root}


def _nbest_with_scores(onnx_model, wav):
    """The runtime's CTC prefix-beam n-best and its attention rescoring, with scores."""
    feats = compute_fbank(wav.astype(np.float32) / 32768.0, 16000, onnx_model.info.fbank)
    hiddens = encode_chunks(onnx_model, feats, CHUNK)
    search = CtcPrefixBeamSearch(10, onnx_model.symbols.blank_id)
    for h in hiddens:
        search.advance(onnx_model.ctc_log_probs(h))
    ctc = search.nbest()
    att = rescore(onnx_model, ctc, np.concatenate(hiddens),
                  DecodeOptions(ctc_weight=CTC_WEIGHT, reverse_weight=REVERSE_WEIGHT))
    return ctc, att


@pytest.mark.parametrize("int8", [False, True])
def test_trained_export_decides_by_a_wide_margin(real_export, int8):
    onnx_model = OnnxAsrModel(real_export["dir"], int8=int8)
    leads = []
    for wav, ids in real_export["utts"]:
        for nbest in _nbest_with_scores(onnx_model, wav):
            assert nbest[0][0] == ids and len(nbest) > 1, (ids, nbest[:2])
            leads.append(nbest[0][1] - nbest[1][1])
    print(f"int8={int8}: smallest lead of the best hypothesis {min(leads):.2f} nats")
    assert min(leads) >= MARGIN_NATS, leads


def test_tree_decoder_equals_padded_decoder(real_export, tmp_path):
    """The runtime rescores with decoder_tree.onnx (the n-best's prefix trees) when the
    export has it: the scores equal decoder.onnx's one padded row per hypothesis on
    the real n-best lists, both directions and L2R only, and so do the rescored
    n-best orders; an export without the file falls back to decoder.onnx."""
    import os
    import shutil

    from wenet_moe_runtime.model import DECODER_TREE
    tree = OnnxAsrModel(real_export["dir"])
    padded = OnnxAsrModel(real_export["dir"], tree_decoder=False)
    assert DECODER_TREE in tree.sessions and DECODER_TREE not in padded.sessions
    shared = 0
    for wav, _ in real_export["utts"]:
        ctc, att = _nbest_with_scores(tree, wav)
        _, att_padded = _nbest_with_scores(padded, wav)
        assert [h[0] for h in att] == [h[0] for h in att_padded]
        np.testing.assert_allclose([h[1] for h in att], [h[1] for h in att_padded], atol=1e-3)
        hyps = [h[0] for h in ctc]
        feats = compute_fbank(wav.astype(np.float32) / 32768.0, 16000, tree.info.fbank)
        enc = np.concatenate(encode_chunks(tree, feats, CHUNK))
        for rw in (0.0, REVERSE_WEIGHT):
            np.testing.assert_allclose(tree.attention_scores(hyps, enc, rw),
                                       padded.attention_scores(hyps, enc, rw), atol=1e-3)
        prefixes = {tuple(h[:j]) for h in hyps for j in range(len(h) + 1)}
        shared += sum(len(h) + 1 for h in hyps) - len(prefixes)
    assert shared > 0      # the n-best lists did share prefixes
    # int8: decoder_tree.int8.onnx quantizes each call's rows together (as
    # decoder.int8.onnx does its padded rows): the same rescored 1-best, close scores
    tree8 = OnnxAsrModel(real_export["dir"], int8=True)
    padded8 = OnnxAsrModel(real_export["dir"], int8=True, tree_decoder=False)
    assert tree8.paths[DECODER_TREE].endswith("decoder_tree.int8.onnx")
    for wav, ids in real_export["utts"]:
        att, att_padded = (_nbest_with_scores(m, wav)[1] for m in (tree8, padded8))
        assert att[0][0] == att_padded[0][0] == ids
        assert abs(att[0][1] - att_padded[0][1]) < 0.5
    copy_dir = tmp_path / "no_tree"
    shutil.copytree(real_export["dir"], copy_dir)
    os.unlink(copy_dir / f"{DECODER_TREE}.onnx")
    fallback = OnnxAsrModel(str(copy_dir))
    assert DECODER_TREE not in fallback.sessions
    wav = real_export["utts"][0][0]
    assert _nbest_with_scores(fallback, wav)[1][0][0] == _nbest_with_scores(tree, wav)[1][0][0]


def test_runtime_offline_matches_torch_decode(real_export):

    onnx_model = OnnxAsrModel(real_export["dir"])
    assert onnx_model.info.chunk_size == CHUNK and onnx_model.info.is_bidirectional_decoder
    model = real_export["model"]
    for (wav, ids), f in zip(real_export["utts"], real_export["feats"]):
        with torch.no_grad():
            ref = model.decode(["ctc_prefix_beam_search", "attention_rescoring"],
                               torch.from_numpy(f)[None], torch.tensor([f.shape[0]]),
                               beam_size=10, decoding_chunk_size=CHUNK,
                               ctc_weight=CTC_WEIGHT, reverse_weight=REVERSE_WEIGHT)
        sym = onnx_model.symbols
        for mode, method in (("ctc_prefix_beam", "ctc_prefix_beam_search"),
                             ("attention_rescoring", "attention_rescoring")):
            got = decode_samples(onnx_model, wav, DecodeOptions(
                mode=mode, ctc_weight=CTC_WEIGHT, reverse_weight=REVERSE_WEIGHT))
            assert got[0]["sentence"] == sym.detokenize(ref[method][0]), (mode, ids)
        assert ref["attention_rescoring"][0] == ids


def test_server_on_real_export_equals_offline(real_export):

    for int8 in (False, True):
        onnx_model = OnnxAsrModel(real_export["dir"], int8=int8)
        srv = ServerProcess(real_export["dir"], ["--int8"] if int8 else [])
        try:
            for wav, ids in real_export["utts"][:4]:
                offline = decode_samples(onnx_model, wav, DecodeOptions(nbest=2))
                res = asyncio.run(asyncio.wait_for(
                    stream_samples(srv.url, wav, chunk_ms=200, nbest=2), 60))
                assert not res.failures and res.speech_end
                assert res.finals == [offline]
                assert offline[0]["sentence"] == onnx_model.symbols.detokenize(ids)
        finally:
            assert srv.stop() == 0


def write_model_and_lists(real_export, tmp_path) -> None:
    """Writes the trained model as a model directory (train.yaml, final.pt) and its
    training wavs as wav.scp and data.list under `tmp_path`."""
    import yaml
    from wenet_moe_runtime.wavio import write_wav

    conf = copy.deepcopy(real_export["conf"])
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(conf, allow_unicode=True), encoding="utf-8")
    torch.save(real_export["model"].state_dict(), tmp_path / "final.pt")
    scp, data = [], []
    for i, (wav, _) in enumerate(real_export["utts"]):
        path = str(tmp_path / f"u{i}.wav")
        write_wav(path, wav)
        scp.append(f"u{i} {path}\n")
        data.append(json.dumps({"key": f"u{i}", "wav": path, "txt": "你"}) + "\n")
    (tmp_path / "wav.scp").write_text("".join(scp))
    (tmp_path / "data.list").write_text("".join(data))


def test_hotwords_recognize_equals_runtime_decode(real_export, tmp_path):
    """`wenet-moe recognize` on the checkpoint and `python -m wenet_moe_runtime.decode`
    on its export, both with the same hotword file, write the same text, for the
    CTC prefix beam search and attention rescoring; the hotwords change results."""
    import os
    import subprocess
    import sys


    write_model_and_lists(real_export, tmp_path)
    (tmp_path / "hot.txt").write_text("世界\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    hot = ["--context_path", str(tmp_path / "hot.txt"), "--context_score", "4.0"]

    def recognize(name, extra):
        cmd = [sys.executable, "-m", "wenet_moe", "recognize", "--config", str(tmp_path / "train.yaml"),
               "--checkpoint", str(tmp_path / "final.pt"), "--test_data", str(tmp_path / "data.list"),
               "--result_dir", str(tmp_path / name), "--modes", "ctc_prefix_beam_search",
               "attention_rescoring", "--decoding_chunk_size", str(CHUNK), "--batch_size", "3",
               "--ctc_weight", str(CTC_WEIGHT), "--reverse_weight", str(REVERSE_WEIGHT), *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return {m: sorted((tmp_path / name / m / "text").read_text(encoding="utf-8").splitlines())
                for m in ("ctc_prefix_beam_search", "attention_rescoring")}

    def runtime(mode, extra):
        out = tmp_path / f"rt_{mode}_{len(extra)}.txt"
        cmd = [sys.executable, "-m", "wenet_moe_runtime.decode", "--model_dir", real_export["dir"],
               "--wav_scp", str(tmp_path / "wav.scp"), "--result", str(out), "--mode", mode,
               "--ctc_weight", str(CTC_WEIGHT), "--reverse_weight", str(REVERSE_WEIGHT), *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return sorted(out.read_text(encoding="utf-8").splitlines())

    biased, plain = recognize("hot", hot), recognize("plain", [])
    for mode in ("ctc_prefix_beam_search", "attention_rescoring"):
        assert runtime(mode, hot) == biased[mode]
    assert biased["ctc_prefix_beam_search"] != plain["ctc_prefix_beam_search"]
    assert sum("世界" in line for line in biased["ctc_prefix_beam_search"]) > \
        sum("世界" in line for line in plain["ctc_prefix_beam_search"])
    # A bad hotword file is a one-line error naming file and line, from both commands.
    (tmp_path / "bad.txt").write_text("世界\n世外\n", encoding="utf-8")
    bad = ["--context_path", str(tmp_path / "bad.txt")]
    for cmd in ([sys.executable, "-m", "wenet_moe_runtime.decode", "--model_dir", real_export["dir"],
                 "--wav_scp", str(tmp_path / "wav.scp"), "--result", str(tmp_path / "x.txt"), *bad],
                [sys.executable, "-m", "wenet_moe", "recognize", "--config", str(tmp_path / "train.yaml"),
                 "--checkpoint", str(tmp_path / "final.pt"), "--test_data", str(tmp_path / "data.list"),
                 "--result_dir", str(tmp_path / "x"), *bad]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert r.returncode == 1 and "bad.txt: line 2 '世外': character '外'" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.txt").exists() and not (tmp_path / "x").exists()


def test_lm_graph_recognize_equals_runtime_decode(real_export, tmp_path):
    """A character LM from the training texts compiled into TLG.fst: `wenet-moe
    recognize --modes ctc_wfst ctc_wfst_rescoring` and the runtime's decode with the
    graph in the export directory (`--lm on`) write the same text; `--lm off` gives
    the plain prefix search."""
    import os
    import shutil
    import subprocess
    import sys


    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tools = os.path.join(root, "tools")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    syms = [ln.split()[0] for ln in T.units()]
    texts = ["".join(syms[i] for i in ids) for ids, _, _ in TRAIN_SET]
    (tmp_path / "text").write_text("\n".join(texts) + "\n", encoding="utf-8")
    export = tmp_path / "export"
    shutil.copytree(real_export["dir"], export)
    for cmd in ([sys.executable, os.path.join(tools, "train_ngram_lm.py"), "--text",
                 str(tmp_path / "text"), "--arpa", str(tmp_path / "lm.arpa"), "--char"],
                [sys.executable, os.path.join(tools, "make_tlg.py"), "--units",
                 str(export / "units.txt"), "--arpa", str(tmp_path / "lm.arpa"),
                 "--graph_dir", str(export)]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
    write_model_and_lists(real_export, tmp_path)
    modes = ("ctc_wfst", "ctc_wfst_rescoring", "ctc_prefix_beam_search")
    r = subprocess.run(
        [sys.executable, "-m", "wenet_moe", "recognize", "--config", str(tmp_path / "train.yaml"),
         "--checkpoint", str(tmp_path / "final.pt"), "--test_data", str(tmp_path / "data.list"),
         "--result_dir", str(tmp_path / "rec"), "--modes", *modes, "--graph_dir", str(export),
         "--decoding_chunk_size", str(CHUNK), "--ctc_weight", str(CTC_WEIGHT),
         "--reverse_weight", str(REVERSE_WEIGHT), "--length_penalty", "0.5"],
        capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rec = {m: sorted((tmp_path / "rec" / m / "text").read_text(encoding="utf-8").splitlines())
           for m in modes}

    def runtime(mode, lm, *extra):
        out = tmp_path / f"rt_{mode}_{lm}_{len(extra)}.txt"
        r = subprocess.run(
            [sys.executable, "-m", "wenet_moe_runtime.decode", "--model_dir", str(export),
             "--wav_scp", str(tmp_path / "wav.scp"), "--result", str(out), "--mode", mode,
             "--lm", lm, "--ctc_weight", str(CTC_WEIGHT), "--reverse_weight", str(REVERSE_WEIGHT),
             "--length_penalty", "0.5", *extra], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return sorted(out.read_text(encoding="utf-8").splitlines())

    assert runtime("ctc_prefix_beam", "on") == rec["ctc_wfst"]
    assert runtime("attention_rescoring", "on") == rec["ctc_wfst_rescoring"]
    assert runtime("ctc_prefix_beam", "off") == rec["ctc_prefix_beam_search"]
    # hotwords with the graph: recognize and the runtime search the same TLG o B; the
    # bonus (1000 per unit) puts the phrase into every utterance, by a margin no
    # acoustic or LM score can match
    (tmp_path / "hot.txt").write_text("世界\n", encoding="utf-8")
    hot = ["--context_path", str(tmp_path / "hot.txt"), "--context_score", "1000"]
    r = subprocess.run(
        [sys.executable, "-m", "wenet_moe", "recognize", "--config", str(tmp_path / "train.yaml"),
         "--checkpoint", str(tmp_path / "final.pt"), "--test_data", str(tmp_path / "data.list"),
         "--result_dir", str(tmp_path / "rec_hot"), "--modes", "ctc_wfst", "ctc_wfst_rescoring",
         "--graph_dir", str(export), "--decoding_chunk_size", str(CHUNK), "--ctc_weight",
         str(CTC_WEIGHT), "--reverse_weight", str(REVERSE_WEIGHT), "--length_penalty", "0.5", *hot],
        capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for mode, rt_mode in (("ctc_wfst", "ctc_prefix_beam"), ("ctc_wfst_rescoring", "attention_rescoring")):
        got = sorted((tmp_path / "rec_hot" / mode / "text").read_text(encoding="utf-8").splitlines())
        assert runtime(rt_mode, "on", *hot) == got
        assert all("世界" in line for line in got) and got != rec[mode]
    # the LM knows the training sentences: the graph search reads them
    expected = sorted(f"u{i} {t}" for i, t in enumerate(texts))
    assert rec["ctc_wfst"] == expected
    # The server finds the graph in the model directory: its streamed finals equal
    # the offline decoding with the graph; hotwords on such a server get `failed`.
    import argparse
    import asyncio
    from wenet_moe_runtime.client import stream_samples
    from wenet_moe_runtime.decode import add_lm_arguments, lm_from_args
    from wenet_moe_runtime.decoder import DecodeOptions
    from wenet_moe_runtime.model import OnnxAsrModel
    from wenet_moe_runtime.offline import decode_samples
    parser = argparse.ArgumentParser()
    add_lm_arguments(parser)
    onnx_model = OnnxAsrModel(str(export))
    wfst = lm_from_args(parser.parse_args([]), str(export), onnx_model.symbols, "ctc_prefix_beam")
    assert wfst is not None
    srv = ServerProcess(str(export), ["--mode", "ctc_prefix_beam"])
    try:
        for wav, ids in real_export["utts"][:3]:
            offline = decode_samples(onnx_model, wav, DecodeOptions(mode="ctc_prefix_beam", wfst=wfst))
            res = asyncio.run(asyncio.wait_for(stream_samples(srv.url, wav, chunk_ms=200), 60))
            assert not res.failures and res.finals == [offline]
            assert offline[0]["sentence"] == onnx_model.symbols.detokenize(ids)

        # hotwords on a graph server: this connection's search runs on TLG o B
        from wenet_moe_runtime.context import build_context_graph
        graph = build_context_graph(onnx_model.symbols, ["世界"], 4.0)
        wav = real_export["utts"][2][0]
        offline = decode_samples(onnx_model, wav, DecodeOptions(mode="ctc_prefix_beam", wfst=wfst,
                                                                context=graph))

        async def with_context():
            from websockets.asyncio.client import connect
            async with connect(srv.url) as ws:
                await ws.send(json.dumps({"signal": "start", "context": ["世界"]}))
                assert json.loads(await ws.recv())["type"] == "server_ready"
                await ws.send(wav.tobytes())
                await ws.send(json.dumps({"signal": "end"}))
                return [json.loads(json.loads(m)["nbest"]) async for m in ws
                        if json.loads(m).get("type") == "final_result"]
        assert asyncio.run(asyncio.wait_for(with_context(), 60)) == [offline]
    finally:
        assert srv.stop() == 0
