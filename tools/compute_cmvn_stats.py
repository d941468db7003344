#!/usr/bin/env python3
"""Global CMVN statistics of a wav.scp, with the features a training config uses.

    compute_cmvn_stats.py --num_workers 2 --train_config conf/train.yaml \
        --in_scp data/train/wav.scp --out_cmvn data/train/global_cmvn

Writes WeNet's JSON of sums: {"mean_stat": [sum x_d], "var_stat": [sum x_d^2],
"frame_num": N}. Features are the runtime's `compute_fbank` with the options the
data pipeline derives from `dataset_conf` (dither forced to 0); audio at another
rate is resampled to `resample_conf.resample_rate`.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from typing import List, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_util import ToolError, atomic_output, read_key_value, run_tool  # noqa: E402


def fbank_options_from_config(configs: dict):
    """FbankOptions of `configs['dataset_conf']` (the data package's mapping), dither 0."""
    from wenet_moe.config import ConfigError
    from wenet_moe.data.features import fbank_options

    ds = configs.get("dataset_conf") or {}
    rate = (ds.get("resample_conf") or {}).get("resample_rate", 16000)
    try:
        opts = fbank_options(ds.get("fbank_conf"), sample_rate=int(rate))
    except ConfigError as e:
        raise ToolError(str(e)) from None
    opts.dither = 0.0
    return opts


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    """float32 (N,) mono samples in [-1, 1] at `sample_rate` Hz."""
    import soundfile as sf

    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own error type
        raise ToolError(f"{path}: cannot read audio ({str(e).splitlines()[0]})") from None
    x = x[:, 0]
    if sr != sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, sample_rate)
        x = resample_poly(x, sample_rate // g, sr // g).astype(np.float32)
    return x


def _stats(job: Tuple[List[str], dict]) -> Tuple[np.ndarray, np.ndarray, int]:
    from wenet_moe_runtime.features import FbankOptions, compute_fbank

    paths, opts_dict = job
    opts = FbankOptions.from_dict(opts_dict)
    s = np.zeros(opts.num_mel_bins, np.float64)
    ss = np.zeros(opts.num_mel_bins, np.float64)
    n = 0
    for p in paths:
        feats = compute_fbank(read_audio(p, opts.sample_rate), opts.sample_rate, opts).astype(np.float64)
        s += feats.sum(0)
        ss += (feats * feats).sum(0)
        n += feats.shape[0]
    return s, ss, n


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_workers", type=int, default=1, help="worker processes")
    p.add_argument("--train_config", required=True, help="training YAML (dataset_conf gives the features)")
    p.add_argument("--in_scp", required=True, help="Kaldi wav.scp")
    p.add_argument("--out_cmvn", required=True, help="output JSON (written atomically)")
    p.add_argument("--log_interval", type=int, default=0, help="unused, accepted for WeNet compatibility")
    return p


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    from wenet_moe.config import ConfigError, load_yaml

    if a.num_workers < 1:
        raise ToolError(f"--num_workers must be >= 1, got {a.num_workers}")
    try:
        configs = load_yaml(a.train_config)
    except ConfigError as e:
        raise ToolError(str(e)) from None
    opts = fbank_options_from_config(configs)
    entries = read_key_value(a.in_scp)
    if not entries:
        raise ToolError(f"{a.in_scp}: no utterances")
    for key, path in entries:
        if not os.path.isfile(path):
            raise ToolError(f"{a.in_scp}: wav of {key} not found: {path}")
    paths = [p for _, p in entries]
    n_jobs = min(len(paths), a.num_workers * 4)
    jobs = [(paths[i::n_jobs], opts.to_dict()) for i in range(n_jobs)]
    if a.num_workers > 1:
        with mp.get_context("fork").Pool(a.num_workers) as pool:
            parts = pool.map(_stats, jobs)
    else:
        parts = [_stats(j) for j in jobs]
    total = np.sum([p[0] for p in parts], axis=0)
    total_sq = np.sum([p[1] for p in parts], axis=0)
    frames = int(sum(p[2] for p in parts))
    if frames == 0:
        raise ToolError(f"{a.in_scp}: every utterance is shorter than one frame")
    with atomic_output(a.out_cmvn) as f:
        json.dump({"mean_stat": total.tolist(), "var_stat": total_sq.tolist(), "frame_num": frames}, f)
    print(f"compute_cmvn_stats.py: {len(paths)} utterances, {frames} frames -> {a.out_cmvn}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_tool(main, "compute_cmvn_stats.py")
