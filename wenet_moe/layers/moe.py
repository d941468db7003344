"""Mixture-of-Experts FFN: one layer class with a pluggable router (see moe_router.py).

Experts are stored stacked: w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D); expert e
computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``, i.e. exactly the dense
`PositionwiseFeedForward` with ``w_1.weight = w1[e].T`` etc.

Dispatch (no Python loop over frames): the N*k (frame, expert) assignments are sorted
by expert once, the frames are gathered once into expert-contiguous rows, and each
expert runs two GEMMs on its contiguous slice (the loop is over experts, E iterations).
  * eager: stable sort, experts without frames skipped (their weights are never read),
    results combined with one index_add (PyTorch accumulates duplicate indices);
    without autograd the expert outputs are written in place into one buffer.
  * eager CPU fp32 inference (`packed_experts`, default on), on weights packed once
    (built on first use, rebuilt when a weight changes: tensor version / storage):
    - up to `kernel_max_rows` rows per expert (measured at first use on this CPU at
      torch's thread count): the C kernel of moe_cpu.c (cpu_kernel.py; compiled
      on first use, oneDNN if it cannot be; torch's OpenMP threads): for relu/swish
      experts the whole layer is one C call (counting sort, gather, both linears with
      the activation fused, gated add-back);
      it streams each expert's weights once, prefetching ahead (~2x oneDNN at 4 rows,
      as fast as MKL's large GEMM at 256 rows);
    - otherwise (large batches where oneDNN measured faster), or without the kernel:
      the same sorted dispatch with each expert as two oneDNN linear calls on weights
      in oneDNN's blocked layout (activation fused).
    MKL's GEMM re-packs the weight matrix on every call, which dominates at the few
    rows an expert gets from a streaming chunk (numbers: docs/moe.md). Each packed
    copy holds as many bytes again as the experts.
    `expert_precision` bf16 / int8 packs the kernel's weights as bf16 (half the bytes)
    or int8 with per-column scales (a quarter), widened to fp32 in registers; w8a8
    takes the int8 weights and also rounds each expert input row to int8 (one scale
    per row), so that the kernel multiplies int8 by int8 into int32 (VNNI where the CPU
    has it). The oneDNN kind and the no-kernel fallback run fp32 on the same rounded
    weights (and, for w8a8, the same rounded rows: `cpu_kernel.quantize_rows`).
    bf16a takes the bf16 weights and rounds each expert's input rows, hidden units and
    output rows to bf16: what a bf16 GEMM computes (bf16 operands, fp32 sums; an
    activation oneDNN does not fuse, i.e. not relu / swish / gelu, gets the first
    GEMM's bf16 output). Its oneDNN kind IS a bf16 GEMM (AMX or AVX512-BF16 where the
    CPU has them: 1.4-1.6x fp32 at 64+ rows per expert on AVX512-BF16), chosen above
    the rows per expert measured at first use (`kernel_max_rows`, at every thread
    count); the kernel and the fallback round in fp32, so every kind computes the same
    values up to the order of the fp32 sums (a bf16 rounding may then differ by one
    step).
  * eager all-frames (`all_frames_rows`): when frames per used expert N*k/E_used are at
    most the threshold, every used expert runs on all N frames with zero gates where
    not chosen (no sort/gather/scatter). Measured (docs/moe.md): it only ties the
    sorted path at ~1 frame per used expert and loses above, hence the default 1.0.
  * eager off the CPU (CUDA; `ACCELERATOR_DISPATCH`, default "auto"): every launch costs
    host time and the sorted loop syncs with the host once per layer (its per-expert
    row counts), so: inference on at most DENSE_MAX_FRAMES frames runs every expert as
    one FFN of E*H hidden units whose hidden units are scaled by the dense (N, E) gate
    matrix (zero where not chosen; eight launches, no sync); bf16 (autocast) runs both
    linears as torch's grouped GEMM over the sorted rows, group ends on the device (no
    sync; training capacity decided on the device too); otherwise the sorted loop.
    Measured on an H200: docs/moe.md, "On a CUDA GPU".
  * eager CPU bf16 training (autocast): each expert's rows are padded with zeros to a
    multiple of BF16_ROW_MULTIPLE, so that oneDNN's bf16 GEMMs (compiled per shape)
    come from its cache rather than being compiled for every batch's row counts.
  * TorchScript / ONNX: unique integer sort keys (so any sort gives the same order),
    tensor-valued slice bounds (kept dynamic by the scripted export, so every length
    works, experts with 0 frames included), the gated rows put back in assignment order
    with ONE gather through the inverse permutation, then the k rows of a frame summed:
    nothing scatter-adds twice into one row, since ONNX ScatterElements would not
    accumulate duplicates.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from wenet_moe.config import ConfigError
from wenet_moe.layers import cpu_kernel
from wenet_moe.layers.activation import get_activation
from wenet_moe.layers.moe_router import (ALL_FRAMES_ROWS, LAST_EMBEDDING, LAST_ROUTING, RouteEmbedding,
                                         Router, balance_loss, frame_mask, importance_loss,
                                         resolve_moe_conf, sparsity_loss)

__all__ = ["MoEFFN", "MoEFactory", "moe_aux_losses", "expert_load", "expert_load_entropy",
           "active_parameters"]

_log = logging.getLogger(__name__)
# oneDNN linear with pre-packed weights (the kernels torch.compile's CPU freezing uses)
_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                  and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@functools.lru_cache(maxsize=None)
def _bf16_gemm_supported() -> bool:
    """Whether oneDNN runs bf16 GEMMs natively on this CPU (AMX, AVX512-BF16, or
    AVX-512 BW/VL/DQ emulation; torch refuses its bf16 linear on AVX2-only CPUs): the
    precondition of bf16a's oneDNN kind."""
    try:
        return _ONEDNN_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# MoEFFN -> (weight key, {kind: packed weights}) (see MoEFFN._packed); kept outside the
# module so that state_dict, deepcopy and TorchScript never see the opaque tensors.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, Dict[str, Any]]]" = weakref.WeakKeyDictionary()
# MoEFFN -> (key, cpu_kernel.RoutedMoE or None, most rows per expert) of the fused C
# path (MoEFFN._kernel_forward), outside the module for the same reasons as _PACKED
_KERNEL_PLANS: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, Any, float]]" = weakref.WeakKeyDictionary()
# (dim, hidden, activation, threads, precision) -> rows per expert up to which the C
# kernel beats oneDNN, measured once per process (kernel_max_rows)
_KERNEL_MAX_ROWS: Dict[Tuple[int, int, str, int, str], float] = {}
# expert precisions already warned about running without the C kernel (once each)
_PRECISION_WARNED: set = set()
# rows per expert tried by kernel_max_rows, ascending
_PROBE_ROWS = (4, 16, 32, 64, 256, 1024)
# most rows of one probe call (past it, fewer experts: the large sizes are compute-bound)
_PROBE_TOTAL_ROWS = 2048
# how much faster oneDNN must be at a size to take it (past the sizes where the kernel
# wins, the two are within a few per cent, and a noisy probe flipped between them)
_PROBE_MARGIN = 0.05
# fp32 bytes of the experts kernel_max_rows cycles through (more than a core's caches)
_PROBE_BYTES = 16 << 20
# eager dispatch on accelerators (x not on the CPU): "auto" (`MoEFFN._accelerator_path`),
# or one of "loop" (the sorted per-expert loop, as on CPU), "grouped" (two grouped
# GEMMs, no host sync) and "dense" (every expert on every frame, zero gates); benches
# set it to compare the three
ACCELERATOR_PATHS = ("auto", "loop", "grouped", "dense")
ACCELERATOR_DISPATCH = "auto"
# CUDA frames (N) up to which "auto" takes "dense" in inference (launch-bound sizes)
DENSE_MAX_FRAMES = 256
# bf16 training on the CPU: each expert's rows are padded to a multiple of this
# (oneDNN compiles a bf16 GEMM per new shape; see MoEFFN._dispatch_eager)
BF16_ROW_MULTIPLE = 16


