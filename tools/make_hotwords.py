#!/usr/bin/env python3
"""Draw a hotword list from test transcripts: phrases absent from the training text.

    tools/make_hotwords.py --test data/test/text --train data/train/text --out hotwords.txt \
        [--num 100] [--length 4] [--has_key]

A phrase is `--length` consecutive characters of one test sentence (spaces removed)
that occur in no training sentence, so an LM or model trained on that text cannot
have memorised it. The choice is deterministic: test sentences are visited in file
order, every `stride`-th one (stride = sentences // num, at least 1), and each gives
its leftmost such phrase not chosen before, until `--num` phrases. Written atomically,
one phrase per line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_util import atomic_output, read_transcripts  # noqa: E402


def read_sentences(path: str, has_key: bool) -> List[str]:
    """Sentences of a text file (after the key when `has_key`), spaces removed."""
    return ["".join(line.split()) for line in read_transcripts(path, has_key)]


def choose_hotwords(test: Sequence[str], train: Sequence[str], num: int, length: int) -> List[str]:
    """Up to `num` phrases of `length` characters from `test` absent from `train`."""
    if num < 1 or length < 1:
        raise ValueError(f"--num and --length must be >= 1, got {num} and {length}")
    seen = {s[i:i + length] for s in train for i in range(len(s) - length + 1)}
    stride = max(1, len(test) // num)
    chosen: List[str] = []
    taken = set()
    for sent in test[::stride]:
        for i in range(len(sent) - length + 1):
            phrase = sent[i:i + length]
            if phrase not in seen and phrase not in taken:
                chosen.append(phrase)
                taken.add(phrase)
                break
        if len(chosen) == num:
            break
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test", required=True, help="test transcripts (the phrases come from here)")
    p.add_argument("--train", required=True, help="training transcripts (phrases must be absent)")
    p.add_argument("--out", required=True, help="hotword list to write, one phrase per line")
    p.add_argument("--num", type=int, default=100, help="most phrases")
    p.add_argument("--length", type=int, default=4, help="characters per phrase")
    p.add_argument("--has_key", action="store_true", help="lines start with an utterance key")
    args = p.parse_args(argv)
    try:
        phrases = choose_hotwords(read_sentences(args.test, args.has_key),
                                  read_sentences(args.train, args.has_key), args.num, args.length)
        if not phrases:
            raise ValueError(f"{args.test}: no {args.length}-character phrase absent from {args.train}")
        with atomic_output(args.out) as f:
            f.writelines(f"{ph}\n" for ph in phrases)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        print(f"make_hotwords.py: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(phrases)} phrases of {args.length} characters absent from {args.train}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
