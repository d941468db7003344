"""WFST decoding of CTC log-posteriors with a TLG graph (torch-free; needs the
optional `kaldifst` + `kaldi-decoder` packages: `pip install 'wenet-moe[lm]'`).

A graph directory holds `TLG.fst` and `words.txt` (`tools/make_tlg.py`). Per frame,
the decoder reads costs `-acoustic_scale * (log p + length_penalty on non-blanks)`;
frames whose blank posterior exceeds `blank_skip_thresh` are skipped (WeNet's blank
frame skipping). The 1-best comes from Kaldi's FasterDecoder (beam, max/min active),
the n-best for attention rescoring from the LatticeSimpleDecoder (beam, lattice beam):
the distinct word sequences among its lattice's best paths. A hypothesis carries its
units (collapsed from the frame alignment: the graph's input labels are unit id + 1),
their peak frames, its words, and its score = -(graph cost + acoustic cost), i.e.
acoustic_scale * CTC log-probability of the best alignment + LM log-probability.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .symbols import SymbolTable, normalize_spaces


class WfstError(ValueError):
    """A graph directory that cannot be used (the message names the file)."""


@dataclass
class WfstOptions:
    """Search options (WeNet runtime names and defaults)."""
    beam: float = 15.0
    lattice_beam: float = 7.5
    max_active: int = 7000
    min_active: int = 200
    acoustic_scale: float = 1.0
    blank_skip_thresh: float = 0.98   # > 1: never skip
    length_penalty: float = 0.0       # added to non-blank log-probabilities
    nbest: int = 10                   # word sequences for attention rescoring

    def __post_init__(self) -> None:
        if self.beam <= 0 or self.lattice_beam <= 0 or self.acoustic_scale <= 0:
            raise WfstError("beam, lattice_beam and acoustic_scale must be > 0")
        if self.max_active < 1 or self.min_active < 0 or self.nbest < 1:
            raise WfstError("max_active and nbest must be >= 1, min_active >= 0")


@dataclass
class WfstHypothesis:
    tokens: List[int]
    score: float
    times: List[int]
    words: List[str]


def has_graph(graph_dir: Optional[str]) -> bool:
    return bool(graph_dir) and os.path.isfile(os.path.join(graph_dir, "TLG.fst")) and \
        os.path.isfile(os.path.join(graph_dir, "words.txt"))


class WfstDecoder:
    """TLG.fst + words.txt of a graph directory, shared read-only by many decodes."""

    def __init__(self, graph_dir: str, symbols: SymbolTable, opts: Optional[WfstOptions] = None):
        try:
            import kaldi_decoder
            import kaldifst
        except ImportError as exc:
            raise WfstError("WFST decoding needs kaldifst and kaldi-decoder: "
                            "pip install 'wenet-moe[lm]'") from exc
        self._kd, self._kf = kaldi_decoder, kaldifst
        self.opts = opts or WfstOptions()
        self.symbols = symbols
        fst_path = os.path.join(graph_dir, "TLG.fst")
        words_path = os.path.join(graph_dir, "words.txt")
        for path in (fst_path, words_path):
            if not os.path.isfile(path):
                raise WfstError(f"{path}: no such file")
        try:
            self.graph = kaldifst.StdVectorFst.read(fst_path)
        except Exception as exc:  # the binding raises RuntimeError on a bad file
            raise WfstError(f"{fst_path}: cannot read ({exc})") from None
        self.words = {}
        with open(words_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[1].isdigit():
                    raise WfstError(f"{words_path}:{lineno}: expected 'word id', got {line.strip()!r}")
                self.words[int(parts[1])] = parts[0]
        self.blank_id = symbols.blank_id

    # ---------------------------------------------------------------- frames
    def frame_costs(self, log_probs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(kept frame indices, (T', V) scaled log-likelihoods for the decoder)."""
        lp = np.asarray(log_probs, dtype=np.float32)
        if lp.ndim != 2 or lp.shape[1] != len(self.symbols):
            raise WfstError(f"log_probs must be (T, {len(self.symbols)}), got {lp.shape}")
        o = self.opts
        keep = self._kept_frames(lp) if o.blank_skip_thresh <= 1.0 else np.arange(lp.shape[0])
        scaled = lp[keep].copy()
        if o.length_penalty:
            nonblank = np.ones(scaled.shape[1], bool)
            nonblank[self.blank_id] = False
            scaled[:, nonblank] += o.length_penalty
        scaled *= o.acoustic_scale
        return keep, np.ascontiguousarray(scaled, dtype=np.float32)

    def _kept_frames(self, lp: np.ndarray) -> np.ndarray:
        """Frames left after blank skipping. Where skipped blanks separate two frames
        with the same best unit, the last skipped blank is kept, so that a repeated
        unit (世 _ 世) does not merge into one (as WeNet's runtime does)."""
        blank = self.blank_id
        skip = np.exp(lp[:, blank]) > self.opts.blank_skip_thresh
        best = lp.argmax(axis=1)
        keep: List[int] = []
        last_skipped = -1
        for t in range(lp.shape[0]):
            if skip[t]:
                last_skipped = t
                continue
            if (last_skipped >= 0 and keep and last_skipped > keep[-1]
                    and best[t] == best[keep[-1]] and best[t] != blank):
                keep.append(last_skipped)
            keep.append(t)
        return np.asarray(keep, dtype=np.int64)

    def _hypothesis(self, ilabels: Sequence[int], olabels: Sequence[int], cost: float,
                    keep: np.ndarray, scaled: np.ndarray) -> WfstHypothesis:
        """Units (collapsed alignment), their peak frames (original indices), words."""
        tokens, times = [], []
        prev = -1
        for j, lab in enumerate(ilabels):
            unit = lab - 1
            if unit != prev and unit != self.blank_id:
                tokens.append(unit)
                times.append(j)
            elif unit == prev and unit != self.blank_id and scaled[j, unit] > scaled[times[-1], unit]:
                times[-1] = j
            prev = unit
        words = [self.words.get(w, "<unk>") for w in olabels]
        return WfstHypothesis(tokens, -cost, [int(keep[t]) for t in times], words)

    def _linear(self, path) -> Tuple[List[int], List[int], float]:
        ok, ilabels, olabels, weight = self._kf.get_linear_symbol_sequence(path)
        if not ok:
            raise WfstError("decoder returned a non-linear best path")
        cost = weight.value1 + weight.value2 if hasattr(weight, "value1") else float(weight.value)
        return ilabels, olabels, cost

    # ---------------------------------------------------------------- search
    def decode(self, log_probs: np.ndarray) -> List[WfstHypothesis]:
        """1-best of a whole utterance (empty list when no path reached the end)."""
        keep, scaled = self.frame_costs(log_probs)
        if scaled.shape[0] == 0:
            return [WfstHypothesis([], 0.0, [], [])]
        o = self.opts
        dec = self._kd.FasterDecoder(self.graph, self._kd.FasterDecoderOptions(
            beam=o.beam, max_active=o.max_active, min_active=o.min_active))
        dec.decode(self._kd.DecodableCtc(scaled))
        ok, path = dec.get_best_path()
        if not ok:
            return []
        return [self._hypothesis(*self._linear(path), keep, scaled)]

    def decode_nbest(self, log_probs: np.ndarray, n: int = 0) -> List[WfstHypothesis]:
        """Up to n (default opts.nbest) distinct word sequences, best first, from the
        lattice of the LatticeSimpleDecoder: the distinct ones among its 10n best paths."""
        n = n or self.opts.nbest
        keep, scaled = self.frame_costs(log_probs)
        if scaled.shape[0] == 0:
            return [WfstHypothesis([], 0.0, [], [])]
        o = self.opts
        dec = self._kd.LatticeSimpleDecoder(self.graph, self._kd.LatticeSimpleDecoderConfig(
            beam=o.beam, lattice_beam=o.lattice_beam))
        dec.decode(self._kd.DecodableCtc(scaled))
        ok, lattice = dec.get_raw_lattice()
        if not ok:
            return []
        out, seen = [], set()
        for path in self._kf.lattice_to_nbest(lattice, n=10 * n):
            hyp = self._hypothesis(*self._linear(path), keep, scaled)
            key = tuple(hyp.words)
            if key in seen:
                continue
            seen.add(key)
            out.append(hyp)
            if len(out) == n:
                break
        out.sort(key=lambda h: -h.score)
        return out