def _grouped_mm_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM has its fused, sync-free kernel for `dtype` on
    `device`: bf16 on CUDA compute capability 9.0+ (elsewhere it loops over the groups
    with a host sync, no better than the sorted loop)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def kernel_max_rows(dim: int, hidden: int, activation: str, precision: str = "fp32") -> float:
    """Rows per expert up to which `packed_experts: true` takes the C kernel rather than
    oneDNN, for experts D x H -> D at torch's current thread count, the kernel's weights
    in `precision` (oneDNN runs fp32, or for bf16a a bf16 GEMM: AMX / AVX512-BF16).

    Measured at first use in this process for each (D, H, activation, threads,
    precision), at one thread too (0.1-1 s; on the development machine's Zen 4 the
    kernel wins at every size with one thread, which another CPU's GEMMs need not
    allow): random experts holding `_PROBE_BYTES` of fp32 weights, so that they come
    from memory as a model's do (one expert stays in cache, which hid the bytes bf16 /
    int8 save: the kernel reads those, oneDNN the fp32 values), each call running
    `_PROBE_ROWS` rows on each of as many experts as `_PROBE_TOTAL_ROWS` allows (at
    least one), both kernels interleaved, median of 5, oneDNN with the eager dispatch's
    gather and add-back (the kernel's C call does its own); the limit is the largest
    size up to which oneDNN was never faster by more than `_PROBE_MARGIN` (oneDNN's
    GEMM wins once the experts are compute-bound, at a size that depends on the CPU,
    the thread count and the precision), inf when that is every size tried. inf
    without oneDNN's linear or the kernel, and for bf16a where the CPU has no bf16
    GEMM. The environment variable `WENET_MOE_KERNEL_MAX_ROWS` fixes it instead."""
    threads = torch.get_num_threads()
    fixed = os.environ.get("WENET_MOE_KERNEL_MAX_ROWS")
    if fixed:
        try:
            return float(fixed)
        except ValueError:
            raise ValueError(f"WENET_MOE_KERNEL_MAX_ROWS: expected a number of rows, "
                             f"got {fixed!r}") from None
    if not _ONEDNN_LINEAR or cpu_kernel.library() is None:
        return math.inf
    if precision == "bf16a" and not _bf16_gemm_supported():
        return math.inf
    key = (dim, hidden, activation, threads, precision)
    if key in _KERNEL_MAX_ROWS:
        return _KERNEL_MAX_ROWS[key]
    lib = cpu_kernel.library()
    gen = torch.Generator().manual_seed(0)
    copies = max(1, min(64, _PROBE_BYTES // (8 * dim * hidden)))
    w1 = torch.randn(copies, dim, hidden, generator=gen) / math.sqrt(dim)
    w2 = torch.randn(copies, hidden, dim, generator=gen) / math.sqrt(hidden)
    b1, b2 = torch.zeros(copies, hidden), torch.zeros(copies, dim)
    (p1, s1), (p2, s2) = (cpu_kernel.pack_expert_weight(w, precision) for w in (w1, w2))
    linear = torch.ops.mkldnn._linear_pointwise
    values = [cpu_kernel.expert_weight_values(w, precision) for w in (w1, w2)]
    dnn = _onednn_experts(values[0], b1, values[1], b2, precision)
    dnn_dtype = dnn[0][0].dtype
    del w1, w2, values
    attr = activation if activation in ("relu", "swish") else "none"
    limit = 0.0
    with torch.inference_mode():
        for rows in _PROBE_ROWS:
            n = max(1, min(copies, _PROBE_TOTAL_ROWS // rows))      # experts run this size
            x = torch.randn(n * rows, dim, generator=gen)
            segments = cpu_kernel.segments_of([rows] * n)
            hid, out = x.new_empty(n * rows, hidden), x.new_empty(n * rows, dim)
            order = torch.randperm(n * rows, generator=gen)

            def by_kernel() -> None:     # (the layer's C call sorts and adds back itself)
                cpu_kernel.segment_linear(lib, x, segments, p1, b1, hid, attr, s1)
                cpu_kernel.segment_linear(lib, hid, segments, p2, b2, out, "none", s2)

            def by_onednn() -> None:     # with the eager dispatch's gather and add-back
                x_dnn = x.index_select(0, order).to(dnn_dtype)    # bf16a: bf16 rows
                for e, (d1, c1, d2, c2) in enumerate(dnn[:n]):
                    part = slice(e * rows, (e + 1) * rows)
                    out[part] = linear(linear(x_dnn[part], d1, c1, attr, [], None), d2, c2, "none", [], None)
                torch.zeros_like(out).index_add_(0, order, out)
            times: Dict[str, List[float]] = {"kernel": [], "onednn": []}
            for rep in range(6):
                for name, fn in (("kernel", by_kernel), ("onednn", by_onednn))[::1 - 2 * (rep % 2)]:
                    start = time.perf_counter()
                    fn()
                    if rep > 0:                 # the first round warms up
                        times[name].append(time.perf_counter() - start)
            kernel_t = sorted(times["kernel"])[2]
            onednn_t = sorted(times["onednn"])[2]
            if kernel_t > onednn_t * (1 + _PROBE_MARGIN):
                break
            limit = float(rows)
    if limit == float(_PROBE_ROWS[-1]):
        limit = math.inf
    _KERNEL_MAX_ROWS[key] = limit
    return limit


def _member(module: nn.Module, name: str) -> Any:
    """`module.<name>` for a parameter, buffer or submodule, without nn.Module.__getattr__'s
    Python fallback (~1 us each: a sizeable part of a one-frame layer call). A plain
    attribute comes first: FSDP swaps the unsharded tensors in as attributes."""
    found = module.__dict__.get(name)
    if found is not None:
        return found
    for table in (module._parameters, module._modules, module._buffers):
        if name in table:
            return table[name]
    return getattr(module, name)     # (raises the usual AttributeError)


def _onednn_experts(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    precision: str) -> List[Tuple[torch.Tensor, ...]]:
    """[(w1, b1, w2, b2) per expert] for oneDNN's linear from fp32 weights (E, D, H) /
    (E, H, D) holding `precision`'s values and biases (E, H) / (E, D): weights in
    oneDNN's blocked layout, bfloat16 for bf16a (a bf16 GEMM; its values are bf16
    already, so exact), else float32; biases copied."""
    reorder = torch.ops.mkldnn._reorder_linear_weight
    dtype = torch.bfloat16 if precision == "bf16a" else torch.float32
    return [(reorder(w1[e].t().contiguous().to(dtype)), b1[e].clone(),
             reorder(w2[e].t().contiguous().to(dtype)), b2[e].clone()) for e in range(w1.size(0))]


def _round_bf16_(t: torch.Tensor) -> torch.Tensor:
    """t (float32) rounded to bfloat16 values in place (nearest, ties to even)."""
    return t.copy_(t.to(torch.bfloat16))


def _fused_activation(activation: nn.Module) -> Tuple[str, Optional[str]]:
    """oneDNN post-op (attr, algorithm) equal to `activation`, or ("", None) if none is."""
    if isinstance(activation, nn.SiLU):
        return "swish", None
    if isinstance(activation, nn.ReLU):
        return "relu", None
    if isinstance(activation, nn.GELU):
        return "gelu", activation.approximate
    return "", None


class MoEFFN(nn.Module):
    """MoE feed-forward block: (B, T, D), route_emb (B, T, E_emb) or empty -> (B, T, D).

    Args:
        idim: model dimension D.
        hidden_units: inner dimension H of one expert.
        dropout_rate: dropout after the activation (as the dense FFN).
        activation: activation module.
        n_expert, n_expert_activated: E experts, k chosen per frame.
        router: module mapping (N, D [+ E_emb]) -> logits (N, E); may be shared.
        router_kind: "topk" | "switch" | "speechmoe" | "omni".
        use_route_emb: concat `route_emb` before the layer input as router input.
        capacity_factor: > 0 caps each expert at ceil(cf * N * k / E) assignments
            during training, N the valid frames of the batch (`mask_pad`); overflow
            assignments and padding frames contribute zero; 0 = off.
        all_frames_rows: eager all-frames dispatch threshold (module docstring).
        packed_experts: eager CPU fp32 inference on packed experts: True (C kernel
            for small batches, oneDNN above), "kernel", "onednn" or False.
        expert_precision: "fp32", "bf16", "bf16a", "int8" or "w8a8": the packed experts'
            weights (bf16a: bf16 weights and bf16 expert inputs, hidden units and outputs;
            w8a8: int8 weights and int8 expert inputs, per-row scales); eager CPU
            inference only (training, autograd and TorchScript use w1/w2).
        conf: the resolved moe_conf (loss weights), kept for `moe_aux_losses`.
    """

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float,
                 activation: nn.Module, n_expert: int, n_expert_activated: int,
                 router: nn.Module, router_kind: str, use_route_emb: bool,
                 capacity_factor: float = 0.0, conf: Optional[Dict[str, Any]] = None,
                 all_frames_rows: float = ALL_FRAMES_ROWS, packed_experts: Any = True,
                 expert_precision: str = "fp32"):
        super().__init__()
        self.idim = idim
        self.hidden_units = hidden_units
        self.n_expert = n_expert
        self.n_expert_activated = n_expert_activated
        self.router_kind = router_kind
        # topk / omni with k >= 2: softmax over the selected logits; switch / speechmoe,
        # and topk / omni with k = 1: gates are the full-softmax probabilities of the
        # chosen experts (a softmax over one logit is always 1: the router would get no
        # gradient from the main loss).
        self.renormalize = router_kind in ("topk", "omni") and n_expert_activated > 1
        self.use_route_emb = use_route_emb
        self.capacity_factor = float(capacity_factor)
        # eager all-frames path when frames per used expert (N*k/E_used) <= this
        self.all_frames_rows = float(all_frames_rows)
        # CPU fp32 inference through oneDNN-packed expert weights (see module docstring)
        self.packed_experts: Any = packed_experts   # True | False | "kernel" | "onednn"
        if expert_precision not in cpu_kernel.PRECISIONS:
            raise ValueError(f"MoEFFN: expert_precision must be one of {', '.join(cpu_kernel.PRECISIONS)}, "
                             f"got {expert_precision!r}")
        # weights of the packed experts: "fp32" | "bf16" | "bf16a" | "int8" | "w8a8" (`_packed`)
        self.expert_precision = expert_precision
        self._fused_activation = _fused_activation(activation)
        # the activation the C kernel fuses ("relu" / "swish"), or "none" (torch's, unfused)
        self._kernel_activation = (self._fused_activation[0]
                                   if self._fused_activation[0] in ("relu", "swish") else "none")
        self.router = router
        self.activation = activation
        self.dropout = nn.Dropout(dropout_rate)
        self.w1 = nn.Parameter(torch.empty(n_expert, idim, hidden_units))
        self.b1 = nn.Parameter(torch.empty(n_expert, hidden_units))
        self.w2 = nn.Parameter(torch.empty(n_expert, hidden_units, idim))
        self.b2 = nn.Parameter(torch.empty(n_expert, idim))
        self.reset_parameters()
        # loss weights only (floats), read by moe_aux_losses; unused in forward
        self.moe_conf = {key: value for key, value in (conf or {}).items()
                         if isinstance(value, float)}

    def reset_parameters(self) -> None:
        """Each expert initialised as nn.Linear would be (uniform +-1/sqrt(fan_in))."""
        bound1 = 1.0 / math.sqrt(self.idim)
        bound2 = 1.0 / math.sqrt(self.hidden_units)
        nn.init.uniform_(self.w1, -bound1, bound1)
        nn.init.uniform_(self.b1, -bound1, bound1)
        nn.init.uniform_(self.w2, -bound2, bound2)
        nn.init.uniform_(self.b2, -bound2, bound2)

    def train(self, mode: bool = True) -> "MoEFFN":
        """nn.Module.train, which also drops this layer's packed experts and prepared C
        call: they are rebuilt when a weight's version counter moves, and some in-place
        updates do not move it (torch's fused optimizers, writes through `.data`), so a
        model that trained and is evaluated again must not keep them."""
        _PACKED.pop(self, None)
        _KERNEL_PLANS.pop(self, None)
        return super().train(mode)

    def route(self, x: torch.Tensor, route_emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D), route_emb (N, E_emb) or empty -> (logits (N,E), top_idx (N,k), gates (N,k))."""
        if self.use_route_emb:
            router_in = torch.cat([route_emb.to(x.dtype), x], dim=-1)
        else:
            router_in = x
        logits = self.router(router_in)
        top_logits, top_idx = torch.topk(logits, self.n_expert_activated, dim=-1)
        if self.renormalize:
            gates = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)
        else:
            probs = torch.softmax(logits.float(), dim=-1).to(x.dtype)
            gates = probs.gather(1, top_idx)
        return logits, top_idx, gates

    def forward(self, xs: torch.Tensor, route_emb: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool)) -> torch.Tensor:
        """xs (B, T, D), route_emb (B, T, E_emb) or empty, mask_pad bool (B, 1, T) valid
        frames or empty (all valid; read only by the training-time capacity) -> (B, T, D)."""
        if not torch.jit.is_scripting() and (xs.dim() != 3 or xs.size(2) != self.idim):
            raise ValueError(f"MoE FFN: xs must be (B, T, {self.idim}), got {tuple(xs.shape)}")
        # the constant width, not xs.size(2): the export then reshapes by a constant
        # instead of computing the shape at run time (a dozen nodes per layer)
        x = xs.reshape(-1, self.idim)
        emb = route_emb
        if self.use_route_emb:
            if route_emb.dim() != 3 or route_emb.size(0) != xs.size(0) or route_emb.size(1) != xs.size(1):
                raise ValueError("speechmoe MoE FFN: route_emb must be the shared frame "
                                 "embedding (B, T, E) of the encoder input")
            emb = route_emb.reshape(-1, route_emb.size(-1))
        if torch.jit.is_scripting():
            logits, top_idx, gates = self.route(x, emb)
            return self.dispatch(x, top_idx, gates).view_as(xs)
        batch, time = xs.size(0), xs.size(1)
        fused = self._kernel_forward(x, emb)
        if fused is not None:
            LAST_ROUTING[self] = (None, fused[1].view(batch, time, -1))
            return fused[0].view_as(xs)
        logits, top_idx, gates = self.route(x, emb)
        out = self.dispatch(x, top_idx, gates, self._valid_frames(mask_pad, batch, time))
        self._record(logits, top_idx, batch, time)
        return out.view_as(xs)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x (n, D) -> (n, D)."""
        h = torch.addmm(self.b1[e], x, self.w1[e])
        h = self.dropout(self.activation(h))
        return torch.addmm(self.b2[e], h, self.w2[e])

    def dispatch(self, x: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor,
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mix of the chosen experts: x (N, D), top_idx/gates (N, k), valid (N,) bool or
        None (eager training capacity only) -> (N, D).

        Eager PyTorch takes `_dispatch_eager`; TorchScript (and so the ONNX export) takes
        the path below, which uses only ops whose ONNX forms are exact: a sort of the
        assignments by expert, gathers, one split of the sorted rows by the per-expert
        counts, the inverse permutation (a sort of the order), and a sum over k. k is the
        module constant `n_expert_activated` and frame indices use truncating division
        (indices are >= 0), so the export has no `If` and no floor-division chain;
        `wenet_moe.export.onnx_passes.fuse_expert_split` turns the split
        (SplitToSequence + a SequenceAt per expert) into one ONNX Split.
        """
        if not torch.jit.is_scripting():
            return self._dispatch_eager(x, top_idx, gates, valid)
        k = self.n_expert_activated
        flat = top_idx.reshape(-1)
        # expert-major order of the assignments (any order within an expert will do: the
        # inverse below undoes it; ONNX TopK keeps equal keys in index order)
        order = torch.argsort(flat)
        x_sorted = x.index_select(0, torch.div(order, k, rounding_mode="trunc"))
        gate_sorted = gates.reshape(-1).index_select(0, order)
        experts = torch.arange(self.n_expert, dtype=flat.dtype, device=flat.device)
        counts = (flat.unsqueeze(1) == experts.unsqueeze(0)).sum(0)     # (E,)
        sizes: List[int] = []
        for e in range(self.n_expert):
            sizes.append(int(counts[e]))
        rows = torch.split(x_sorted, sizes)
        pieces: List[torch.Tensor] = []
        for e in range(self.n_expert):
            pieces.append(self.expert(e, rows[e]))
        y_sorted = torch.cat(pieces, 0) * gate_sorted.unsqueeze(1)
        y = y_sorted.index_select(0, torch.argsort(order))       # the inverse permutation
        if k == 1:
            return y
        return y.view(-1, k, self.idim).sum(1)

    @torch.jit.unused
    def _kernel_forward(self, x: torch.Tensor, emb: torch.Tensor
                        ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(out (N, D), top_idx (N, k)) for x (N, D), emb (N, E_emb) or empty, by one C call
        that routes and runs the experts (`cpu_kernel.RoutedMoE`), when the C kernel
        serves this call (as `_packed` decides) and the router is a float32 `Router`
        without forward hooks (they would not run); else None. Same routing and gates
        as `route` up to float rounding (its sums run in another order). The prepared
        call is kept per layer and rebuilt when a weight (expert or router) changes, or
        the precision, packing mode or thread count."""
        router = _member(self, "router")
        if (self.training or not isinstance(router, Router) or self._kernel_activation == "none"
                or router._forward_hooks or router._forward_pre_hooks
                or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return None
        gate = _member(router, "gate")
        bias = _member(gate, "bias")
        key = ((torch.get_num_threads(), self.expert_precision, self.packed_experts)
               + tuple((t.data_ptr(), t._version) for t in (_member(self, "w1"), _member(self, "b1"),
                                                           _member(self, "w2"), _member(self, "b2"),
                                                           _member(gate, "weight")))
               + (None if bias is None else (bias.data_ptr(), bias._version),))
        plan = _KERNEL_PLANS.get(self)
        if plan is None or plan[0] != key:
            plan = (key,) + self._kernel_plan(x)
            _KERNEL_PLANS[self] = plan
        n_assign = x.size(0) * self.n_expert_activated
        call, max_rows = plan[1], plan[2]
        if call is None or n_assign / min(n_assign, self.n_expert) > max_rows:
            return None
        return call(x, emb)    # (read only with a route embedding)

    @torch.jit.unused
    def _kernel_plan(self, x: torch.Tensor) -> Tuple[Optional[cpu_kernel.RoutedMoE], float]:
        """(the prepared C call or None, the most rows per expert it takes) for
        `_kernel_forward`: the kernel where `_packed` would choose it (with several
        threads and packed_experts true, up to `kernel_max_rows`)."""
        packed = self._packed(x, 1.0)
        gate = self.router.gate
        if packed is None or packed[0] != "kernel" or gate.weight.dtype != torch.float32:
            return None, 0.0
        max_rows = math.inf
        if self.packed_experts is True and _ONEDNN_LINEAR:
            max_rows = kernel_max_rows(self.idim, self.hidden_units, self._kernel_activation,
                                       self.expert_precision)
        # copies: FSDP frees the unsharded parameters' storage between forwards
        bias = None if gate.bias is None else gate.bias.detach().clone()
        lib = cpu_kernel.library()
        weight_t = gate.weight.detach().t().clone(memory_format=torch.contiguous_format)
        return cpu_kernel.RoutedMoE(lib, packed[1], self._kernel_activation, weight_t, bias,
                                    self.n_expert_activated, self.renormalize,
                                    cpu_kernel.threads(lib), self.expert_precision == "bf16a"), max_rows

    @torch.jit.unused
    def _valid_frames(self, mask_pad: torch.Tensor, batch: int, time: int) -> Optional[torch.Tensor]:
        """(B*T,) bool valid frames of `mask_pad` (B, 1, T) when the capacity is in force
        (training, capacity_factor > 0) and a mask was given, else None."""
        if not (self.training and self.capacity_factor > 0) or mask_pad.numel() == 0:
            return None
        if mask_pad.numel() != batch * time or mask_pad.size(0) != batch:
            raise ValueError(f"MoE FFN: mask_pad of shape {tuple(mask_pad.shape)} does not mark "
                             f"the frames of xs ({batch}, {time}, D)")
        return mask_pad.reshape(-1).to(torch.bool)

    @torch.jit.unused
    def _capacity(self, flat: torch.Tensor, k: int, valid: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, List[int], List[int]]:
        """Capacity-limited sorting of the assignments `flat` (N*k,) expert ids: (sort keys,
        assignments per key, the most assignments kept per key). Each expert keeps
        ceil(cf * N_valid * k / E) assignments, N_valid the valid frames; padding
        assignments get the extra key E, which is never run, so they neither take an
        expert's slot nor are kept."""
        n_valid = flat.numel() // k if valid is None else int(valid.sum())
        cap = int(math.ceil(self.capacity_factor * n_valid * k / self.n_expert))
        if valid is None:
            return flat, torch.bincount(flat, minlength=self.n_expert).tolist(), [cap] * self.n_expert
        keys = flat.masked_fill(~valid.repeat_interleave(k), self.n_expert)
        counts = torch.bincount(keys, minlength=self.n_expert + 1).tolist()
        return keys, counts, [cap] * self.n_expert + [0]

    @torch.jit.unused
    def _dispatch_eager(self, x: torch.Tensor, top_idx: torch.Tensor,
                        gates: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Eager dispatch: one stable sort, one gather, a contiguous slice per expert that
        received frames (others are skipped: their weights are never read), one
        index_add back (PyTorch accumulates duplicate indices). Without autograd the
        expert outputs are written in place into one buffer (no concatenation copy),
        by the oneDNN-packed kernels where `_packed` allows them.
        Capacity (training, capacity_factor > 0): each expert keeps its first
        ceil(cf * N * k / E) assignments of valid frames (`valid`, N of them) in frame
        order; the rest and every padding frame contribute zero (`_capacity`)."""
        n_tok, k = top_idx.size(0), top_idx.size(1)
        n_assign, dim = n_tok * k, x.size(1)
        if x.device.type != "cpu":
            path = self._accelerator_path(x)
            if path == "grouped":
                return self._dispatch_grouped(x, top_idx, gates, valid)
            if path == "dense":
                return self._dispatch_dense(x, top_idx, gates)
        # inference on CPU fp32: packed experts (rows per expert if all get some)
        packed = self._packed(x, n_assign / min(n_assign, self.n_expert))
        if packed is not None and packed[0] == "kernel" and self._kernel_activation != "none":
            return cpu_kernel.moe_forward(cpu_kernel.library(), x, top_idx, gates.to(x.dtype),
                                          packed[1], self._kernel_activation,
                                          self.expert_precision == "bf16a")
        flat = top_idx.reshape(-1)
        counts = torch.bincount(flat, minlength=self.n_expert).tolist()
        capped = self.training and self.capacity_factor > 0
        used = [e for e, count in enumerate(counts) if count > 0]
        if packed is None and not capped and n_assign <= self.all_frames_rows * len(used):
            return self._dispatch_all_frames(x, top_idx, gates, used)
        limits = [n_assign] * self.n_expert       # the most assignments kept per sort key
        if capped:
            flat, counts, limits = self._capacity(flat, k, valid)
        order = torch.argsort(flat, stable=True)
        token = torch.div(order, k, rounding_mode="floor")
        x_sorted = x.index_select(0, token)
        gate_sorted = gates.reshape(-1).index_select(0, order).unsqueeze(1)
        bounds = list(itertools.accumulate(counts))
        if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            # unbind / split, not w1[e] / x_sorted[a:b]: the backward of each indexing
            # op materialises a zero tensor of the whole stack (E x D x H per expert and
            # parameter), which cost a third of a training step; unbind and split
            # assemble their gradients once
            # under autocast: each stack cast once (one cast op, and the backward assembles
            # the stacked gradient in the half-size dtype, then casts it once)
            dtype = self._compute_dtype(x)
            w1, b1, w2, b2 = ((p if p.dtype == dtype else p.to(dtype)).unbind(0)
                              for p in (self.w1, self.b1, self.w2, self.b2))
            sizes: List[int] = []
            owners: List[int] = []      # expert of each piece, -1 for dropped rows
            start = 0
            for e, end in enumerate(bounds):
                kept = min(end - start, limits[e])
                if kept > 0:
                    sizes.append(kept)
                    owners.append(e)
                if end - start > kept:
                    sizes.append(end - start - kept)
                    owners.append(-1)
                start = end
            # bf16 on the CPU: oneDNN builds (JIT-compiles) a GEMM for every new row count,
            # and an expert's row count changes every batch; rows padded with zeros to a
            # multiple of BF16_ROW_MULTIPLE keep the shapes few, so the GEMMs come from
            # oneDNN's cache (the padded rows' outputs are dropped: no value or gradient
            # changes)
            multiple = BF16_ROW_MULTIPLE if x.device.type == "cpu" and dtype == torch.bfloat16 else 1
            pieces: List[torch.Tensor] = []
            for e, rows in zip(owners, x_sorted.split(sizes, 0)):
                if e < 0:
                    pieces.append(torch.zeros_like(rows))
                    continue
                n_rows = rows.size(0)
                pad = -n_rows % multiple
                if pad:
                    rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
                h = self.dropout(self.activation(torch.addmm(b1[e], rows, w1[e])))
                out = torch.addmm(b2[e], h, w2[e])
                pieces.append(out[:n_rows] if pad else out)
            y_sorted = torch.cat(pieces, 0) * gate_sorted
            return torch.zeros_like(x, dtype=y_sorted.dtype).index_add(0, token, y_sorted)
        y_sorted = x.new_empty(n_assign, dim)
        if packed is not None and packed[0] == "kernel":    # inference: never capped
            self._kernel_experts(packed[1], x_sorted, counts, y_sorted)
        else:
            start = 0
            for e, end in enumerate(bounds):
                kept = min(end - start, limits[e])
                if kept > 0 and packed is not None and packed[0] == "onednn":
                    y_sorted[start:start + kept] = self._packed_expert(packed[1][e],
                                                                       x_sorted[start:start + kept])
                elif kept > 0:   # MKL addmm on the parameters, or on rounded copies ("values")
                    w1, b1, w2, b2 = (self.w1, self.b1, self.w2, self.b2) if packed is None else packed[1]
                    rows = self._round_rows(x_sorted[start:start + kept], packed is not None)
                    h = self._activate_(self._round_preactivation(torch.addmm(b1[e], rows, w1[e]),
                                                                  packed is not None))
                    torch.addmm(b2[e], self._round_rows(self.dropout(h), packed is not None), w2[e],
                                out=y_sorted[start:start + kept])
                    if packed is not None and self.expert_precision == "bf16a":
                        _round_bf16_(y_sorted[start:start + kept])
                if end - start > kept:
                    y_sorted[start + kept:end].zero_()
                start = end
        y_sorted.mul_(gate_sorted)
        return torch.zeros_like(x).index_add_(0, token, y_sorted)

    @torch.jit.unused
    def _packed(self, x: torch.Tensor, rows_per_expert: float = 1.0) -> Optional[Tuple[str, Any]]:
        """Packed expert weights when this call may use them (CPU, fp32, eval mode, no
        autograd/autocast), else None:
          ("kernel", (w1, b1, w2, b2[, scale1, scale2])) in `cpu_kernel.pack_weight`'s
            layout, weights of `expert_precision` (int8 adds their column scales), for
            the C kernel (torch's threads through OpenMP): with `packed_experts` true
            when experts get at most `kernel_max_rows` rows on average
            (`rows_per_expert`); always with "kernel";
          ("onednn", [(w1, b1, w2, b2) per expert]) in oneDNN's blocked layout otherwise
            (large batches where oneDNN measured faster, or when the kernel cannot run: no C
            compiler, D or H not multiples of 16);
          ("values", (w1, b1, w2, b2)) fp32 (E, D, H) / (E, H, D) copies of the weights
            rounded to bf16 / int8, for MKL addmm, when `expert_precision` is not fp32
            and neither kernel can run.
        oneDNN and "values" run fp32 on the weights rounded to `expert_precision`
        (`cpu_kernel.expert_weight_values`), so every kind computes with the same
        weight values; when the C kernel cannot run, a one-line warning says so once.
        Each kind is built on first use and rebuilt when any expert tensor was modified
        or moved (or the precision changed), so a process that decodes both streaming
        chunks and whole utterances holds up to two packed copies."""
        mode = self.packed_experts
        if (mode is False or self.training or x.device.type != "cpu" or x.dtype != torch.float32
                or self.w1.dtype != torch.float32 or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return None
        precision = self.expert_precision
        kernel = (mode in (True, "kernel") and self.idim % cpu_kernel.BLOCK == 0
                  and self.hidden_units % cpu_kernel.BLOCK == 0 and cpu_kernel.library() is not None)
        # bf16a's oneDNN kind is a bf16 GEMM: only where the CPU runs one (else the
        # kernel, or with packed_experts 'onednn' the fallback, round in fp32)
        onednn = mode in (True, "onednn") and _ONEDNN_LINEAR and (precision != "bf16a" or _bf16_gemm_supported())
        if kernel and (mode == "kernel" or not onednn or rows_per_expert <= kernel_max_rows(
                self.idim, self.hidden_units, self._kernel_activation, precision)):
            kind = "kernel"
        elif onednn:
            kind = "onednn"
        elif precision != "fp32":
            kind = "values"
        else:
            return None
        # (bf16a on oneDNN is its bf16 GEMM: nothing to warn about)
        if (not kernel and precision != "fp32" and precision not in _PRECISION_WARNED
                and not (precision == "bf16a" and kind == "onednn")):
            _PRECISION_WARNED.add(precision)
            why = ("packed_experts is 'onednn'" if mode == "onednn" else
                   f"D={self.idim} or H={self.hidden_units} is not a multiple of {cpu_kernel.BLOCK}"
                   if cpu_kernel.library() is not None else cpu_kernel.disabled_reason() or "no kernel")
            _log.warning("moe_conf.expert_precision %s: no C kernel (%s); experts run in fp32 on "
                         "weights rounded to %s once (same values, no speed-up)", precision, why, precision)
        if kind == "kernel" and precision == "w8a8" and "w8a8-emulated" not in _PRECISION_WARNED:
            _PRECISION_WARNED.add("w8a8-emulated")     # asked once: the build does not change
            dot = cpu_kernel.int8_dot_kind()
            if dot != "vnni":
                _log.warning("moe_conf.expert_precision w8a8: the kernel was built without VNNI "
                             "(-march=%s); it computes the same int8 dot products by %s, at about "
                             "the speed of int8 experts or below", cpu_kernel.target_arch(),
                             "AVX2 vpmaddwd" if dot == "avx2" else "shifts and multiplies")
        params = (self.w1, self.b1, self.w2, self.b2)
        key = (precision,) + tuple((p.data_ptr(), p._version) for p in params)
        cached = _PACKED.get(self)
        if cached is None or cached[0] != key:
            cached = (key, {})
            _PACKED[self] = cached
        if kind not in cached[1]:
            with torch.no_grad():
                b1, b2 = self.b1.detach().contiguous().clone(), self.b2.detach().contiguous().clone()
                if kind == "kernel":
                    (p1, s1), (p2, s2) = (cpu_kernel.pack_expert_weight(w, precision) for w in (self.w1, self.w2))
                    cached[1][kind] = (p1, b1, p2, b2) + ((s1, s2) if s1 is not None else ())
                else:
                    w1, w2 = (cpu_kernel.expert_weight_values(w, precision).contiguous()
                              if precision != "fp32" else w for w in (self.w1, self.w2))
                    if kind == "values":
                        cached[1][kind] = (w1, b1, w2, b2)
                    else:
                        cached[1][kind] = _onednn_experts(w1, b1, w2, b2, precision)
        return kind, cached[1][kind]

    @torch.jit.unused
    def _kernel_experts(self, packs: Tuple[torch.Tensor, ...], x_sorted: torch.Tensor,
                        counts: List[int], out: torch.Tensor) -> None:
        """All experts on their rows of the expert-sorted x (N*k, D) -> out (N*k, D), by
        the small-batch C kernel: one call for every first linear (relu / swish fused
        into it, other activations applied to all hidden rows at once), one call for
        every second linear."""
        lib = cpu_kernel.library()
        segments = cpu_kernel.segments_of(counts)
        hidden = x_sorted.new_empty(x_sorted.size(0), self.hidden_units)
        scale1, scale2 = (packs[4], packs[5]) if len(packs) > 4 else (None, None)
        bf16a = self.expert_precision == "bf16a"
        if bf16a:       # (w8a8's rows are rounded by the kernel itself)
            x_sorted = x_sorted.to(torch.bfloat16).float()
        cpu_kernel.segment_linear(lib, x_sorted, segments, packs[0], packs[1], hidden,
                                  self._kernel_activation, scale1)
        if self._kernel_activation == "none":
            hidden = self._activate_(self._round_preactivation(hidden, True))
        if bf16a:
            _round_bf16_(hidden)
        cpu_kernel.segment_linear(lib, hidden, segments, packs[2], packs[3], out, "none", scale2)
        if bf16a:
            _round_bf16_(out)

    @torch.jit.unused
    def _activate_(self, h: torch.Tensor) -> torch.Tensor:
        """The activation, in place where PyTorch has an in-place form (inference only)."""
        if isinstance(self.activation, nn.SiLU):
            return torch.nn.functional.silu(h, inplace=True)
        if isinstance(self.activation, nn.ReLU):
            return h.relu_()
        return self.activation(h)

    @torch.jit.unused
    def _round_rows(self, rows: torch.Tensor, packed: bool) -> torch.Tensor:
        """rows as the packed experts of `expert_precision` multiply them when `packed`:
        w8a8 rounds each row to int8 with its own scale (`cpu_kernel.quantize_rows`),
        bf16a every value to bf16; otherwise (and when not `packed`) rows itself."""
        if packed and self.expert_precision == "w8a8":
            q, scale = cpu_kernel.quantize_rows(rows)
            return q.mul_(scale)
        if packed and self.expert_precision == "bf16a":
            return rows.to(torch.bfloat16).float()
        return rows

    @torch.jit.unused
    def _round_preactivation(self, h: torch.Tensor, packed: bool) -> torch.Tensor:
        """h (first linear's output, float32) rounded to bf16 in place when `packed`, the
        precision is bf16a and oneDNN cannot fuse the activation (not relu, swish or
        gelu): its bf16 GEMM then hands the activation bf16 values, and every kind does
        the same; else h itself."""
        if packed and self.expert_precision == "bf16a" and not self._fused_activation[0]:
            return _round_bf16_(h)
        return h

    @torch.jit.unused
    def _packed_expert(self, pack: Tuple[torch.Tensor, ...], rows: torch.Tensor) -> torch.Tensor:
        """Expert on rows (n, D) -> (n, D) with packed weights (as `expert`)."""
        linear = torch.ops.mkldnn._linear_pointwise
        attr, algorithm = self._fused_activation
        if self.expert_precision == "bf16a":   # a bf16 GEMM: bf16 in, fp32 sums, bf16 out
            rows = rows.to(torch.bfloat16)
            if attr:
                h = linear(rows, pack[0], pack[1], attr, [], algorithm)
            else:
                h = self.activation(linear(rows, pack[0], pack[1], "none", [], None).float())
            return linear(h.to(torch.bfloat16), pack[2], pack[3], "none", [], None).float()
        rows = self._round_rows(rows, True)
        if attr:
            h = linear(rows, pack[0], pack[1], attr, [], algorithm)
        else:
            h = self.activation(linear(rows, pack[0], pack[1], "none", [], None))
        return linear(self._round_rows(h, True), pack[2], pack[3], "none", [], None)

    @torch.jit.unused
    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the expert GEMMs run in: autocast's where it is on, else x's."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    @torch.jit.unused
    def _accelerator_path(self, x: torch.Tensor) -> str:
        """Eager dispatch off the CPU: `ACCELERATOR_DISPATCH`, or for "auto": "dense" for
        inference on at most DENSE_MAX_FRAMES frames (every expert's two GEMMs batched:
        a handful of kernel launches and no host sync, where launches, not FLOPs, take
        the time); "grouped" where torch's fused grouped GEMM runs (bf16 on CUDA 9.0+,
        e.g. autocast training); else "loop"."""
        path = ACCELERATOR_DISPATCH
        capped = self.training and self.capacity_factor > 0
        aligned = self.idim % 8 == 0 and self.hidden_units % 8 == 0   # 16-byte strides
        if path == "auto":
            if not capped and not self.training and x.size(0) <= DENSE_MAX_FRAMES:
                path = "dense"
            elif aligned and _grouped_mm_fast(x.device, self._compute_dtype(x)):
                path = "grouped"
            else:
                path = "loop"
        if path == "dense" and capped:
            return "loop"            # capacity needs the sorted assignments
        if path == "grouped" and not (aligned and hasattr(torch, "_grouped_mm")):
            return "loop"
        return path

    @torch.jit.unused
    def _dispatch_grouped(self, x: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor,
                          valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sorted dispatch without a host sync: the N*k assignments sorted by expert (stable,
        so capacity keeps each expert's first assignments in frame order, as `_capacity`),
        both expert linears as one grouped GEMM each over the expert-contiguous rows
        (group ends from a cumulative bincount, on the device), the k gated rows of a frame
        put back through the inverse permutation and summed (deterministic: no
        scatter-add). Dropped assignments (capacity, padding) run with the last expert
        and are zeroed. x (N, D), top_idx / gates (N, k) -> (N, D) in the compute dtype
        (`_compute_dtype`; the gated sum in gates' dtype)."""
        n_tok, k = top_idx.size(0), top_idx.size(1)
        n_assign, n_expert = n_tok * k, self.n_expert
        keys = top_idx.reshape(-1)
        capped = self.training and self.capacity_factor > 0
        if capped and valid is not None:
            keys = keys.masked_fill(~valid.repeat_interleave(k), n_expert)
        sorted_keys, order = torch.sort(keys, stable=True)
        counts = torch.bincount(keys, minlength=n_expert + 1 if capped else n_expert)
        ends = torch.cumsum(counts[:n_expert], 0, dtype=torch.int32)
        keep = None
        if capped:
            ends[-1] = n_assign                    # key E (dropped) rows join the last group
            n_valid = valid.sum() if valid is not None else torch.tensor(n_tok, device=x.device)
            cap = torch.ceil(self.capacity_factor * n_valid.float() * k / n_expert)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(n_assign, device=x.device) - starts.index_select(0, sorted_keys)
            keep = (rank < cap) & (sorted_keys < n_expert)
            sorted_keys = sorted_keys.clamp(max=n_expert - 1)
        dtype = self._compute_dtype(x)
        rows = x.index_select(0, torch.div(order, k, rounding_mode="floor")).to(dtype)
        h = torch._grouped_mm(rows, self.w1.to(dtype), offs=ends)
        h = self.dropout(self.activation(h + self.b1.to(dtype).index_select(0, sorted_keys)))
        y = torch._grouped_mm(h, self.w2.to(dtype), offs=ends) + self.b2.to(dtype).index_select(0, sorted_keys)
        y = y * gates.reshape(-1).index_select(0, order).unsqueeze(1)
        if keep is not None:
            y = torch.where(keep.unsqueeze(1), y, torch.zeros((), dtype=y.dtype, device=y.device))
        y = y.index_select(0, torch.argsort(order))     # back to assignment order
        return y.view(n_tok, k, self.idim).sum(1) if k > 1 else y

    @torch.jit.unused
    def _dispatch_dense(self, x: torch.Tensor, top_idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every expert on every frame, as one dense FFN of E*H hidden units whose hidden
        units are scaled by a dense (N, E) gate matrix that is zero where an expert was not
        chosen: E/k times the FLOPs of the sorted dispatch, but eight kernel launches, no
        sort, gather or host sync (small N on accelerators). Exact: a zero gate makes a
        (frame, expert) pair add 0. x (N, D), top_idx / gates (N, k) -> (N, D)."""
        n_tok, n_expert, hidden = x.size(0), self.n_expert, self.hidden_units
        dense_gates = torch.zeros(n_tok, n_expert, dtype=gates.dtype,
                                  device=gates.device).scatter_(1, top_idx, gates)
        w1 = self.w1.permute(1, 0, 2).reshape(self.idim, n_expert * hidden)     # (D, E*H)
        h = self.dropout(self.activation(torch.addmm(self.b1.reshape(-1), x, w1)))
        h = (h.view(n_tok, n_expert, hidden) * dense_gates.unsqueeze(2).to(h.dtype)).view(n_tok, n_expert * hidden)
        bias = torch.mm(dense_gates.to(h.dtype), self.b2.to(h.dtype))          # gate-weighted b2
        return torch.addmm(bias, h, self.w2.reshape(n_expert * hidden, self.idim).to(h.dtype))

    @torch.jit.unused
    def _dispatch_all_frames(self, x: torch.Tensor, top_idx: torch.Tensor,
                             gates: torch.Tensor, used: List[int]) -> torch.Tensor:
        """All-frames dispatch for tiny batches: every used expert runs on all N frames,
        its hidden rows scaled by the (N,) gate column of a dense (N, E) gate matrix that
        is zero where the expert was not chosen; no sort, gather or scatter. Unused
        experts are never read; zero gates make the extra (frame, expert) pairs
        contribute exactly 0 to the output and to every gradient. x (N, D) -> (N, D)."""
        dense_gates = torch.zeros(x.size(0), self.n_expert, dtype=gates.dtype,
                                  device=gates.device).scatter(1, top_idx, gates)
        grad = torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)
        y = torch.mm(dense_gates, self.b2)                        # gate-weighted b2
        for e in used:
            h = torch.addmm(self.b1[e], x, self.w1[e])
            if not grad and isinstance(self.activation, nn.SiLU):
                h = torch.nn.functional.silu(h, inplace=True)
            elif not grad and isinstance(self.activation, nn.ReLU):
                h = h.relu_()
            else:
                h = self.activation(h)
            h = self.dropout(h)
            gate = dense_gates[:, e:e + 1]
            if grad:
                y = torch.addmm(y, h * gate, self.w2[e])
            else:
                y.addmm_(h.mul_(gate), self.w2[e])
        return y

    @torch.jit.unused
    def _record(self, logits: torch.Tensor, top_idx: torch.Tensor, batch: int, time: int) -> None:
        """Keep this forward's routing for aux losses (training) and expert_load."""
        kept = logits.view(batch, time, -1) if self.training else None
        LAST_ROUTING[self] = (kept, top_idx.detach().view(batch, time, -1))


class MoEFactory:
    """Builds the MoE FFNs of one encoder or decoder stack (see ffn.FFNFactory).

    Holds the state shared across the stack: the Omni-Router's single router and the
    SpeechMoE shared frame-embedding network (encoder only).
    """

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float,
                 activation_name: str, n_expert: int, n_expert_activated: int,
                 moe_conf: Dict[str, Any], frame_embedding: bool):
        where = "encoder_conf" if frame_embedding else "decoder_conf"
        if isinstance(n_expert, bool) or not isinstance(n_expert, int) or n_expert < 1:
            raise ConfigError(f"{where}.n_expert: expected an integer >= 1, got {n_expert!r}")
        if (isinstance(n_expert_activated, bool) or not isinstance(n_expert_activated, int)
                or not 1 <= n_expert_activated <= n_expert):
            raise ConfigError(f"{where}.n_expert_activated: expected an integer in "
                              f"1..n_expert ({n_expert}), got {n_expert_activated!r}")
        self.conf = resolve_moe_conf(moe_conf or {})
        self.idim = idim
        self.hidden_units = hidden_units
        self.dropout_rate = dropout_rate
        self.activation_name = activation_name
        get_activation(activation_name)  # fail early on a bad name
        self.n_expert = n_expert
        self.n_expert_activated = n_expert_activated
        self.router_kind = self.conf["router"]
        self.use_route_emb = self.router_kind == "speechmoe" and frame_embedding
        self._embedding: Optional[RouteEmbedding] = None
        router_in = idim
        if self.use_route_emb:
            self._embedding = RouteEmbedding(idim, self.conf["embed_dim"], self.conf["embed_layers"])
            router_in = idim + self.conf["embed_dim"]
        self.router_in = router_in
        self._shared_router: Optional[Router] = None
        if self.router_kind == "omni":
            self._shared_router = Router(router_in, n_expert, self.conf["router_bias"])

    def __call__(self) -> MoEFFN:
        """A new MoE FFN (sharing the stack's router for `omni`)."""
        router = self._shared_router
        if router is None:
            router = Router(self.router_in, self.n_expert, self.conf["router_bias"])
        return MoEFFN(self.idim, self.hidden_units, self.dropout_rate,
                      get_activation(self.activation_name), self.n_expert,
                      self.n_expert_activated, router, self.router_kind,
                      self.use_route_emb, self.conf["capacity_factor"], self.conf,
                      self.conf["all_frames_rows"], self.conf["packed_experts"],
                      self.conf["expert_precision"])

    def route_embedding(self) -> Optional[RouteEmbedding]:
        """The SpeechMoE shared embedding network of this stack (same object every call)."""
        return self._embedding


def _moe_layers(model: nn.Module) -> List[Tuple[str, MoEFFN]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFFN)]


def _layer_mask(name: str, batch: int, time: int, device: torch.device,
                encoder_out_lens: Optional[torch.Tensor],
                text_lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Valid frames of a layer: encoder frames, or decoder steps (<sos> + text)."""
    lengths: Optional[torch.Tensor] = encoder_out_lens
    if "decoder" in name.split(".")[0] or ".decoder" in name:
        lengths = None if text_lengths is None else text_lengths + 1
    if lengths is None:
        return torch.ones(batch, time, dtype=torch.bool, device=device)
    return frame_mask(lengths.to(device), batch, time)


def moe_aux_losses(model: nn.Module, encoder_out_lens: Optional[torch.Tensor],
                   text: Optional[torch.Tensor], text_lengths: Optional[torch.Tensor]
                   ) -> Dict[str, Tuple[torch.Tensor, float]]:
    """Auxiliary losses of the last training forward: name -> (unweighted loss, weight).

    Sums each loss over the MoE layers that recorded routing since the previous call
    (`loss_balance`, `loss_sparsity`, `loss_importance`), plus `loss_embed_ctc` for a
    SpeechMoE embedding network (CTC of its frames against `text`, summed over the
    batch and divided by the batch size, as the main CTC). Padding frames are excluded.
    Empty for dense models and `topk` without a balance weight.
    """
    totals: Dict[str, torch.Tensor] = {}
    weights: Dict[str, float] = {}

    def add(key: str, value: torch.Tensor, weight: float) -> None:
        totals[key] = totals[key] + value if key in totals else value
        weights[key] = weight

    for name, layer in _moe_layers(model):
        record = LAST_ROUTING.get(layer)
        if record is None or record[0] is None:
            continue
        logits, top_idx = record
        LAST_ROUTING[layer] = (None, top_idx)   # consumed: frees the graph, no reuse
        mask = _layer_mask(name, logits.size(0), logits.size(1), logits.device,
                           encoder_out_lens, text_lengths)
        conf = layer.moe_conf
        if conf.get("balance_weight", 0.0) > 0:
            add("loss_balance", balance_loss(logits, top_idx, mask), conf["balance_weight"])
        if layer.router_kind == "speechmoe":
            add("loss_sparsity", sparsity_loss(logits, mask), conf["sparsity_weight"])
            add("loss_importance", importance_loss(logits, mask), conf["importance_weight"])
    for name, module in model.named_modules():
        if not isinstance(module, RouteEmbedding) or module not in LAST_EMBEDDING:
            continue
        emb = LAST_EMBEDDING.pop(module)
        ctc = getattr(model, "ctc", None)
        if ctc is None or text is None or text_lengths is None or encoder_out_lens is None:
            continue
        log_probs = ctc.log_softmax(module.ctc_proj(emb)).float()
        targets = text.clamp(min=0)
        blank = int(getattr(ctc, "blank_id", 0))
        loss = torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1), targets, encoder_out_lens.long(), text_lengths.long(),
            blank=blank, reduction="sum", zero_infinity=True) / emb.size(0)
        conf = next((m.moe_conf for _, m in _moe_layers(model)), {})
        add("loss_embed_ctc", loss, conf.get("embed_ctc_weight", 0.01))
    return {key: (totals[key], weights[key]) for key in totals}


def expert_load(model: nn.Module, encoder_out_lens: Optional[torch.Tensor] = None,
                text_lengths: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Qualified layer name -> int64 counts (n_expert,) of assignments on the last forward.

    With `encoder_out_lens` / `text_lengths`, padding frames are excluded (encoder
    layers / decoder layers); otherwise every frame counts. Each frame counts once per
    chosen expert (k times in total). Empty for dense models.
    """
    loads: Dict[str, torch.Tensor] = {}
    for name, layer in _moe_layers(model):
        record = LAST_ROUTING.get(layer)
        if record is None:
            continue
        top_idx = record[1]
        mask = _layer_mask(name, top_idx.size(0), top_idx.size(1), top_idx.device,
                           encoder_out_lens, text_lengths)
        chosen = top_idx[mask].reshape(-1)
        loads[name] = torch.bincount(chosen, minlength=layer.n_expert).to(torch.int64).cpu()
    return loads


def expert_load_entropy(loads: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Entropy in nats of each layer's load distribution (log(E) = perfectly balanced)."""
    result: Dict[str, float] = {}
    for name, counts in loads.items():
        total = counts.sum().item()
        if total <= 0:
            result[name] = 0.0
            continue
        share = counts.double() / total
        share = share[share > 0]
        result[name] = float(-(share * share.log()).sum())
    return result


def active_parameters(model: nn.Module) -> int:
    """Parameters used per frame: all (shared ones once) minus the unchosen experts."""
    total = sum(p.numel() for p in model.parameters())
    for _, layer in _moe_layers(model):
        per_expert = (layer.w1[0].numel() + layer.b1[0].numel()
                      + layer.w2[0].numel() + layer.b2[0].numel())
        total -= (layer.n_expert - layer.n_expert_activated) * per_expert
    return total
