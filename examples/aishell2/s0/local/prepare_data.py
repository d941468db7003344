#!/usr/bin/env python3
"""Kaldi data directory from one AISHELL-2 list directory.

    prepare_data.py CORPUS_DIR DATA_DIR

CORPUS_DIR holds `wav.scp` (`key relative/or/absolute.wav`, relative to
CORPUS_DIR) and `trans.txt` (`key transcript`), as `iOS/data`, `iOS/dev` and
`iOS/test` of the release. DATA_DIR receives `wav.scp` (absolute paths),
`text` (normalised) and `utt2spk`, sorted by key. Normalisation: full-width
ASCII to half-width, English upper-cased, punctuation removed, the space
between two Latin words kept as `▁`, every other space removed.

Skipped utterances are reported by reason (missing transcript, transcript
without wav.scp entry, wav file missing on disk, empty transcript, malformed or
duplicate line), plus blank lines and wav files on disk that wav.scp does not
list (extra wav). A file is rewritten only when its content changes.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import unicodedata
from collections import Counter
from typing import Dict, List, Tuple

_PUNCT = re.compile(r"[\s\u3000]*[,.!?;:\"()\[\]{}<>，。！？；：、“”‘’（）《》【】…—·~`@#$%^&*_+=|\\/-]+[\s\u3000]*")
_LATIN_SPACE = re.compile(r"(?<=[A-Z0-9'])\s+(?=[A-Z0-9'])")


def normalize(text: str) -> str:
    """Normalised transcript (see module docstring); may be empty."""
    text = unicodedata.normalize("NFKC", text).replace("\ufeff", "")
    text = text.upper()
    text = _PUNCT.sub(" ", text)
    text = _LATIN_SPACE.sub("▁", text.strip())
    return re.sub(r"\s+", "", text)


def read_lines(path: str, skipped: Counter, examples: Dict[str, str]) -> Dict[str, Tuple[str, int]]:
    """key -> (value, line number); counts blank/malformed/duplicate lines."""
    out: Dict[str, Tuple[str, int]] = {}
    name = os.path.basename(path)
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                skipped[f"blank line in {name}"] += 1
                continue
            parts = line.strip().split(maxsplit=1)
            if len(parts) < 2:
                if name == "trans.txt":  # a key with an empty transcript
                    out.setdefault(parts[0], ("", lineno))
                    continue
                reason = f"malformed line in {name}"
                skipped[reason] += 1
                examples.setdefault(reason, f"{path}:{lineno}")
                continue
            if parts[0] in out:
                reason = f"duplicate key in {name}"
                skipped[reason] += 1
                examples.setdefault(reason, f"{path}:{lineno}")
                continue
            out[parts[0]] = (parts[1], lineno)
    return out


def write_if_changed(path: str, lines: List[str]) -> bool:
    data = "".join(lines)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == data:
                return False
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def prepare(corpus: str, out_dir: str) -> Tuple[int, Counter, Dict[str, str]]:
    """Write DATA_DIR; returns (kept utterances, skipped counts, example locations)."""
    corpus = os.path.abspath(corpus)
    for name in ("wav.scp", "trans.txt"):
        if not os.path.isfile(os.path.join(corpus, name)):
            raise FileNotFoundError(f"{corpus}: no {name} (expected an AISHELL-2 list directory)")
    skipped: Counter = Counter()
    examples: Dict[str, str] = {}
    wavs = read_lines(os.path.join(corpus, "wav.scp"), skipped, examples)
    trans = read_lines(os.path.join(corpus, "trans.txt"), skipped, examples)
    kept = []
    listed = set()
    for key in sorted(wavs):
        rel, lineno = wavs[key]
        path = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(corpus, rel))
        listed.add(path)
        if key not in trans:
            reason = "missing transcript"
        elif not os.path.isfile(path):
            reason = "wav file missing on disk"
        elif not normalize(trans[key][0]):
            reason = "empty transcript"
        else:
            kept.append((key, path, normalize(trans[key][0])))
            continue
        skipped[reason] += 1
        examples.setdefault(reason, f"{os.path.join(corpus, 'wav.scp')}:{lineno} ({key})")
    for key in sorted(set(trans) - set(wavs)):
        skipped["transcript without wav.scp entry"] += 1
        examples.setdefault("transcript without wav.scp entry",
                            f"{os.path.join(corpus, 'trans.txt')}:{trans[key][1]} ({key})")
    for root, _, files in os.walk(corpus):
        for fn in sorted(files):
            if fn.lower().endswith(".wav") and os.path.normpath(os.path.join(root, fn)) not in listed:
                skipped["extra wav (on disk, not in wav.scp)"] += 1
                examples.setdefault("extra wav (on disk, not in wav.scp)", os.path.join(root, fn))
    if not kept:
        raise ValueError(f"{corpus}: no usable utterance (wav.scp and trans.txt share no key with a wav file)")
    os.makedirs(out_dir, exist_ok=True)
    write_if_changed(os.path.join(out_dir, "wav.scp"), [f"{k} {p}\n" for k, p, _ in kept])
    write_if_changed(os.path.join(out_dir, "text"), [f"{k} {t}\n" for k, _, t in kept])
    write_if_changed(os.path.join(out_dir, "utt2spk"), [f"{k} {speaker(k)}\n" for k, _, _ in kept])
    return len(kept), skipped, examples


def speaker(key: str) -> str:
    """AISHELL-2 keys are I<speaker>W<utt> (e.g. IC0001W0001 -> C0001)."""
    m = re.match(r"^I?([A-Z]\d{4})W", key)
    return m.group(1) if m else key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus_dir", help="directory with wav.scp and trans.txt")
    p.add_argument("data_dir", help="output Kaldi data directory")
    a = p.parse_args(argv)
    try:
        n, skipped, examples = prepare(a.corpus_dir, a.data_dir)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 1
    print(f"prepare_data.py: {a.corpus_dir} -> {a.data_dir}: {n} utterances", file=sys.stderr)
    for reason in sorted(skipped):
        print(f"prepare_data.py:   skipped {skipped[reason]} x {reason}, e.g. {examples.get(reason, '-')}"
              if reason in examples else f"prepare_data.py:   skipped {skipped[reason]} x {reason}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
