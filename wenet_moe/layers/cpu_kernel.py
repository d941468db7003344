"""The small-batch CPU expert kernel (`moe_cpu.c`): built on first use, called via ctypes.

The C file is compiled once per machine with the system C compiler (`$CC`, else `cc`)
as `-O3 -march=native` (`$WENET_MOE_KERNEL_MARCH` overrides the target) into a cache directory (`$WENET_MOE_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/wenet_moe`, else `~/.cache/wenet_moe`); the library name carries a
hash of the source, the flags and the CPU, and is written under a temporary name and
renamed. Without a compiler, or with `WENET_MOE_CPU_KERNEL=0`, `library()` returns
None and MoE layers use the oneDNN kernels instead (a warning says why, once).

Expert weights may be packed as fp32, bf16 (round-to-nearest-even; widened to fp32 in
registers; bf16a rounds the experts' inputs, hidden units and outputs to bf16 too, as a
bf16 GEMM computes them: `BF16_ROWS`), int8 (symmetric, one fp32 scale per output column; fp32 activations) or
w8a8 (the int8 weights, and each input row quantized to int8 in the kernel: int32 dot
products, by VNNI where the build has it, `int8_dot_kind`): `pack_expert_weight`;
`expert_weight_values` gives the fp32 values each precision's weights stand for (for
the fallbacks, the exports and the tests; w8a8 also rounds the activations, see
`quantize_rows`).
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import platform
import threading
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from wenet_moe_runtime import native as _native

__all__ = ["library", "pack_weight", "segment_linear", "moe_forward", "RoutedMoE", "routed_moe_forward",
           "disabled_reason", "pack_expert_weight", "quantize_int8", "quantize_rows", "expert_weight_values",
           "int8_dot_kind", "PRECISIONS"]

# the kernel's source, build and loading live in the torch-free runtime (which runs it too)
SOURCE = _native.SOURCE
FLAGS, OPENMP_FLAGS, LIBS = _native.FLAGS, _native.OPENMP_FLAGS, _native.LIBS
ABI_VERSION = _native.ABI_VERSION
BLOCK = _native.BLOCK          # column block of the packed layout (floats)
ACTIVATIONS = _native.ACTIVATIONS   # fused into the kernel's stores
BF16_ROWS = 8       # ACT_BF16 of `wm_moe_forward`'s act: bf16a's rounding of the activations
PRECISIONS = ("fp32", "bf16", "bf16a", "int8", "w8a8")       # moe_conf.expert_precision
BF16_WEIGHTS = ("bf16", "bf16a")     # the precisions whose packed weights are bfloat16
# packed weight dtype -> the kernel's element type (WT_F32, WT_BF16, WT_I8 in moe_cpu.c;
# int8 in the 4-k groups of `pack_weight_q8` is WT_Q8 = 3)
_WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
WT_Q8 = 3
QUAD = 4            # k per 32-bit group of the WT_Q8 layout

_log = logging.getLogger(__name__)
_state: dict = {}   # "lib": CDLL or None, "reason": why it is None
_scratch = threading.local()


target_arch = _native.target_arch
load = _native.load
_slow_target_reason = _native.slow_target_reason


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel library (of `SOURCE`), or None when it is disabled or cannot
    be built (a warning says why, once; the MoE layers then use oneDNN kernels)."""
    return _native.cached_library(_state, SOURCE, lambda reason: _log.warning(
        "MoE CPU kernel not used (%s); using oneDNN kernels", reason))


def int8_dot_kind() -> str:
    """How the built kernel multiplies w8a8 rows by int8 weights (the same exact int32
    sums every way): "vnni" (AVX512-VNNI / AVX-VNNI `vpdpbusd`, 64 products per
    instruction), "avx2" (`vpmaddwd` on int16, 16), "generic" (shifts and multiplies),
    or "" without a kernel."""
    lib = library()
    if lib is None:
        return ""
    return {2: "vnni", 1: "avx2"}.get(_native.int8_dot_native(lib), "generic")


def threads(lib: ctypes.CDLL) -> int:
    """Threads a kernel call uses: torch's intra-op threads when built with OpenMP, else 1."""
    return torch.get_num_threads() if lib.wm_openmp() else 1


