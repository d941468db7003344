#!/usr/bin/env python3
"""Print the CER table of a model directory (Markdown).

    cer_table.py EXP_DIR [--lm TAG]

Reads EXP_DIR/decode_<set>_<full|chunkN>/<mode>/wer (compute_cer.py output) and
prints, for every set, one row per decoding mode and one column per context.
With runtime_* directories present, their CERs are listed below the table.
`--lm TAG` (full or chunkN) prints instead the table of stages 8-9: one column per
set, rows without LM (decode_<set>_TAG), with the LM graph (decode_<set>_TAG_lm),
with hotwords (_hotwords) and with both (_lm_hotwords).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

MODE_ORDER = ["ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring"]
_OVERALL = re.compile(r"^Overall -> ([0-9.]+) % N=(\d+)")


def read_cer(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = _OVERALL.match(line)
                if m:
                    return float(m.group(1))
    except OSError:
        return None
    return None


def collect(exp: str):
    table = {}  # set -> tag -> mode -> cer
    for name in sorted(os.listdir(exp)):
        m = re.fullmatch(r"decode_(.+)_(full|chunk\d+)", name)
        if not m or not os.path.isdir(os.path.join(exp, name)):
            continue
        for mode in sorted(os.listdir(os.path.join(exp, name))):
            cer = read_cer(os.path.join(exp, name, mode, "wer"))
            if cer is not None:
                table.setdefault(m.group(1), {}).setdefault(m.group(2), {})[mode] = cer
    return table


def tag_key(tag: str):
    return (0, 0) if tag == "full" else (1, -int(tag[5:]))


def format_table(table) -> str:
    out = []
    for split, by_tag in sorted(table.items()):   # a set before its @precision decodes
        tags = sorted(by_tag, key=tag_key)
        modes = sorted({m for t in by_tag.values() for m in t},
                       key=lambda m: (MODE_ORDER.index(m) if m in MODE_ORDER else 99, m))
        heads = ["full context" if t == "full" else f"chunk {t[5:]}" for t in tags]
        out.append(f"CER (%) on {split}:\n")
        out.append("| mode | " + " | ".join(heads) + " |")
        out.append("|---|" + "---|" * len(tags))
        for mode in modes:
            cells = [f"{by_tag[t][mode]:.2f}" if mode in by_tag[t] else "-" for t in tags]
            out.append(f"| {mode} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


LM_RUNS = [("without LM", "", ["ctc_prefix_beam_search", "attention_rescoring"]),
           ("with LM", "_lm", ["ctc_wfst", "ctc_wfst_rescoring"]),
           ("hotwords", "_hotwords", ["ctc_prefix_beam_search", "attention_rescoring"]),
           ("LM + hotwords", "_lm_hotwords", ["ctc_wfst", "ctc_wfst_rescoring"])]


def format_lm_table(exp: str, tag: str) -> str:
    """CER without/with the LM graph and hotwords, one column per decoded set."""
    sets = sorted({m.group(1) for name in os.listdir(exp)
                   for m in [re.fullmatch(rf"decode_(.+)_{tag}_lm", name)] if m})
    if not sets:
        return ""
    out = [f"CER (%) without and with the LM and hotwords ({tag}):\n",
           "| decoding | mode | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
    for label, suffix, modes in LM_RUNS:
        for mode in modes:
            cers = [read_cer(os.path.join(exp, f"decode_{x}_{tag}{suffix}", mode, "wer")) for x in sets]
            if all(c is None for c in cers):
                continue
            out.append(f"| {label} | {mode} | " + " | ".join("-" if c is None else f"{c:.2f}"
                                                            for c in cers) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp_dir", help="model directory")
    p.add_argument("--lm", default=None, metavar="TAG",
                   help="print the LM/hotword table of this context (full or chunkN)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.exp_dir):
        print(f"cer_table.py: error: {a.exp_dir}: no such directory", file=sys.stderr)
        return 1
    if a.lm is not None:
        if not re.fullmatch(r"full|chunk\d+", a.lm):
            print(f"cer_table.py: error: --lm {a.lm}: expected full or chunkN", file=sys.stderr)
            return 1
        table = format_lm_table(a.exp_dir, a.lm)
        if not table:
            print(f"cer_table.py: no decode_*_{a.lm}_lm under {a.exp_dir}", file=sys.stderr)
            return 1
        print(table)
        return 0
    table = collect(a.exp_dir)
    if not table:
        print(f"cer_table.py: no decode_*/*/wer under {a.exp_dir}", file=sys.stderr)
        return 1
    print(format_table(table))
    for name in sorted(os.listdir(a.exp_dir)):
        if name.startswith("runtime_"):
            cer = read_cer(os.path.join(a.exp_dir, name, "wer"))
            if cer is not None:
                print(f"{name}: CER {cer:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
