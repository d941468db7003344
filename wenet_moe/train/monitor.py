"""What a training run reports: progress bar, log lines, TensorBoard scalars.

The progress bar (tqdm, stderr) is shown only on rank 0 and only when stderr is a
terminal; TensorBoard is written only on rank 0 when a directory is given.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Dict, Optional

import torch

logger = logging.getLogger("wenet_moe.train")


def scalar_parts(out: Dict[str, object]) -> Dict[str, float]:
    """Scalar entries (`loss`, `loss_ctc`, `th_accuracy`, aux losses) of a model output dict."""
    parts = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            parts[k] = float(v.detach().float().item())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            parts[k] = float(v)
    return parts


def moe_entropies(model: torch.nn.Module) -> Dict[str, float]:
    """Per-layer expert-load entropy (nats) of the last forward; {} for dense models."""
    fn = getattr(model, "expert_load", None)
    loads = None
    try:
        from wenet_moe.layers import moe as moe_mod  # type: ignore
    except ImportError:
        return {}
    if callable(fn):
        loads = fn()
    elif hasattr(moe_mod, "expert_load"):
        loads = moe_mod.expert_load(model)
    if not loads or not hasattr(moe_mod, "expert_load_entropy"):
        return {}
    return {k: float(v) for k, v in moe_mod.expert_load_entropy(loads).items()}


class Monitor:
    """Progress bar per epoch and scalar logging for one process."""

    def __init__(self, rank: int = 0, tensorboard_dir: Optional[str] = None, show_bar: Optional[bool] = None):
        self.rank = rank
        if show_bar is None:
            show_bar = sys.stderr.isatty()
        self.show_bar = bool(show_bar) and rank == 0
        self.writer = None
        if tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(tensorboard_dir)
        self._bar = None
        self._t0 = 0.0
        self._frames = 0

    # --- per epoch progress -------------------------------------------------------
    def start_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self._t0 = time.monotonic()
        self._frames = 0
        if self.show_bar:
            from tqdm import tqdm
            self._bar = tqdm(desc=f"epoch {epoch}", initial=first_batch, file=sys.stderr,
                             dynamic_ncols=True, leave=True)

    def batch_done(self, frames: int, loss: float, lr: float) -> None:
        """Account one batch (`frames`: input feature frames in it, before subsampling)."""
        self._frames += int(frames)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", fps=f"{self.frames_per_second():.0f}",
                                  refresh=False)

    def frames_per_second(self) -> float:
        dt = time.monotonic() - self._t0
        return self._frames / dt if dt > 0 else 0.0

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # --- scalars ------------------------------------------------------------------
    def log_step(self, epoch: int, step: int, lr: float, grad_norm: float,
                 parts: Dict[str, float], entropies: Dict[str, float]) -> None:
        if self.rank != 0:
            return
        text = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
        logger.info("epoch %d step %d lr %.3e grad_norm %.3f %s fps %.0f", epoch, step, lr, grad_norm, text,
                    self.frames_per_second())
        if self.writer is not None:
            for k, v in parts.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.add_scalar("train/lr", lr, step)
            if math.isfinite(grad_norm):
                self.writer.add_scalar("train/grad_norm", grad_norm, step)
            for layer, h in entropies.items():
                self.writer.add_scalar(f"moe_entropy/{layer}", h, step)

    def log_epoch(self, epoch: int, step: int, cv_parts: Dict[str, float], train_parts: Dict[str, float],
                  skipped: Dict[str, int], entropies: Dict[str, float]) -> None:
        if self.rank != 0:
            return
        cv_text = " ".join(f"{k} {v:.4f}" for k, v in cv_parts.items())
        tr_text = " ".join(f"{k} {v:.4f}" for k, v in train_parts.items())
        logger.info("epoch %d done at step %d: cv %s | train %s", epoch, step, cv_text, tr_text)
        logger.info("epoch %d skipped data: %s", epoch,
                    ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none")
        if self.writer is not None:
            for k, v in cv_parts.items():
                self.writer.add_scalar(f"cv/{k}", v, epoch)
            for k, v in train_parts.items():
                self.writer.add_scalar(f"train_epoch/{k}", v, epoch)
            for k, v in skipped.items():
                self.writer.add_scalar(f"skipped/{k}", v, epoch)
            for layer, h in entropies.items():
                self.writer.add_scalar(f"cv_moe_entropy/{layer}", h, epoch)
            self.writer.flush()

    def close(self) -> None:
        self.end_epoch()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
