"""The small-batch CPU expert kernel (`moe_cpu.c`): built on first use, called via ctypes.

The C file is compiled once per machine with the system C compiler (`$CC`, else `cc`)
as `-O3 -march=native` into a cache directory (`$WENET_MOE_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/wenet_moe`, else `~/.cache/wenet_moe`); the library name carries a
hash of the source, the flags and the CPU, and is written under a temporary name and
renamed. Without a compiler, or with `WENET_MOE_CPU_KERNEL=0`, `library()` returns
None and MoE layers use the oneDNN kernels instead (a warning says why, once).
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch

__all__ = ["library", "pack_weight", "segment_linear", "moe_forward", "disabled_reason"]

SOURCE = Path(__file__).with_name("moe_cpu.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=fast"]
# tried first: OpenMP, so that the kernel shares torch's threads (a compiler without it
# builds the single-threaded kernel)
OPENMP_FLAGS = ["-fopenmp"]
ABI_VERSION = 5
BLOCK = 16          # column block of the packed layout (floats)
ACTIVATIONS = {"none": 0, "relu": 1, "swish": 2}   # fused into the kernel's stores

_log = logging.getLogger(__name__)
_state: dict = {}   # "lib": CDLL or None, "reason": why it is None
_scratch = threading.local()


def _cpu_signature() -> str:
    """Text that changes when the CPU model / instruction set does (for the cache key)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = [line for line in f if line.startswith(("flags", "Features"))]
    except OSError:
        flags = []
    return flags[0] if flags else (platform.processor() or platform.machine())


def _cache_dir() -> Path:
    root = os.environ.get("WENET_MOE_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wenet_moe"


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler '{compiler}' on PATH")
    source = SOURCE.read_bytes()
    for extra in (OPENMP_FLAGS, []):
        flags = FLAGS + extra
        key = hashlib.sha256(source + " ".join([compiler] + flags).encode()
                             + _cpu_signature().encode()).hexdigest()[:16]
        cache = _cache_dir()
        target = cache / f"moe_cpu_{key}.so"
        if target.exists():
            break
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".moe_cpu_", suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, target)
                break
            if extra:
                continue    # no OpenMP: build the single-threaded kernel
            first = (done.stderr.strip().splitlines() or ["?"])[0]
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {first}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    if lib.wm_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{target} has ABI {lib.wm_abi_version()}, expected {ABI_VERSION}")
    fn = lib.wm_segment_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    fn = lib.wm_moe_forward
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.wm_openmp.restype = ctypes.c_int
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, or None when it is disabled or cannot be built."""
    if "lib" not in _state:
        lib, reason = None, ""
        if os.environ.get("WENET_MOE_CPU_KERNEL", "1") == "0":
            reason = "disabled by WENET_MOE_CPU_KERNEL=0"
        else:
            try:
                lib = _build()
            except (OSError, RuntimeError) as err:
                reason = str(err)
                _log.warning("MoE CPU kernel unavailable (%s); using oneDNN kernels", reason)
        _state["lib"], _state["reason"] = lib, reason
    return _state["lib"]


def threads(lib: ctypes.CDLL) -> int:
    """Threads a kernel call uses: torch's intra-op threads when built with OpenMP, else 1."""
    return torch.get_num_threads() if lib.wm_openmp() else 1


