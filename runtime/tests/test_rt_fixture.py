"""The constructed stand-in model (rt_tiny_model.build_tiny) decides everything the
runtime tests feed it by a wide margin, in torch and through ONNX Runtime (fp32
and int8), with 1 or 2 threads, oneDNN on or off and weights jittered by 1e-3.

Frame classes (rt_tiny_model.frame_classes): on a frame inside silence <blank>,
on a frame inside a tone that tone, on a frame straddling a boundary <blank> or
that tone must lead every other token by MARGIN_NATS log-prob (so P(blank) >
1 - 8 e^-30 > 0.99 on silence). Label paths that keep to these choices collapse
to the right tokens (checked by `assert_decisive`), so with eps = the summed
probability of all other choices, a prefix with k tokens fewer or more than the
right one h* has CTC probability <= eps^max(1, ceil(k/2)) (a frame changed adds or
removes at most two tokens), and h* has >= 1 - eps (the beam search only ever
underestimates a prefix; h*'s prefixes are the best ones, never pruned).

Attention rescoring ranks by `att + ctc_weight * ctc` (decoder.rescore; defaults
rescoring_weight 1, ctc_weight 0.5), `att = (1-rw) l2r + rw r2l`, each a sum over
L+1 tokens of log-probs within 2B of -log V (B = DEC_BOUND, |decoder logit| <= B
by construction). So att(h) - att(h*) <= max(k, 0) log V + 2B (2 L* + 2) where
k = L* - len(h), and rescoring keeps h* whenever
  0.5 (max(1, ceil(|k|/2)) log(1/eps) + log(1-eps)) > max(k, 0) log V + 2B (2 L* + 2),
which `test_margins` checks for every k with the eps it measures.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

import rt_tiny_model as T
from rt_fixtures import CHUNK, TRAIN_SET, fbank_fn, two_sentences
from wenet_moe_runtime.model import OnnxAsrModel
from wenet_moe_runtime.offline import encode_chunks

MARGIN_NATS = 30.0
CTC_WEIGHT = 0.5            # DecodeOptions' default (rescoring_weight 1)
SHIFTS = (0, 1, 2, 3)       # fbank frames skipped: a segment after an endpoint starts anywhere


def _noise(std: float, seconds: float, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, std, int(seconds * T.SR)) * 32767
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def _inputs() -> Dict[str, Tuple[np.ndarray, List[Tuple[int, int, int]]]]:
    """name -> (int16 wav, tone spans): everything the runtime tests feed the model."""
    out = {}
    for i, (ids, seed, tail) in enumerate(TRAIN_SET):
        out[f"train{i}"] = (T.synth(ids, seed=seed, tail_s=tail), T.tone_spans(ids))
    out["two"] = two_sentences()
    u0 = T.synth(TRAIN_SET[0][0], seed=0)
    spans0 = T.tone_spans(TRAIN_SET[0][0])
    zeros6 = np.zeros(6 * T.SR, np.int16)
    out["6s_digital_silence_then_u0"] = (np.concatenate([zeros6, u0]),
                                         T.tone_spans(TRAIN_SET[0][0], start=len(zeros6)))
    loop = np.concatenate([u0, np.zeros(2 * T.SR, np.int16)])       # the web test's capture
    out["u0_2s_zeros_twice"] = (np.concatenate([loop, loop]),
                                spans0 + T.tone_spans(TRAIN_SET[0][0], start=len(loop)))
    ids = [7, 4, 4, 2]
    out["long_lead_and_tail"] = (T.synth(ids, lead_s=2.5, tail_s=3.0, seed=11),
                                 T.tone_spans(ids, lead_s=2.5))
    out["noise_floor_4s"] = (T.synth([], lead_s=2.0, tail_s=2.0, seed=12), [])
    for std in (1e-3, 1e-2, 1e-1):
        out[f"white_noise_{std:g}"] = (_noise(std, 2.0, seed=13), [])
    return out


def assert_decisive(classes: List[Tuple[str, int]], ids: List[int], name: str) -> None:
    """Every label path taking <blank> on silence, the tone on tone frames and
    either on straddling frames collapses to `ids`."""
    runs = []                                  # [token, first frame, end frame) of tone runs
    for i, (kind, tok) in enumerate(classes):
        if kind == "tone":
            if runs and runs[-1][2] == i and runs[-1][0] == tok:
                runs[-1][2] = i + 1
            else:
                runs.append([tok, i, i + 1])
        elif kind == "straddle":
            near = [classes[j] for j in (i - 1, i + 1) if 0 <= j < len(classes)]
            assert ("tone", tok) in near, f"{name}: straddling frame {i} not next to its tone"
    assert [r[0] for r in runs] == ids, f"{name}: tone frames {runs} != {ids}"
    for (_, _, end), (_, start, _) in zip(runs, runs[1:]):
        assert any(classes[j][0] == "silence" for j in range(end, start)), \
            f"{name}: no silence frame between tone runs ending {end} and starting {start}"


def _allowed(kind: str, tok: int) -> List[int]:
    return [0] if kind == "silence" else [tok] if kind == "tone" else [0, tok]


def margins(lp: np.ndarray, classes: List[Tuple[str, int]]) -> Tuple[Dict[str, float], float]:
    """(T', V) log-probs -> (smallest lead of the allowed choice per frame class, eps)."""
    assert lp.shape[0] == len(classes), (lp.shape, len(classes))
    lead = {"silence": math.inf, "tone": math.inf, "straddle": math.inf}
    eps = 0.0
    for row, (kind, tok) in zip(lp.astype(np.float64), classes):
        ok = _allowed(kind, tok)
        rest = np.delete(row, ok)
        lead[kind] = min(lead[kind], float(row[ok].max() - rest.max()))
        eps += float(np.exp(rest).sum())
    return lead, eps


def rescoring_keeps_best(eps: float, best_len: int, vocab: int) -> bool:
    """The inequality of the module docstring, for every length difference k."""
    log_inv = -math.log(eps) if eps > 0 else math.inf
    att_slack = 2 * T.DEC_BOUND * (2 * best_len + 2)
    for k in range(-best_len - 8, best_len + 1):           # k = L* - len(h)
        changed = max(1, math.ceil(abs(k) / 2))
        ctc_gap = CTC_WEIGHT * (changed * log_inv + math.log1p(-eps))
        if not ctc_gap > max(k, 0) * math.log(vocab) + att_slack:
            return False
    return True


@pytest.fixture(scope="module")
def setup(tiny_exports):
    _, fbank = fbank_fn()
    inputs = {}
    for name, (wav, spans) in _inputs().items():
        feats = np.asarray(fbank(wav), np.float32)
        for shift in SHIFTS:
            classes = T.frame_classes(len(wav), spans, first_frame=shift)
            assert_decisive(classes, [t for _, _, t in spans], f"{name}+{shift}")
            inputs[f"{name}+{shift}"] = (feats[shift:], classes, len(spans))
    return tiny_exports["torch_model"], inputs


def _torch_lp(model, feats: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.ctc(model.encode_full(torch.from_numpy(feats), CHUNK)).numpy()


def _jittered(model, seed: int):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(other.parameters()) + [other.encoder.mean]:
            t.mul_(1 + 1e-3 * torch.randn(t.shape, generator=gen))
    return other


def _run_backend(backend: str, model, tiny_exports, feats: np.ndarray) -> np.ndarray:
    if backend.startswith("onnx"):
        onnx_model = _onnx_models(tiny_exports, backend == "onnx_int8")
        return np.concatenate([onnx_model.ctc_log_probs(h) for h in encode_chunks(onnx_model, feats, CHUNK)])
    if backend == "torch_2_threads":
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            return _torch_lp(model, feats)
        finally:
            torch.set_num_threads(before)
    if backend == "torch_no_mkldnn":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # torch's note on TF32 for Intel GPUs
            with torch.backends.mkldnn.flags(enabled=False):
                return _torch_lp(model, feats)
    return _torch_lp(model, feats)


_ONNX: Dict[bool, OnnxAsrModel] = {}


def _onnx_models(tiny_exports, int8: bool) -> OnnxAsrModel:
    if int8 not in _ONNX:
        _ONNX[int8] = OnnxAsrModel(tiny_exports["full"], int8=int8)
    return _ONNX[int8]


BACKENDS = ["torch", "torch_2_threads", "torch_no_mkldnn", "torch_jitter_1e-3_seed0",
            "torch_jitter_1e-3_seed1", "onnx_fp32", "onnx_int8"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_margins(setup, tiny_exports, backend):
    model, inputs = setup
    if backend.startswith("torch_jitter"):
        model = _jittered(model, int(backend[-1]))
    worst = {"silence": math.inf, "tone": math.inf, "straddle": math.inf}
    worst_eps = 0.0
    for name, (feats, classes, n_tokens) in inputs.items():
        lp = _run_backend(backend, model, tiny_exports, feats)
        lead, eps = margins(lp, classes)
        for kind, value in lead.items():
            assert value >= MARGIN_NATS, f"{backend} {name}: {kind} lead {value:.2f} nats"
            worst[kind] = min(worst[kind], value)
        if any(k == "silence" for k, _ in classes):
            assert float(np.exp(lp[[k == "silence" for k, _ in classes], 0]).min()) > 0.99
        assert rescoring_keeps_best(eps, n_tokens, lp.shape[1]), f"{backend} {name}: eps {eps:.3g}"
        worst_eps = max(worst_eps, eps)
    print(f"{backend}: smallest leads (nats) " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items())
          + f"; largest eps {worst_eps:.2g}")
    assert all(math.isfinite(v) for v in worst.values())       # every class was seen


def test_decoder_logits_are_bounded(setup, tiny_exports):
    """|decoder logit| <= DEC_BOUND on any input: every log-prob within 2 B of -log V,
    in torch and through ONNX Runtime (fp32, int8), even for huge encoder outputs."""
    model, _ = setup
    assert model.decoder.logit_bound() <= T.DEC_BOUND
    vocab = model.vocab
    rng = np.random.default_rng(0)
    hyps = np.array([[model.sos, 2, 3, 4, 5, 6], [model.sos, 7, 7, model.sos, model.sos, model.sos]])
    lens = np.array([6, 3])
    lo, hi = -math.log(vocab) - 2 * T.DEC_BOUND, -math.log(vocab) + 2 * T.DEC_BOUND
    spread = 0.0
    for scale in (1.0, 1e3):
        enc = (scale * rng.normal(size=(1, 40, 32))).astype(np.float32)
        with torch.no_grad():
            outs = [o.numpy() for o in model.decoder(torch.from_numpy(hyps), torch.from_numpy(lens),
                                                     torch.from_numpy(enc), torch.tensor(0.3))]
        for int8 in (False, True):
            sess = _onnx_models(tiny_exports, int8).sessions["decoder"]
            outs += sess.run(None, {"hyps": hyps, "hyps_lens": lens, "encoder_out": enc,
                                    "reverse_weight": np.array(0.3, np.float32)})
        for o in outs:
            assert lo - 1e-3 <= o.min() and o.max() <= hi + 1e-3, (o.min(), o.max())
            spread = max(spread, float(o.max() - o.min()))
    assert spread > 0.05                                       # not a constant decoder
