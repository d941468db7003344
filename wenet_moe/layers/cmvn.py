"""Global CMVN: the statistics files and the module that applies them in the encoder.

Two file formats (WeNet's):
- JSON of sums: `{"mean_stat": [sum x_d], "var_stat": [sum x_d^2], "frame_num": N}`;
- Kaldi text matrix (2, D+1): row 0 = sums + frame count, row 1 = sums of squares
  (+ a trailing 0), e.g. the output of `compute-cmvn-stats` with `--binary=false`.

mean = sum / N, var = max(sumsq / N - mean^2, 1e-20), istd = 1 / sqrt(var).
"""
from __future__ import annotations

import json
import math
from typing import List, Tuple, Union

import numpy as np
import torch
from torch import nn

from wenet_moe.config import ConfigError

VAR_FLOOR = 1.0e-20


def _stats_to_mean_istd(path: str, sums: List[float], sumsq: List[float],
                        count: float) -> Tuple[np.ndarray, np.ndarray]:
    if len(sums) == 0:
        raise ConfigError(f"{path}: CMVN statistics are empty")
    if len(sums) != len(sumsq):
        raise ConfigError(f"{path}: CMVN mean and variance statistics differ in length "
                          f"({len(sums)} vs {len(sumsq)})")
    if not math.isfinite(count) or count <= 0:
        raise ConfigError(f"{path}: CMVN frame count must be positive, got {count}")
    s = np.asarray(sums, dtype=np.float64)
    sq = np.asarray(sumsq, dtype=np.float64)
    if not (np.isfinite(s).all() and np.isfinite(sq).all()):
        raise ConfigError(f"{path}: CMVN statistics contain non-finite values")
    mean = s / count
    var = np.maximum(sq / count - mean * mean, VAR_FLOOR)
    return mean, 1.0 / np.sqrt(var)


def _load_json(path: str, text: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid CMVN JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: CMVN JSON must be an object")
    for key in ("mean_stat", "var_stat", "frame_num"):
        if key not in data:
            raise ConfigError(f"{path}: CMVN JSON lacks '{key}'")
    try:
        sums = [float(v) for v in data["mean_stat"]]
        sumsq = [float(v) for v in data["var_stat"]]
        count = float(data["frame_num"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: CMVN JSON has a non-numeric statistic") from e
    return _stats_to_mean_istd(path, sums, sumsq, count)


def _load_kaldi_text(path: str, text: str) -> Tuple[np.ndarray, np.ndarray]:
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ConfigError(f"{path}: not a Kaldi text CMVN matrix (expected '[ ... ]'; "
                          f"binary Kaldi files are not read, use --binary=false)")
    rows = [line.split() for line in body[1:-1].strip().splitlines() if line.strip()]
    if len(rows) != 2:
        raise ConfigError(f"{path}: Kaldi CMVN matrix must have 2 rows, got {len(rows)}")
    try:
        row0 = [float(v) for v in rows[0]]
        row1 = [float(v) for v in rows[1]]
    except ValueError as e:
        raise ConfigError(f"{path}: Kaldi CMVN matrix has a non-numeric entry") from e
    if len(row0) < 2 or len(row0) != len(row1):
        raise ConfigError(f"{path}: Kaldi CMVN rows must have the same length >= 2 "
                          f"(got {len(row0)} and {len(row1)})")
    return _stats_to_mean_istd(path, row0[:-1], row1[:-1], row0[-1])


def load_cmvn(path: str, is_json: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Read a global CMVN file; returns (mean (D,), istd (D,)) float64 arrays.

    Raises ConfigError naming the file on a missing or malformed file.
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read CMVN file: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: CMVN file is not text (binary Kaldi files are not "
                          f"read, use --binary=false)") from e
    return _load_json(path, text) if is_json else _load_kaldi_text(path, text)


class GlobalCMVN(nn.Module):
    """(x - mean) * istd per feature dim; x (B, T, D) -> (B, T, D).

    Args:
        mean, istd: (D,) arrays or tensors (stored as float32 buffers `mean`, `istd`).
        norm_var: multiply by istd (False: subtract the mean only).
    """

    def __init__(self, mean: Union[np.ndarray, torch.Tensor],
                 istd: Union[np.ndarray, torch.Tensor], norm_var: bool = True):
        super().__init__()
        mean_t = torch.as_tensor(np.asarray(mean) if not torch.is_tensor(mean) else mean)
        istd_t = torch.as_tensor(np.asarray(istd) if not torch.is_tensor(istd) else istd)
        if mean_t.shape != istd_t.shape or mean_t.dim() != 1:
            raise ValueError(f"CMVN mean and istd must be 1-D of equal size, got "
                             f"{tuple(mean_t.shape)} and {tuple(istd_t.shape)}")
        self.norm_var = norm_var
        self.register_buffer("mean", mean_t.float())
        self.register_buffer("istd", istd_t.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.mean
        if self.norm_var:
            x = x * self.istd
        return x
