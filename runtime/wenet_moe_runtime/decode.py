"""Decode a Kaldi `wav.scp` with an export (the recipe's runtime stage).

    python -m wenet_moe_runtime.decode --model_dir DIR --wav_scp wav.scp \
        --result text [--mode attention_rescoring] [--chunk_size 16] [--int8] \
        [--context_path hotwords.txt --context_score 3.0] [--batch_size 8]

Writes `key text` lines in wav.scp order (atomically: temporary name, then rename).
A wav that cannot be read is skipped (no line) with a one-line warning naming it, and
the count is reported at the end; a sample rate other than the model's is an error.
With `--batch_size N > 1` the utterances are decoded N at a time, longest files
first, their encoder chunks advanced together through `encoder_batch.onnx` (fp32
exports that have it): an MoE layer then reads each chosen expert once per step
for all N utterances. Results equal those of `--batch_size 1` up to the float
rounding of the batched sums.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional, Tuple

from . import encoder_choice
from .context import add_context_arguments, context_from_args
from .decoder import MODES, DecodeOptions
from .model import ModelError, OnnxAsrModel
from .offline import decode_many
from .wavio import read_wav

ALIASES = {"ctc_greedy_search": "ctc_greedy", "ctc_prefix_beam_search": "ctc_prefix_beam",
           "ctc_wfst": "ctc_prefix_beam", "ctc_wfst_rescoring": "attention_rescoring"}


def read_scp(path: str) -> List[Tuple[str, str]]:
    """`key path` lines; a malformed line raises ValueError naming file and line."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'key wav_path', got {line!r}")
            entries.append((parts[0], parts[1]))
    return entries


def _file_size(path: str) -> int:
    """Bytes of `path` (0 when it cannot be read: read_wav then names the problem)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_dir", required=True, help="directory of the ONNX export")
    parser.add_argument("--wav_scp", required=True, help="Kaldi wav.scp (key path)")
    parser.add_argument("--result", required=True, help="output text file (key text)")
    parser.add_argument("--mode", default="attention_rescoring", choices=MODES + tuple(ALIASES),
                        help="search; WeNet's names ctc_greedy_search and "
                             "ctc_prefix_beam_search are accepted too")
    parser.add_argument("--chunk_size", type=int, default=0,
                        help="decoding chunk (encoder frames); 0: the export's")
    parser.add_argument("--beam_size", type=int, default=10)
    parser.add_argument("--ctc_weight", type=float, default=0.5)
    parser.add_argument("--rescoring_weight", type=float, default=1.0)
    parser.add_argument("--reverse_weight", type=float, default=None,
                        help="R2L decoder weight; default: the export's")
    parser.add_argument("--int8", action="store_true", help="use the *.int8.onnx models")
    parser.add_argument("--num_threads", type=int, default=1)
    encoder_choice.add_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=1,
                        help="utterances decoded together (their encoder chunks in one "
                             "encoder_batch.onnx call; fp32 exports that have it)")
    add_context_arguments(parser)
    add_lm_arguments(parser)


def add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """--lm / --graph_dir and the WFST search options (shared with the server)."""
    from .wfst import add_wfst_arguments
    parser.add_argument("--lm", default="on", choices=["on", "off"],
                        help="on: decode with TLG.fst + words.txt when the graph directory "
                             "holds them (ctc_prefix_beam -> graph 1-best, attention_rescoring "
                             "-> rescored graph n-best)")
    parser.add_argument("--graph_dir", default=None,
                        help="directory of TLG.fst + words.txt (default: --model_dir)")
    add_wfst_arguments(parser)


def lm_from_args(args: argparse.Namespace, model_dir: str, symbols, mode: str):
    """The WfstDecoder to use, or None (`--lm off`, or no graph in the model dir)."""
    from .wfst import has_graph, wfst_from_args
    wants = mode in ("ctc_wfst", "ctc_wfst_rescoring")
    if args.lm == "off":
        if wants:
            raise ValueError(f"--mode {mode} needs --lm on")
        return None
    if mode in ("ctc_greedy", "ctc_greedy_search") and not args.graph_dir:
        return None  # greedy search never uses the graph found in the model dir
    graph_dir = args.graph_dir or model_dir
    if not has_graph(graph_dir):
        if args.graph_dir or wants:
            raise ValueError(f"{graph_dir}: no TLG.fst and words.txt")
        return None
    return wfst_from_args(args, graph_dir, symbols)


def main(args: argparse.Namespace) -> int:
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        model = OnnxAsrModel(args.model_dir, int8=args.int8, num_threads=args.num_threads,
                             batch_encoder=args.batch_size > 1, max_encoder_batch=args.batch_size,
                             kernel_experts=encoder_choice.from_arguments(args))
        if args.batch_size > 1 and not model.batched:
            print(f"note: {args.model_dir} has no {'fp32 ' if args.int8 else ''}batched encoder "
                  "(encoder_batch.onnx); utterances run one by one", file=sys.stderr)
        opts = DecodeOptions(chunk_size=args.chunk_size, beam_size=args.beam_size,
                             mode=ALIASES.get(args.mode, args.mode), ctc_weight=args.ctc_weight,
                             rescoring_weight=args.rescoring_weight,
                             reverse_weight=args.reverse_weight,
                             context=context_from_args(args, model.symbols),
                             wfst=lm_from_args(args, args.model_dir, model.symbols, args.mode))
        entries = read_scp(args.wav_scp)
        rate = int(model.info.fbank.sample_rate)
        order = list(range(len(entries)))
        if args.batch_size > 1:     # similar lengths together: less padding, fuller steps
            order.sort(key=lambda i: -_file_size(entries[i][1]))
        texts: List[Optional[str]] = [None] * len(entries)
        skipped = 0
        for first in range(0, len(order), args.batch_size):
            group, waves = [], []
            for i in order[first: first + args.batch_size]:
                try:
                    samples, sr = read_wav(entries[i][1])
                except (ValueError, OSError) as exc:
                    print(f"warning: {entries[i][0]}: skipped: {exc}", file=sys.stderr)
                    skipped += 1
                    continue
                if sr != rate:
                    raise ValueError(f"{entries[i][1]}: sample rate {sr} Hz, the model expects {rate} Hz")
                group.append(i)
                waves.append(samples)
            for i, nbest in zip(group, decode_many(model, waves, opts)):
                texts[i] = nbest[0]["sentence"]
        if skipped:
            print(f"warning: {skipped} of {len(entries)} wavs could not be read and were skipped",
                  file=sys.stderr)
        lines = [f"{key} {text}".rstrip() + "\n" for (key, _), text in zip(entries, texts)
                 if text is not None]
    except (ModelError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    folder = os.path.dirname(os.path.abspath(args.result))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, args.result)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return 0


def cli(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wenet_moe_runtime.decode",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
