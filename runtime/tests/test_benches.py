"""Benchmark helpers that decide what a bench compares.

bench/server_load.py's `--calibrate_blank`: the served copy of an export has its CTC
blank bias moved so that the asked fraction of the test wavs' frames is blank-best,
and shares every other file with the export. bench/trained_rtf.py's dense twin of an
MoE config has the MoE's active FFN compute per frame."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import rt_tiny_model as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
server_load = pytest.importorskip("server_load")

from wenet_moe_runtime.decoder import resolve_chunk_size  # noqa: E402
from wenet_moe_runtime.features import FbankOptions  # noqa: E402
from wenet_moe_runtime.model import OnnxAsrModel  # noqa: E402
from wenet_moe_runtime.offline import encode_chunks, utterance_fbank  # noqa: E402


def blank_fraction(model_dir: str, wavs) -> float:
    """Share of the frames whose best CTC class is blank, computed here from the log-posteriors."""
    model = OnnxAsrModel(model_dir)
    chunk = resolve_chunk_size(model, 0)
    best = [model.ctc_log_probs(np.concatenate(encode_chunks(model, utterance_fbank(model, w), chunk)))
            .argmax(axis=1) for _, w in wavs]
    return float(np.mean(np.concatenate(best) == 0))


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_calibrated_copy_has_the_asked_blank_fraction(tmp_path, fraction):
    export = str(tmp_path / "export")
    T.make_standin_export(export, FbankOptions().to_dict(), 32, 2, 2, 40)
    wavs = server_load.synthetic_wavs()
    out = server_load.blank_calibrated(export, wavs, fraction)
    assert out == export + f".blank{round(100 * fraction)}"
    assert abs(blank_fraction(out, wavs) - fraction) < 0.03
    # everything but the CTC graphs is the export's own file
    for name in os.listdir(export):
        same = os.path.samefile(os.path.join(export, name), os.path.join(out, name))
        assert same == (name not in server_load.CTC_GRAPHS), name
    # calibrated again from the export, not from the copy: the same graphs
    before = open(os.path.join(out, "ctc.onnx"), "rb").read()
    server_load.blank_calibrated(export, wavs, fraction)
    assert open(os.path.join(out, "ctc.onnx"), "rb").read() == before


@pytest.mark.parametrize("decoder_moe", [False, True])
def test_dense_twin_has_the_active_compute_of_the_moe(tmp_path, decoder_moe):
    import copy

    from rt_fixtures import tiny_moe_conf
    from wenet_moe.layers.moe import MoEFFN
    from wenet_moe.model import build_model
    trained_rtf = pytest.importorskip("trained_rtf")
    (tmp_path / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    conf = tiny_moe_conf(str(tmp_path / "units.txt"), len(T.units()), decoder_moe=decoder_moe)
    twin = trained_rtf.dense_twin(conf)
    assert conf["encoder_conf"]["mlp_type"] == "moe"            # the input is left as it was
    moe, dense = build_model(copy.deepcopy(conf)), build_model(copy.deepcopy(twin))
    assert not any(isinstance(m, MoEFFN) for m in dense.modules())
    layers = [m for m in moe.modules() if isinstance(m, MoEFFN)]
    assert len(layers) == (2 * 2 + (2 if decoder_moe else 0))  # macaron x blocks (+ decoders)
    # per frame: k experts of (D x H + H x D) weights = one dense FFN of k * H units
    k, hidden = 2, 48
    def ffn_weights(part):
        return [p.numel() for n, p in dense.named_parameters()
                if n.startswith(part) and n.endswith(("w_1.weight", "w_2.weight"))]
    assert ffn_weights("encoder.") == [32 * k * hidden] * 8          # 2 blocks x macaron x 2
    # the decoders (1 + 1 layers) change only where they were MoE
    assert ffn_weights("decoder.") == [32 * (k * hidden if decoder_moe else hidden)] * 4
    for layer in layers:
        assert layer.w1.shape == (4, 32, hidden) and layer.w2.shape == (4, hidden, 32)


def test_blank_shift_is_the_margin_quantile():
    common = pytest.importorskip("common")
    # margins max(non-blank) - blank: 1, 3, 2, -1
    scores = np.array([[0.0, 1.0, -2.0], [1.0, 4.0, 0.0], [0.5, 0.0, 2.5], [2.0, 1.0, 0.0]])
    assert common.blank_shift(scores, 0.5) == pytest.approx(1.5)
    assert common.blank_shift(scores, 1.0) == pytest.approx(3.0)
    # raised by the 0.75 quantile (2.25), frames 0, 2 and 3 become blank-best
    shifted = scores.copy()
    shifted[:, 0] += common.blank_shift(scores, 0.75)
    assert list(shifted.argmax(axis=1)) == [0, 1, 0, 0]


def test_random_model_blank_raised_to_the_fraction(tmp_path):
    import torch

    from rt_fixtures import tiny_moe_conf
    from wenet_moe.model import build_model
    common = pytest.importorskip("common")
    (tmp_path / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    model = build_model(tiny_moe_conf(str(tmp_path / "units.txt"), len(T.units()))).eval()
    feats = torch.randn(1, 400, 80)
    common.raise_blank_(model, feats, 0.7, 8)
    with torch.no_grad():
        enc, _ = model.encoder(feats, torch.tensor([400]), 8, -1)
        best = model.ctc.ctc_lo(enc)[0].argmax(dim=1)
    assert enc.size(1) >= 90
    assert abs(float((best == 0).float().mean()) - 0.7) < 0.03


def test_raising_blank_log_posterior_ranks_as_raising_its_logit():
    """bench/rtf.py's runtime decoding cases raise the blank of the runtime's
    log-posteriors instead of re-exporting the CTC layer: the prefix beam search then
    returns the hypotheses, in the order, that raising the blank logit gives, with
    scores apart by one constant."""
    from wenet_moe_runtime.ctc_search import ctc_prefix_beam_search

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(40, 7))
    shift = 1.7
    raised = logits.copy()
    raised[:, 0] += shift
    want = ctc_prefix_beam_search(log_softmax(raised), 6, 0)
    approx = log_softmax(logits)
    approx[:, 0] += shift
    got = ctc_prefix_beam_search(approx, 6, 0)
    assert [h[0] for h in got] == [h[0] for h in want]
    assert len({tuple(h[0]) for h in want}) == 6 and any(len(h[0]) > 3 for h in want)
    gaps = [g[1] - w[1] for g, w in zip(got, want)]
    assert max(gaps) - min(gaps) < 1e-6 and abs(gaps[0]) > 1.0
