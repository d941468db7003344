"""Process-group glue for single-process, torchrun (many processes / nodes) training.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; when they are
absent the job is a single process and every helper here is a no-op.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu", backend: str = "") -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Args:
        device: "cpu" or "cuda"; decides the default backend (gloo / nccl) and, on
            CUDA, selects the GPU `LOCAL_RANK`.
        backend: explicit backend name, or "" for the default.
    Returns:
        DistInfo; world_size 1 without torchrun (nothing is initialised).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda given but CUDA is not available")
        torch.cuda.set_device(local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, "")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, backend)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies.

    torchrun starts each worker in a session of its own, so a SIGKILL of torchrun
    (or of the recipe's process group) would leave the workers running, and still
    writing checkpoints, beside the rerun that resumes from them. No-op elsewhere.
    """
    import ctypes
    import signal
    import sys
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:        # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def cleanup_distributed(info: DistInfo, finished: bool = True) -> None:
    """Leave the process group so that the process exits cleanly.

    After a finished run all ranks meet at a barrier, so that no rank tears the group
    down while a peer is still in a collective (e.g. gathering the last checkpoint).
    A gloo worker thread releases its finished work objects (the barrier and the
    collectives it waited for) only after `wait()` has returned, and that release
    needs the GIL when the work holds Python tensors; if the interpreter is already
    finalizing, the thread dies inside a C++ destructor and the process aborts
    ("terminate called without an active exception", about 1 FSDP run in 40 here;
    seen in gdb: ~AsyncBarrierWork -> ~AsyncAllgatherWork -> take_gil). So the main
    thread then sleeps briefly without the GIL. `finished=False` (this rank is
    failing) skips both: peers might never reach the barrier.
    """
    if info.is_distributed and dist.is_initialized():
        if finished:
            dist.barrier()
            time.sleep(0.5)
        dist.destroy_process_group()


def _comm_device(info: DistInfo) -> torch.device:
    if info.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_have_data(has_data: bool, info: DistInfo) -> bool:
    """True when every rank still has a batch this step (all-reduce MIN of a flag).

    Ranks whose data partition is longer stop together with the shortest one, so no
    rank waits forever in a gradient all-reduce at the end of an epoch (WeNet's join
    behaviour: the tail of longer partitions is dropped for that epoch).
    """
    if not info.is_distributed:
        return has_data
    flag = torch.tensor([1 if has_data else 0], dtype=torch.int32, device=_comm_device(info))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1)


def all_reduce_sums(values: List[float], info: DistInfo) -> List[float]:
    """Element-wise sum of a list of floats over ranks (float64)."""
    if not info.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu().tolist()]


def sum_counters(counters: Dict[str, int], info: DistInfo) -> Dict[str, int]:
    """Sum dicts of counters whose key sets may differ between ranks."""
    if not info.is_distributed:
        return dict(counters)
    gathered: List[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, dict(counters))
    total: Dict[str, int] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            total[k] = total.get(k, 0) + int(v)
    return total


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()
