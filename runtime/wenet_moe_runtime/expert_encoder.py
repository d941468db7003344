"""An exported streaming encoder whose MoE FFNs run in the C kernel (`<graph>.kernel/`).

The export writes, beside `encoder.onnx` / `encoder_batch.onnx` of an MoE model, the
same graph cut at its MoE FFNs (`wenet_moe.export.expert_split`): ONNX Runtime pieces
and, between two pieces, one MoE FFN (router, top-k, gated experts) that the C kernel
runs in one call at the memory's speed, where ONNX Runtime runs a few-row GEMM per
expert plus the dispatch's sort / gather / scatter nodes. It also joins them into one
graph (`whole.onnx`) in which each MoE FFN is a node of the kernel's own ONNX Runtime
custom op (`wenet_moe.kernel::RoutedExperts`, registered from the kernel library):
one session, no piece boundaries, and the experts shared out on that session's
intra-op threads, so it serves any thread count. `ExpertSplitEncoder` runs the whole
graph where the directory has it (else the pieces in order, with `native.RoutedExperts`
calls between them) and looks like the `InferenceSession` of the `.onnx` graph (`run`,
`get_inputs`, `get_outputs`, `get_modelmeta`), so the model code does not tell them
apart. Same outputs as the `.onnx` graph up to float rounding (the kernel sums in
another order; a near-tie of two router logits may pick the other expert, as between
any two builds); the whole graph and the pieces give the same numbers.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort

from . import native

_log = logging.getLogger(__name__)

# the artefact (`wenet_moe.export.expert_split` writes it with these names)
FORMAT = "wenet-moe expert-split 1"
MANIFEST = "manifest.json"
WEIGHTS = "experts.npz"
# arrays of call j in WEIGHTS: f"{j}.{name}"
WEIGHT_NAMES = ("router_weight", "router_bias", "w1", "b1", "w2", "b2")
# the whole graph in one file (manifest "whole"): the pieces joined, each call a node of
# the kernel's ONNX Runtime custom op (`moe_cpu.c`, RegisterCustomOps), whose weights
# the runtime supplies packed (`native.RoutedExperts.op_inputs`) as the initializers
# f"{j}.{name}" (empty in the file), with the session's thread count (THREADS_INPUT)
WHOLE = "whole.onnx"
OP_DOMAIN = "wenet_moe.kernel"
OP_TYPE = "RoutedExperts"
OP_WEIGHT_NAMES = ("router_t", "router_b", "w1", "scale1", "b1", "w2", "scale2", "b2")
THREADS_INPUT = "kernel_threads"
# session config entries of the runtime's options that the whole graph's session keeps
SESSION_CONFIG_KEYS = ("session.force_spinning_stop", "session.intra_op.allow_spinning")


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message (ONNX Runtime's run to many), else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def kernel_dir(graph_path: str) -> str:
    """`encoder.onnx` -> `encoder.kernel` (beside it)."""
    return os.path.splitext(graph_path)[0] + ".kernel"


def kernel_op_session(graph, calls: Sequence["native.RoutedExperts"], options: ort.SessionOptions,
                      lib) -> Tuple[ort.InferenceSession, tuple]:
    """A session of `graph` (a path or bytes; its calls `wenet_moe.kernel::RoutedExperts`
    nodes numbered j = 0, 1, ...) with the kernel library `lib` registered as its custom
    op, the packed weights of `calls[j]` (not copied) as its initializers f"{j}.{name}",
    and the thread count of `options` as THREADS_INPUT. Returns (session, what the
    session reads: keep it as long as the session)."""
    own = ort.SessionOptions()      # the library and initializers are this session's only
    for attr in ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "log_severity_level",
                 "enable_mem_pattern", "enable_cpu_mem_arena", "graph_optimization_level",
                 "enable_profiling", "profile_file_prefix"):
        setattr(own, attr, getattr(options, attr))
    for key in SESSION_CONFIG_KEYS:
        try:
            value = options.get_session_config_entry(key)
        except RuntimeError:  # not set in `options`
            continue
        own.add_session_config_entry(key, value)
    own.register_custom_ops_library(lib._name)
    names, arrays = [THREADS_INPUT], [np.array(max(1, options.intra_op_num_threads), np.int64)]
    for j, call in enumerate(calls):
        names += [f"{j}.{name}" for name in OP_WEIGHT_NAMES]
        arrays += list(call.op_inputs())
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    for name, value in zip(names, values):
        own.add_initializer(name, value)      # read in place
    session = ort.InferenceSession(graph, sess_options=own, providers=["CPUExecutionProvider"])
    return session, (list(calls), arrays, values)


@dataclass
class _Arg:
    """What `InferenceSession.get_inputs()` / `get_outputs()` items give: a name."""
    name: str


@dataclass
class _Meta:
    """What `InferenceSession.get_modelmeta()` gives: the metadata map."""
    custom_metadata_map: Dict[str, str] = field(default_factory=dict)


class ExpertSplitEncoder:
    """`<graph>.kernel/` as one session: its whole graph (`mode` "whole") or its pieces
    ("pieces": a directory without `whole.onnx`, or `whole_graph=False`).

    Args:
        path: the `.kernel` directory.
        options: ONNX Runtime session options (the whole graph's session, or each piece's).
        threads: OpenMP threads of each kernel call between pieces (1 without OpenMP).
            `OnnxAsrModel` runs pieces with one thread only: every piece's session has
            its own ONNX Runtime thread pool, and with 2 threads their spinning workers
            (and OpenMP's) made the paper MoE's encoder 12-14x slower on 2 cores. The
            whole graph's op uses the session's intra-op threads instead.
        whole_graph: run the whole graph where the directory has one.
    Raises:
        ValueError naming the file for a bad manifest or weights; RuntimeError when the
        kernel is unavailable (`native.disabled_reason()`).
    """

    def __init__(self, path: str, options: ort.SessionOptions, threads: int = 1,
                 whole_graph: bool = True) -> None:
        lib = native.library()
        if lib is None:
            raise RuntimeError(f"MoE CPU kernel unavailable: {native.disabled_reason()}")
        manifest_path = os.path.join(path, MANIFEST)
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{manifest_path}: cannot read: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: not a '{FORMAT}' manifest")
        self.path = path
        held = manifest.get("expert_weights", "fp32")
        if held not in native.WEIGHT_TYPES:
            raise ValueError(f"{manifest_path}: expert_weights {held!r} is not one of "
                             f"{', '.join(native.WEIGHT_TYPES)}")
        # how the experts are held: "fp32" or "bf16" (exact: the export rounded them)
        self.expert_weights = held
        self._inputs = [_Arg(n) for n in manifest["inputs"]]
        self._outputs = [_Arg(n) for n in manifest["outputs"]]
        self._meta = _Meta(dict(manifest.get("metadata", {})))
        weights_path = os.path.join(path, WEIGHTS)
        try:
            weights = np.load(weights_path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{weights_path}: cannot read: {exc}") from None
        self._steps: List = []
        self._session: Optional[ort.InferenceSession] = None
        whole = self._whole_file(path, manifest) if whole_graph else ""
        with weights:
            calls = []
            for i, step in enumerate(manifest["steps"]):
                if "experts" not in step:
                    continue
                j = step["experts"]
                try:
                    arrays = {key: weights[f"{j}.{key}"] for key in WEIGHT_NAMES}
                except KeyError as exc:
                    raise ValueError(f"{weights_path}: no array {exc} (step {i} of {manifest_path})") from None
                calls.append(native.RoutedExperts(lib, arrays["router_weight"], arrays["router_bias"],
                                                  arrays["w1"], arrays["b1"], arrays["w2"], arrays["b2"],
                                                  step["k"], step["renormalize"], step["activation"], threads,
                                                  held))
        # why the pieces run ("" when the whole graph does)
        self.pieces_reason = "" if whole else ("whole_graph=False" if not whole_graph else "no whole graph")
        if whole:
            try:
                self._session, self._held = kernel_op_session(os.path.join(path, whole), calls, options, lib)
                self.mode = "whole"
                return
            except Exception as exc:  # onnxruntime raises several types
                # e.g. an ONNX Runtime without the C API the op needs: the pieces compute the same
                self.pieces_reason = f"{os.path.join(path, whole)}: cannot load: {first_line(exc)}"
                _log.warning("%s; running the pieces", self.pieces_reason)
        self.mode = "pieces"
        for step in manifest["steps"]:
            if "piece" in step:
                session = ort.InferenceSession(os.path.join(path, step["piece"]), sess_options=options,
                                               providers=["CPUExecutionProvider"])
                self._steps.append(("piece", session, list(step["inputs"]), list(step["outputs"])))
            else:
                call = calls[step["experts"]]
                self._steps.append(("experts", call, [step["x"], step["route_emb"]], [step["output"]]))

    @property
    def session(self) -> Optional[ort.InferenceSession]:
        """The whole graph's session (None when the pieces run)."""
        return self._session

    @staticmethod
    def _whole_file(path: str, manifest) -> str:
        """The whole graph's file name that `manifest` (of the directory at `path`) names
        and that exists there, else ""."""
        whole = manifest.get("whole", "") if isinstance(manifest, dict) else ""
        return whole if whole and os.path.isfile(os.path.join(path, whole)) else ""

    @staticmethod
    def has_whole_graph(path: str) -> bool:
        """Whether the `.kernel` directory at `path` holds the whole graph (WHOLE, named
        by its manifest)."""
        try:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            return False
        return bool(ExpertSplitEncoder._whole_file(path, manifest))

    def get_inputs(self) -> List[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> List[_Arg]:
        return list(self._outputs)

    def get_modelmeta(self) -> _Meta:
        return self._meta

    def run(self, output_names: Optional[Sequence[str]], feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """As `InferenceSession.run`: the named outputs (all with None) for `feeds`."""
        if self._session is not None:
            return self._session.run(output_names, feeds)
        values: Dict[str, np.ndarray] = dict(feeds)
        for kind, runner, inputs, outputs in self._steps:
            if kind == "piece":
                values.update(zip(outputs, runner.run(outputs, {x: values[x] for x in inputs})))
            else:
                emb = values[inputs[1]] if runner.emb_dim else None
                values[outputs[0]] = runner(values[inputs[0]], emb)
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        return [values[n] for n in names]
