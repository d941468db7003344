"""Contextual biasing (hotwords) for CTC prefix beam search, as WeNet's context graph.

A list of phrases is tokenized into units of `units.txt` and compiled into a prefix
trie with Aho-Corasick failure links. Each prefix of the beam carries a trie state;
every unit that extends a match earns `score`, and when the match breaks the prefix
loses the bonus of the unfinished part and re-enters the longest phrase prefix that
is a suffix of what it has read (the failure link), earning that part anew.

Scores, for a state s (a trie node) with depth d(s) and e(s) the deepest node on the
path root..s that ends a phrase (the root when none): `node_score(s) = score * d(s)`,
`partial(s) = node_score(s) - node_score(e(s))` (the bonus not yet secured by a
completed phrase). `step(s, unit)`:
- `unit` extends the match (a child n of s): `+score`, state n;
- otherwise follow failure links to the deepest node n whose path is a suffix of
  path(s)+unit (the root when none): `node_score(n) - partial(s)`, state n;
- a state that completes a phrase and has no longer phrase below it goes back to the
  root (its bonus stays; nothing more can be lost).
`finalize(s) = -partial(s)` removes the bonus of an unfinished match at the end.
So a hypothesis that contains a phrase keeps `score * len(phrase)` per occurrence,
and one that only starts it keeps nothing. (A unit shared by two overlapping
completed phrases counts for both.)
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .symbols import BPE_SPACE, SymbolTable, is_cjk, is_word_char

DEFAULT_MAX_PHRASES = 1000
DEFAULT_MAX_LEN = 32


class ContextError(ValueError):
    """A phrase list that cannot be compiled (the message names the phrase)."""


@dataclass
class ContextLimits:
    """How a server compiles the `context` list of a start message."""
    score: float = 3.0                      # bonus per matched unit
    max_phrases: int = DEFAULT_MAX_PHRASES  # phrases per list
    max_len: int = DEFAULT_MAX_LEN          # units per phrase
    # with an LM graph, a per-connection list is composed with TLG (~50 us per graph
    # state on a loaded 2-core machine, blocking the server's event loop): bound it
    max_graph_states: int = 100000

    def __post_init__(self) -> None:
        if not self.score > 0.0 or self.max_phrases < 1 or self.max_len < 1:
            raise ContextError("context score, max phrases and max length must be positive, got "
                               f"{self.score}, {self.max_phrases}, {self.max_len}")
        if self.max_graph_states < 0:
            raise ContextError(f"max context graph states must be >= 0, got {self.max_graph_states}")


def tokenize_phrase(symbols: SymbolTable, phrase: str) -> List[int]:
    """Unit ids of a phrase: CJK characters one unit each; a Latin word as the
    whole (upper-cased) word when `units.txt` holds it, else as BPE pieces by
    greedy longest match (`▁` on the first piece), or, in a table without BPE
    pieces, letter by letter. Raises ContextError naming the
    unit that `units.txt` lacks."""
    ids: List[int] = []
    word = ""

    def flush_word() -> None:
        nonlocal word
        if not word:
            return
        w = word.upper()
        word = ""
        for cand in ((BPE_SPACE + w, w) if symbols.is_bpe else (w,)):
            if symbols.get(cand) is not None:
                ids.append(symbols.get(cand))
                return
        if not symbols.is_bpe:
            letters = [symbols.get(c) for c in w]
            if None in letters:
                raise ContextError(f"word '{w}' is not a unit of units.txt (nor are all its letters)")
            ids.extend(letters)
            return
        text, pos = BPE_SPACE + w, 0
        while pos < len(text):
            for end in range(len(text), pos, -1):
                i = symbols.get(text[pos:end])
                if i is not None:
                    ids.append(i)
                    pos = end
                    break
            else:
                raise ContextError(f"'{text[pos:]}' of word '{w}' has no unit in units.txt")

    for ch in phrase:
        if is_word_char(ch) and not is_cjk(ch):
            word += ch
            continue
        flush_word()
        if ch.isspace():
            continue
        i = symbols.get(ch)
        if i is None:
            raise ContextError(f"character '{ch}' is not a unit of units.txt")
        ids.append(i)
    flush_word()
    return ids


def read_context_file(path: str) -> List[Tuple[int, str]]:
    """(line number, phrase) of each non-blank line of a UTF-8 file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as exc:
        raise ContextError(f"{path}: not UTF-8 text ({exc})") from None


class _Node:
    __slots__ = ("children", "fail", "depth", "is_end", "node_score", "partial")

    def __init__(self, depth: int) -> None:
        self.children: Dict[int, _Node] = {}
        self.fail: Optional[_Node] = None
        self.depth = depth
        self.is_end = False
        self.node_score = 0.0
        self.partial = 0.0


