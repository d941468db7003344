"""Assemble a training run from parts: wrap the model, build optimizer and scheduler,
resume from a checkpoint, run the Trainer. `wenet-moe train` calls `run_training`
after building the tokenizer, data loaders and model; tests call it with stand-ins.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from wenet_moe.checkpoint_io import load_model_weights
from wenet_moe.train.dist import DistInfo
from wenet_moe.train.monitor import Monitor
from wenet_moe.train.optim import build_optimizer
from wenet_moe.train.scheduler import build_scheduler
from wenet_moe.train.trainer import Trainer, TrainConf

logger = logging.getLogger("wenet_moe.train")
ENGINES = ("torch_ddp", "fsdp")


def validate_optim_conf(configs: Dict[str, Any]) -> None:
    """Build optimizer and scheduler on a 1-parameter stand-in, so bad `optim*` /
    `scheduler*` keys fail before any data or model work."""
    probe = torch.nn.Linear(1, 1)
    opt = build_optimizer(probe, configs.get("optim", "adam"), configs.get("optim_conf") or {})
    build_scheduler(opt, configs.get("scheduler", "warmuplr"), configs.get("scheduler_conf") or {})


def wrap_model(model: torch.nn.Module, device: torch.device, info: DistInfo,
               engine: str = "torch_ddp") -> torch.nn.Module:
    """Move to `device`; under torchrun wrap in DDP (or FSDP with engine "fsdp").

    DDP uses find_unused_parameters=True: an MoE expert that received no frame in a
    step, or a decoder direction with zero weight, has no gradient.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown --train_engine '{engine}' (choose from {', '.join(ENGINES)})")
    model = model.to(device)
    if engine == "fsdp":
        from wenet_moe.train.fsdp import shard_model
        return shard_model(model, device, info)
    if not info.is_distributed:
        return model
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def run_training(configs: Dict[str, Any], model: torch.nn.Module, train_loader: Iterable,
                 cv_loader: Optional[Iterable], model_dir: str, device: str = "cpu",
                 info: Optional[DistInfo] = None, checkpoint: Optional[str] = None,
                 tensorboard_dir: Optional[str] = None, engine: str = "torch_ddp",
                 show_bar: Optional[bool] = None,
                 step_hook: Optional[Callable[[Trainer], None]] = None) -> Trainer:
    """Train `model` for `configs['max_epoch']` epochs; returns the finished Trainer.

    `checkpoint`: a training checkpoint (resume optimizer, scheduler, RNG, epoch and
    position) or a weights-only one (averaged: initialise the weights, start afresh).
    """
    info = info or DistInfo()
    conf = TrainConf.from_configs(configs)
    dev = torch.device(device if device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    ckpt: Dict[str, Any] = {}
    if checkpoint:
        ckpt = load_model_weights(model, checkpoint)
        logger.info("loaded weights from %s", checkpoint)
    wrapped = wrap_model(model, dev, info, engine)
    optimizer = build_optimizer(wrapped, configs.get("optim", "adam"), configs.get("optim_conf") or {})
    scheduler = build_scheduler(optimizer, configs.get("scheduler", "warmuplr"), configs.get("scheduler_conf") or {})
    monitor = Monitor(rank=info.rank, tensorboard_dir=tensorboard_dir, show_bar=show_bar)
    trainer = Trainer(wrapped, optimizer, scheduler, train_loader, cv_loader, conf, model_dir, dev, info,
                      monitor, step_hook)
    if ckpt.get("optimizer") is not None:
        trainer.load_state(ckpt)
        logger.info("resuming at epoch %d, batch %d, step %d", trainer.epoch, trainer.batch_idx, trainer.step)
    trainer.fit()
    return trainer
