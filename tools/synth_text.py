"""Mandarin sentences for the synthetic corpus, built from pip-installable lexicons.

The vocabulary is the `vocab_size` most frequent characters of jieba's dictionary
(character weight = summed frequency of the words holding it) that have a single
reading in pypinyin; with `homophones="none"` at most one character per toneless
syllable is kept, so every character is identifiable from its sound alone (the
demo's target is a low CER after minutes of CPU training). Sentences are random
sequences of dictionary words written only with vocabulary characters, drawn with
probability proportional to sqrt(frequency).
"""
from __future__ import annotations

import math
import os
import random
import re
from typing import Dict, List, Sequence, Tuple

_HAN = re.compile(r"^[\u4e00-\u9fff]+$")


def jieba_dict_path() -> str:
    import jieba

    return os.path.join(os.path.dirname(jieba.__file__), "dict.txt")


def read_lexicon(path: str, max_word_len: int = 4) -> List[Tuple[str, int]]:
    """(word, frequency) pairs of all-Han words of 1..max_word_len characters."""
    words = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{lineno}: expected 'word frequency [tag]', got {line.strip()!r}")
            word, freq = parts[0], int(parts[1])
            if freq > 0 and len(word) <= max_word_len and _HAN.match(word):
                words.append((word, freq))
    return words


def char_readings(ch: str) -> List[str]:
    """All tone-numbered pinyin readings pypinyin knows for one character."""
    from pypinyin import Style, pinyin

    return pinyin(ch, style=Style.TONE3, heteronym=True, neutral_tone_with_five=True)[0]


def choose_vocabulary(words: Sequence[Tuple[str, int]], vocab_size: int,
                      homophones: str = "none") -> List[str]:
    """Most frequent single-reading characters; see module docstring.

    homophones: "none" (one char per toneless syllable), "tone" (one per toned
    syllable) or "all" (no restriction).
    """
    if homophones not in ("none", "tone", "all"):
        raise ValueError(f"homophones must be none|tone|all, got {homophones!r}")
    weight: Dict[str, int] = {}
    for word, freq in words:
        for ch in word:
            weight[ch] = weight.get(ch, 0) + freq
    ranked = sorted(weight, key=lambda c: (-weight[c], c))
    chosen, used = [], set()
    for ch in ranked:
        readings = char_readings(ch)
        if len(readings) != 1 or not readings[0][-1:].isdigit():
            continue
        syllable = readings[0] if homophones == "tone" else readings[0].rstrip("012345")
        if homophones != "all":
            if syllable in used:
                continue
            used.add(syllable)
        chosen.append(ch)
        if len(chosen) == vocab_size:
            break
    return chosen


def make_sentences(words: Sequence[Tuple[str, int]], vocab: Sequence[str], count: int,
                   min_chars: int, max_chars: int, seed: int) -> List[str]:
    """`count` distinct sentences of min_chars..max_chars vocabulary characters."""
    vocab_set = set(vocab)
    usable = [(w, f) for w, f in words if all(c in vocab_set for c in w)]
    if not usable:
        raise ValueError("no lexicon word is written with the chosen vocabulary")
    rng = random.Random(seed)
    cum, total = [], 0.0
    for _, f in usable:
        total += math.sqrt(f)
        cum.append(total)
    sentences, seen = [], set()
    attempts = 0
    while len(sentences) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"could only make {len(sentences)} distinct sentences of {count} requested; "
                             "raise --vocab_size or the sentence length")
        target = rng.randint(min_chars, max_chars)
        text = ""
        while len(text) < target:
            word = usable[_bisect(cum, rng.random() * total)][0]
            if len(text) + len(word) > max_chars:
                break
            text += word
        if len(text) >= min_chars and text not in seen:
            seen.add(text)
            sentences.append(text)
    return sentences


def _bisect(cum: List[float], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def read_text_file(path: str) -> List[str]:
    """Distinct non-empty lines of a text file, spaces removed, in file order."""
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = "".join(line.split())
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    if not out:
        raise ValueError(f"{path}: no sentences (file is empty)")
    return out
