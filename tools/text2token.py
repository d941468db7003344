#!/usr/bin/env python3
"""Split transcripts into tokens (characters or n-grams of them), as WeNet's text2token.py.

    text2token.py -s 1 -n 1 --space "▁" data/train/text > tokens

-s N skips the first N columns (the key); a space inside the remaining text
becomes the --space symbol; --non_lang_syms lists symbols such as `<noise>`
kept whole; --trans_type phn treats every space-separated word as one token.
Reads stdin when no file is given.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_util import ToolError, atomic_output, run_tool  # noqa: E402


def split_chars(text: str, space: str, non_lang: Sequence[str]) -> List[str]:
    """Characters of `text`; spaces become `space`; non-language symbols stay whole."""
    pattern = None
    if non_lang:
        pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(non_lang, key=len, reverse=True)) + ")")
    pieces = pattern.split(text) if pattern else [text]
    tokens = []
    for piece in pieces:
        if pattern and piece in non_lang:
            tokens.append(piece)
            continue
        for ch in piece:
            tokens.append(space if ch.isspace() else ch)
    # collapse repeated space symbols (several spaces in a row)
    out = []
    for t in tokens:
        if t == space and (not out or out[-1] == space):
            continue
        out.append(t)
    while out and out[-1] == space:
        out.pop()
    return out


def ngrams(tokens: List[str], n: int) -> List[str]:
    if n == 1:
        return tokens
    return ["".join(tokens[i:i + n]) for i in range(max(len(tokens) - n + 1, 1))] if tokens else []


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", default="-", help="input file (default stdin)")
    p.add_argument("-s", "--skip-ncols", type=int, default=0, help="leading columns copied unchanged")
    p.add_argument("-n", "--nchar", type=int, default=1, help="characters per token")
    p.add_argument("--space", default="<space>", help="symbol for a space inside the text")
    p.add_argument("-l", "--non_lang_syms", default="", help="file of symbols kept whole, one per line")
    p.add_argument("--trans_type", default="char", choices=["char", "phn"], help="char or phn (words)")
    p.add_argument("-o", "--output", default="-", help="output file (default stdout; written atomically)")
    return p


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    if a.nchar < 1 or a.skip_ncols < 0:
        raise ToolError(f"need --nchar >= 1 and --skip-ncols >= 0, got {a.nchar} and {a.skip_ncols}")
    non_lang: List[str] = []
    if a.non_lang_syms:
        if not os.path.exists(a.non_lang_syms):
            raise ToolError(f"{a.non_lang_syms}: no such file")
        with open(a.non_lang_syms, encoding="utf-8") as f:
            non_lang = [ln.strip() for ln in f if ln.strip()]
    if a.text != "-" and not os.path.exists(a.text):
        raise ToolError(f"{a.text}: no such file")
    src = sys.stdin if a.text == "-" else open(a.text, encoding="utf-8")
    lines = []
    with src:
        for lineno, line in enumerate(src, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split(maxsplit=a.skip_ncols) if a.skip_ncols else [line]
            if len(cols) < a.skip_ncols:
                raise ToolError(f"{a.text}:{lineno}: fewer than {a.skip_ncols} columns")
            head, body = cols[:a.skip_ncols], (cols[a.skip_ncols] if len(cols) > a.skip_ncols else "")
            if a.trans_type == "phn":
                tokens = body.split()
            else:
                tokens = ngrams(split_chars(body.strip(), a.space, non_lang), a.nchar)
            lines.append(" ".join(head + tokens) + "\n")
    if a.output == "-":
        sys.stdout.writelines(lines)
    else:
        with atomic_output(a.output) as f:
            f.writelines(lines)
    return 0


if __name__ == "__main__":
    run_tool(main, "text2token.py")
