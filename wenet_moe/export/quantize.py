"""int8 copies of the ONNX graphs (onnxruntime dynamic quantization) and their
accuracy gate.

`quantize_dynamic` stores int8 weights of every MatMul/Gemm whose weight is an
initializer and quantizes activations per call. The exporter constant-folds each
expert's `w1[e]` / `w2[e]` into an initializer of its own Gemm, so MoE experts are
quantized like attention, subsampling, CTC and decoder projections (the fused
export names them `moe<j>/expert<e>/w1_quantized` etc.; tests count them by dtype).
MatMul weights are quantized per output column (`DynamicQuantizeMatMul` /
`MatMulInteger` take a per-column scale and zero point), embeddings (Gather) per
tensor. ONNX Runtime's CPU `ConvInteger` (1.31) took 3-4x the time of the fp32
`Conv` (10 s offline encoder, Dense-S: 2061 vs 686 ms), so Convs are not quantized as
Convs: those with group 1, no padding and >= 64 inputs per output (the subsampling's
second 3x3 convolution, the largest single op of a streaming chunk; the conformer's
pointwise ones) are first rewritten as im2col + MatMul (`onnx_passes.conv_as_matmul`)
and quantized as MatMuls; the depthwise and the first (1-channel) convolutions stay
fp32 Conv. MoE routers stay fp32 too (`_router_nodes`). Subgraphs are quantized as
well (`EnableSubgraph`: the bidirectional decoder's right-to-left branch sits in an
`If`). int8 output is not equal to fp32, so it is gated on
greedy-decision agreement (`gate`), not closeness.

The MoE dispatch must be in its fused form (`onnx_passes.fuse_expert_split`, applied
here too, idempotent): after the quantizer's shape inference ONNX Runtime fails on
the unfused `SequenceAt` outputs ("Shape mismatch attempting to re-use buffer").
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Callable, Dict, List, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from wenet_moe.export.gate import (DEFAULT_MAX_DISAGREEMENT, Agreement, GateInputs,
                                   decoder_feeds, decoder_tree_feeds, stream_onnx)
from wenet_moe.export.verify import session


def int8_name(name: str) -> str:
    """encoder.onnx -> encoder.int8.onnx."""
    return name[:-len(".onnx")] + ".int8.onnx"


def quantize_onnx(src: str, dst: str, per_channel: bool = True) -> None:
    """Write the dynamically int8-quantized copy of `src` to `dst`, keeping its
    metadata; MatMul/Gemm weights per output column with `per_channel` (two quantizer
    passes: MatMul first, then the other op types per tensor), qualifying Convs as
    MatMuls (`conv_as_matmul`), other Convs and MoE routers left fp32.
    `graph.value_info` is cleared first: stale shape annotations from the exporter can
    make the quantizer's shape inference fail."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from wenet_moe.export.onnx_export import EXTERNAL_DATA_BYTES, save_onnx, weight_bytes
    from wenet_moe.export.onnx_passes import conv_as_matmul, fuse_expert_split

    proto = onnx.load(src)
    meta = {p.key: p.value for p in proto.metadata_props}
    fuse_expert_split(proto)
    conv_as_matmul(proto)
    del proto.graph.value_info[:]
    _unshare_weights(proto)
    routers = _router_nodes(proto)
    exclude = routers + [f"{n}_MatMul" for n in routers]   # the quantizer's Gemm -> MatMul
    external = weight_bytes(proto) > EXTERNAL_DATA_BYTES
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=os.path.dirname(os.path.abspath(dst)))
    os.close(fd)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns on the root logger per tensor
    mid = tmp[:-len(".onnx")] + ".matmul.onnx"
    try:
        save_onnx(proto, tmp, check=False)
        if per_channel:
            quantize_dynamic(tmp, mid, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             per_channel=True, nodes_to_exclude=exclude,
                             use_external_data_format=external,
                             extra_options={"EnableSubgraph": True})
            rest = sorted(_integer_ops() - {"MatMul", "Conv"})
            quantize_dynamic(mid, dst, weight_type=QuantType.QInt8, op_types_to_quantize=rest,
                             nodes_to_exclude=exclude, use_external_data_format=external,
                             extra_options={"EnableSubgraph": True})
        else:
            quantize_dynamic(tmp, dst, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                             op_types_to_quantize=sorted(_integer_ops() - {"Conv"}),
                             use_external_data_format=external,
                             extra_options={"EnableSubgraph": True})
    finally:
        root.setLevel(level)
        for leftover in (tmp, tmp + ".data", mid, mid + ".data"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    out = onnx.load(dst)
    have = {p.key for p in out.metadata_props}
    for key, value in meta.items():
        if key not in have:
            entry = out.metadata_props.add()
            entry.key, entry.value = key, value
    # onnxruntime's quantizer leaves subgraphs that onnx.checker calls unsorted;
    # onnxruntime itself loads them (verify_int8 runs every file)
    save_onnx(out, dst, check=False)


def _router_nodes(proto: onnx.ModelProto) -> List[str]:
    """Names of the MoE router projections (a Gemm/MatMul whose output a TopK reads),
    naming unnamed ones: they stay fp32. A router is E x D (tiny), and int8 logits
    would flip near-tied expert choices, which moves a frame's whole FFN output."""
    from wenet_moe.export.onnx_passes import graphs
    names: List[str] = []
    for graph in graphs(proto.graph):          # the decoder's If branches too
        producer = {out: node for node in graph.node for out in node.output}
        for node in graph.node:
            if node.op_type != "TopK":
                continue
            src = producer.get(node.input[0])
            if src is None or src.op_type not in ("Gemm", "MatMul"):
                continue
            if not src.name:
                src.name = f"moe_router_{len(names)}"
            names.append(src.name)
    return names


def _integer_ops() -> set:
    """Op types the dynamic (IntegerOps) quantizer handles."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry
    return set(IntegerOpsRegistry)


def _unshare_weights(proto: onnx.ModelProto) -> None:
    """Give every Gemm/MatMul its own copy of its weight initializer.

    A parameter shared by several layers (the Omni-Router's router) is exported
    once and read by several nodes, directly or through Identity nodes; the
    quantizer then emits a broken graph (bias Add of the wrong shape) for the
    transposed Gemm weight. Copies are small (router weights are E x D)."""
    inits = {t.name: t for t in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node
             if n.op_type == "Identity" and n.input[0] in inits}
    seen: Dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
                for i in range(1, len(node.input)):
                    name = alias.get(node.input[i], node.input[i])
                    if name not in inits:
                        continue
                    count = seen.get(name, 0)
                    seen[name] = count + 1
                    if count == 0 and node.input[i] == name:
                        continue
                    copy = onnx.TensorProto()
                    copy.CopyFrom(inits[name])
                    copy.name = f"{name}.copy{count}"
                    proto.graph.initializer.append(copy)
                    node.input[i] = copy.name
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)


def verify_int8(model: torch.nn.Module, out_dir: str, chunk_size: int, left_chunks: int,
                inputs: GateInputs, max_disagreement: float = DEFAULT_MAX_DISAGREEMENT,
                reverse_weight: float = 0.0,
                variant: Callable[[str], str] = int8_name) -> Dict[str, float]:
    """The int8 accuracy gate (see `gate`) on every `*.int8.onnx` beside its fp32
    graph, each run as a runtime runs it on the gate's inputs:

    * model.int8.onnx: offline, one utterance per call;
    * encoder.int8.onnx + ctc.int8.onnx: streaming at the export's chunk and left
      chunks (the runtime's `--int8` path without the kernel), and the same with
      `encoder.int8.kernel/` when the export has it (with the kernel);
    * model_streaming.int8.onnx: streaming, sherpa-onnx's zero cache;
    * decoder.int8.onnx: teacher-forced on the fp32 greedy hypothesis, given the
      encoder output of its own precision (per-position best token compared);
    * decoder_tree.int8.onnx (when written): the same, on that hypothesis's tree.

    `variant` names the graph compared with each fp32 one (default the int8 copy;
    `experts_int8_name` for the int8-expert graphs of `--expert_precision int8`); a
    graph without a variant file (ctc.onnx has no experts) is its own variant.
    Raises Int8GateError (one line) when one disagrees with fp32 beyond
    `max_disagreement`; returns the report of every graph."""
    from wenet_moe.export.onnx_export import ENCODER_INPUTS, STREAMING_INPUTS
    from wenet_moe.train.diagnostics import greedy_collapse

    def other(name: str) -> str:
        path = os.path.join(out_dir, variant(f"{name}.onnx"))
        return os.path.basename(path) if os.path.exists(path) else f"{name}.onnx"

    def pair(name: str):
        return (session(os.path.join(out_dir, f"{name}.onnx")),
                session(os.path.join(out_dir, other(name))))

    chunk = chunk_size if chunk_size > 0 else 16
    required = chunk * left_chunks if (chunk_size > 0 and left_chunks > 0) else -1
    sherpa_required = chunk * (left_chunks if left_chunks > 0 else 2)
    blank = int(model.blank_id)
    offline = Agreement(other("model"), blank_id=blank)
    runtime = Agreement(f"{other('encoder')} + {other('ctc')}", blank_id=blank)
    sherpa = Agreement(other("model_streaming"), blank_id=blank)
    decoder = Agreement(other("decoder"), ctc=False)
    names = ["model", "encoder", "ctc", "model_streaming", "decoder"]
    tree = Agreement(other("decoder_tree"), ctc=False)
    if other("decoder_tree") != "decoder_tree.onnx":
        names.append("decoder_tree")
    sessions = {n: pair(n) for n in names}
    # the int8 runtime's encoder when the export has `encoder.int8.kernel/`, with
    # ctc.int8.onnx, against the same fp32 encoder + CTC
    kernel = _int8_kernel_encoder(out_dir, variant)
    kernel_runtime = Agreement(f"encoder.int8.kernel + {other('ctc')}", blank_id=blank)
    rw = float(reverse_weight) if model.is_bidirectional_decoder() else 0.0
    for feat in inputs.feats:
        feeds = {"x": feat[None].astype(np.float32),
                 "x_lens": np.array([feat.shape[0]], dtype=np.int64)}
        want, got = (s.run(None, feeds) for s in sessions["model"])
        offline.add(want[0][0, :int(want[1][0])], got[0][0, :int(got[1][0])])

        hidden = [stream_onnx(s, ENCODER_INPUTS, feat, chunk, required, model)
                  for s in sessions["encoder"]]
        if hidden[0].shape[0] == 0:
            continue
        lp = [s.run(None, {"hidden": h[None]})[0][0] for s, h in zip(sessions["ctc"], hidden)]
        runtime.add(lp[0], lp[1])
        if kernel is not None:
            h = stream_onnx(kernel, ENCODER_INPUTS, feat, chunk, required, model)
            kernel_runtime.add(lp[0], sessions["ctc"][1].run(None, {"hidden": h[None]})[0][0])
        sherpa.add(*(stream_onnx(s, STREAMING_INPUTS, feat, chunk, sherpa_required, model,
                                 scalar_offsets=False) for s in sessions["model_streaming"]))
        hyp = greedy_collapse(lp[0].argmax(-1).tolist(), blank)
        outs = [s.run(None, decoder_feeds(model, hyp, h, rw))
                for s, h in zip(sessions["decoder"], hidden)]
        decoder.add(outs[0][0][0], outs[1][0][0])
        if rw > 0:
            decoder.add(outs[0][1][0], outs[1][1][0])
        if "decoder_tree" in sessions:
            outs = [s.run(None, decoder_tree_feeds(model, hyp, h))
                    for s, h in zip(sessions["decoder_tree"], hidden)]
            tree.add(outs[0][0][0], outs[1][0][0])
            if rw > 0:
                tree.add(outs[0][1][0], outs[1][1][0])
    report: Dict[str, float] = {}
    tallies = [offline, runtime, sherpa, decoder] + ([tree] if "decoder_tree" in sessions else [])
    if kernel is not None:
        tallies.append(kernel_runtime)
    for tally in tallies:
        report.update(tally.check(max_disagreement, inputs))
    return report


def _int8_kernel_encoder(out_dir: str, variant: Callable[[str], str]):
    """The int8 runtime's kernel encoder (`encoder.int8.kernel/`) as a session, or None
    when the export has none or this machine has no kernel to run it (a warning)."""
    from wenet_moe_runtime import native

    path = os.path.join(out_dir, "encoder.int8.kernel")
    if variant is not int8_name or not os.path.isdir(path):
        return None
    if native.library() is None:
        logging.warning("encoder.int8.kernel not gated here: MoE CPU kernel unavailable (%s)",
                        native.disabled_reason())
        return None
    return session(path)


# -- int8 experts in the fp32 graphs (`--expert_precision int8`) ---------------------

EXPERT_BLOCK = 256          # MatMulNBits block along K (ONNX Runtime takes 16..256)
_EXPERT_WEIGHT = re.compile(r"^moe\d+/expert\d+/w[12]$")


def experts_int8_name(name: str) -> str:
    """encoder.onnx -> encoder.experts_int8.onnx (staging name of the int8-expert graph)."""
    return name[:-len(".onnx")] + ".experts_int8.onnx"


def _is_expert_weight(name: str) -> bool:
    return bool(_EXPERT_WEIGHT.match(name))


def expert_int8_weights(weight: np.ndarray, block: int = EXPERT_BLOCK
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, N) fp32 expert weight (y = x W) -> the `com.microsoft::MatMulNBits` (8 bit)
    inputs (blob uint8 (N, ceil(K / block), block), scales fp32 (N * blocks,),
    zero points uint8 (N * blocks,)) holding exactly the PyTorch kernel's int8 experts
    (`cpu_kernel.quantize_int8`: symmetric, scale max_k |W[k, n]| / 127 per column,
    round half to even): every block of a column repeats its column scale, zero
    point 128; K is padded to whole blocks with zero weights."""
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int16)
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), dtype=np.int16)
    padded[:k] = q
    blob = (padded.T + 128).astype(np.uint8).reshape(n, blocks, block)
    scales = np.repeat(scale[:, None], blocks, axis=1).reshape(-1)
    zero_points = np.full(n * blocks, 128, dtype=np.uint8)
    return blob, scales, zero_points