def disabled_reason() -> str:
    """Why `library()` is None ("" when it is available or was not asked for yet)."""
    return _state.get("reason", "")


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E, K, N) weights (y = x W) -> (q int8 (E, K, N), scale float32 (E, N)): symmetric,
    per output column n: scale = max_k |W[k, n]| / 127, q = round(W / scale) (half to
    even) in [-127, 127]; an all-zero column gets scale 1 (q = 0)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def expert_weight_values(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """(E, K, N) fp32 weights -> the fp32 values a kernel of `precision` multiplies with:
    the weights themselves (fp32), rounded to bf16 (round to nearest even; bf16, bf16a), or
    int8 q times its column scale (int8, w8a8)."""
    w = weight.detach().float()
    if precision == "fp32":
        return w
    if precision in BF16_WEIGHTS:
        return w.to(torch.bfloat16).float()
    if precision in ("int8", "w8a8"):
        q, scale = quantize_int8(w)
        return q.float() * scale.unsqueeze(1)
    raise ValueError(f"expert precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")


def pack_weight(weight: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """(E, K, N) expert weights (y = x W) -> the packed layout (E, N/16, K, 16), contiguous,
    of the same dtype (float32, bfloat16 or int8 for the kernel); with copy=False the
    strided view of `weight` in that order (for a copy into memory of one's choice)."""
    n_expert, k_dim, n_dim = weight.shape
    if n_dim % BLOCK:
        raise ValueError(f"packed expert weights need N % {BLOCK} == 0, got N={n_dim}")
    view = weight.detach().reshape(n_expert, k_dim, n_dim // BLOCK, BLOCK).permute(0, 2, 1, 3)
    return view.contiguous() if copy else view


def pack_weight_q8(q: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """(E, K, N) int8 weights -> the WT_Q8 layout (E, N/16, K/4, 64): per 16-column
    panel, groups of 4 k, each 16 columns x 4 bytes (q[4g + t][16 j + c] at 4 c + t);
    copy=False as `pack_weight` (a strided view, shaped (E, N/16, K/4, 16, 4))."""
    n_expert, k_dim, n_dim = q.shape
    if n_dim % BLOCK or k_dim % BLOCK:
        raise ValueError(f"w8a8 expert weights need K % {BLOCK} == 0 and N % {BLOCK} == 0, "
                         f"got K={k_dim} N={n_dim}")
    grouped = q.detach().reshape(n_expert, k_dim // QUAD, QUAD, n_dim // BLOCK, BLOCK)
    view = grouped.permute(0, 3, 1, 4, 2)
    if not copy:
        return view
    return view.reshape(n_expert, n_dim // BLOCK, k_dim // QUAD, QUAD * BLOCK).contiguous()


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel's w8a8 activation rounding, in torch: (R, K) float32 rows -> (q (R, K)
    float32 integers in [-127, 127], scale (R, 1)): a = max_k |x|, q = round(x * (127 / a))
    (half to even), scale = a / 127; an all-zero row gets q = 0, scale 0."""
    amax = x.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(x * inv).clamp_(-127, 127), amax / 127.0


HUGE_PAGE = _native.HUGE_PAGE


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in memory that Linux is asked to back with 2 MiB transparent huge
    pages (`madvise(MADV_HUGEPAGE)` before first touch; honoured in THP modes `always`
    and `madvise`, the common default), when it spans at least one: a streamed expert
    then costs one TLB entry per 2 MiB instead of 512, and the hardware prefetchers,
    which stop at 4 KiB page boundaries, keep streaming (per MoE layer call with the
    experts coming from memory: ~10 % less time at 1-16 frames, `bench/moe_layer.py`).
    `t.contiguous()` where that is unavailable (not Linux, `WENET_MOE_HUGE_PAGES=0`, or
    the mapping fails); the copy holds the same values, contiguous. `t` may be a strided
    view (`pack_weight(w, copy=False)`): copying it straight into the huge pages avoids a
    contiguous intermediate, which glibc kept resident after it was freed (the packed
    experts then cost twice their size in RSS)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_PAGE or os.environ.get("WENET_MOE_HUGE_PAGES", "1") == "0":
        return t.contiguous()
    raw = torch.from_numpy(_native.huge_page_array((nbytes,), np.uint8))   # keeps its mapping alive
    out = raw.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def _return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim(0)`; nothing
    elsewhere). Packing leaves its fp32 temporaries (quantization, bf16 rounding: MiBs
    per expert stack) freed inside the heap, between long-lived allocations, where
    glibc's raised mmap threshold put them; untrimmed they stayed resident (24 w8a8 or
    int8 stacks of 8 x 256 x 1024: +200-360 MiB of RSS for 48-96 MiB of weights)."""
    trim = _state.get("malloc_trim", False)
    if trim is False:
        trim = None
        if platform.system() == "Linux":
            try:
                trim = ctypes.CDLL(None).malloc_trim
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                trim = None
        _state["malloc_trim"] = trim
    if trim is not None:
        trim(0)


def pack_expert_weight(weight: torch.Tensor, precision: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(E, K, N) fp32 expert weights -> (packed (E, N/16, K, 16), scale) for `precision`:
    float32 (fp32), bfloat16 rounded to nearest even (bf16, bf16a), or int8 with its float32
    (E, N) column scales (int8, `quantize_int8`), or for w8a8 int8 in `pack_weight_q8`'s
    layout with (E, 2N) float32: the column scales, then the column sums of q as int32
    bits (the kernel's uint8-offset correction); scale is None for fp32 / bf16. The
    packed weights lie in huge pages where possible (`in_huge_pages`)."""
    w, scale = weight.detach().float(), None
    if precision == "w8a8":
        q, scale = quantize_int8(w)
        sums = q.sum(dim=1, dtype=torch.int32)
        packed = in_huge_pages(pack_weight_q8(q, copy=False))
        packed = packed.view(packed.size(0), packed.size(1), packed.size(2), -1)
        scale = torch.cat([scale, sums.view(torch.float32)], dim=1).contiguous()
    else:
        if precision in BF16_WEIGHTS:
            w = w.to(torch.bfloat16)
        elif precision == "int8":
            w, scale = quantize_int8(w)
        elif precision != "fp32":
            raise ValueError(f"expert precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        packed = in_huge_pages(pack_weight(w, copy=False))
    del w
    if precision != "fp32":
        _return_freed_memory()
    return packed, scale


def _weight_type(packed: torch.Tensor, scale: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    """(kernel element type, scale pointer or 0, K) of a packed weight, checked."""
    wt = _WEIGHT_TYPES.get(packed.dtype)
    if wt is None or not packed.is_contiguous() or packed.dim() != 4:
        raise ValueError(f"packed expert weights: expected a contiguous float32, bfloat16 or int8 "
                         f"tensor from pack_weight, got {packed.dtype} {tuple(packed.shape)}")
    k_dim, words = packed.size(2), 1
    if wt == 2 and packed.size(3) == QUAD * BLOCK:      # pack_weight_q8's layout
        wt, k_dim, words = WT_Q8, packed.size(2) * QUAD, 2
    if (wt in (2, WT_Q8)) != (scale is not None):
        raise ValueError("packed expert weights: int8 weights need their column scales (and only they)")
    if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()
                              or scale.shape != (packed.size(0), words * packed.size(1) * BLOCK)):
        raise ValueError(f"packed expert weights: scale must be contiguous float32 "
                         f"({packed.size(0)}, {words * packed.size(1) * BLOCK}), got {tuple(scale.shape)}")
    return wt, (0 if scale is None else scale.data_ptr()), k_dim


def segment_linear(lib: ctypes.CDLL, x: torch.Tensor, segments: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor, out: torch.Tensor, activation: str = "none",
                   scale: Optional[torch.Tensor] = None) -> None:
    """out[rows of s] = act(x[rows of s] @ W_e + b_e) for each segment s = (start, count, e).

    Args:
        x: (R, K) float32 rows, row-contiguous (stride(1) == 1).
        segments: (3, S) int64, contiguous: starts, counts and expert ids.
        packed: (E, N/16, K, 16) float32, bfloat16 or int8 from `pack_weight`, or
            (E, N/16, K/4, 64) int8 from `pack_weight_q8` (w8a8);
        bias: (E, N) float32 contiguous.
        out: (R, N) float32, row-contiguous; rows outside the segments are untouched.
        activation: "none", "relu" or "swish" (x * sigmoid(x), exp to ~2 ulp).
        scale: (E, N) float32 column scales of int8 weights, (E, 2N) scales and column
            sums of w8a8 ones (`pack_expert_weight`), else None.
    """
    n_seg = segments.size(1)
    wt, scale_ptr, k_dim = _weight_type(packed, scale)
    n_dim = packed.size(1) * BLOCK
    if x.stride(1) != 1 or out.stride(1) != 1 or x.size(1) != k_dim or out.size(1) != n_dim:
        raise ValueError(f"segment_linear: bad shapes x {tuple(x.shape)} out {tuple(out.shape)} "
                         f"for weights K={k_dim} N={n_dim}")
    base = segments.data_ptr()
    step = segments.stride(0) * 8
    status = lib.wm_segment_linear(x.data_ptr(), x.stride(0), base, base + step, base + 2 * step, n_seg,
                                   k_dim, n_dim, packed.data_ptr(), scale_ptr, wt, bias.data_ptr(),
                                   out.data_ptr(), out.stride(0), ACTIVATIONS[activation], threads(lib))
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


def _expert_constants(packs: Tuple[Any, ...], activation: str, k: int,
                      bf16_rows: bool = False) -> Tuple[Any, ...]:
    """`wm_moe_forward`'s arguments k .. act for the experts `packs` (checked; see
    `moe_forward`)."""
    n_expert, hidden = packs[1].shape
    scale1, scale2 = (packs[4], packs[5]) if len(packs) > 4 else (None, None)
    wt, scale1_ptr, _ = _weight_type(packs[0], scale1)
    wt2, scale2_ptr, _ = _weight_type(packs[2], scale2)
    if wt2 != wt:
        raise ValueError(f"moe_forward: w1 is {packs[0].dtype} but w2 is {packs[2].dtype}")
    return (k, n_expert, hidden, packs[0].data_ptr(), scale1_ptr, packs[1].data_ptr(),
            packs[2].data_ptr(), scale2_ptr, packs[3].data_ptr(), wt,
            ACTIVATIONS[activation] | (BF16_ROWS if bf16_rows else 0))


def _scratch(n_assign: int, dim: int, hidden: int, n_expert: int) -> Tuple[int, int, int, int, int]:
    """Pointers to this thread's scratch for `wm_moe_forward`: (x_sorted, h, y_sorted,
    order, gates of `wm_moe_routed_forward`)."""
    floats, words = _native.scratch_sizes(n_assign, dim, hidden, n_expert)
    work = _workspace("float", floats, torch.float32)
    order = _workspace("index", words, torch.int64)
    x_sorted, h, y_sorted, gates = _native.scratch_pointers(work.data_ptr(), n_assign, dim, hidden)
    return x_sorted, h, y_sorted, order.data_ptr(), gates


_check_status = _native.check_status


def moe_forward(lib: ctypes.CDLL, x: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor,
                packs: Tuple[Any, ...], activation: str, bf16_rows: bool = False) -> torch.Tensor:
    """The whole MoE FFN in one call (sort, gather, experts, gated add-back).

    Args:
        x: (N, D) float32; top_idx: (N, k) int64 expert ids; gates: (N, k) float32.
        packs: (w1 packed (E, H/16, D, 16), b1 (E, H), w2 packed (E, D/16, H, 16), b2 (E, D))
            and optionally (scale1 (E, H), scale2 (E, D)) of int8 weights; the packed
            weights are float32, bfloat16 or int8 (`pack_weight`), both of one type.
        activation: "none", "relu" or "swish" (fused into the first linear).
        bf16_rows: round each expert's input rows, hidden units and output rows to
            bfloat16 (expert_precision bf16a; the gated sum stays fp32).
    Returns:
        (N, D) = sum_j gates[:, j] * expert_{top_idx[:, j]}(x).
    """
    x = x.contiguous()
    top_idx = top_idx.contiguous()
    gates = gates.contiguous()
    constants = _expert_constants(packs, activation, top_idx.size(1), bf16_rows)
    out = torch.empty_like(x)
    scratch = _scratch(x.size(0) * top_idx.size(1), x.size(1), constants[2], constants[1])
    status = lib.wm_moe_forward(x.data_ptr(), x.size(0), x.size(1), top_idx.data_ptr(), gates.data_ptr(),
                                *constants, *scratch[:4], out.data_ptr(), threads(lib))
    _check_status(status, "moe_forward", packs[1].size(0))
    return out


class RoutedMoE:
    """The router and the whole MoE FFN in one C call (`moe_forward` with the routing of
    `moe.MoEFFN.route` done in C), its weights checked and their addresses taken once:
    at 1-4 frames the per-call cost of a handful of small torch ops and of argument
    checks is a large part of a layer's time.

    Args:
        lib: `library()`.
        packs, activation: as `moe_forward`.
        router_weight_t: (E_emb + D, E) float32 contiguous, the router's weight
            transposed (input rows [route_emb, x]; E_emb = 0 without an embedding).
        router_bias: (E,) float32 contiguous, or None.
        k, renormalize: experts per frame; gates = softmax over the k chosen logits
            (True) or the full-softmax probabilities of the chosen experts (False).
        threads: threads of each call (`threads(lib)`).
        bf16_rows: as `moe_forward` (expert_precision bf16a).
    The tensors are referenced, not copied: the caller rebuilds this object when they change.
    """

    def __init__(self, lib: ctypes.CDLL, packs: Tuple[Any, ...], activation: str,
                 router_weight_t: torch.Tensor, router_bias: Optional[torch.Tensor], k: int,
                 renormalize: bool, threads: int, bf16_rows: bool = False):
        self._experts = _expert_constants(packs, activation, k, bf16_rows)
        n_expert, hidden = packs[1].shape
        dim = packs[3].size(1)
        if (router_weight_t.dtype != torch.float32 or not router_weight_t.is_contiguous()
                or router_weight_t.dim() != 2 or router_weight_t.size(1) != n_expert
                or router_weight_t.size(0) < dim):
            raise ValueError(f"routed MoE: router weight must be contiguous float32 (E_emb + {dim}, "
                             f"{n_expert}), got {router_weight_t.dtype} {tuple(router_weight_t.shape)}")
        if router_bias is not None and (router_bias.dtype != torch.float32 or not router_bias.is_contiguous()
                                        or router_bias.shape != (n_expert,)):
            raise ValueError(f"routed MoE: router bias must be contiguous float32 ({n_expert},), "
                             f"got {router_bias.dtype} {tuple(router_bias.shape)}")
        self.dim, self.hidden, self.n_expert, self.k = dim, hidden, n_expert, k
        self.emb_dim = router_weight_t.size(0) - dim
        self._tensors = (packs, router_weight_t, router_bias)     # kept alive
        self._router = (router_weight_t.data_ptr(), None if router_bias is None else router_bias.data_ptr(),
                        int(renormalize))
        self._threads = threads
        self._call = lib.wm_moe_routed_forward

    def __call__(self, x: torch.Tensor, route_emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) float32, route_emb (N, E_emb) float32 (not read when E_emb = 0) ->
        ((N, D) output, (N, k) int64 chosen experts, largest logit first)."""
        x = x.contiguous()
        n_tok = x.size(0)
        if x.dim() != 2 or x.size(1) != self.dim or x.dtype != torch.float32:
            raise ValueError(f"routed MoE: x must be float32 (N, {self.dim}), got {x.dtype} {tuple(x.shape)}")
        emb_ptr = None
        if self.emb_dim:
            route_emb = route_emb.contiguous()
            if route_emb.shape != (n_tok, self.emb_dim) or route_emb.dtype != torch.float32:
                raise ValueError(f"routed MoE: route_emb must be float32 ({n_tok}, {self.emb_dim}), "
                                 f"got {route_emb.dtype} {tuple(route_emb.shape)}")
            emb_ptr = route_emb.data_ptr()
        out = torch.empty_like(x)
        top_idx = torch.empty(n_tok, self.k, dtype=torch.int64)
        scratch = _scratch(n_tok * self.k, self.dim, self.hidden, self.n_expert)
        status = self._call(x.data_ptr(), n_tok, self.dim, emb_ptr, self.emb_dim, *self._router,
                            top_idx.data_ptr(), scratch[4], *self._experts, *scratch[:4], out.data_ptr(),
                            self._threads)
        _check_status(status, "routed MoE", self.n_expert)
        return out, top_idx


def routed_moe_forward(lib: ctypes.CDLL, x: torch.Tensor, route_emb: torch.Tensor,
                       router_weight_t: torch.Tensor, router_bias: Optional[torch.Tensor], k: int,
                       renormalize: bool, packs: Tuple[Any, ...], activation: str,
                       bf16_rows: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """`RoutedMoE` built for one call: ((N, D) output, (N, k) chosen experts)."""
    return RoutedMoE(lib, packs, activation, router_weight_t, router_bias, k, renormalize,
                     threads(lib), bf16_rows)(x, route_emb)
