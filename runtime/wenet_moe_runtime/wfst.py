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

Hotwords: `WfstDecoder.for_context(ContextGraph)` returns a decoder over TLG o B,
B the biasing acceptor of `bias_fst` (a trie over the graph's words with back-off
arcs that take an unfinished match's bonus back); scores then include the bonus of
completed phrases. Compositions are cached per distinct list on the base decoder.
"""
from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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
    # search beam of the lattice decoder behind the n-best: kaldi-decoder's
    # LatticeSimpleDecoder has no max_active, so at `beam` 15 its active set grows
    # ~10x the FasterDecoder's; it runs at min(beam, max(this, lattice_beam))
    lattice_search_beam: float = 10.0

    def __post_init__(self) -> None:
        if (self.beam <= 0 or self.lattice_beam <= 0 or self.acoustic_scale <= 0
                or self.lattice_search_beam <= 0):
            raise WfstError("beam, lattice_beam, lattice_search_beam and acoustic_scale must be > 0")
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
        self.words_path = words_path
        self.base = self          # the unbiased decoder (self, or the one composed from)
        self.context = None       # the ContextGraph composed into self.graph, if any
        self.compose_seconds = 0.0
        self._biased: "OrderedDict[tuple, WfstDecoder]" = OrderedDict()
        self._spellings: Optional[Dict[Tuple[int, ...], int]] = None
        self._longest_spelling = 0

    # ------------------------------------------------------------- hotwords
    MAX_BIASED_GRAPHS = 8   # composed graphs cached per base decoder (distinct lists)

    def for_context(self, context) -> "WfstDecoder":
        """The decoder whose graph is TLG o B(context) (`bias_fst`); the base decoder
        for `context=None`. Composed graphs are cached per distinct phrase list and
        score (least recently used dropped beyond MAX_BIASED_GRAPHS).
        Raises WfstError when a phrase cannot be spelled by the graph's words."""
        base = self.base
        if context is None:
            return base
        if self.context is context:
            return self
        key = context.key()
        cached = base._biased.get(key)
        if cached is not None:
            base._biased.move_to_end(key)
            return cached
        t0 = time.perf_counter()
        bias = base.bias_fst(context)
        kf = self._kf
        graph = kf.StdVectorFst(kf.compose(base.graph, bias, match_side="right"))
        kf.arcsort(graph, sort_type="ilabel")
        dec = copy.copy(base)
        dec.graph, dec.context, dec._biased = graph, context, OrderedDict()
        dec.compose_seconds = time.perf_counter() - t0
        base._biased[key] = dec
        while len(base._biased) > self.MAX_BIASED_GRAPHS:
            base._biased.popitem(last=False)
        return dec

    def _word_spellings(self) -> Dict[Tuple[int, ...], int]:
        """Unit sequence -> word id, for the words of words.txt that
        `context.tokenize_phrase` spells (the spelling make_tlg gives them without
        a lexicon; for a character LM, every character is its own unit)."""
        if self._spellings is None:
            from .context import ContextError, tokenize_phrase
            spellings: Dict[Tuple[int, ...], int] = {}
            for wid in sorted(self.words):
                w = self.words[wid]
                if wid == 0 or w.startswith("#") or (w.startswith("<") and w.endswith(">")):
                    continue
                try:
                    ids = tuple(tokenize_phrase(self.symbols, w))
                except ContextError:
                    continue
                if ids:
                    spellings.setdefault(ids, wid)
            self._spellings = spellings
            self._longest_spelling = max((len(k) for k in spellings), default=0)
        return self._spellings

    def phrase_words(self, phrase: Sequence[int]) -> List[Tuple[int, int]]:
        """A phrase's units as words of the graph, greedy longest match:
        [(word id, number of units)]. Raises WfstError naming the phrase and the unit
        where no word of words.txt starts."""
        spellings = self._word_spellings()
        out, pos = [], 0
        while pos < len(phrase):
            for end in range(min(len(phrase), pos + self._longest_spelling), pos, -1):
                wid = spellings.get(tuple(phrase[pos:end]))
                if wid is not None:
                    out.append((wid, end - pos))
                    pos = end
                    break
            else:
                raise WfstError(
                    f"hotword '{self.symbols.detokenize(list(phrase))}': no word of "
                    f"{self.words_path} spells its units from "
                    f"'{self.symbols.detokenize(list(phrase[pos:]))}' on (the LM graph cannot output it)")
        return out

    def bias_fst(self, context):
        """The biasing acceptor B over word ids (tropical costs = -bonus).

        State 0 (start, final) loops on every word at cost 0. The phrases, as words
        (`phrase_words`), form a trie below it: each arc of a word of n units costs
        `-score * n`. A trie state s holding an unfinished match has an epsilon arc
        back to state 0 and a final weight, both `+partial(s)` (the bonus earned
        since the last completed phrase on its path): leaving the match, or ending
        in it, takes that bonus back. A completed phrase with no longer phrase below
        it returns to state 0 (the bonus stays). Composed with TLG, the search
        keeps, for each word sequence, its best path through B: CTC + LM score plus
        the bonus of the best set of non-overlapping phrase occurrences (equal to
        `ContextGraph.score_tokens` unless two phrases overlap); the held bonus of
        an unfinished match counts in the beam pruning (a partial result is the
        FasterDecoder's best path to a final state, so a phrase shows once complete)."""
        kf = self._kf
        fst = kf.StdVectorFst()
        root = fst.add_state()
        fst.start = root
        fst.set_final(root, 0.0)
        for wid in sorted(self.words):
            if wid != 0:
                fst.add_arc(root, kf.StdArc(wid, wid, 0.0, root))
        child: Dict[Tuple[int, int], int] = {}
        edges: List[Tuple[int, int, float, int]] = []   # (src, word, bonus, dst), parents first
        ends = set()
        for phrase in context.phrases:
            state = root
            for wid, n in self.phrase_words(phrase):
                nxt = child.get((state, wid))
                if nxt is None:
                    nxt = child[(state, wid)] = fst.add_state()
                    edges.append((state, wid, context.score * n, nxt))
                state = nxt
            ends.add(state)
        has_child = {src for src, _, _, _ in edges}
        partial = {root: 0.0}
        for src, wid, bonus, dst in edges:
            partial[dst] = (0.0 if src in ends else partial[src]) + bonus
            leaf_end = dst in ends and dst not in has_child
            fst.add_arc(src, kf.StdArc(wid, wid, -bonus, root if leaf_end else dst))
            if not leaf_end:
                held = 0.0 if dst in ends else partial[dst]
                fst.add_arc(dst, kf.StdArc(0, 0, held, root))
                fst.set_final(dst, held)
        kf.connect(fst)      # drops the unused states of leaf ends
        kf.arcsort(fst, sort_type="ilabel")
        return fst

    # ---------------------------------------------------------------- frames
    def _check(self, log_probs: np.ndarray) -> np.ndarray:
        lp = np.asarray(log_probs, dtype=np.float32)
        if lp.ndim != 2 or lp.shape[1] != len(self.symbols):
            raise WfstError(f"log_probs must be (T, {len(self.symbols)}), got {lp.shape}")
        return lp

    def scale(self, rows: np.ndarray) -> np.ndarray:
        """Decoder log-likelihoods: acoustic_scale * (log p + length_penalty on non-blanks)."""
        scaled = np.array(rows, dtype=np.float32, copy=True).reshape(-1, len(self.symbols))
        if self.opts.length_penalty:
            nonblank = np.ones(scaled.shape[1], bool)
            nonblank[self.blank_id] = False
            scaled[:, nonblank] += self.opts.length_penalty
        scaled *= self.opts.acoustic_scale
        return np.ascontiguousarray(scaled, dtype=np.float32)

    def frame_costs(self, log_probs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(kept frame indices, (T', V) scaled log-likelihoods for the decoder)."""
        lp = self._check(log_probs)
        keep = FrameSelector(self.blank_id, self.opts.blank_skip_thresh).push(lp)
        return np.asarray(keep, dtype=np.int64), self.scale(lp[keep])

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
        """1-best of a whole utterance (empty list when the decoder found no path);
        the same computation as a `WfstStream` fed in chunks."""
        stream = WfstStream(self)
        stream.accept(log_probs)
        best = stream.best(final=True)
        return [best] if best is not None else []

    def decode_nbest(self, log_probs: np.ndarray, n: int = 0) -> List[WfstHypothesis]:
        """Up to n (default opts.nbest) distinct word sequences, best first, from the
        lattice of the LatticeSimpleDecoder (search beam `nbest_search_beam`, lattice
        beam `lattice_beam`): the distinct ones among its 10n best paths (only
        those are converted to hypotheses)."""
        n = n or self.opts.nbest
        keep, scaled = self.frame_costs(log_probs)
        if scaled.shape[0] == 0:
            return [WfstHypothesis([], 0.0, [], [])]
        dec = self._kd.LatticeSimpleDecoder(self.graph, self._kd.LatticeSimpleDecoderConfig(
            beam=self.nbest_search_beam, lattice_beam=self.opts.lattice_beam))
        dec.decode(self._kd.DecodableCtc(scaled))
        ok, lattice = dec.get_raw_lattice()
        if not ok:
            return []
        out, seen = [], set()
        for path in self._kf.lattice_to_nbest(lattice, n=10 * n):
            ilabels, olabels, cost = self._linear(path)
            key = tuple(olabels)
            if key in seen:
                continue
            seen.add(key)
            out.append(self._hypothesis(ilabels, olabels, cost, keep, scaled))
            if len(out) == n:
                break
        out.sort(key=lambda h: -h.score)
        return out

    @property
    def nbest_search_beam(self) -> float:
        """The lattice decoder's search beam: min(beam, max(lattice_search_beam,
        lattice_beam))."""
        o = self.opts
        return min(o.beam, max(o.lattice_search_beam, o.lattice_beam))


class FrameSelector:
    """Blank frame skipping, chunk by chunk: frames whose blank posterior exceeds
    `thresh` are dropped; where dropped blanks separate two kept frames with the same
    best unit, the last dropped blank is kept, so that a repeated unit (世 _ 世) does
    not merge into one (as WeNet's runtime does). `thresh > 1` keeps every frame."""

    def __init__(self, blank_id: int, thresh: float) -> None:
        self.blank_id, self.thresh = blank_id, thresh
        self.t = 0                  # frames seen
        self.last_skipped = -1      # index of the last dropped frame
        self.prev_t, self.prev_best = -1, -1   # last kept non-inserted frame

    def push(self, lp: np.ndarray) -> List[int]:
        """Indices, relative to this chunk's first frame, of the frames to decode
        (-1: the previous chunk's last frame, kept as the blank between repeats)."""
        if self.thresh > 1.0:
            self.t += lp.shape[0]
            return list(range(lp.shape[0]))
        keep: List[int] = []
        start = self.t
        skip = np.exp(lp[:, self.blank_id]) > self.thresh
        best = lp.argmax(axis=1)
        for i in range(lp.shape[0]):
            t = start + i
            if skip[i]:
                self.last_skipped = t
                continue
            b = int(best[i])
            if (self.last_skipped > self.prev_t >= 0 and b == self.prev_best
                    and b != self.blank_id):
                keep.append(self.last_skipped)
            keep.append(t)
            self.prev_t, self.prev_best = t, b
        self.t = start + lp.shape[0]
        return [k - start for k in keep]


class WfstStream:
    """Incremental graph search of one stream (FasterDecoder): `accept(chunk)` as CTC
    log-posteriors arrive, `best(final)` for partial (best active path) or final
    (best path to a final state, if any) results. Frame times are counted from the
    first accepted frame."""

    def __init__(self, wfst: WfstDecoder) -> None:
        self.wfst = wfst
        o = wfst.opts
        self.decoder = wfst._kd.FasterDecoder(wfst.graph, wfst._kd.FasterDecoderOptions(
            beam=o.beam, max_active=o.max_active, min_active=o.min_active))
        self.decoder.init_decoding()
        self.selector = FrameSelector(wfst.blank_id, o.blank_skip_thresh)
        self.keep: List[int] = []          # original index of every decoded frame
        self.rows: List[np.ndarray] = []   # their scaled log-likelihoods
        self.frames = 0                    # frames accepted
        self.prev_row: Optional[np.ndarray] = None

    def accept(self, log_probs: np.ndarray) -> None:
        lp = self.wfst._check(log_probs)
        kept = self.selector.push(lp)
        # an inserted blank is the frame just before a kept one: for the first frame
        # of a chunk, the previous chunk's last frame (index -1)
        rows = [lp[k] if k >= 0 else self.prev_row for k in kept]
        if lp.shape[0]:
            self.prev_row = lp[-1]
        if rows:
            scaled = self.wfst.scale(np.stack(rows))
            self.decoder.advance_decoding(self.wfst._kd.DecodableCtc(scaled, offset=len(self.keep)))
            self.keep.extend(self.frames + k for k in kept)
            self.rows.append(scaled)
        self.frames += lp.shape[0]

    def best(self, final: bool) -> Optional[WfstHypothesis]:
        if not self.keep:
            return WfstHypothesis([], 0.0, [], [])
        ok, path = self.decoder.get_best_path(use_final_probs=final)
        if not ok:
            return None
        return self.wfst._hypothesis(*self.wfst._linear(path), np.asarray(self.keep),
                                     np.concatenate(self.rows, axis=0))


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
    parser.add_argument("--lattice_search_beam", type=float, default=d.lattice_search_beam,
                        help="search beam of the lattice decoder behind the n-best "
                             "(runs at min(beam, max(this, lattice_beam)))")


def wfst_from_args(args, graph_dir: str, symbols: SymbolTable) -> WfstDecoder:
    opts = WfstOptions(args.beam, args.lattice_beam, args.max_active, args.min_active,
                       args.acoustic_scale, args.blank_skip_thresh, args.length_penalty,
                       args.wfst_nbest, args.lattice_search_beam)
    return WfstDecoder(graph_dir, symbols, opts)
