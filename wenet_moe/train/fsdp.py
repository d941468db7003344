"""`--train_engine fsdp`: fully sharded data parallel (torch FSDP2, `fully_shard`).

Every outermost block of a `ModuleList` (encoder blocks, decoder blocks) becomes one
FSDP unit, then the root; parameters, gradients and Adam moments are sharded over
ranks and gathered block by block for forward and backward (docs/scaling.md). A module
used by several blocks (the Omni-Router of a stack) becomes a unit of its own first, so
that no block claims it: it is gathered for each use, and its gradient, summed over
the blocks, is reduce-scattered once per use and accumulated.
Checkpoints are written as full (unsharded) state dicts, so every tool (average,
export, recognize) reads them like DDP checkpoints. Works with gloo on CPU and nccl
on GPU; fp16 is not supported with FSDP here (use bf16).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.distributed as dist
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


def _shared_modules(model: nn.Module, blocks: List[nn.Module]) -> List[nn.Module]:
    """The outermost modules with parameters that are reached through more than one
    block, or through a block and outside every block (e.g. one router module used by
    every MoE layer of a stack)."""
    block_index = {id(b): i for i, b in enumerate(blocks)}
    owners: Dict[int, set] = {}
    found: Dict[int, nn.Module] = {}

    def walk(module: nn.Module, owner: Any) -> None:
        owner = block_index.get(id(module), owner)
        owners.setdefault(id(module), set()).add(owner)
        found[id(module)] = module
        for child in module.children():
            walk(child, owner)

    walk(model, None)
    shared = [found[k] for k, who in owners.items()
              if len(who) > 1 and any(True for _ in found[k].parameters())]
    return [m for m in shared
            if not any(other is not m and any(sub is m for sub in other.modules()) for other in shared)]


def shard_model(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """Apply `fully_shard` to each module shared between blocks, then to each outermost
    list block, then to the root (bottom-up, in place)."""
    if not info.is_distributed:
        raise ValueError("--train_engine fsdp needs torchrun with at least 2 processes")
    from torch.distributed.fsdp import fully_shard
    blocks = _outermost_blocks(model)
    for module in _shared_modules(model, blocks):
        fully_shard(module)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


def _dtensor_types():
    from torch.distributed.tensor import DTensor, Shard
    return DTensor, Shard


def _row_shard(t: Any) -> bool:
    """True for a DTensor sharded on dim 0 over a 1-D mesh (what `fully_shard` makes)."""
    DTensor, Shard = _dtensor_types()
    return (isinstance(t, DTensor) and t.device_mesh.ndim == 1 and len(t.placements) == 1
            and isinstance(t.placements[0], Shard) and t.placements[0].dim == 0)


def _full_tensor(t: Any) -> Any:
    """A dim-0 sharded DTensor -> the whole tensor on CPU (collective); plain tensors
    -> a CPU copy; anything else unchanged.

    FSDP2 gives rank r the r-th piece of `torch.chunk(param, world_size)` (possibly
    empty). The pieces are padded to the chunk size and gathered with the synchronous
    c10d `all_gather`: the DTensor / functional-collective path of
    `get_model_state_dict` intermittently corrupted the heap or aborted at exit over
    gloo (torch 2.13: "free(): invalid size", "terminate called without an active
    exception"; about 1 run in 15).
    """
    DTensor, _ = _dtensor_types()
    if isinstance(t, DTensor) and not _row_shard(t):
        return t.full_tensor().detach().cpu()
    if not isinstance(t, DTensor):
        return t.detach().cpu().clone() if torch.is_tensor(t) else t
    group = t.device_mesh.get_group()
    world = dist.get_world_size(group)
    local = t.to_local().detach()
    rows = -(-t.shape[0] // world) if t.shape[0] else 0
    padded = local.new_zeros((rows,) + tuple(t.shape[1:]))
    padded[:local.shape[0]].copy_(local)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts, 0)[:t.shape[0]].cpu()


def _shard_like(full: torch.Tensor, like: Any) -> torch.Tensor:
    """This rank's dim-0 piece of `full`, as a DTensor placed like the parameter `like`."""
    DTensor, _ = _dtensor_types()
    group = like.device_mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pieces = torch.chunk(full, world, dim=0)
    local = pieces[rank] if rank < len(pieces) else full.new_zeros((0,) + tuple(full.shape[1:]))
    local = local.to(like.to_local().device).clone()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _walk(obj: Any, fn) -> Any:
    if isinstance(obj, dict):
        return {k: _walk(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, fn) for v in obj]
    return fn(obj)


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Full model and optimizer state dicts on CPU (collective: every rank calls it).

    The model's keys are those of the unwrapped model; the optimizer's is the plain
    `optimizer.state_dict()` layout (parameter indices), so FSDP and DDP checkpoints
    are interchangeable.
    """
    model_state = {k: _full_tensor(v) for k, v in model.state_dict().items()}
    return {"model": model_state, "optimizer": _walk(optimizer.state_dict(), _full_tensor)}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Load a full optimizer state dict (from `full_states`, or from a DDP / single
    process checkpoint) into the optimizer of a sharded model."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(isinstance(k, str) for k in state.get("state", {})):
        state = _from_named(model, params, state)
    sharded: Dict[Any, Any] = {}
    for idx, entry in state["state"].items():
        param = params[int(idx)]
        sharded[idx] = {name: (_shard_like(value, param)
                               if _row_shard(param) and torch.is_tensor(value) and value.shape == param.shape
                               else value)
                        for name, value in entry.items()}
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def _from_named(model: nn.Module, params: List[nn.Parameter], state: Dict[str, Any]) -> Dict[str, Any]:
    """Parameter-name keyed optimizer state (checkpoints written before this layout, by
    torch's `get_optimizer_state_dict`) -> keyed by index into `params` (the optimizer's
    parameters in param-group order)."""
    index_of_param = {id(p): i for i, p in enumerate(params)}
    index = {name: index_of_param[id(p)] for name, p in model.named_parameters() if id(p) in index_of_param}
    groups = [dict(g, params=[index[name] for name in g["params"]]) for g in state["param_groups"]]
    return {"state": {index[name]: entry for name, entry in state["state"].items()}, "param_groups": groups}


def clip_grad_norm(params: List[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of sharded parameters (collective); returns it.

    Sums the squares of the local gradient shards, all-reduces that one number with
    synchronous c10d, and scales the local shards (the reasons of `_full_tensor`)."""
    DTensor, _ = _dtensor_types()
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = params[0].device if params else torch.device("cpu")     # the same on every rank
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in local:
        total += g.detach().double().pow(2).sum()
    # one all-reduce per distinct process group (every FSDP unit has its own mesh object,
    # all over the same ranks); taken from the parameters: the same on every rank
    groups = {}
    for p in params:
        if isinstance(p, DTensor):
            group = p.device_mesh.get_group()
            groups.setdefault(tuple(dist.get_process_group_ranks(group)), group)
    for group in groups.values():
        dist.all_reduce(total, group=group)
    norm = float(total.sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for g in local:
            g.mul_(scale)
    return norm