def words_text(words: Sequence[str]) -> str:
    """Words joined by spaces, none next to a CJK character; `<...>` symbols dropped."""
    return normalize_spaces(" ".join(w for w in words if not (w.startswith("<") and w.endswith(">"))))


def add_wfst_arguments(parser) -> None:
    """WFST search options, shared by `wenet-moe recognize` and the runtime's CLIs."""
    d = WfstOptions()
    parser.add_argument("--beam", type=float, default=d.beam, help="WFST decoding beam")
    parser.add_argument("--lattice_beam", type=float, default=d.lattice_beam,
                        help="lattice beam (n-best for rescoring)")
    parser.add_argument("--max_active", type=int, default=d.max_active, help="most active states")
    parser.add_argument("--min_active", type=int, default=d.min_active, help="fewest active states")
    parser.add_argument("--acoustic_scale", type=float, default=d.acoustic_scale,
                        help="scale of CTC log-probabilities against the LM")
    parser.add_argument("--blank_skip_thresh", type=float, default=d.blank_skip_thresh,
                        help="skip frames whose blank posterior exceeds this (> 1: never)")
    parser.add_argument("--length_penalty", type=float, default=d.length_penalty,
                        help="added to every non-blank log-probability")
    parser.add_argument("--wfst_nbest", type=int, default=d.nbest,
                        help="word sequences passed to attention rescoring")


def wfst_from_args(args, graph_dir: str, symbols: SymbolTable) -> WfstDecoder:
    opts = WfstOptions(args.beam, args.lattice_beam, args.max_active, args.min_active,
                       args.acoustic_scale, args.blank_skip_thresh, args.length_penalty,
                       args.wfst_nbest)
    return WfstDecoder(graph_dir, symbols, opts)
