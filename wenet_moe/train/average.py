"""Checkpoint averaging: the last N epoch checkpoints, or the best N by cv loss.

Epoch checkpoints are `src_path/N.pt` with `src_path/N.yaml` (cv_loss, step, epoch, lr)
beside them. The averaged model is written as a plain model state dict.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from wenet_moe.config import ConfigError, load_yaml
from wenet_moe.checkpoint_io import extract_state_dict, load_checkpoint
from wenet_moe.train.checkpoint import atomic_torch_save

_EPOCH_FILE = re.compile(r"^(\d+)\.pt$")


def list_epoch_checkpoints(src_path: str) -> List[Tuple[int, str]]:
    """(epoch, path) of every `N.pt` in `src_path`, sorted by epoch."""
    if not os.path.isdir(src_path):
        raise FileNotFoundError(f"{src_path}: not a directory")
    found = []
    for path in glob.glob(os.path.join(src_path, "*.pt")):
        m = _EPOCH_FILE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def select_checkpoints(src_path: str, num: int, val_best: bool = False,
                       min_epoch: int = 0, max_epoch: int = 1 << 30) -> List[str]:
    """Paths of the checkpoints to average.

    Args:
        num: how many.
        val_best: pick the N with the lowest `cv_loss` in `N.yaml` (ties: later epoch);
            otherwise the last N epochs.
        min_epoch, max_epoch: inclusive epoch range considered.
    """
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    cands = [(e, p) for e, p in list_epoch_checkpoints(src_path) if min_epoch <= e <= max_epoch]
    if not cands:
        raise FileNotFoundError(f"{src_path}: no epoch checkpoints N.pt in epochs [{min_epoch}, {max_epoch}]")
    if val_best:
        scored = []
        for epoch, path in cands:
            ypath = os.path.join(src_path, f"{epoch}.yaml")
            if not os.path.isfile(ypath):
                raise FileNotFoundError(f"{ypath}: missing (needed by --val_best)")
            info = load_yaml(ypath)
            loss = info.get("cv_loss")
            if not isinstance(loss, (int, float)):
                raise ConfigError(f"{ypath}: field 'cv_loss' missing or not a number")
            scored.append((float(loss), -epoch, path))
        scored.sort()
        chosen = [p for _, _, p in scored[:num]]
    else:
        chosen = [p for _, p in cands[-num:]]
    if len(chosen) < num:
        raise FileNotFoundError(f"{src_path}: asked for {num} checkpoints, found {len(chosen)}")
    return chosen


def average_state_dicts(paths: List[str]) -> Dict[str, torch.Tensor]:
    """Element-wise mean of the model weights in `paths` (float64 accumulation).

    Floating tensors are averaged and cast back to their dtype; integer tensors (e.g.
    BatchNorm's num_batches_tracked) are summed then floor-divided, as WeNet does.
    """
    if not paths:
        raise ValueError("no checkpoints to average")
    total: Optional[Dict[str, torch.Tensor]] = None
    dtypes: Dict[str, torch.dtype] = {}
    for path in paths:
        sd = extract_state_dict(load_checkpoint(path), path)
        if total is None:
            total = {}
            for k, v in sd.items():
                dtypes[k] = v.dtype
                total[k] = v.detach().to(torch.float64 if v.is_floating_point() else v.dtype).clone()
            continue
        if set(sd) != set(total):
            diff = sorted(set(sd) ^ set(total))
            raise ValueError(f"{path}: keys differ from {paths[0]} (e.g. {diff[0]})")
        for k, v in sd.items():
            if v.shape != total[k].shape:
                raise ValueError(f"{path}: '{k}' has shape {tuple(v.shape)}, expected {tuple(total[k].shape)}")
            total[k] += v.detach().to(total[k].dtype)
    assert total is not None
    n = len(paths)
    out = {}
    for k, v in total.items():
        if v.is_floating_point():
            out[k] = (v / n).to(dtypes[k])
        else:
            out[k] = torch.div(v, n, rounding_mode="floor").to(dtypes[k])
    return out


def average_checkpoints(dst_model: str, src_path: str, num: int, val_best: bool = False,
                        min_epoch: int = 0, max_epoch: int = 1 << 30) -> List[str]:
    """Average the selected checkpoints into `dst_model` (atomic); returns the sources."""
    paths = select_checkpoints(src_path, num, val_best, min_epoch, max_epoch)
    atomic_torch_save(average_state_dicts(paths), dst_model)
    return paths