def int8_experts(proto: onnx.ModelProto, block: int = EXPERT_BLOCK,
                 accuracy_level: int = 4) -> int:
    """Rewrite, in place, every MoE expert projection (a Gemm or MatMul whose weight is
    an initializer named `moe<j>/expert<e>/w1|w2`, in any subgraph) into one
    `com.microsoft::MatMulNBits` with 8-bit weights (`expert_int8_weights`) and the
    bias as its bias input; the fp32 weights are dropped. `accuracy_level` 4 makes
    ONNX Runtime quantize each row of activations per block of K to int8 (rows are
    independent: a frame's output does not depend on the frames computed with it, so
    batched and lone streams agree) and use its int8 dot-product kernels; routers,
    attention, convolutions and everything else stay fp32. Returns the number of
    projections rewritten (0 for a dense model)."""
    from wenet_moe.export.onnx_passes import graphs

    every = graphs(proto.graph)
    owner = {t.name: g for g in every for t in g.initializer}
    tensors = {t.name: t for g in every for t in g.initializer}
    rewritten, done = 0, set()
    for graph in every:
        for node in graph.node:
            if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 \
                    or not _is_expert_weight(node.input[1]) or node.input[1] not in tensors:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                           or attrs.get("beta", 1.0) != 1.0):
                raise ValueError(f"int8 experts: Gemm {node.name} has attributes {attrs}; "
                                 "expected y = x W + b")
            name = node.input[1]
            weight = numpy_helper.to_array(tensors[name]).astype(np.float32)
            if node.op_type == "Gemm" and attrs.get("transB", 0):
                weight = weight.T
            k, n = weight.shape
            size = min(block, max(16, 1 << (k - 1).bit_length()))   # power of 2 in 16..block
            if name not in done:       # a weight read by several nodes is stored once
                for suffix, value in zip(("int8", "scale", "zero_point"),
                                         expert_int8_weights(weight, size)):
                    owner[name].initializer.append(numpy_helper.from_array(value, f"{name}_{suffix}"))
                done.add(name)
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
            nbits = onnx.helper.make_node(
                "MatMulNBits", [node.input[0], f"{name}_int8", f"{name}_scale",
                                f"{name}_zero_point", "", bias],
                list(node.output), name=(node.name or name) + "_int8", domain="com.microsoft",
                K=k, N=n, bits=8, block_size=size, accuracy_level=accuracy_level)
            node.CopyFrom(nbits)       # in place: subgraph references stay valid
            rewritten += 1
    if rewritten:
        used = {x for g in every for node in g.node for x in node.input}
        for graph in every:
            for index in reversed(range(len(graph.initializer))):
                name = graph.initializer[index].name
                if name not in used and _is_expert_weight(name):
                    del graph.initializer[index]
        if not any(op.domain == "com.microsoft" for op in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return rewritten
