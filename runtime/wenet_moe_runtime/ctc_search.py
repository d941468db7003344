"""CTC search in numpy (torch-free): greedy and prefix beam search with token times.

Shared by the toolkit's `decode` and the streaming server, so training-side decoding
and serving run the same code. Inputs are CTC log-posteriors `(T, V)` (natural log,
one row per encoder frame). Token times are encoder-frame indices of each emitted
token's peak: the frame, within the run of frames the best alignment assigns to the
token, where the token's posterior is highest.

Contextual biasing: given a `ContextGraph` (`context.py`), each prefix carries its
trie state and bonus; the beam is ranked by CTC log probability + bonus, and the
n-best scores include the bonus (an unfinished phrase's partial bonus removed).
"""
from __future__ import annotations

import heapq
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .context import ContextGraph

NEG_INF = float("-inf")

Hypothesis = Tuple[List[int], float, List[int]]  # (tokens, log score, token times)


def _logadd(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) for Python floats (faster than numpy on scalars)."""
    if a < b:
        a, b = b, a
    if b == NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


def _check_log_probs(log_probs: np.ndarray) -> np.ndarray:
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must be 2-D (T, V), got shape {log_probs.shape}")
    return log_probs


def ctc_greedy_search(log_probs: np.ndarray, blank_id: int = 0) -> Tuple[List[int], List[int]]:
    """Best-path decoding: argmax per frame, merge repeats, drop blanks.

    Args:
        log_probs: (T, V) CTC log-posteriors of one utterance.
        blank_id: index of the blank symbol.
    Returns:
        (tokens, times): token ids and, per token, the frame of its peak posterior
        within its run of consecutive frames.
    """
    log_probs = _check_log_probs(log_probs)
    if log_probs.shape[0] == 0:
        return [], []
    best = log_probs.argmax(axis=1)
    best_lp = log_probs[np.arange(best.shape[0]), best]
    # Run boundaries: a new run starts where the argmax changes.
    starts = np.flatnonzero(np.concatenate(([True], best[1:] != best[:-1])))
    ends = np.concatenate((starts[1:], [best.shape[0]]))
    tokens: List[int] = []
    times: List[int] = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        tok = int(best[s])
        if tok == blank_id:
            continue
        tokens.append(tok)
        times.append(s + int(np.argmax(best_lp[s:e])))
    return tokens, times


class _Prefix:
    """Scores of one prefix: total log probs ending in blank / non-blank, plus the
    Viterbi (best single alignment) scores and token times used for timestamps."""

    __slots__ = ("pb", "pnb", "vb", "vnb", "times_b", "times_nb", "peak_nb", "ctx_state",
                 "ctx_score")

    def __init__(self, ctx_state=None, ctx_score: float = 0.0) -> None:
        self.pb = NEG_INF
        self.pnb = NEG_INF
        self.vb = NEG_INF
        self.vnb = NEG_INF
        self.times_b: Tuple[int, ...] = ()
        self.times_nb: Tuple[int, ...] = ()
        self.peak_nb = NEG_INF  # posterior of the last token at its recorded time
        self.ctx_state = ctx_state  # context trie state (None without biasing)
        self.ctx_score = ctx_score  # context bonus accumulated so far

    def total(self) -> float:
        return _logadd(self.pb, self.pnb)

    def ranking(self) -> float:
        return _logadd(self.pb, self.pnb) + self.ctx_score

    def best_times(self) -> Tuple[int, ...]:
        return self.times_nb if self.vnb > self.vb else self.times_b

    def offer_nb(self, viterbi: float, times: Tuple[int, ...], peak: float) -> None:
        if viterbi > self.vnb:
            self.vnb, self.times_nb, self.peak_nb = viterbi, times, peak


class CtcPrefixBeamSearch:
    """Incremental CTC prefix beam search (for streaming and whole utterances).

    Args:
        beam_size: number of prefixes kept after each frame.
        blank_id: index of the blank symbol.
        top_k: tokens considered per frame (the k most probable); defaults to
            `beam_size`. Use the vocabulary size for an exact (unpruned) search.
        context: optional hotword graph; prefixes are ranked with its bonus.

    `advance(chunk)` consumes (T, V) log-posteriors; `nbest()` returns the current
    hypotheses best first; `reset()` starts a new utterance. Frame indices in the
    times keep counting across chunks.
    """

    def __init__(self, beam_size: int, blank_id: int = 0, top_k: int = 0,
                 context: Optional[ContextGraph] = None) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.beam_size = int(beam_size)
        self.blank_id = int(blank_id)
        self.top_k = int(top_k) if top_k > 0 else self.beam_size
        self.context = context
        self.reset()

    def reset(self) -> None:
        """Forget all frames (start of a new utterance)."""
        root = _Prefix(self.context.root if self.context is not None else None)
        root.pb = 0.0
        root.vb = 0.0
        self._beam: Dict[Tuple[int, ...], _Prefix] = {(): root}
        self.num_frames = 0

    def advance(self, log_probs: np.ndarray) -> None:
        """Consume a chunk of frames.

        Args:
            log_probs: (T, V) log-posteriors of the next T encoder frames.
        """
        log_probs = _check_log_probs(log_probs)
        vocab = log_probs.shape[1]
        if vocab and not 0 <= self.blank_id < vocab:
            raise ValueError(f"blank_id {self.blank_id} outside vocabulary of size {vocab}")
        k = min(self.top_k, vocab)
        if k < vocab:
            top_all = np.argpartition(-log_probs, k - 1, axis=1)[:, :k]
        else:
            top_all = np.broadcast_to(np.arange(vocab), log_probs.shape)
        for row, top in zip(log_probs, top_all):
            self._step(row, top)
            self.num_frames += 1

    def _step(self, row: np.ndarray, top: np.ndarray) -> None:
        t = self.num_frames
        blank = self.blank_id
        tokens = top.tolist()
        tok_lps = row[top].tolist()  # log-posteriors of the pruned tokens
        context = self.context
        new: Dict[Tuple[int, ...], _Prefix] = {}
        for prefix, old in self._beam.items():
            last = prefix[-1] if prefix else -1
            p_any = _logadd(old.pb, old.pnb)
            v_any = old.vb if old.vb > old.vnb else old.vnb
            times_any = old.times_b if old.vb >= old.vnb else old.times_nb
            for tok, lp in zip(tokens, tok_lps):
                if tok == blank:
                    p = new.get(prefix)
                    if p is None:
                        p = new[prefix] = _Prefix(old.ctx_state, old.ctx_score)
                    p.pb = _logadd(p.pb, p_any + lp)
                    if v_any + lp > p.vb:
                        p.vb, p.times_b = v_any + lp, times_any
                    continue
                key = prefix + (tok,)
                q = new.get(key)
                if q is None:
                    if context is None:
                        q = new[key] = _Prefix()
                    else:
                        delta, state = context.step(old.ctx_state, tok)
                        q = new[key] = _Prefix(state, old.ctx_score + delta)
                if tok == last:
                    # Same token without a blank in between: collapses into prefix.
                    p = new.get(prefix)
                    if p is None:
                        p = new[prefix] = _Prefix(old.ctx_state, old.ctx_score)
                    p.pnb = _logadd(p.pnb, old.pnb + lp)
                    if old.vnb > NEG_INF:
                        times, peak = old.times_nb, old.peak_nb
                        if lp > peak:
                            times, peak = times[:-1] + (t,), lp
                        p.offer_nb(old.vnb + lp, times, peak)
                    # Same token after a blank: a new token.
                    q.pnb = _logadd(q.pnb, old.pb + lp)
                    if old.vb > NEG_INF:
                        q.offer_nb(old.vb + lp, old.times_b + (t,), lp)
                else:
                    q.pnb = _logadd(q.pnb, p_any + lp)
                    q.offer_nb(v_any + lp, times_any + (t,), lp)
        if len(new) > self.beam_size:
            ranked = heapq.nlargest(self.beam_size, new.items(), key=lambda kv: kv[1].ranking())
        else:
            ranked = sorted(new.items(), key=lambda kv: kv[1].ranking(), reverse=True)
        self._beam = dict(ranked)

    def _final_score(self, p: _Prefix) -> float:
        if self.context is None:
            return p.total()
        return p.total() + p.ctx_score + self.context.finalize(p.ctx_state)

    def nbest(self, n: int = 0) -> List[Hypothesis]:
        """Current hypotheses, best first: (tokens, log score, token times); with a
        context graph the score includes the bonus of completed phrases.

        Args:
            n: how many to return (0: the whole beam).
        """
        scored = [(self._final_score(p), i, k, p) for i, (k, p) in enumerate(self._beam.items())]
        scored.sort(key=lambda x: (-x[0], x[1]))
        if n > 0:
            scored = scored[:n]
        return [(list(k), score, list(p.best_times())) for score, _, k, p in scored]

    def scores(self) -> Dict[Tuple[int, ...], float]:
        """Total log probability of every prefix in the beam."""
        return {k: p.total() for k, p in self._beam.items()}


def ctc_prefix_beam_search(log_probs: np.ndarray, beam_size: int, blank_id: int = 0,
                           top_k: int = 0, context: Optional[ContextGraph] = None
                           ) -> List[Hypothesis]:
    """Prefix beam search over a whole utterance.

    Args:
        log_probs: (T, V) CTC log-posteriors.
        beam_size: prefixes kept per frame (and returned).
        blank_id: index of the blank symbol.
        top_k: tokens considered per frame (default: beam_size).
        context: optional hotword graph (scores then include its bonus).
    Returns:
        up to beam_size (tokens, log score, token times), best first.
    """
    search = CtcPrefixBeamSearch(beam_size, blank_id, top_k, context)
    search.advance(log_probs)
    return search.nbest()


def batch_ctc_greedy_search(log_probs: np.ndarray, lengths: Sequence[int],
                            blank_id: int = 0) -> List[Tuple[List[int], List[int]]]:
    """Greedy search for a padded batch (B, T, V) with valid lengths (B,)."""
    return [ctc_greedy_search(log_probs[b, : int(n)], blank_id) for b, n in enumerate(lengths)]


class CtcGreedySearch:
    """Incremental best-path search, chunk by chunk; after any split of the frames
    into chunks its result equals `ctc_greedy_search` of all frames (a run of one
    token that spans chunks stays one token, its time the first peak of the run).

    Same interface as `CtcPrefixBeamSearch`: `advance(chunk)`, `nbest()`, `reset()`.
    The score of the single hypothesis is the sum of the per-frame best
    log-posteriors (the best path's log probability).
    """

    def __init__(self, blank_id: int = 0) -> None:
        self.blank_id = int(blank_id)
        self.reset()

    def reset(self) -> None:
        """Forget all frames (start of a new utterance)."""
        self.tokens: List[int] = []
        self.times: List[int] = []
        self.score = 0.0
        self.num_frames = 0
        self._last = -1                # argmax of the previous frame (-1: none yet)
        self._peak = NEG_INF           # best log-posterior of the current non-blank run

    def advance(self, log_probs: np.ndarray) -> None:
        """Consume (T, V) log-posteriors of the next T encoder frames."""
        log_probs = _check_log_probs(log_probs)
        if log_probs.shape[0] == 0:
            return
        best = log_probs.argmax(axis=1)
        best_lp = log_probs[np.arange(best.shape[0]), best]
        self.score += float(best_lp.sum())
        for t, (tok, lp) in enumerate(zip(best.tolist(), best_lp.tolist())):
            if tok != self._last:
                if tok != self.blank_id:
                    self.tokens.append(tok)
                    self.times.append(self.num_frames + t)
                    self._peak = lp
            elif tok != self.blank_id and lp > self._peak:
                self.times[-1] = self.num_frames + t
                self._peak = lp
            self._last = tok
        self.num_frames += best.shape[0]

    def nbest(self, n: int = 0) -> List[Hypothesis]:
        """The one best path as `[(tokens, log score, token times)]`."""
        return [(list(self.tokens), self.score, list(self.times))]
