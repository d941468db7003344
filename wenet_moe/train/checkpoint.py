"""Training checkpoints: atomic writes, RNG states, the checkpoint dict.

A training checkpoint (`N.pt` after epoch N, `step_S.pt` after optimizer step S) is a
dict: `model` (state dict), `optimizer`, `scheduler`, `scaler`, `rng` (python, numpy,
torch, cuda), `rng_epoch_start` (the same states captured just before the epoch's data
iterator was created), `epoch`, `step`, `batch_idx` (batches consumed in `epoch`),
`epoch_done`. An averaged checkpoint is a plain model state dict. Reading any of them
(`load_model_weights`, `load_checkpoint`) lives in `wenet_moe.checkpoint_io`, below
both this package and the model package.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

from wenet_moe.checkpoint_io import unwrap_model


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same directory, then rename onto `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(model_dir: str) -> list:
    """Delete `.tmp.*` files that a killed run left in `model_dir` (the temporary
    names of `atomic_torch_save`, `save_yaml` and `link_or_copy`; never read as
    checkpoints). Returns the removed paths."""
    removed = []
    if os.path.isdir(model_dir):
        for name in sorted(os.listdir(model_dir)):
            path = os.path.join(model_dir, name)
            if name.startswith(".tmp.") and (os.path.isfile(path) or os.path.islink(path)):
                os.unlink(path)
                removed.append(path)
    return removed


def capture_rng() -> Dict[str, Any]:
    """States of python's, numpy's, torch's (and CUDA's) global generators."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def link_or_copy(src: str, dst: str) -> None:
    """Point `dst` at `src` (relative symlink in the same dir, else a copy), atomically."""
    d = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(d, f".tmp.{os.path.basename(dst)}.{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        if os.path.dirname(os.path.abspath(src)) == d:
            os.symlink(os.path.basename(src), tmp)
        else:
            shutil.copyfile(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def make_checkpoint(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    scheduler: Any, scaler: Any, epoch: int, step: int, batch_idx: int,
                    epoch_done: bool, rng_epoch_start: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint dict described in the module docstring."""
    ckpt: Dict[str, Any] = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": capture_rng(),
        "rng_epoch_start": rng_epoch_start,
        "epoch": int(epoch),
        "step": int(step),
        "batch_idx": int(batch_idx),
        "epoch_done": bool(epoch_done),
    }
    if extra:
        ckpt.update(extra)
    return ckpt
