"""Top-level training keys of the YAML (WeNet names) and their checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable

import torch

from wenet_moe.config import ConfigError, check_keys

TRAIN_KEYS = ("max_epoch", "accum_grad", "grad_clip", "log_interval", "save_interval", "dtype", "seed")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainConf:
    """Top-level training keys of the YAML (WeNet names)."""
    max_epoch: int = 100
    accum_grad: int = 1
    grad_clip: float = 5.0
    log_interval: int = 100
    save_interval: int = 0      # optimizer steps between step checkpoints; 0 = epoch ends only
    dtype: str = "fp32"
    seed: int = 777

    @staticmethod
    def from_configs(configs: Dict[str, Any]) -> "TrainConf":
        conf = TrainConf()
        for key in TRAIN_KEYS:
            if key not in configs or configs[key] is None:
                continue
            value = configs[key]
            if key == "dtype":
                if value not in DTYPES:
                    raise ConfigError(f"'dtype' must be one of {', '.join(DTYPES)}, got {value!r}")
            elif key == "grad_clip":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ConfigError(f"'grad_clip' must be a positive number, got {value!r}")
                value = float(value)
            else:
                minimum = 1 if key in ("max_epoch", "accum_grad", "log_interval") else 0
                if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                    raise ConfigError(f"'{key}' must be an integer >= {minimum}, got {value!r}")
            setattr(conf, key, value)
        return conf


def check_train_conf(configs: Dict[str, Any], allowed_top: Iterable[str]) -> TrainConf:
    """Check the top-level keys of a config and parse its training keys."""
    check_keys(configs, allowed_top, "")
    return TrainConf.from_configs(configs)
