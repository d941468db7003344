"""Whole-utterance decoding of a wav.scp with utterances batched (torch-free runtime).

    python bench/decode_batch.py --compare DENSE_EXPORT MOE_EXPORT --wav_scp wav.scp \
        [--batches 1,4,8,16] [--chunk 16] [--reps 3]

What `python -m wenet_moe_runtime.decode --batch_size B` does to the encoder: the
utterances (longest first) are encoded B at a time with `offline.encode_many`, each
step one `encoder_batch.onnx` call over the chunks of the utterances that still have
one. Prints the encoder RTF (best of `--reps` wall times / audio seconds; fbank
excluded, computed once) of each export per batch size, B / A per batch size, and
each export's speed-up over B = 1: an MoE reads each chosen expert once per step for
all B utterances instead of once per utterance.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe  # noqa: E402

from wenet_moe_runtime.decode import read_scp  # noqa: E402
from wenet_moe_runtime.model import OnnxAsrModel  # noqa: E402
from wenet_moe_runtime.offline import encode_many, utterance_fbank  # noqa: E402
from wenet_moe_runtime.wavio import read_wav  # noqa: E402


def encoder_rtf(model_dir: str, waves: List, batches: List[int], chunk: int, reps: int,
                threads: int) -> Dict[int, float]:
    """Encoder RTF of `model_dir` over `waves` per batch size."""
    model = OnnxAsrModel(model_dir, num_threads=threads, batch_encoder=True,
                         max_encoder_batch=max(batches))
    if not model.batched:
        raise SystemExit(f"{model_dir}: no encoder_batch.onnx (export it with the fp32 graphs)")
    rate = int(model.info.fbank.sample_rate)
    audio_s = sum(len(w) for w in waves) / rate
    feats = [utterance_fbank(model, w) for w in waves]
    out = {}
    for b in batches:
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            for first in range(0, len(feats), b):
                encode_many(model, feats[first: first + b], chunk)
            best = min(best, time.perf_counter() - start)
        out[b] = best / audio_s
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", nargs=2, required=True, metavar=("EXPORT_A", "EXPORT_B"))
    p.add_argument("--wav_scp", required=True)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max_utts", type=int, default=0, help="first N utterances (0: all)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    entries = read_scp(args.wav_scp)
    if args.max_utts > 0:
        entries = entries[: args.max_utts]
    waves = sorted((read_wav(path)[0] for _, path in entries), key=len, reverse=True)
    print(describe())
    print(f"{len(waves)} utterances of {args.wav_scp}, chunk {args.chunk}, {args.threads} thread(s); "
          f"encoder RTF (best of {args.reps})")
    rtf = {d: encoder_rtf(d, waves, batches, args.chunk, args.reps, args.threads) for d in args.compare}
    a, b = args.compare
    print(f"{'batch':>6} {'A':>9} {'B':>9} {'B/A':>6} {'A speed-up':>11} {'B speed-up':>11}")
    for n in batches:
        print(f"{n:6d} {rtf[a][n]:9.4f} {rtf[b][n]:9.4f} {rtf[b][n] / rtf[a][n]:6.2f} "
              f"{rtf[a][batches[0]] / rtf[a][n]:11.2f} {rtf[b][batches[0]] / rtf[b][n]:11.2f}")
    print(f"A = {a}\nB = {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
