#!/usr/bin/env python3
"""Character/word error rate with Levenshtein alignment, like Kaldi's compute-wer.py.

    compute_cer.py [--char=1] [--v=1] ref.txt hyp.txt > wer

Both files hold `key text` lines. With --char=1 text is split into characters
(spaces dropped, runs of Latin letters/digits kept as one token); otherwise into
space-separated words. With --v=1 every utterance gets its alignment and counts.
Summary: `Overall -> X.XX % N=.. C=.. S=.. D=.. I=..`. An utterance missing from
the hypotheses counts as all deletions (reported at the end).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_util import ToolError, read_key_value, run_tool  # noqa: E402

_LATIN = re.compile(r"[A-Za-z0-9'▁]+|\S")


def tokenize(text: str, char: bool, case_sensitive: bool = False) -> List[str]:
    if not case_sensitive:
        text = text.upper()
    if not char:
        return text.split()
    return _LATIN.findall(text)


def align(ref: List[str], hyp: List[str]) -> List[Tuple[str, str, str]]:
    """Minimum-edit alignment: list of (op, ref_token, hyp_token), op in C S D I.

    Costs: substitution, deletion, insertion 1 each; ties prefer C/S, then D, then I.
    """
    n, m = len(ref), len(hyp)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        cost[i][0] = i
    for j in range(1, m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        ri, row, prev = ref[i - 1], cost[i], cost[i - 1]
        for j in range(1, m + 1):
            diag = prev[j - 1] + (0 if ri == hyp[j - 1] else 1)
            row[j] = min(diag, prev[j] + 1, row[j - 1] + 1)
    ops = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and cost[i][j] == cost[i - 1][j - 1] + (0 if ref[i - 1] == hyp[j - 1] else 1):
            ops.append(("C" if ref[i - 1] == hyp[j - 1] else "S", ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif i > 0 and cost[i][j] == cost[i - 1][j] + 1:
            ops.append(("D", ref[i - 1], ""))
            i -= 1
        else:
            ops.append(("I", "", hyp[j - 1]))
            j -= 1
    ops.reverse()
    return ops


def count(ops) -> dict:
    c = {"C": 0, "S": 0, "D": 0, "I": 0}
    for op, _, _ in ops:
        c[op] += 1
    return c


def error_rate(c: dict) -> float:
    n = c["C"] + c["S"] + c["D"]
    return 100.0 * (c["S"] + c["D"] + c["I"]) / max(n, 1)


def format_alignment(ops) -> Tuple[str, str]:
    """Two aligned lines (ref, hyp); gaps shown as '*'."""
    refs, hyps = [], []
    for _, r, h in ops:
        r, h = r or "*", h or "*"
        w = max(_width(r), _width(h))
        refs.append(r + " " * (w - _width(r)))
        hyps.append(h + " " * (w - _width(h)))
    return " ".join(refs), " ".join(hyps)


def _width(s: str) -> int:
    return sum(2 if ord(ch) > 0x2E80 else 1 for ch in s)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--char", type=int, default=0, choices=[0, 1], help="1: score characters (CER)")
    p.add_argument("--v", type=int, default=0, choices=[0, 1], help="1: per-utterance alignment detail")
    p.add_argument("--cs", type=int, default=0, choices=[0, 1], help="1: case sensitive")
    p.add_argument("ref", help="reference `key text` file")
    p.add_argument("hyp", help="hypothesis `key text` file")
    return p


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    refs = read_key_value(a.ref, allow_empty_value=True)
    hyps = dict(read_key_value(a.hyp, allow_empty_value=True))
    ref_keys = {k for k, _ in refs}
    extra = sorted(k for k in hyps if k not in ref_keys)
    if extra:
        raise ToolError(f"{a.hyp}: {len(extra)} keys have no reference in {a.ref}, e.g. {extra[0]!r}")
    total = {"C": 0, "S": 0, "D": 0, "I": 0}
    missing = []
    out = sys.stdout
    for key, ref_text in refs:
        if key not in hyps:
            missing.append(key)
        ref = tokenize(ref_text, bool(a.char), bool(a.cs))
        hyp = tokenize(hyps.get(key, ""), bool(a.char), bool(a.cs))
        ops = align(ref, hyp)
        c = count(ops)
        for k in total:
            total[k] += c[k]
        if a.v:
            r, h = format_alignment(ops)
            out.write(f"utt: {key}\nWER: {error_rate(c):.2f} % N={len(ref)} C={c['C']} S={c['S']} "
                      f"D={c['D']} I={c['I']}\nlab: {r}\nrec: {h}\n\n")
    n = total["C"] + total["S"] + total["D"]
    out.write("===========================================================================\n")
    out.write(f"Overall -> {error_rate(total):.2f} % N={n} C={total['C']} S={total['S']} "
              f"D={total['D']} I={total['I']}\n")
    if missing:
        out.write(f"Missing hypotheses: {len(missing)} (counted as deletions), e.g. {missing[0]}\n")
    out.write("===========================================================================\n")
    return 0


if __name__ == "__main__":
    run_tool(main, "compute_cer.py")
