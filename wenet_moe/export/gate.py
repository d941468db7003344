"""The int8 accuracy gate: int8 graphs against their fp32 originals on the same inputs.

int8 output is not equal to fp32, so closeness is the wrong test; what matters is
whether the int8 model makes the same decisions. The gate's measure is the
**greedy CTC disagreement on decided frames**: over every output frame where the
fp32 model's best token leads its runner-up by at least `DECIDED_MARGIN` (1 nat,
a 2.7x probability ratio), the fraction where the int8 model's best token
differs. Frames fp32 itself barely decides (ties between two tokens, or every
frame of an untrained model) are reported but not counted: flipping a tie is not
an int8 defect. The export fails when the rate exceeds `--int8_max_disagreement`
(default 0.02).

Also reported per graph: the share of decided frames, the greedy token
disagreement (edit distance between the int8 and fp32 greedy CTC token
sequences over the fp32 token count) and the largest log-prob difference.

Inputs: the audio of `--int8_verify_data` (a data.list, wav.scp or one audio
file; its first `VERIFY_UTTS` utterances) as the model's own fbank; without it,
random features centred on the model's CMVN statistics (mean + N(0, 1) / istd),
on which a trained model decides most frames as blank: a damaged int8 model
still shows, but only real audio measures token decisions.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wenet_moe.export.verify import ParityError, feature_dim

DECIDED_MARGIN = 1.0
DEFAULT_MAX_DISAGREEMENT = 0.02
VERIFY_UTTS = 20
SYNTHETIC_LENGTHS = (50, 120, 300, 700)
# below this share of decided frames the gate is logged as weak (untrained model?)
WEAK_DECIDED_SHARE = 0.2


class Int8GateError(ParityError):
    """An int8 graph disagrees with fp32 beyond --int8_max_disagreement."""


@dataclass
class GateInputs:
    """Feature matrices (T, F) float32 the gate runs on, and how to name them."""
    feats: List[np.ndarray]
    description: str


@dataclass
class Agreement:
    """Running tally of int8 vs fp32 decisions of one graph (or pipeline).

    `ctc` rows are CTC log-posteriors (greedy token sequences are compared too);
    otherwise rows are decoder positions (only per-row decisions are compared).
    """
    name: str
    ctc: bool = True
    blank_id: int = 0
    frames: int = 0
    decided: int = 0
    flipped: int = 0
    edits: int = 0
    tokens: int = 0
    max_diff: float = 0.0

    def add(self, want: np.ndarray, got: np.ndarray) -> None:
        """Count one utterance: want/got (T, V) log-probs of fp32 and int8."""
        want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
        if want.shape != got.shape:
            raise ParityError(f"{self.name}: int8 output shape {got.shape}, fp32 {want.shape}")
        if not np.all(np.isfinite(got)):
            raise ParityError(f"{self.name}: int8 output is not finite")
        if want.shape[0] == 0:
            return
        if want.shape[-1] > 1:
            top2 = np.partition(want, -2, axis=-1)[:, -2:]
            decided = (top2[:, 1] - top2[:, 0]) >= DECIDED_MARGIN
        else:
            decided = np.ones(want.shape[0], dtype=bool)
        best_w, best_g = want.argmax(-1), got.argmax(-1)
        self.frames += int(want.shape[0])
        self.decided += int(decided.sum())
        self.flipped += int((decided & (best_w != best_g)).sum())
        self.max_diff = max(self.max_diff, float(np.abs(got - want).max()))
        if self.ctc:
            from wenet_moe.train.diagnostics import edit_distance, greedy_collapse
            hyp_w = greedy_collapse(best_w.tolist(), self.blank_id)
            hyp_g = greedy_collapse(best_g.tolist(), self.blank_id)
            self.edits += edit_distance(hyp_w, hyp_g)
            self.tokens += len(hyp_w)

    @property
    def rate(self) -> float:
        """Disagreement on decided frames (0 when fp32 decided none)."""
        return self.flipped / self.decided if self.decided else 0.0

    def report(self) -> Dict[str, float]:
        unit = "frames" if self.ctc else "positions"
        out = {f"{self.name} disagreement (decided {unit})": self.rate,
               f"{self.name} decided {unit} share": self.decided / max(self.frames, 1)}
        if self.ctc:
            out[f"{self.name} greedy token disagreement"] = self.edits / max(self.tokens, 1)
        out[f"{self.name} max |diff| log-prob"] = self.max_diff
        return out

    def check(self, limit: float, inputs: GateInputs) -> Dict[str, float]:
        """Raise Int8GateError (one line) when the rate exceeds `limit`; else report."""
        unit = "frames" if self.ctc else "positions"
        if self.rate > limit:
            raise Int8GateError(
                f"int8 accuracy gate: {self.name}: best token differs from fp32 on "
                f"{self.flipped} of {self.decided} decided {unit} ({self.rate:.1%} > "
                f"--int8_max_disagreement {limit:g}; max |diff| {self.max_diff:.3g}; "
                f"inputs: {inputs.description})")
        if self.frames and self.decided < WEAK_DECIDED_SHARE * self.frames:
            logging.warning("int8 gate on %s: fp32 decides only %d of %d %s by >= %g nats "
                            "(untrained model or unlike inputs): pass --int8_verify_data "
                            "with real audio for a meaningful gate", self.name, self.decided,
                            self.frames, unit, DECIDED_MARGIN)
        return self.report()


def check_limit(limit: float) -> float:
    limit = float(limit)
    if not 0.0 <= limit <= 1.0:
        raise ValueError(f"--int8_max_disagreement must be in [0, 1], got {limit:g}")
    return limit


# ------------------------------------------------------------------ inputs
def _read_entries(path: str) -> List[Tuple[str, str, Optional[float], Optional[float]]]:
    """(where, wav, start, end) of the first VERIFY_UTTS entries of a data.list
    (JSON lines with "wav") or wav.scp (`key path`)."""
    from wenet_moe.data.dataset import read_list

    entries = []
    for lineno, text in read_list(path):
        where = f"{path}:{lineno}"
        text = text.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("wav"), str):
                raise ValueError(f"{where}: field 'wav' missing or not a string")
            try:
                start = float(obj["start"]) if obj.get("start") is not None else None
                end = float(obj["end"]) if obj.get("end") is not None else None
            except (TypeError, ValueError):
                raise ValueError(f"{where}: field 'start' or 'end' is not a number") from None
            entries.append((where, obj["wav"], start, end))
        else:
            parts = text.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{where}: expected 'key wav_path' (wav.scp) or a JSON "
                                 f"object (data.list)")
            if parts[1].endswith(".tar"):
                raise ValueError(f"{where}: shard lists are not read; give a data.list, "
                                 f"wav.scp or audio file")
            entries.append((where, parts[1].strip(), None, None))
        if len(entries) == VERIFY_UTTS:
            break
    if not entries:
        raise ValueError(f"{path}: no utterances to verify int8 on")
    return entries


def audio_features(path: str, configs: Dict[str, Any]) -> GateInputs:
    """fbank (the model's own options, dither 0) of the audio named by `path`."""
    from wenet_moe.data.audio import AudioError, load_audio, resample
    from wenet_moe.data.processors import AUDIO_SUFFIXES
    from wenet_moe.model.loading import eval_fbank_options
    from wenet_moe_runtime.features import compute_fbank

    if not os.path.isfile(path):
        raise ValueError(f"{path}: --int8_verify_data not found")
    opts = eval_fbank_options(configs)
    if path.rsplit(".", 1)[-1].lower() in AUDIO_SUFFIXES:
        entries = [(path, path, None, None)]
    else:
        entries = _read_entries(path)
    feats = []
    for where, wav, start, end in entries:
        try:
            samples, rate = load_audio(wav, start, end, name=wav)
        except AudioError as e:
            raise ValueError(f"{where}: {e}" if where != path else str(e)) from None
        if rate != opts.sample_rate:
            samples = resample(samples, rate, opts.sample_rate)
        feats.append(compute_fbank(samples, opts.sample_rate, opts))
    seconds = sum(f.shape[0] for f in feats) * opts.frame_shift_ms / 1000.0
    return GateInputs(feats, f"{len(feats)} utterance(s), {seconds:.1f} s, of {path}")


def synthetic_features(model: torch.nn.Module, seed: int = 0,
                       lengths: Sequence[int] = SYNTHETIC_LENGTHS) -> GateInputs:
    """Random features in the model's input range: mean + N(0, 1) / istd of its
    global CMVN (N(0, 1) without one)."""
    gen = torch.Generator().manual_seed(seed)
    cmvn = getattr(model.encoder, "global_cmvn", None)
    feats = []
    for t in lengths:
        z = torch.randn(t, feature_dim(model), generator=gen)
        if cmvn is not None:
            scale = 1.0 / cmvn.istd if getattr(cmvn, "norm_var", True) else 1.0
            z = cmvn.mean + z * scale
        feats.append(z.numpy().astype(np.float32))
    where = "CMVN-centred" if cmvn is not None else "N(0, 1)"
    return GateInputs(feats, f"{len(feats)} random {where} inputs (no --int8_verify_data)")


def gate_inputs(model: torch.nn.Module, configs: Dict[str, Any],
                verify_data: Optional[str]) -> GateInputs:
    return audio_features(verify_data, configs) if verify_data else synthetic_features(model)


# ------------------------------------------------------------------ running
def stream_onnx(sess, names: Sequence[str], feats: np.ndarray, chunk: int, required: int,
                model: torch.nn.Module, scalar_offsets: bool = True) -> np.ndarray:
    """Run a streaming graph (encoder.onnx or model_streaming.onnx and their int8
    copies) over feats (T, F) as the runtimes do: chunk windows of
    (chunk-1)*subsampling + right_context + 1 frames; with required > 0 a zero
    cache of `required` frames hidden by att_mask and positions from `required`,
    else a growing cache. Returns the concatenated first output (T', D or V)."""
    from wenet_moe.export.onnx_export import cache_shapes
    from wenet_moe.export.verify import chunk_windows

    att_shape, cnn_shape = cache_shapes(model)
    sub, rc = model.subsampling_rate(), model.right_context()
    cache_t = max(required, 0)
    att = np.zeros((att_shape[0], att_shape[1], cache_t, att_shape[3]), np.float32)
    cnn = np.zeros(cnn_shape, np.float32)
    shape = () if scalar_offsets else (1,)
    offset, valid, outs = cache_t, 0, []
    for start, end in chunk_windows(feats.shape[0], chunk, sub, rc):
        t_out = (end - start - rc - 1) // sub + 1
        mask = np.ones((1, 1, att.shape[2] + t_out), dtype=bool)
        if cache_t > 0:
            mask[:, :, : max(cache_t - valid, 0)] = False
        out, att, cnn = sess.run(None, dict(zip(names, [
            np.ascontiguousarray(feats[None, start:end], dtype=np.float32),
            np.full(shape, offset, np.int64), np.full(shape, required, np.int64),
            att, cnn, mask])))
        outs.append(out[0])
        offset += out.shape[1]
        valid += out.shape[1]
    if not outs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outs, axis=0)


def decoder_feeds(model: torch.nn.Module, hyp: Sequence[int], encoder_out: np.ndarray,
                  reverse_weight: float) -> Dict[str, np.ndarray]:
    """decoder.onnx inputs scoring one hypothesis: <sos> + hyp, length len + 1."""
    hyps = np.array([[model.sos_symbol()] + [int(t) for t in hyp]], dtype=np.int64)
    return {"hyps": hyps, "hyps_lens": np.array([hyps.shape[1]], dtype=np.int64),
            "encoder_out": np.ascontiguousarray(encoder_out[None], dtype=np.float32),
            "reverse_weight": np.array(reverse_weight, dtype=np.float32)}


def decoder_tree_feeds(model: torch.nn.Module, hyp: Sequence[int], encoder_out: np.ndarray
                       ) -> Dict[str, np.ndarray]:
    """decoder_tree.onnx inputs scoring one hypothesis: its prefix tree (a chain of
    len + 1 nodes, whose rows are decoder.onnx's rows) and its reversal's."""
    from wenet_moe_runtime.prefix_tree import decoder_tree_feeds

    feeds, _, _ = decoder_tree_feeds([list(hyp)], [0], model.sos_symbol(), model.eos_symbol(),
                                     encoder_out[None])
    return feeds