class ContextGraph:
    """Aho-Corasick trie over unit ids with a per-unit bonus (see module doc).

    Args:
        phrases: unit id sequences (empty ones are ignored, duplicates merged).
        score: bonus per matched unit (log domain, > 0).
    """

    def __init__(self, phrases: Iterable[Sequence[int]], score: float) -> None:
        if not score > 0.0:
            raise ContextError(f"context score must be > 0, got {score}")
        self.score = float(score)
        self.root = _Node(0)
        self.num_phrases = 0
        self.phrases: List[Tuple[int, ...]] = []   # distinct phrases, first-seen order
        for ids in phrases:
            ids = list(ids)
            if not ids:
                continue
            node = self.root
            for tok in ids:
                nxt = node.children.get(tok)
                if nxt is None:
                    nxt = node.children[tok] = _Node(node.depth + 1)
                node = nxt
            if not node.is_end:
                self.num_phrases += 1
                self.phrases.append(tuple(ids))
            node.is_end = True
        self._link()

    def key(self) -> Tuple[float, Tuple[Tuple[int, ...], ...]]:
        """(score, sorted phrases): equal for lists that bias identically."""
        return self.score, tuple(sorted(self.phrases))

    def _link(self) -> None:
        """Breadth-first: scores, partial bonuses and failure links."""
        root = self.root
        root.fail = root
        queue: List[Tuple[_Node, float]] = [(root, 0.0)]  # (node, node_score of e(node))
        head = 0
        while head < len(queue):
            node, secured = queue[head]
            head += 1
            node.node_score = self.score * node.depth
            if node.is_end:
                secured = node.node_score
            node.partial = node.node_score - secured
            for tok, child in node.children.items():
                if node is root:
                    child.fail = root
                else:
                    f = node.fail
                    while f is not root and tok not in f.children:
                        f = f.fail
                    child.fail = f.children.get(tok, root)
                queue.append((child, secured))

    def step(self, state: _Node, token: int) -> Tuple[float, _Node]:
        """(bonus change, next state) after reading `token` in `state`."""
        nxt = state.children.get(token)
        if nxt is not None:
            delta = self.score
        else:
            f = state
            while f is not self.root and token not in f.children:
                f = f.fail
            nxt = f.children.get(token, self.root)
            delta = nxt.node_score - state.partial
        if nxt.is_end and not nxt.children:
            nxt = self.root
        return delta, nxt

    def finalize(self, state: _Node) -> float:
        """Bonus change at the end of a hypothesis: minus the unfinished part."""
        return -state.partial

    def score_tokens(self, tokens: Sequence[int]) -> float:
        """Total bonus of a complete token sequence (for tests and n-best rescoring)."""
        state, total = self.root, 0.0
        for tok in tokens:
            delta, state = self.step(state, tok)
            total += delta
        return total + self.finalize(state)


def build_context_graph(symbols: SymbolTable, phrases: Sequence[str], score: float,
                        max_phrases: int = DEFAULT_MAX_PHRASES, max_len: int = DEFAULT_MAX_LEN,
                        where: str = "context", labels: Optional[Sequence[str]] = None
                        ) -> ContextGraph:
    """Tokenize and compile phrases; errors name `where` and the phrase's position.

    Args:
        symbols: the model's unit table.
        phrases: text phrases (non-empty strings).
        score: bonus per matched unit.
        max_phrases / max_len: bounds on the count and on each phrase's units.
        where: prefix of error messages (a file path, or the server's field name).
        labels: how errors name each phrase (default `phrase N`, from 1).
    """
    if len(phrases) > max_phrases:
        raise ContextError(f"{where}: {len(phrases)} phrases, at most {max_phrases} allowed")
    seqs = []
    for n, phrase in enumerate(phrases):
        label = labels[n] if labels is not None else f"phrase {n + 1}"
        if not isinstance(phrase, str) or not phrase.strip():
            raise ContextError(f"{where}: {label} must be a non-empty string, got {phrase!r}")
        if len(phrase) > 16 * max_len:  # before tokenizing: bounds the work on bad input
            raise ContextError(f"{where}: {label} has {len(phrase)} characters, "
                               f"at most {16 * max_len} allowed")
        try:
            ids = tokenize_phrase(symbols, phrase)
        except ContextError as exc:
            raise ContextError(f"{where}: {label} '{phrase}': {exc}") from None
        if len(ids) > max_len:
            raise ContextError(f"{where}: {label} '{phrase}' has {len(ids)} units, "
                               f"at most {max_len} allowed")
        seqs.append(ids)
    return ContextGraph(seqs, score)


def load_context_graph(symbols: SymbolTable, path: str, score: float,
                       max_phrases: int = DEFAULT_MAX_PHRASES,
                       max_len: int = DEFAULT_MAX_LEN) -> ContextGraph:
    """`build_context_graph` over a file of one phrase per line; errors name the
    file and line."""
    lines = read_context_file(path)
    return build_context_graph(symbols, [p for _, p in lines], score, max_phrases, max_len,
                               where=path, labels=[f"line {n}" for n, _ in lines])


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    """Hotword options, shared with `wenet-moe recognize`."""
    parser.add_argument("--context_path", default=None,
                        help="hotwords: one phrase per line, biasing the CTC prefix beam search")
    parser.add_argument("--context_score", type=float, default=3.0,
                        help="hotword bonus per matched unit (log domain)")
    parser.add_argument("--max_context_phrases", type=int, default=DEFAULT_MAX_PHRASES,
                        help="most phrases accepted from --context_path")
    parser.add_argument("--max_context_len", type=int, default=DEFAULT_MAX_LEN,
                        help="most units per phrase")


def context_from_args(args: argparse.Namespace, symbols):
    """The ContextGraph of `--context_path` (None without one); bad options raise
    ContextError."""
    limits = ContextLimits(args.context_score, args.max_context_phrases, args.max_context_len)
    if not args.context_path:
        return None
    if not os.path.isfile(args.context_path):
        raise ContextError(f"--context_path {args.context_path}: no such file")
    return load_context_graph(symbols, args.context_path, limits.score, limits.max_phrases,
                              limits.max_len)
