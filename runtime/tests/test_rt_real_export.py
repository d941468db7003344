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
from rt_fixtures import TRAIN_SET, ServerProcess
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
    moe = {"mlp_type": "moe", "n_expert": 4, "n_expert_activated": 2}
    conf = {
        "input_dim": 80, "output_dim": vocab, "encoder": "conformer",
        "encoder_conf": {"output_size": 32, "attention_heads": 2, "linear_units": 48,
                         "num_blocks": 2, "cnn_module_kernel": 3, "causal": True,
                         "use_dynamic_chunk": True, "cnn_module_norm": "layer_norm",
                         "input_layer": "conv2d", "dropout_rate": 0.0,
                         "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0, **moe},
        "decoder": "bitransformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 48, "num_blocks": 1,
                         "r_num_blocks": 1, "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
                         "self_attention_dropout_rate": 0.0, "src_attention_dropout_rate": 0.0,
                         **moe},
        "ctc": "ctc", "ctc_conf": {"ctc_blank_id": 0}, "cmvn": "global_cmvn",
        "cmvn_conf": {"cmvn_file": str(root / "global_cmvn"), "is_json_cmvn": True},
        "model": "asr_model",
        "model_conf": {"ctc_weight": 0.3, "reverse_weight": REVERSE_WEIGHT, "lsm_weight": 0.0,
                       "length_normalized_loss": False},
        "moe_conf": {"router": "topk"}, "tokenizer": "char",
        "tokenizer_conf": {"symbol_table_path": str(root / "units.txt"), "split_with_space": False,
                           "special_tokens": {"<blank>": 0, "<unk>": 1, "<sos>": vocab - 1,
                                              "<eos>": vocab - 1}},
        "dataset_conf": {"fbank_conf": fbank_conf},
    }
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
    return {"dir": out, "model": model, "utts": utts, "feats": feats}


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
