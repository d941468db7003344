#!/usr/bin/env python3
"""Compile a decoding graph TLG.fst (+ words.txt) from units.txt and an ARPA LM.

    tools/make_tlg.py --units units.txt --arpa lm.arpa --graph_dir DIR [--lexicon lexicon.txt]

- T: CTC topology over the units (WeNet's compact form): state 0 (start, final)
  loops on blank; each unit u has a state entered by u (emitting u), looping on u
  (emitting nothing) and returning to 0 by epsilon. A repeat without a blank between
  reads as one unit or as two (the LM decides); it keeps T linear in the number of
  units. Input labels are unit id + 1 (Kaldi's decoders reserve 0 for epsilon, and
  kaldi-decoder's DecodableCtc reads column label-1).
- L: lexicon from words to unit sequences. Without `--lexicon`, every word of the
  LM is spelled by `wenet_moe_runtime.context.tokenize_phrase` (a character LM: each
  CJK character is its own unit); `--lexicon` gives `word unit unit ...` lines. Words
  whose units are missing from units.txt are dropped (counted in the log). Unit
  sequences shared by several words or prefixes of another word's get disambiguation
  symbols #1, #2, ..., and a #0 loop passes G's back-off symbol.
- G: the ARPA LM compiled by kaldilm's arpa2fst (back-off arcs on #0, <s>/</s> as
  epsilon).
LG = minimize(determinize(L o G)) with the disambiguation symbols then replaced by
epsilon; TLG = T o LG, arc-sorted. Files are written under temporary names and renamed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "runtime") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "runtime"))

from wenet_moe_runtime.context import ContextError, tokenize_phrase  # noqa: E402
from wenet_moe_runtime.symbols import SymbolTable, is_special  # noqa: E402


def _kaldifst():
    try:
        import kaldifst
    except ImportError as exc:
        raise RuntimeError("building TLG.fst needs kaldifst and kaldilm: pip install "
                           "'wenet-moe[lm]'") from exc
    return kaldifst


def arpa_words(arpa_path: str) -> List[str]:
    """The unigram vocabulary of an ARPA file, in file order."""
    words, in_unigrams = [], False
    with open(arpa_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith("\\"):
                in_unigrams = line == "\\1-grams:"
                continue
            if in_unigrams and line:
                parts = line.split()
                if len(parts) < 2:
                    raise ValueError(f"{arpa_path}:{lineno}: malformed unigram line {line!r}")
                words.append(parts[1])
    if not words:
        raise ValueError(f"{arpa_path}: no \\1-grams: section")
    return words


def make_ctc_topo(symbols: SymbolTable):
    """T as a StdVectorFst: input unit id + 1, output unit id + 1 (0 = epsilon)."""
    k = _kaldifst()
    fst = k.StdVectorFst()
    start = fst.add_state()
    fst.start = start
    fst.set_final(start, 0.0)
    blank = symbols.blank_id + 1
    fst.add_arc(start, k.StdArc(blank, 0, 0.0, start))
    for uid, sym in enumerate(symbols.symbols):
        if uid == symbols.blank_id or is_special(sym):
            continue
        s = fst.add_state()
        fst.add_arc(start, k.StdArc(uid + 1, uid + 1, 0.0, s))
        fst.add_arc(s, k.StdArc(uid + 1, 0, 0.0, s))
        fst.add_arc(s, k.StdArc(0, 0, 0.0, start))
    return fst


def lexicon_entries(symbols: SymbolTable, words: Sequence[str],
                    lexicon_path: Optional[str] = None) -> Tuple[List[Tuple[str, List[int]]], int]:
    """(word, unit ids) for every LM word that can be spelled; and how many cannot."""
    special = {"<s>", "</s>", "<unk>", "<eps>", "#0"}
    given: Dict[str, List[List[int]]] = {}
    if lexicon_path:
        with open(lexicon_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    raise ValueError(f"{lexicon_path}:{lineno}: expected 'word unit ...'")
                ids = [symbols.get(u) for u in parts[1:]]
                if None in ids:
                    raise ValueError(f"{lexicon_path}:{lineno}: unit "
                                     f"'{parts[1 + ids.index(None)]}' is not in units.txt")
                given.setdefault(parts[0], []).append(ids)
    out, dropped = [], 0
    for w in words:
        if w in special:
            continue
        if lexicon_path:
            prons = given.get(w)
            if not prons:
                dropped += 1
                continue
            out.extend((w, p) for p in prons)
            continue
        try:
            ids = tokenize_phrase(symbols, w)
        except ContextError:
            dropped += 1
            continue
        if ids:
            out.append((w, ids))
    return out, dropped


def make_lexicon_fst(entries: Sequence[Tuple[str, List[int]]], word_ids: Dict[str, int],
                     num_units: int):
    """L with disambiguation symbols; returns (fst, first disambiguation label).

    Input labels: unit id + 1, then #0 = num_units + 1, #1 = num_units + 2, ...;
    output labels: word ids of words.txt."""
    k = _kaldifst()
    seq_count: Dict[Tuple[int, ...], int] = defaultdict(int)
    prefixes = set()
    for _, ids in entries:
        seq_count[tuple(ids)] += 1
        for n in range(1, len(ids)):
            prefixes.add(tuple(ids[:n]))
    disambig0 = num_units + 1
    next_k: Dict[Tuple[int, ...], int] = defaultdict(int)
    fst = k.StdVectorFst()
    loop = fst.add_state()
    fst.start = loop
    fst.set_final(loop, 0.0)
    max_k = 0
    for word, ids in entries:
        labels = [u + 1 for u in ids]
        key = tuple(ids)
        if seq_count[key] > 1 or key in prefixes:
            next_k[key] += 1
            labels.append(disambig0 + next_k[key])
            max_k = max(max_k, next_k[key])
        src = loop
        for i, lab in enumerate(labels):
            dst = loop if i == len(labels) - 1 else fst.add_state()
            fst.add_arc(src, k.StdArc(lab, word_ids[word] if i == 0 else 0, 0.0, dst))
            src = dst
    fst.add_arc(loop, k.StdArc(disambig0, word_ids["#0"], 0.0, loop))
    return fst, disambig0


def _drop_disambig(fst, first: int):
    """A copy of `fst` whose input labels >= first become epsilon."""
    k = _kaldifst()
    out = k.StdVectorFst()
    for _ in k.StateIterator(fst):
        out.add_state()
    out.start = fst.start
    for state in k.StateIterator(fst):
        out.set_final(state, fst.final(state))
        for arc in k.ArcIterator(fst, state):
            ilabel = 0 if arc.ilabel >= first else arc.ilabel
            out.add_arc(state, k.StdArc(ilabel, arc.olabel, arc.weight, arc.nextstate))
    return out


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_tlg(units_path: str, arpa_path: str, graph_dir: str,
              lexicon_path: Optional[str] = None) -> Dict[str, int]:
    """Write graph_dir/TLG.fst and graph_dir/words.txt; returns sizes for the log."""
    k = _kaldifst()
    import kaldilm

    symbols = SymbolTable.read(units_path)
    words = arpa_words(arpa_path)
    vocab = [w for w in dict.fromkeys(words) if w not in ("<s>", "</s>", "#0", "<eps>")]
    table = ["<eps>"] + vocab + ["#0", "<s>", "</s>"]
    word_ids = {w: i for i, w in enumerate(table)}
    os.makedirs(graph_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=graph_dir) as tmp:
        words_tmp = os.path.join(tmp, "words.txt")
        with open(words_tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{w} {i}\n" for i, w in enumerate(table))
        g_path = os.path.join(tmp, "G.fst")
        kaldilm.arpa2fst(arpa_path, g_path, disambig_symbol="#0", read_symbol_table=words_tmp,
                         max_arpa_warnings=0)
        G = k.StdVectorFst.read(g_path)
        entries, dropped = lexicon_entries(symbols, vocab, lexicon_path)
        if not entries:
            raise ValueError(f"{arpa_path}: no LM word can be spelled with {units_path}")
        L, disambig0 = make_lexicon_fst(entries, word_ids, len(symbols))
        k.arcsort(L, sort_type="olabel")
        k.arcsort(G, sort_type="ilabel")
        LG = k.StdVectorFst(k.compose(L, G))
        k.determinize_star(LG, use_log=True)
        k.minimize_encoded(LG)
        LG = _drop_disambig(LG, disambig0)
        k.arcsort(LG, sort_type="ilabel")
        T = make_ctc_topo(symbols)
        k.arcsort(T, sort_type="olabel")
        TLG = k.StdVectorFst(k.compose(T, LG))
        k.arcsort(TLG, sort_type="ilabel")
        _atomic(os.path.join(graph_dir, "TLG.fst"), lambda p: TLG.write(p))
        _atomic(os.path.join(graph_dir, "words.txt"),
                lambda p: open(p, "w", encoding="utf-8").writelines(
                    f"{w} {i}\n" for i, w in enumerate(table)))
    return {"words": len(vocab), "dropped_words": dropped, "lexicon_entries": len(entries),
            "LG_states": LG.num_states, "TLG_states": TLG.num_states}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", required=True, help="units.txt of the model")
    p.add_argument("--arpa", required=True, help="ARPA n-gram LM (tools/train_ngram_lm.py)")
    p.add_argument("--graph_dir", required=True, help="writes TLG.fst and words.txt here")
    p.add_argument("--lexicon", default=None, help="word unit unit ... (default: spell words "
                   "with units.txt, characters for a character LM)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for path in (args.units, args.arpa) + ((args.lexicon,) if args.lexicon else ()):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file")
        sizes = build_tlg(args.units, args.arpa, args.graph_dir, args.lexicon)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"make_tlg.py: error: {exc}", file=sys.stderr)
        return 1
    logging.info("wrote %s/TLG.fst: %s", args.graph_dir, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
