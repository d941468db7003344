"""An exported streaming encoder whose MoE FFNs run in the C kernel (`<graph>.kernel/`).

The export writes, beside `encoder.onnx` / `encoder_batch.onnx` of an MoE model, the
same graph cut at its MoE FFNs (`wenet_moe.export.expert_split`): ONNX Runtime pieces
and, between two pieces, one MoE FFN (router, top-k, gated experts) that
`native.RoutedExperts` runs in one C call at the memory's speed, where ONNX Runtime
runs a few-row GEMM per expert plus the dispatch's sort / gather / scatter nodes.
`ExpertSplitEncoder` runs them in order and looks like the `InferenceSession` of the
whole graph (`run`, `get_inputs`, `get_outputs`, `get_modelmeta`), so the model code
does not tell them apart. Same outputs as the whole graph up to float rounding (the
kernel sums in another order; a near-tie of two router logits may pick the other
expert, as between any two builds).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnxruntime as ort

from . import native

# the artefact (`wenet_moe.export.expert_split` writes it with these names)
FORMAT = "wenet-moe expert-split 1"
MANIFEST = "manifest.json"
WEIGHTS = "experts.npz"
# arrays of call j in WEIGHTS: f"{j}.{name}"
WEIGHT_NAMES = ("router_weight", "router_bias", "w1", "b1", "w2", "b2")


def kernel_dir(graph_path: str) -> str:
    """`encoder.onnx` -> `encoder.kernel` (beside it)."""
    return os.path.splitext(graph_path)[0] + ".kernel"


@dataclass
class _Arg:
    """What `InferenceSession.get_inputs()` / `get_outputs()` items give: a name."""
    name: str


@dataclass
class _Meta:
    """What `InferenceSession.get_modelmeta()` gives: the metadata map."""
    custom_metadata_map: Dict[str, str] = field(default_factory=dict)


class ExpertSplitEncoder:
    """The pieces of `<graph>.kernel/` as one session.

    Args:
        path: the `.kernel` directory.
        options: ONNX Runtime session options of the pieces.
        threads: threads of each kernel call (1 without OpenMP). `OnnxAsrModel` uses
            this class with one thread only: every piece's session has its own ONNX
            Runtime thread pool, and with 2 threads their spinning workers (and
            OpenMP's) made the paper MoE's encoder 12-14x slower on 2 cores.
    Raises:
        ValueError naming the file for a bad manifest or weights; RuntimeError when the
        kernel is unavailable (`native.disabled_reason()`).
    """

    def __init__(self, path: str, options: ort.SessionOptions, threads: int = 1) -> None:
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
        with weights:
            for i, step in enumerate(manifest["steps"]):
                if "piece" in step:
                    session = ort.InferenceSession(os.path.join(path, step["piece"]), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
                    self._steps.append(("piece", session, list(step["inputs"]), list(step["outputs"])))
                    continue
                j = step["experts"]
                try:
                    arrays = {key: weights[f"{j}.{key}"] for key in WEIGHT_NAMES}
                except KeyError as exc:
                    raise ValueError(f"{weights_path}: no array {exc} (step {i} of {manifest_path})") from None
                call = native.RoutedExperts(lib, arrays["router_weight"], arrays["router_bias"],
                                            arrays["w1"], arrays["b1"], arrays["w2"], arrays["b2"],
                                            step["k"], step["renormalize"], step["activation"], threads,
                                            held)
                self._steps.append(("experts", call, [step["x"], step["route_emb"]], [step["output"]]))

    def get_inputs(self) -> List[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> List[_Arg]:
        return list(self._outputs)

    def get_modelmeta(self) -> _Meta:
        return self._meta

    def run(self, output_names: Optional[Sequence[str]], feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """As `InferenceSession.run`: the named outputs (all with None) for `feeds`."""
        values: Dict[str, np.ndarray] = dict(feeds)
        for kind, runner, inputs, outputs in self._steps:
            if kind == "piece":
                values.update(zip(outputs, runner.run(outputs, {x: values[x] for x in inputs})))
            else:
                emb = values[inputs[1]] if runner.emb_dim else None
                values[outputs[0]] = runner(values[inputs[0]], emb)
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        return [values[n] for n in names]
