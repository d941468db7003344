#!/usr/bin/env python3
"""Estimate an n-gram language model with interpolated modified Kneser-Ney smoothing
and write it in ARPA format.

    tools/train_ngram_lm.py --text text --order 3 --arpa lm.arpa [--char] [--has_key]

Input: one sentence per line (`--has_key`: Kaldi `text`, the first field is the key).
Words are whitespace-separated; with `--char` every CJK character is a word of its own
(a character LM for a Mandarin character model; Latin words stay whole).

The model (Chen & Goodman 1998, "interpolated modified Kneser-Ney"):
- the highest order uses counts c(h w); lower orders use continuation counts
  N1+(. h w) (how many distinct words precede `h w`), except n-grams that start
  with `<s>`, which keep their counts (nothing can precede `<s>`);
- per order, three discounts from the count-of-counts n1..n4 of that order:
  Y = n1/(n1+2 n2), D1 = 1-2Y n2/n1, D2 = 2-3Y n3/n2, D3+ = 3-4Y n4/n3, each
  clamped to [0, k] (k = 1, 2, 3) and replaced by 0.5, 1.0, 1.5 when a
  count-of-count it needs is zero (tiny corpora);
- p(w|h) = max(c(h w) - D(c), 0) / c(h .) + gamma(h) p(w|h'), with
  gamma(h) = (D1 N1(h .) + D2 N2(h .) + D3+ N3+(h .)) / c(h .), h' = h without its
  first word, and the unigram level interpolated with the uniform distribution over
  the vocabulary (without `<s>`);
- ARPA stores log10 p(w|h) for every seen n-gram and log10 gamma(h) as the back-off
  weight of every history h: for an unseen w, the interpolated p(w|h) equals
  gamma(h) p(w|h'), which is exactly ARPA's back-off rule.
`<s>` gets probability 0 (log10 -99) as a predicted word, as in SRILM/KenLM.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_util import atomic_output, read_transcripts  # noqa: E402

BOS, EOS = "<s>", "</s>"
Ngram = Tuple[str, ...]


def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF
            or 0x3040 <= o <= 0x30FF or 0xAC00 <= o <= 0xD7AF or 0x20000 <= o <= 0x2FA1F)


def split_words(line: str, char: bool) -> List[str]:
    """Whitespace words; with `char`, CJK characters become words of their own."""
    if not char:
        return line.split()
    out: List[str] = []
    for word in line.split():
        buf = ""
        for ch in word:
            if is_cjk(ch):
                if buf:
                    out.append(buf)
                    buf = ""
                out.append(ch)
            else:
                buf += ch
        if buf:
            out.append(buf)
    return out


def discounts(count_of_counts: Dict[int, int]) -> Tuple[float, float, float]:
    """(D1, D2, D3+) of modified Kneser-Ney from n1..n4 (see module doc)."""
    n1, n2, n3, n4 = (count_of_counts.get(k, 0) for k in (1, 2, 3, 4))
    if n1 == 0 or n2 == 0:
        return 0.5, 1.0, 1.5
    y = n1 / (n1 + 2.0 * n2)
    d1 = 1.0 - 2.0 * y * n2 / n1
    d2 = 2.0 - 3.0 * y * n3 / n2 if n3 else 1.0
    d3 = 3.0 - 4.0 * y * n4 / n3 if n3 and n4 else 1.5
    return (min(max(d1, 0.0), 1.0), min(max(d2, 0.0), 2.0), min(max(d3, 0.0), 3.0))


class KneserNeyLM:
    """Interpolated modified Kneser-Ney n-gram model estimated from sentences."""

    def __init__(self, sentences: Iterable[Sequence[str]], order: int) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order = order
        raw: List[Dict[Ngram, int]] = [defaultdict(int) for _ in range(order + 1)]
        vocab = set()
        for words in sentences:
            for w in words:
                if w in (BOS, EOS):
                    raise ValueError(f"the text holds the reserved word {w}")
            seq = [BOS] + list(words) + [EOS]
            vocab.update(seq)
            for n in range(1, order + 1):
                for i in range(len(seq) - n + 1):
                    raw[n][tuple(seq[i:i + n])] += 1
        if not raw[1]:
            raise ValueError("no sentences")
        # The highest order keeps its counts, and so does every n-gram that starts
        # with <s> (nothing precedes it); the others get continuation counts.
        self.counts: List[Dict[Ngram, int]] = [dict() for _ in range(order + 1)]
        self.counts[order] = {g: c for g, c in raw[order].items() if g != (BOS,)}
        for n in range(order - 1, 0, -1):
            cont: Dict[Ngram, int] = defaultdict(int)
            for g in raw[n + 1]:
                cont[g[1:]] += 1
            self.counts[n] = {g: (c if g[0] == BOS else cont[g]) for g, c in raw[n].items()
                              if g != (BOS,)}
        self.vocab = sorted(vocab)
        self._estimate()

    def _estimate(self) -> None:
        self.prob: List[Dict[Ngram, float]] = [dict() for _ in range(self.order + 1)]
        self.bow: List[Dict[Ngram, float]] = [dict() for _ in range(self.order + 1)]
        predicted = [w for w in self.vocab if w != BOS]
        uniform = 1.0 / len(predicted)
        for n in range(1, self.order + 1):
            counts = self.counts[n]
            coc: Dict[int, int] = defaultdict(int)
            for c in counts.values():
                if c <= 4:
                    coc[c] += 1
            d = discounts(coc)
            totals: Dict[Ngram, float] = defaultdict(float)
            nk: Dict[Ngram, List[int]] = defaultdict(lambda: [0, 0, 0])
            for g, c in counts.items():
                h = g[:-1]
                totals[h] += c
                nk[h][min(c, 3) - 1] += 1
            gammas = {h: (d[0] * k[0] + d[1] * k[1] + d[2] * k[2]) / totals[h] for h, k in nk.items()}
            for g, c in counts.items():
                h = g[:-1]
                lower = uniform if n == 1 else self.p(g[1:])
                self.prob[n][g] = max(c - d[min(c, 3) - 1], 0.0) / totals[h] + gammas[h] * lower
            if n == 1:
                # unseen-word mass of the unigram level is spread uniformly; words
                # never seen as unigrams (only <s>) get it too
                for w in predicted:
                    self.prob[1].setdefault((w,), gammas[()] * uniform)
            self.bow[n - 1] = {h: g for h, g in gammas.items()}

    def p(self, g: Ngram) -> float:
        """Interpolated probability of the last word of `g` given the others (backing
        off to shorter histories where `g` is unseen)."""
        n = len(g)
        if g in self.prob[n]:
            return self.prob[n][g]
        if n == 1:
            return 0.0
        return self.bow[n - 1].get(g[:-1], 1.0) * self.p(g[1:])

    def sentence_logprob(self, words: Sequence[str]) -> float:
        """Natural-log probability of a sentence, `</s>` included."""
        seq = [BOS] + list(words) + [EOS]
        total = 0.0
        for i in range(1, len(seq)):
            total += math.log(self.p(tuple(seq[max(0, i - self.order + 1): i + 1])))
        return total

    def write_arpa(self, path: str) -> None:
        """Atomic write of the ARPA file."""
        lines = ["", "\\data\\"]
        grams: List[List[Ngram]] = [[]]
        for n in range(1, self.order + 1):
            keys = sorted(self.prob[n]) if n > 1 else sorted(self.prob[1]) + [(BOS,)]
            grams.append(keys)
            lines.append(f"ngram {n}={len(keys)}")
        for n in range(1, self.order + 1):
            lines += ["", f"\\{n}-grams:"]
            for g in grams[n]:
                lp = -99.0 if g == (BOS,) else math.log10(self.prob[n][g])
                text = f"{lp:.6f}\t{' '.join(g)}"
                if n < self.order and g in self.bow[n]:
                    text += f"\t{math.log10(self.bow[n][g]):.6f}"
                lines.append(text)
        lines += ["", "\\end\\", ""]
        with atomic_output(path) as f:
            f.write("\n".join(lines))


def read_sentences(path: str, has_key: bool, char: bool) -> List[List[str]]:
    out = [words for words in (split_words(line, char) for line in read_transcripts(path, has_key))
           if words]
    if not out:
        raise ValueError(f"{path}: no sentences")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", required=True, help="training text, one sentence per line")
    p.add_argument("--arpa", required=True, help="output ARPA file")
    p.add_argument("--order", type=int, default=3, help="n-gram order (3 or 4 usual)")
    p.add_argument("--char", action="store_true", help="CJK characters are words")
    p.add_argument("--has_key", action="store_true", help="Kaldi text: the first field is a key")
    args = p.parse_args(argv)
    try:
        lm = KneserNeyLM(read_sentences(args.text, args.has_key, args.char), args.order)
        lm.write_arpa(args.arpa)
    except (OSError, ValueError) as exc:
        print(f"train_ngram_lm.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.arpa}: order {args.order}, " + ", ".join(
        f"{len(lm.prob[n])} {n}-grams" for n in range(1, args.order + 1)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
