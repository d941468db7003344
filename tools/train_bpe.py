#!/usr/bin/env python3
"""Train a sentencepiece model and write the matching `units.txt`.

    train_bpe.py --input text --vocab_size 500 --model_prefix data/lang/bpe --units data/lang/units.txt

Writes PREFIX.model, PREFIX.vocab and UNITS (`<blank> 0`, `<unk> 1`, the
pieces, `<sos/eos>` last). `--has_key` reads Kaldi `text` (`key transcript`).
`--mixed` is for Mandarin text with English words (`tokenizer: char` with
`tokenizer_conf.bpe_path`): the model is trained on the uppercased Latin words
only, and every CJK character of the text becomes a unit as well.
Every output is written under a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime"))

from wenet_moe_runtime.symbols import SymbolTable, is_cjk, is_word_char  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_util import ToolError, read_transcripts  # noqa: E402


class BpeToolError(ToolError):
    pass


def read_sentences(path: str, has_key: bool) -> List[str]:
    out = read_transcripts(path, has_key, keyed_without_text="error")
    if not out:
        raise BpeToolError(f"{path}: no text")
    return out


def latin_words(sentence: str) -> List[str]:
    """Uppercased runs of Latin letters/digits (the char tokenizer's words)."""
    words, cur = [], ""
    for ch in sentence:
        if is_word_char(ch):
            cur += ch
        else:
            if cur:
                words.append(cur.upper())
            cur = ""
    if cur:
        words.append(cur.upper())
    return words


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="training text, one sentence per line")
    p.add_argument("--vocab_size", type=int, required=True, help="sentencepiece vocabulary size")
    p.add_argument("--model_prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--units", required=True, help="output units.txt")
    p.add_argument("--has_key", action="store_true", help="lines are 'key transcript' (Kaldi text)")
    p.add_argument("--mixed", action="store_true", help="Mandarin + English: BPE over Latin words, CJK chars as units")
    p.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--character_coverage", type=float, default=1.0)
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    import sentencepiece as spm

    if args.vocab_size < 3:
        raise BpeToolError(f"--vocab_size must be at least 3, got {args.vocab_size}")
    sentences = read_sentences(args.input, args.has_key)
    if args.mixed:
        corpus = [" ".join(latin_words(s)) for s in sentences]
        corpus = [c for c in corpus if c]
        if not corpus:
            raise BpeToolError(f"{args.input}: --mixed, but the text has no Latin words")
    else:
        corpus = sentences
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".train_bpe.", dir=out_dir)
    try:
        text_path = os.path.join(tmp_dir, "corpus.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write("\n".join(corpus) + "\n")
        tmp_prefix = os.path.join(tmp_dir, "m")
        try:
            spm.SentencePieceTrainer.Train(
                input=text_path, model_prefix=tmp_prefix, vocab_size=args.vocab_size,
                model_type=args.model_type, character_coverage=args.character_coverage,
                unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, input_sentence_size=10000000,
                shuffle_input_sentence=True, minloglevel=2)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else "training failed"
            raise BpeToolError(f"sentencepiece: {msg}") from None
        sp = spm.SentencePieceProcessor()
        sp.Load(tmp_prefix + ".model")
        units = ["<blank>", "<unk>"]
        seen = set(units)
        for i in range(sp.GetPieceSize()):
            piece = sp.IdToPiece(i)
            if sp.IsUnknown(i) or sp.IsControl(i) or piece in seen:
                continue
            units.append(piece)
            seen.add(piece)
        if args.mixed:
            chars = sorted({ch for s in sentences for ch in s if is_cjk(ch)})
            for ch in chars:
                if ch not in seen:
                    units.append(ch)
                    seen.add(ch)
        units.append("<sos/eos>")
        table = SymbolTable(units)
        table.write(os.path.join(tmp_dir, "units.txt"))
        os.makedirs(os.path.dirname(os.path.abspath(args.units)), exist_ok=True)
        os.replace(tmp_prefix + ".model", args.model_prefix + ".model")
        os.replace(tmp_prefix + ".vocab", args.model_prefix + ".vocab")
        shutil.move(os.path.join(tmp_dir, "units.txt"), args.units)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"{args.model_prefix}.model: {sp.GetPieceSize()} pieces; {args.units}: {len(units)} units")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ToolError, OSError) as e:
        print(f"train_bpe.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
