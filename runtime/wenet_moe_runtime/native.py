"""The small-batch CPU expert kernel (`moe_cpu.c`), torch-free: build, load, call.

The C file is compiled once per machine with the system C compiler (`$CC`, else `cc`)
as `-O3 -march=native` (`$WENET_MOE_KERNEL_MARCH` overrides the target) into a cache
directory (`$WENET_MOE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/wenet_moe`, else
`~/.cache/wenet_moe`); the library name carries a hash of the source, the flags and
the CPU, and is written under a temporary name and renamed. `wenet_moe.layers.cpu_kernel`
(PyTorch's MoE layers) and `expert_encoder` (the runtime's encoder with the experts
outside ONNX Runtime) both build it here.

`RoutedExperts` runs one MoE FFN (router + top-k + gated experts) on numpy rows in one
C call, with fp32 expert weights packed as the kernel reads them (`pack_weight`) in
2 MiB huge pages where Linux grants them (`huge_page_array`).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np

SOURCE = Path(__file__).with_name("moe_cpu.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=fast"]
# tried first: OpenMP, so that the kernel shares the caller's threads (a compiler
# without it builds the single-threaded kernel)
OPENMP_FLAGS = ["-fopenmp"]
LIBS = ["-lm"]      # after the source: expf of the router's softmax
ABI_VERSION = 12
BLOCK = 16          # column block of the packed layout (floats)
ACTIVATIONS = {"none": 0, "relu": 1, "swish": 2}   # fused into the kernel's stores
HUGE_PAGE = 2 << 20     # bytes of an x86-64 transparent huge page
WEIGHT_TYPES = {"fp32": 0, "bf16": 1, "w8a8": 3}    # WT_F32, WT_BF16, WT_Q8 of moe_cpu.c

_log = logging.getLogger(__name__)
_state: dict = {}   # "lib": CDLL or None, "reason": why it is None


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


def target_arch() -> str:
    """`-march` of the build: `$WENET_MOE_KERNEL_MARCH`, else native. Another value
    (e.g. `haswell`: AVX2 + FMA, no AVX-512) builds the code paths of an older CPU on
    this one, to measure them (`bench/moe_layer.py`)."""
    march = os.environ.get("WENET_MOE_KERNEL_MARCH", "") or "native"
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", march):
        raise RuntimeError(f"WENET_MOE_KERNEL_MARCH: not a -march value: {march!r}")
    return march


def build(source: Path = SOURCE) -> ctypes.CDLL:
    """Compile `source` into the cache (once per source, flags and CPU) and load it.
    Raises RuntimeError (no compiler, a compile error naming the file) or OSError."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler '{compiler}' on PATH")
    text = Path(source).read_bytes()
    for extra in (OPENMP_FLAGS, []):
        flags = FLAGS + [f"-march={target_arch()}"] + extra
        key = hashlib.sha256(text + " ".join([compiler] + flags + LIBS).encode()
                             + _cpu_signature().encode()).hexdigest()[:16]
        cache = _cache_dir()
        target = cache / f"moe_cpu_{key}.so"
        if target.exists():
            break
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".moe_cpu_", suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-o", tmp, str(source), *LIBS], capture_output=True,
                                  text=True)
            if done.returncode == 0:
                os.replace(tmp, target)
                break
            if extra:
                continue    # no OpenMP: build the single-threaded kernel
            first = (done.stderr.strip().splitlines() or ["?"])[0]
            raise RuntimeError(f"{compiler} failed on {Path(source).name}: {first}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return load(target)


def load(target: Path) -> ctypes.CDLL:
    """The built library at `target` with its function signatures declared (ABI checked)."""
    lib = ctypes.CDLL(str(target))
    if lib.wm_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{target} has ABI {lib.wm_abi_version()}, expected {ABI_VERSION}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn = lib.wm_segment_linear
    fn.restype = i32
    fn.argtypes = [p, i64, p, p, p, i64, i32, i32, p, p, i32, p, p, i64, i32, i32]
    fn = lib.wm_moe_forward
    fn.restype = i32
    fn.argtypes = [p, i64, i32, p, p, i32, i32, i32, p, p, p, p, p, p, i32, i32, p, p, p, p, p, i32]
    fn = lib.wm_moe_routed_forward
    fn.restype = i32
    fn.argtypes = [p, i64, i32, p, i32, p, p, i32, p, p] + lib.wm_moe_forward.argtypes[5:]
    lib.wm_openmp.restype = i32
    lib.wm_int8_dot_native.restype = i32
    lib.wm_vector_isa.restype = i32
    return lib


def slow_target_reason(lib: ctypes.CDLL) -> str:
    """Why the native build should not be used, or "": on an x86-64 CPU without AVX2
    (before Haswell / Excavator) the kernel is generic vector code that GCC splits and
    partly scalarizes, ~50x slower than the AVX2 build (2 GFLOP/s on a 256 x 1024
    expert), where oneDNN and ONNX Runtime still run SSE / AVX kernels. An explicit
    `$WENET_MOE_KERNEL_MARCH` is built and used as asked (to measure it)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and lib.wm_vector_isa() == 0 and not os.environ.get("WENET_MOE_KERNEL_MARCH"):
        return "x86-64 CPU without AVX2: the generic vector code is slower than the libraries'"
    return ""


def cached_library(state: dict, source: Path = SOURCE,
                   warn: Optional[Callable[[str], None]] = None) -> Optional[ctypes.CDLL]:
    """The kernel built from `source`, or None (disabled by `WENET_MOE_CPU_KERNEL=0`,
    no compiler, a failed build, a CPU without AVX2), decided once and kept in `state`
    ("lib", and "reason": why it is None); `warn(reason)` is called when it could not
    be built or is not used (not when disabled)."""
    if "lib" not in state:
        lib, reason = None, ""
        if os.environ.get("WENET_MOE_CPU_KERNEL", "1") == "0":
            reason = "disabled by WENET_MOE_CPU_KERNEL=0"
        else:
            try:
                lib = build(source)
                reason = slow_target_reason(lib)
                if reason:
                    lib = None
            except (OSError, RuntimeError) as err:
                reason = str(err)
            if reason and warn is not None:
                warn(reason)
        state["lib"], state["reason"] = lib, reason
    return state["lib"]


def library() -> Optional[ctypes.CDLL]:
    """The kernel for the runtime (`cached_library`); `disabled_reason()` says why not."""
    return cached_library(_state)


def disabled_reason() -> str:
    """Why `library()` is None ("" when it is available or was not asked for yet)."""
    return _state.get("reason", "")


def int8_dot_native(lib: ctypes.CDLL) -> int:
    """How `lib` multiplies w8a8 rows: 2 VNNI (`vpdpbusd`), 1 AVX2 `vpmaddwd` (about the
    fp32 rate: slower than ONNX Runtime's int8 GEMMs), 0 generic shifts."""
    return int(lib.wm_int8_dot_native())


def huge_page_array(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array in memory that Linux is asked to back with
    2 MiB transparent huge pages (`madvise(MADV_HUGEPAGE)` before first touch): a
    streamed expert then costs one TLB entry per 2 MiB instead of 512. A plain
    `np.empty` where that is unavailable (small arrays, no MADV_HUGEPAGE,
    `WENET_MOE_HUGE_PAGES=0`, or the mapping fails)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or advice is None or os.environ.get("WENET_MOE_HUGE_PAGES", "1") == "0":
        return np.empty(shape, dtype)
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(advice)
    except (OSError, ValueError, AttributeError):
        return np.empty(shape, dtype)
    raw = np.frombuffer(region, dtype=np.uint8)        # keeps `region` alive
    start = (-raw.ctypes.data) % HUGE_PAGE             # from a 2 MiB boundary
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def to_bf16(weight: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(weight, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(weight), 0x7FC0, rounded).astype(np.uint16)


def quantize_int8(weight: np.ndarray):
    """(E, K, N) float32 -> (q int8 (E, K, N), scale float32 (E, N)): symmetric per output
    column, scale = max_k |W| / 127 (1 for an all-zero column), q = round(W / scale)
    (half to even); the same numbers as `wenet_moe.layers.cpu_kernel.quantize_int8`."""
    w = np.asarray(weight, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None, :]), -127, 127).astype(np.int8)
    return q, scale


def pack_weight(weight: np.ndarray, weights: str = "fp32"):
    """(E, K, N) float32 expert weights (y = x W) -> (packed, scale) in the kernel's
    layouts, in huge pages where possible: fp32 / bf16 (`to_bf16` bits) as
    (E, N/16, K, 16) with scale None; w8a8 (`quantize_int8`) as (E, N/16, K/4, 16, 4)
    int8 (groups of 4 k per column) with (E, 2N) words: the column scales, then the
    column sums of q as int32 bits."""
    n_expert, k_dim, n_dim = weight.shape
    if n_dim % BLOCK or (weights == "w8a8" and k_dim % BLOCK):
        raise ValueError(f"packed expert weights need N % {BLOCK} == 0 (and K for w8a8), "
                         f"got K={k_dim} N={n_dim}")
    if weights == "w8a8":
        q, scale = quantize_int8(weight)
        out = huge_page_array((n_expert, n_dim // BLOCK, k_dim // 4, BLOCK, 4), np.int8)
        out[...] = q.reshape(n_expert, k_dim // 4, 4, n_dim // BLOCK, BLOCK).transpose(0, 3, 1, 4, 2)
        sums = q.sum(axis=1, dtype=np.int32)
        return out, np.ascontiguousarray(np.concatenate([scale, sums.view(np.float32)], axis=1))
    values = to_bf16(weight) if weights == "bf16" else weight
    out = huge_page_array((n_expert, n_dim // BLOCK, k_dim, BLOCK), values.dtype)
    out[...] = values.reshape(n_expert, k_dim, n_dim // BLOCK, BLOCK).transpose(0, 2, 1, 3)
    return out, None


def scratch_sizes(n_assign: int, dim: int, hidden: int, n_expert: int):
    """(floats, int64 words) of `wm_moe_forward`'s work space for n_assign = frames x k:
    x_sorted, h and y_sorted, plus `wm_moe_routed_forward`'s gates; the order words."""
    return n_assign * (2 * dim + hidden + 1), 2 * n_assign + 2 * n_expert


def scratch_pointers(base: int, n_assign: int, dim: int, hidden: int):
    """(x_sorted, h, y_sorted, gates) addresses in a float work space at `base`."""
    h = base + 4 * n_assign * dim
    y_sorted = h + 4 * n_assign * hidden
    return base, h, y_sorted, y_sorted + 4 * n_assign * dim


def check_status(status: int, name: str, n_expert: int) -> None:
    """Raise for a nonzero status of `wm_moe_forward` / `wm_moe_routed_forward`."""
    if status == -1:
        raise ValueError(f"{name}: an expert id in top_idx is outside [0, {n_expert})")
    if status == -4:
        raise ValueError(f"{name}: the kernel routes at most 256 experts, k of them (1 <= k <= experts)")
    if status != 0:
        raise MemoryError(f"{name}: the kernel could not allocate its tile buffer")


def _f32(a: np.ndarray, shape, what: str) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.shape != tuple(shape):
        raise ValueError(f"routed experts: {what} must be {tuple(shape)}, got {a.shape}")
    return a


class RoutedExperts:
    """One inference MoE FFN in one C call: logits = [route_emb, x] W_r + b_r, the k
    largest chosen (ties: the lower expert), gates = softmax over those k logits
    (`renormalize`) or the full-softmax probabilities of the chosen experts, and
    out = sum_j gates_j * (act(x W1_e + b1_e) W2_e + b2_e).

    Args:
        lib: `library()`.
        router_weight: (E, E_emb + D) float32 (as torch's Linear stores it);
            router_bias (E,) or None.
        w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D): float32 expert weights.
        k, renormalize, activation ("relu" | "swish"): as the model's layer.
        threads: threads of each call (1 without OpenMP).
        weights: "fp32"; "bf16": w1 / w2 held as bfloat16 (rounded to nearest even;
            widened to fp32 in the kernel's registers), half the bytes to read; "w8a8":
            int8 weights (per output column) times each row quantized to int8 (per
            row), int32 dot products (VNNI where the build has it), a quarter.
    """

    def __init__(self, lib: ctypes.CDLL, router_weight: np.ndarray, router_bias: Optional[np.ndarray],
                 w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, k: int,
                 renormalize: bool, activation: str, threads: int = 1, weights: str = "fp32") -> None:
        n_expert, dim, hidden = w1.shape
        if activation not in ("relu", "swish"):
            raise ValueError(f"routed experts: activation must be relu or swish, got {activation!r}")
        if dim % BLOCK or hidden % BLOCK:
            raise ValueError(f"routed experts: D={dim} and H={hidden} must be multiples of {BLOCK}")
        if weights not in WEIGHT_TYPES:
            raise ValueError(f"routed experts: weights must be one of {', '.join(WEIGHT_TYPES)}, got {weights!r}")
        if not 1 <= k <= n_expert or n_expert > 256:
            raise ValueError(f"routed experts: k={k} of {n_expert} experts (at most 256)")
        self.dim, self.hidden, self.n_expert, self.k = dim, hidden, n_expert, int(k)
        self.emb_dim = router_weight.shape[1] - dim
        self.router_t = np.ascontiguousarray(_f32(router_weight, (n_expert, self.emb_dim + dim),
                                                  "router weight").T)
        self.router_b = None if router_bias is None else _f32(router_bias, (n_expert,), "router bias")
        self.w1, self.scale1 = pack_weight(_f32(w1, (n_expert, dim, hidden), "w1"), weights)
        self.w2, self.scale2 = pack_weight(_f32(w2, (n_expert, hidden, dim), "w2"), weights)
        self.b1 = _f32(b1, (n_expert, hidden), "b1")
        self.b2 = _f32(b2, (n_expert, dim), "b2")
        self._fixed = (int(bool(renormalize)),)
        scale1, scale2 = (None if a is None else a.ctypes.data for a in (self.scale1, self.scale2))
        self._experts = (self.k, n_expert, hidden, self.w1.ctypes.data, scale1, self.b1.ctypes.data,
                         self.w2.ctypes.data, scale2, self.b2.ctypes.data, WEIGHT_TYPES[weights],
                         ACTIVATIONS[activation])
        self._threads = max(1, int(threads)) if lib.wm_openmp() else 1
        self._call = lib.wm_moe_routed_forward
        self._scratch = threading.local()

    def op_inputs(self):
        """The weights as the custom op `wenet_moe.kernel::RoutedExperts` reads them
        (`moe_cpu.c`), in its input order, without copies of the packed experts:
        router_t (E_emb + D, E), router_b (E,), w1 bytes, scale1 (words; empty unless
        w8a8), b1 (E, H), w2 bytes, scale2, b2 (E, D)."""
        none = np.zeros(0, np.float32)
        router_b = np.zeros(self.n_expert, np.float32) if self.router_b is None else self.router_b
        return (self.router_t, router_b, self.w1.reshape(-1).view(np.uint8),
                none if self.scale1 is None else self.scale1.reshape(-1), self.b1,
                self.w2.reshape(-1).view(np.uint8), none if self.scale2 is None else self.scale2.reshape(-1),
                self.b2)

    def _work(self, floats: int, ints: int):
        """This thread's scratch (`floats` float32: x_sorted, h, y_sorted, gates; `ints`
        int64: order and top_idx), grown to the largest call."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf[0].size < floats or buf[1].size < ints:
            buf = (np.empty(max(floats, 1), np.float32), np.empty(ints, np.int64))
            self._scratch.buf = buf
        return buf

    def __call__(self, x: np.ndarray, route_emb: Optional[np.ndarray] = None) -> np.ndarray:
        """x (..., D) float32, route_emb (..., E_emb) (only with E_emb > 0) -> (..., D)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[-1] != self.dim:
            raise ValueError(f"routed experts: x must be (..., {self.dim}), got {x.shape}")
        n_tok = x.size // self.dim
        emb_ptr = None
        if self.emb_dim:
            if route_emb is None or route_emb.size != n_tok * self.emb_dim:
                raise ValueError(f"routed experts: route_emb must hold {n_tok} x {self.emb_dim} values")
            route_emb = np.ascontiguousarray(route_emb, dtype=np.float32)
            emb_ptr = route_emb.ctypes.data
        out = np.empty_like(x)
        if n_tok == 0:
            return out
        n_assign = n_tok * self.k
        n_floats, words = scratch_sizes(n_assign, self.dim, self.hidden, self.n_expert)
        floats, ints = self._work(n_floats, words + n_assign)   # the order words, then top_idx
        x_sorted, h, y_sorted, gates = scratch_pointers(floats.ctypes.data, n_assign, self.dim, self.hidden)
        top_idx = ints.ctypes.data + 8 * words
        status = self._call(x.ctypes.data, n_tok, self.dim, emb_ptr, self.emb_dim, self.router_t.ctypes.data,
                            None if self.router_b is None else self.router_b.ctypes.data, *self._fixed,
                            top_idx, gates, *self._experts, x_sorted, h, y_sorted, ints.ctypes.data,
                            out.ctypes.data, self._threads)
        check_status(status, "routed experts", self.n_expert)
        return out
