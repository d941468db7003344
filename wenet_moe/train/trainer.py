"""The training loop: epochs of optimizer steps, CV, checkpoints, exact resume.

A batch is the data pipeline's dict `{keys, feats (B,T,F), feats_lengths (B,),
target (B,L) padded -1, target_lengths (B,), skipped: {counter: n}}`; the model is
called as `model(feats, feats_lengths, target, target_lengths) -> {"loss", ...}`.

Determinism for resume: the global RNG states are captured right before each epoch's
data iterator is created (`rng_epoch_start`) and after every optimizer step. Resuming
mid-epoch restores the epoch-start states, re-creates the iterator (same shuffles and
worker seeds), skips the batches already consumed, then restores the step states.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.distributed as dist

from wenet_moe.config import ConfigError, save_yaml
from wenet_moe.train.conf import DTYPES, TRAIN_KEYS, TrainConf, check_train_conf  # noqa: F401
from wenet_moe.checkpoint_io import unwrap_model
from wenet_moe.train.checkpoint import (atomic_torch_save, capture_rng, link_or_copy, make_checkpoint,
                                        remove_stale_temp_files, restore_rng)
from wenet_moe.train.diagnostics import ctc_greedy_stats, supports_ctc_stats
from wenet_moe.train.dist import DistInfo, all_ranks_have_data, all_reduce_sums, sum_counters
from wenet_moe.train.fsdp import clip_grad_norm, full_states, is_sharded, load_optimizer
from wenet_moe.train.monitor import Monitor, moe_entropies, scalar_parts
from wenet_moe.train.scheduler import schedule_advice

class Trainer:
    """Runs `fit()`; owns the step counter, epoch position and checkpoint writing.

    Args:
        model: the model, possibly wrapped in DistributedDataParallel.
        optimizer, scheduler: built by `optim.build_optimizer` / `scheduler.build_scheduler`.
        train_loader, cv_loader: iterables of batches; `loader.dataset.set_epoch(e)` is
            called before each epoch when it exists.
        conf: TrainConf; model_dir: where N.pt / N.yaml / step_S.pt go.
        device: torch device of the model; info: DistInfo.
        monitor: progress/TensorBoard sink (a silent one by default).
        step_hook: called as `step_hook(trainer)` after every optimizer step (and after
            a step checkpoint is written); tests use it to simulate a crash.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 train_loader: Iterable, cv_loader: Optional[Iterable], conf: TrainConf, model_dir: str,
                 device: torch.device, info: Optional[DistInfo] = None, monitor: Optional[Monitor] = None,
                 step_hook: Optional[Callable[["Trainer"], None]] = None):
        self.model = model
        self.raw_model = unwrap_model(model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.cv_loader = cv_loader
        self.conf = conf
        self.model_dir = model_dir
        self.device = torch.device(device)
        self.info = info or DistInfo()
        self.monitor = monitor or Monitor(rank=self.info.rank, show_bar=False)
        self.step_hook = step_hook
        if conf.dtype == "fp16" and self.device.type != "cuda":
            raise ConfigError("'dtype: fp16' needs --device cuda (use bf16 on CPU)")
        self.amp_dtype = DTYPES[conf.dtype]
        self.sharded = is_sharded(model)
        if self.sharded and conf.dtype == "fp16":
            raise ConfigError("'dtype: fp16' is not supported with --train_engine fsdp (use bf16)")
        self._unsynced = False       # gradients accumulated under DDP no_sync since the last step
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=conf.dtype == "fp16")
        self.step = 0
        self.epoch = 0
        self.batch_idx = 0
        self._resume: Optional[Dict[str, Any]] = None
        self._rng_epoch_start: Optional[Dict[str, Any]] = None
        self._stats: Dict[str, Any] = {}
        self.last_grad_norm = float("nan")

    # --- resume -------------------------------------------------------------------
    def load_state(self, ckpt: Dict[str, Any]) -> None:
        """Continue from a training checkpoint (model weights must already be loaded)."""
        for key in ("optimizer", "scheduler", "epoch", "step", "batch_idx", "epoch_done", "rng"):
            if key not in ckpt:
                raise ValueError(f"checkpoint has no '{key}': not a training checkpoint (averaged?)")
        if self.sharded:
            load_optimizer(self.model, self.optimizer, ckpt["optimizer"])
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        own = self._own_rank_state(ckpt)
        if ckpt["epoch_done"]:
            self.epoch, self.batch_idx = int(ckpt["epoch"]) + 1, 0
            restore_rng(own["rng"])
        else:
            self.epoch, self.batch_idx = int(ckpt["epoch"]), int(own["batch_idx"])
            self._resume = own

    def _own_rank_state(self, ckpt: Dict[str, Any]) -> Dict[str, Any]:
        """This rank's `rng`, `rng_epoch_start`, `batch_idx` and `epoch_stats` from a
        checkpoint: each rank draws its own dropout masks and DataLoader worker seeds
        and counts its own batches, so a checkpoint keeps one entry per rank
        (`ranks`); older checkpoints (and a different world size) fall back to rank 0's."""
        ranks = ckpt.get("ranks")
        if ranks and len(ranks) == self.info.world_size:
            return ranks[self.info.rank]
        if ranks and self.info.is_main:
            logging.getLogger("wenet_moe.train").warning(
                "checkpoint was written by %d process(es), resuming with %d: every rank starts from rank 0's "
                "random state, so the run does not repeat the original one exactly", len(ranks),
                self.info.world_size)
        return {"rng": ckpt["rng"], "rng_epoch_start": ckpt.get("rng_epoch_start"),
                "batch_idx": ckpt["batch_idx"], "epoch_stats": ckpt.get("epoch_stats")}

    # --- helpers --------------------------------------------------------------------
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)

    def _to_device(self, batch: Dict[str, Any]):
        nb = self.device.type == "cuda"
        return tuple(batch[k].to(self.device, non_blocking=nb)
                     for k in ("feats", "feats_lengths", "target", "target_lengths"))

    def _set_epoch(self, loader: Iterable, epoch: int) -> None:
        ds = getattr(loader, "dataset", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)

    def _params(self):
        return [p for p in self.raw_model.parameters() if p.requires_grad]

    def _all_reduce_grads(self) -> None:
        """Average gradients over ranks by hand (used for a flush after no_sync steps)."""
        if not self.info.is_distributed:
            return
        for p in self._params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.info.world_size)

    def _optimizer_step(self, micro_batches: int) -> None:
        """Clip, step optimizer (skipped on a non-finite norm) and scheduler."""
        if self._unsynced:      # epoch-end flush after no_sync micro-batches
            self._all_reduce_grads()
            self._unsynced = False
        if micro_batches != self.conf.accum_grad:   # epoch-end flush: make it a mean
            for p in self._params():
                if p.grad is not None:
                    p.grad.mul_(self.conf.accum_grad / micro_batches)
        self.scaler.unscale_(self.optimizer)
        if self.sharded:
            self.last_grad_norm = clip_grad_norm(self._params(), self.conf.grad_clip)
        else:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params(), self.conf.grad_clip))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)    # skips itself on inf/nan
            self.scaler.update()
        elif math.isfinite(self.last_grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1

    # --- epochs ---------------------------------------------------------------------
    def fit(self) -> None:
        if self.info.is_main:
            for path in remove_stale_temp_files(self.model_dir):
                logging.getLogger("wenet_moe.train").info("removed %s (left by an interrupted run)", path)
        while self.epoch < self.conf.max_epoch:
            self.train_epoch()
            cv_parts = self.cross_validate()
            self._end_epoch(cv_parts)
            self.epoch += 1
            self.batch_idx = 0
        self.monitor.close()

    def _start_iterator(self):
        resume, self._resume = self._resume, None
        if resume is not None:
            self._rng_epoch_start = resume["rng_epoch_start"]
            restore_rng(self._rng_epoch_start)
        else:
            self._rng_epoch_start = capture_rng()
        self._set_epoch(self.train_loader, self.epoch)
        it = iter(self.train_loader)
        if resume is not None:
            for i in range(self.batch_idx):
                try:
                    next(it)
                except StopIteration:
                    raise ValueError(f"cannot resume: epoch {self.epoch} has only {i} batches, "
                                     f"checkpoint consumed {self.batch_idx}") from None
            restore_rng(resume["rng"])
            self._stats = dict(resume.get("epoch_stats") or {})
        else:
            self._stats = {}
        return it

    def train_epoch(self) -> None:
        """One pass over this rank's training partition (stops with the shortest rank)."""
        self.model.train()
        it = self._start_iterator()
        stats = self._stats
        stats.setdefault("sums", {})
        stats.setdefault("utts", 0.0)
        stats.setdefault("skipped", {})
        self.monitor.start_epoch(self.epoch, self.batch_idx)
        accum = self.conf.accum_grad
        pending = 0
        while True:
            batch = self._next_batch(it, stats["skipped"])
            if not all_ranks_have_data(batch is not None, self.info):
                break
            feats, feats_lengths, target, target_lengths = self._to_device(batch)
            boundary = pending + 1 == accum
            no_sync = self.info.is_distributed and not boundary and hasattr(self.model, "no_sync")
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with self._autocast():
                    out = self.model(feats, feats_lengths, target, target_lengths)
                loss = out["loss"]
                self.scaler.scale(loss / accum).backward()
            self._unsynced = no_sync    # a synchronised backward reduces everything accumulated
            pending += 1
            parts = scalar_parts(out)
            n = float(feats.size(0))
            stats["utts"] += n
            for k, v in parts.items():
                stats["sums"][k] = stats["sums"].get(k, 0.0) + v * n
            self.monitor.batch_done(int(feats_lengths.sum()), parts.get("loss", float("nan")), self.lr())
            if boundary:
                self._after_step(parts, pending)
                pending = 0
        if pending:
            self._after_step(None, pending)
        self.monitor.end_epoch()

    def _next_batch(self, it, skipped: Dict[str, int]) -> Optional[Dict[str, Any]]:
        """Next batch with at least one utterance (None at the end); every item taken
        from the iterator counts in `batch_idx`, and its skip counters in `skipped`."""
        for batch in it:
            self.batch_idx += 1
            for k, v in (batch.get("skipped") or {}).items():
                skipped[k] = skipped.get(k, 0) + int(v)
            if batch["feats"].size(0) > 0:
                return batch
        return None

    def _after_step(self, parts: Optional[Dict[str, float]], micro_batches: int) -> None:
        self._optimizer_step(micro_batches)
        if parts is not None and self.step % self.conf.log_interval == 0:
            self.monitor.log_step(self.epoch, self.step, self.lr(), self.last_grad_norm, parts,
                                  moe_entropies(self.raw_model))
        if self.conf.save_interval and self.step % self.conf.save_interval == 0:
            self.save(f"step_{self.step}", epoch_done=False)
        if self.step_hook is not None:
            self.step_hook(self)

    @torch.no_grad()
    def cross_validate(self) -> Dict[str, float]:
        """Utterance-weighted mean of each loss part over the CV set (all ranks)."""
        if self.cv_loader is None:
            return {}
        self.raw_model.eval()
        self._set_epoch(self.cv_loader, self.epoch)
        sums: Dict[str, float] = {}
        utts = 0.0
        skipped: Dict[str, int] = {}
        check_ctc = supports_ctc_stats(self.raw_model) and not self.sharded
        ctc = [0.0, 0.0, 0.0, 0.0]      # blank frames, frames, token errors, reference tokens
        for batch, weight in self._cv_batches(skipped):
            feats, feats_lengths, target, target_lengths = self._to_device(batch)
            with self._autocast():
                out = self.raw_model(feats, feats_lengths, target, target_lengths)
            n = float(feats.size(0)) * weight
            utts += n
            for k, v in scalar_parts(out).items():
                sums[k] = sums.get(k, 0.0) + v * n
            if check_ctc:
                with self._autocast():
                    stats = ctc_greedy_stats(self.raw_model, feats, feats_lengths, target, target_lengths)
                ctc = [a + b for a, b in zip(ctc, stats)]
        self.model.train()
        names = sorted(sums)
        if self.info.is_distributed:   # ranks may have seen different loss names only if empty
            names = sorted(set().union(*self._gather(names)))
        totals = all_reduce_sums([utts] + ctc + [sums.get(k, 0.0) for k in names], self.info)
        self._cv_skipped = sum_counters(skipped, self.info)
        if totals[0] <= 0:
            return {}
        parts = {k: v / totals[0] for k, v in zip(names, totals[5:])}
        if check_ctc and totals[2] > 0:
            parts["ctc_blank_rate"] = totals[1] / totals[2]
            parts["ctc_greedy_ter"] = totals[3] / max(totals[4], 1.0)
        return parts

    def _cv_batches(self, skipped: Dict[str, int]):
        """(batch, weight) pairs of this rank's CV partition. Under FSDP every forward is
        collective, so a rank that ran out repeats its last batch with weight 0 until
        all ranks are done."""
        it = iter(self.cv_loader)
        last = None
        while True:
            batch = None
            for item in it:
                for k, v in (item.get("skipped") or {}).items():
                    skipped[k] = skipped.get(k, 0) + int(v)
                if item["feats"].size(0) > 0:
                    batch = item
                    break
            if not self.sharded:
                if batch is None:
                    return
                yield batch, 1.0
                continue
            if not all_ranks_have_data(batch is None, self.info):   # MIN of "done" = someone has data
                if batch is not None:
                    last = batch
                    yield batch, 1.0
                elif last is not None:
                    yield last, 0.0
                else:
                    raise RuntimeError(f"rank {self.info.rank}: empty CV partition under FSDP")
            else:
                return

    def _gather(self, obj: Any):
        out = [None] * self.info.world_size
        dist.all_gather_object(out, obj)
        return out

    def _end_epoch(self, cv_parts: Dict[str, float]) -> None:
        stats = self._stats
        names = sorted(stats["sums"])
        if self.info.is_distributed:
            names = sorted(set().union(*self._gather(names)))
        totals = all_reduce_sums([stats["utts"]] + [stats["sums"].get(k, 0.0) for k in names], self.info)
        train_parts = {k: v / totals[0] for k, v in zip(names, totals[1:])} if totals[0] > 0 else {}
        skipped = sum_counters(stats["skipped"], self.info)
        for k, v in getattr(self, "_cv_skipped", {}).items():
            skipped["cv_" + k] = v
        entropies = moe_entropies(self.raw_model)
        if self.epoch == 0 and self.info.is_main and self.scheduler is not None:
            advice = schedule_advice(self.scheduler, self.step, self.conf.max_epoch)
            if advice:
                logging.getLogger("wenet_moe.train").warning("%s", advice)
        if self.info.is_main and cv_parts.get("ctc_blank_rate", 0.0) > 0.98 and self.epoch >= 1:
            logging.getLogger("wenet_moe.train").warning(
                "epoch %d: CTC emits blank on %.1f%% of CV frames (greedy token error rate %.2f): the run "
                "may sit on the all-blank plateau; see docs/training.md", self.epoch,
                100 * cv_parts["ctc_blank_rate"], cv_parts.get("ctc_greedy_ter", float("nan")))
        self.monitor.log_epoch(self.epoch, self.step, cv_parts, train_parts, skipped, entropies)
        info = {"epoch": self.epoch, "step": self.step, "lr": self.lr(),
                "cv_loss": cv_parts.get("loss"), "train_loss": train_parts.get("loss"),
                "cv": cv_parts, "train": train_parts, "skipped": skipped}
        path = self.save(str(self.epoch), epoch_done=True, info=info)
        if path is not None:
            link_or_copy(path, os.path.join(self.model_dir, "final.pt"))

    def save(self, name: str, epoch_done: bool, info: Optional[Dict[str, Any]] = None) -> Optional[str]:
        """Write `model_dir/<name>.pt` and `<name>.yaml` (rank 0 only); returns the .pt path."""
        ranks = self._rank_states(epoch_done)       # collective: all ranks
        if not self.info.is_main and not self.sharded:
            return None
        extra = {"epoch_stats": self._stats if not epoch_done else None, "ranks": ranks}
        if self.sharded:
            extra.update(full_states(self.model, self.optimizer))    # collective: all ranks
            if not self.info.is_main:
                return None
        ckpt = make_checkpoint(self.model, self.optimizer, self.scheduler, self.scaler, self.epoch, self.step,
                               self.batch_idx, epoch_done, self._rng_epoch_start, extra=extra)
        path = os.path.join(self.model_dir, f"{name}.pt")
        meta = info or {"epoch": self.epoch, "step": self.step, "lr": self.lr(), "batch_idx": self.batch_idx}
        # the .yaml first: N.pt is what marks epoch N done (run.sh resumes from the
        # highest N.pt), so a kill between the two files repeats the epoch
        save_yaml(_plain(meta), os.path.join(self.model_dir, f"{name}.yaml"))
        atomic_torch_save(ckpt, path)
        return path

    def _rank_states(self, epoch_done: bool) -> list:
        """[per rank: {rng, rng_epoch_start, batch_idx, epoch_stats}] (see `_own_rank_state`)."""
        own = {"rng": capture_rng(), "rng_epoch_start": self._rng_epoch_start, "batch_idx": self.batch_idx,
               "epoch_stats": None if epoch_done else self._stats}
        return self._gather(own) if self.info.is_distributed else [own]


def _plain(obj: Any) -> Any:
    """YAML-safe copy (floats, ints, str, lists, dicts; NaN kept as .nan)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float):
        return float(obj)
    return obj