def disabled_reason() -> str:
    """Why `library()` is None ("" when it is available or was not asked for yet)."""
    return _state.get("reason", "")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(E, K, N) expert weights (y = x W) -> the packed layout (E, N/16, K, 16), contiguous."""
    n_expert, k_dim, n_dim = weight.shape
    if n_dim % BLOCK:
        raise ValueError(f"packed expert weights need N % {BLOCK} == 0, got N={n_dim}")
    return weight.detach().reshape(n_expert, k_dim, n_dim // BLOCK, BLOCK).permute(0, 2, 1, 3).contiguous()


def segment_linear(lib: ctypes.CDLL, x: torch.Tensor, segments: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor, out: torch.Tensor, activation: str = "none") -> None:
    """out[rows of s] = act(x[rows of s] @ W_e + b_e) for each segment s = (start, count, e).

    Args:
        x: (R, K) float32 rows, row-contiguous (stride(1) == 1).
        segments: (3, S) int64, contiguous: starts, counts and expert ids.
        packed: (E, N/16, K, 16) from `pack_weight`; bias: (E, N) contiguous.
        out: (R, N) float32, row-contiguous; rows outside the segments are untouched.
        activation: "none", "relu" or "swish" (x * sigmoid(x), exp to ~2 ulp).
    """
    n_seg = segments.size(1)
    k_dim, n_dim = packed.size(2), packed.size(1) * BLOCK
    if x.stride(1) != 1 or out.stride(1) != 1 or x.size(1) != k_dim or out.size(1) != n_dim:
        raise ValueError(f"segment_linear: bad shapes x {tuple(x.shape)} out {tuple(out.shape)} "
                         f"for weights K={k_dim} N={n_dim}")
    base = segments.data_ptr()
    step = segments.stride(0) * 8
    status = lib.wm_segment_linear(x.data_ptr(), x.stride(0), base, base + step, base + 2 * step, n_seg,
                                   k_dim, n_dim, packed.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                   out.stride(0), ACTIVATIONS[activation], threads(lib))
    if status != 0:
        raise MemoryError("segment_linear: the kernel could not allocate its tile buffer")


def segments_of(counts: List[int]) -> torch.Tensor:
    """(3, S) int64 (start, count, expert) for the experts with rows, from per-expert row
    counts of an expert-sorted buffer."""
    starts = itertools.accumulate([0] + counts[:-1])
    segments = [(start, count, e) for e, (start, count) in enumerate(zip(starts, counts)) if count > 0]
    return torch.tensor(segments, dtype=torch.int64).reshape(-1, 3).t().contiguous()


def _workspace(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer of at least `numel` elements, kept between calls (it
    grows to the largest call): a fresh multi-MB tensor every call costs more in page
    faults than the sort, gather and add-back it serves (~1.5 ms at 1024 frames)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        buffers[name] = buf
    return buf


def moe_forward(lib: ctypes.CDLL, x: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor,
                packs: Tuple[torch.Tensor, ...], activation: str) -> torch.Tensor:
    """The whole MoE FFN in one call (sort, gather, experts, gated add-back).

    Args:
        x: (N, D) float32; top_idx: (N, k) int64 expert ids; gates: (N, k) float32.
        packs: (w1 packed (E, H/16, D, 16), b1 (E, H), w2 packed (E, D/16, H, 16), b2 (E, D)).
        activation: "none", "relu" or "swish" (fused into the first linear).
    Returns:
        (N, D) = sum_j gates[:, j] * expert_{top_idx[:, j]}(x).
    """
    x = x.contiguous()
    top_idx = top_idx.contiguous()
    gates = gates.contiguous()
    n_tok, dim = x.shape
    k = top_idx.size(1)
    n_expert, hidden = packs[1].shape
    n_assign = n_tok * k
    work = _workspace("float", n_assign * (2 * dim + hidden), torch.float32)
    order = _workspace("index", 2 * n_assign + 2 * n_expert, torch.int64)
    out = torch.empty_like(x)
    base, size = work.data_ptr(), work.element_size()
    status = lib.wm_moe_forward(x.data_ptr(), n_tok, dim, top_idx.data_ptr(), gates.data_ptr(), k, n_expert,
                                hidden, packs[0].data_ptr(), packs[1].data_ptr(), packs[2].data_ptr(),
                                packs[3].data_ptr(), ACTIVATIONS[activation], base,
                                base + n_assign * dim * size, base + n_assign * (dim + hidden) * size,
                                order.data_ptr(), out.data_ptr(), threads(lib))
    if status == -1:
        raise ValueError(f"moe_forward: an expert id in top_idx is outside [0, {n_expert})")
    if status != 0:
        raise MemoryError("moe_forward: the kernel could not allocate its tile buffer")
    return out
