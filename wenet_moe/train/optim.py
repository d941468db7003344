"""Optimizers by config name: `optim: adam|adamw` with `optim_conf`."""
from __future__ import annotations

from typing import Any, Dict

import torch

from wenet_moe.config import ConfigError, check_keys

OPTIM_KEYS = ("lr", "weight_decay", "betas", "eps", "amsgrad")


def build_optimizer(model: torch.nn.Module, name: str, conf: Dict[str, Any]) -> torch.optim.Optimizer:
    """Adam or AdamW over the trainable parameters of `model`.

    `optim_conf` keys: lr (default 0.001), weight_decay (adam 0, adamw 0.01),
    betas ([0.9, 0.98] default, as WeNet's recipes), eps (1e-8), amsgrad (false).
    torch's fused implementation where every parameter allows it (same update).
    """
    conf = dict(conf or {})
    table = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in table:
        raise ConfigError(f"unknown optim '{name}' (choose from {', '.join(table)})")
    check_keys(conf, OPTIM_KEYS, "optim_conf")
    lr = conf.get("lr", 0.001)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"'optim_conf.lr' must be a positive number, got {lr!r}")
    betas = conf.get("betas", [0.9, 0.98])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"'optim_conf.betas' must be two numbers in [0, 1), got {betas!r}")
    wd = conf.get("weight_decay", 0.01 if name == "adamw" else 0.0)
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0:
        raise ConfigError(f"'optim_conf.weight_decay' must be a number >= 0, got {wd!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused kernel (one pass over each tensor; ~4x the default per-tensor loop on
    # the CPU, which matters for an MoE's several-times-larger parameter set) where it
    # applies: plain floating-point CPU / CUDA tensors (not FSDP's sharded DTensors)
    fused = bool(params) and all(type(p.data) is torch.Tensor and p.is_floating_point()
                                 and p.device.type in ("cpu", "cuda") for p in params)
    return table[name](params, lr=float(lr), betas=tuple(float(b) for b in betas),
                       eps=float(conf.get("eps", 1e-8)), weight_decay=float(wd),
                       amsgrad=bool(conf.get("amsgrad", False)), fused=fused or None)
