"""`--train_engine fsdp`: fully sharded data parallel (torch FSDP2, `fully_shard`).

Every outermost block of a `ModuleList` (encoder blocks, decoder blocks) becomes one
FSDP unit, then the root; parameters, gradients and Adam moments are sharded over
ranks and gathered block by block for forward and backward (docs/scaling.md).
Checkpoints are written as full (unsharded) state dicts, so every tool (average,
export, recognize) reads them like DDP checkpoints. Works with gloo on CPU and nccl
on GPU; fp16 is not supported with FSDP here (use bf16).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from wenet_moe.train.dist import DistInfo


def _outermost_blocks(model: nn.Module) -> List[nn.Module]:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    blocks: List[nn.Module] = []
    seen = set()
    for ml in lists:
        if id(ml) in seen:
            continue
        for child in ml:
            blocks.append(child)
            for sub in child.modules():   # lists nested inside a block stay in that unit
                seen.add(id(sub))
    return blocks


def shard_model(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """Apply `fully_shard` to each outermost list block, then to the root (in place)."""
    if not info.is_distributed:
        raise ValueError("--train_engine fsdp needs torchrun with at least 2 processes")
    from torch.distributed.fsdp import fully_shard
    for block in _outermost_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Full model and optimizer state dicts on CPU (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=opts),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=opts)}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load a full optimizer state dict (from `full_states`) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, strict=False))
