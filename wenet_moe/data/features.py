"""Toolkit side of feature extraction: `dataset_conf.fbank_conf` -> `FbankOptions`.

The computation itself lives in the torch-free runtime
(`wenet_moe_runtime.features`), so training and serving cannot drift apart.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from wenet_moe.config import ConfigError, check_keys
from wenet_moe_runtime.features import FbankOptions, OnlineFbank, compute_fbank  # noqa: F401

# WeNet's keys, plus the options that must match the runtime (sherpa-onnx).
FBANK_KEYS = ("num_mel_bins", "frame_shift", "frame_length", "dither", "snip_edges",
              "high_freq", "low_freq", "window_type", "energy_floor", "preemph_coeff",
              "remove_dc_offset")


def fbank_options(fbank_conf: Optional[Dict[str, Any]], sample_rate: int = 16000,
                  where: str = "dataset_conf.fbank_conf") -> FbankOptions:
    """Build `FbankOptions` from a WeNet-style `fbank_conf` (missing keys: defaults).

    `frame_shift`/`frame_length` are in ms, as in WeNet. Unknown keys raise
    ConfigError naming `<where>.<key>`.
    """
    conf = dict(fbank_conf or {})
    check_keys(conf, FBANK_KEYS, where)
    kw: Dict[str, Any] = {"sample_rate": int(sample_rate)}
    rename = {"frame_shift": "frame_shift_ms", "frame_length": "frame_length_ms"}
    for k, v in conf.items():
        kw[rename.get(k, k)] = v
    try:
        return FbankOptions.from_dict(kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def fbank_tensor(waveform: torch.Tensor, sample_rate: int, opts: FbankOptions,
                 rng: Optional[np.random.Generator] = None) -> torch.Tensor:
    """Fbank of a float waveform tensor (N,) or (1, N) in [-1, 1] -> float32 (T, bins)."""
    x = waveform.detach().to(torch.float32).reshape(-1).cpu().numpy()
    return torch.from_numpy(compute_fbank(x, sample_rate, opts, rng=rng))
