"""Encoder cost per stream-chunk with cross-stream batching (torch-free runtime).

    python bench/batch_encoder.py --compare DENSE_EXPORT MOE_EXPORT [--batches 1,4,8,16]

For each export and batch size B it advances B streams by one chunk with
`OnnxAsrModel.forward_encoder_chunks` (one `encoder_batch.onnx` call; B = 1 is a
batch of one, as the server runs a lone stream; `single` runs `encoder.onnx`) from a
history of `--history_chunks` chunks, and prints milliseconds of CPU time per
stream-chunk (process CPU time, which other load on the machine only delays), medians
of repetitions interleaved across both exports, and the ratio B / A per batch size:
the MoE's chunk-16 cost against Dense-S's as its experts are read once per batch
instead of once per stream. Exports from `bench/server_load.py --random_export CONFIG
DIR --export_only`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

from wenet_moe_runtime.model import OnnxAsrModel


def make_states(model: OnnxAsrModel, n: int, history_chunks: int, chunk: int, seed: int):
    """n streams, each advanced `history_chunks` chunks (stream by stream) from random
    features; returns (windows of their next chunk, states)."""
    rng = np.random.default_rng(seed)
    info = model.info
    window = (chunk - 1) * info.subsampling_rate + info.right_context + 1
    bins = info.fbank.num_mel_bins
    states = []
    for _ in range(n):
        st = model.new_state(chunk)
        for _ in range(history_chunks):
            model.forward_encoder_chunk(rng.standard_normal((window, bins)).astype(np.float32), st)
        states.append(st)
    windows = [rng.standard_normal((window, bins)).astype(np.float32) for _ in range(n)]
    return windows, states


def copy_state(st):
    import copy
    return copy.copy(st)


def cases(model: OnnxAsrModel, solo: OnnxAsrModel, batches: List[int], history_chunks: int,
          seed: int) -> Dict[str, Tuple[Callable[[], None], int]]:
    """name -> (call, streams it advances): 'single' (`solo`'s encoder.onnx per stream,
    B streams) and 'B=b' (one call of `model`'s batched graph over b streams; b = 1: a
    batch of one, as the server runs a lone stream)."""
    chunk = model.info.chunk_size if model.info.chunk_size > 0 else 16
    top = max(batches)
    windows, states = make_states(model, top, history_chunks, chunk, seed)
    fns: Dict[str, Tuple[Callable[[], None], int]] = {}

    def single():
        for w, st in zip(windows, states):
            solo.forward_encoder_chunk(w, copy_state(st))
    fns["single"] = (single, top)
    for b in batches:
        def batched(b=b):
            model.forward_encoder_chunks(windows[:b], [copy_state(st) for st in states[:b]])
        fns[f"B={b}"] = (batched, b)
    return fns


def measure(exports: List[Dict[str, Tuple[Callable[[], None], int]]], reps: int
            ) -> List[Dict[str, float]]:
    """CPU ms per stream-chunk of every case of every export (`cases`), medians of `reps`
    rounds; each round runs every case of every export once, in an order rotated from
    round to round, so that the machine's drift (tens of per cent within a minute on a
    shared VM) falls on all of them alike (timing the exports one after the other put
    up to 20 % between two copies of the same export)."""
    names = [(i, k) for i, fns in enumerate(exports) for k in fns]
    for i, k in names:   # warm-up
        exports[i][k][0]()
    samples: Dict[Tuple[int, str], List[float]] = {n: [] for n in names}
    for rep in range(reps):
        shift = rep % len(names)
        for i, k in names[shift:] + names[:shift]:
            fn, streams = exports[i][k]
            t0 = time.process_time()
            fn()
            samples[(i, k)].append(1000.0 * (time.process_time() - t0) / streams)
    return [{k: statistics.median(samples[(i, k)]) for k in fns} for i, fns in enumerate(exports)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", nargs=2, metavar=("EXPORT_A", "EXPORT_B"), required=True)
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--history_chunks", type=int, default=4,
                   help="chunks each stream ran before the measured one")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe
    print(describe(), flush=True)
    batches = [int(x) for x in args.batches.split(",")]
    exports = []
    for d in args.compare:
        model = OnnxAsrModel(d, num_threads=args.threads, max_encoder_batch=max(batches),
                             batch_encoder=True)
        solo = OnnxAsrModel(d, num_threads=args.threads)
        if not model.batched:
            print(f"{d}: no encoder_batch.onnx: re-export it", file=sys.stderr)
            return 1
        exports.append(cases(model, solo, batches, args.history_chunks, 0))
    a, b = measure(exports, args.reps)
    print(f"\nA = {args.compare[0]}\nB = {args.compare[1]}")
    chunk = OnnxAsrModel(args.compare[0], batch_encoder=False).info.chunk_size
    print(f"encoder CPU ms per stream-chunk (chunk {chunk}, "
          f"history {args.history_chunks} chunks, {args.threads} thread(s), median of {args.reps})")
    print("| call | A | B | B / A | A vs its single | B vs its single |")
    print("|---|---|---|---|---|---|")
    for k in a:
        print(f"| {k} | {a[k]:.2f} | {b[k]:.2f} | {b[k] / a[k]:.2f} | "
              f"{a[k] / a['single']:.2f} | {b[k] / b['single']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
