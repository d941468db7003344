"""int8 copies of the ONNX graphs (onnxruntime dynamic quantization) and their
sanity check.

`quantize_dynamic` stores int8 weights of every MatMul/Gemm whose weight is an
initializer and quantizes activations per call. MoE expert weights are sliced per
expert inside the graph (not initializers), so experts stay fp32; attention,
subsampling, CTC and decoder projections become int8. int8 output is not equal
to fp32, so it is checked for shapes, finiteness and greedy-CTC agreement, not
for closeness.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Dict, Sequence

import numpy as np
import onnx
import torch

from wenet_moe.export.verify import ParityError, chunk_windows, feature_dim, session


def int8_name(name: str) -> str:
    """encoder.onnx -> encoder.int8.onnx."""
    return name[:-len(".onnx")] + ".int8.onnx"


def quantize_onnx(src: str, dst: str) -> None:
    """Write the dynamically int8-quantized copy of `src` to `dst`, keeping its
    metadata. `graph.value_info` is cleared first: stale shape annotations from
    the exporter can make the quantizer's shape inference fail."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from wenet_moe.export.onnx_export import EXTERNAL_DATA_BYTES, save_onnx, weight_bytes

    proto = onnx.load(src)
    meta = {p.key: p.value for p in proto.metadata_props}
    del proto.graph.value_info[:]
    _unshare_weights(proto)
    external = weight_bytes(proto) > EXTERNAL_DATA_BYTES
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=os.path.dirname(os.path.abspath(dst)))
    os.close(fd)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns on the root logger per tensor
    try:
        save_onnx(proto, tmp, check=False)
        quantize_dynamic(tmp, dst, weight_type=QuantType.QInt8,
                         use_external_data_format=external)
    finally:
        root.setLevel(level)
        for leftover in (tmp, tmp + ".data"):
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


def _check(name: str, arrays: Sequence[np.ndarray], shapes: Sequence[tuple]) -> None:
    for i, (a, s) in enumerate(zip(arrays, shapes)):
        if tuple(a.shape) != tuple(s):
            raise ParityError(f"{name}: output {i} has shape {a.shape}, fp32 {s}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ParityError(f"{name}: output {i} is not finite")


def verify_int8(model: torch.nn.Module, out_dir: str, chunk_size: int, left_chunks: int,
                lengths: Sequence[int] = (7, 50, 300), seed: int = 0) -> Dict[str, float]:
    """Run every `*.int8.onnx` beside its fp32 graph: equal shapes, finite values.
    Returns {"model.int8.onnx greedy agreement": fraction of frames whose argmax
    equals fp32's, "... max |diff|": largest log-prob difference} and the same
    for the streaming loop of encoder.int8.onnx (output difference)."""
    from wenet_moe.export.onnx_export import cache_shapes

    gen = torch.Generator().manual_seed(seed)
    report: Dict[str, float] = {}
    fp, q8 = (session(os.path.join(out_dir, n)) for n in ("model.onnx", "model.int8.onnx"))
    agree, total, worst = 0, 0, 0.0
    for t in lengths:
        x = torch.randn(1, t, feature_dim(model), generator=gen).numpy()
        feeds = {"x": x, "x_lens": np.array([t], dtype=np.int64)}
        want, got = fp.run(None, feeds), q8.run(None, feeds)
        _check("model.int8.onnx", got, [w.shape for w in want])
        agree += int(np.sum(got[0].argmax(-1) == want[0].argmax(-1)))
        total += want[0].shape[1]
        worst = max(worst, float(np.abs(got[0] - want[0]).max()))
    report["model.int8.onnx greedy agreement"] = agree / max(total, 1)
    report["model.int8.onnx max |diff|"] = worst

    att_shape, cnn_shape = cache_shapes(model)
    chunk = chunk_size if chunk_size > 0 else 16
    for name, names, shape, required in (
            ("encoder", ("chunk", "offset", "required_cache_size", "att_cache", "cnn_cache",
                         "att_mask"), (), -1),
            ("model_streaming", ("x", "offset", "required_cache_size", "attn_cache",
                                 "conv_cache", "attn_mask"), (1,),
             chunk * (left_chunks if left_chunks > 0 else 2))):
        fp, q8 = session(os.path.join(out_dir, f"{name}.onnx")), \
            session(os.path.join(out_dir, f"{name}.int8.onnx"))
        cache_t = max(required, 0)
        states = [[np.zeros((att_shape[0], att_shape[1], cache_t, att_shape[3]), np.float32),
                   np.zeros(cnn_shape, np.float32)] for _ in range(2)]
        xs = torch.randn(1, 200, feature_dim(model), generator=gen).numpy()
        offset, worst = cache_t, 0.0
        for k, (start, end) in enumerate(chunk_windows(200, chunk, model.subsampling_rate(),
                                                       model.right_context())):
            t_out = (end - start - model.right_context() - 1) // model.subsampling_rate() + 1
            mask = np.ones((1, 1, cache_t + t_out if cache_t else states[0][0].shape[2] + t_out),
                           dtype=bool)
            mask[:, :, : max(cache_t - k * chunk, 0)] = False
            outs = []
            for sess, st in ((fp, states[0]), (q8, states[1])):
                feeds = dict(zip(names, [xs[:, start:end], np.full(shape, offset, np.int64),
                                         np.full(shape, required, np.int64), st[0], st[1], mask]))
                out = sess.run(None, feeds)
                st[0], st[1] = out[1], out[2]
                outs.append(out)
            _check(f"{name}.int8.onnx", outs[1], [o.shape for o in outs[0]])
            worst = max(worst, float(np.abs(outs[1][0] - outs[0][0]).max()))
            offset += outs[0][0].shape[1]
        report[f"{name}.int8.onnx max |diff|"] = worst

    for name, feeds in (
            ("ctc", {"hidden": torch.randn(1, 9, model.encoder.output_size(),
                                           generator=gen).numpy()}),
            ("decoder", {"hyps": np.array([[model.sos_symbol(), 1, 2], [model.sos_symbol(), 3,
                                                                       model.eos_symbol()]]),
                         "hyps_lens": np.array([3, 2]),
                         "encoder_out": torch.randn(1, 11, model.encoder.output_size(),
                                                    generator=gen).numpy(),
                         "reverse_weight": np.array(0.3, dtype=np.float32)})):
        want = session(os.path.join(out_dir, f"{name}.onnx")).run(None, feeds)
        got = session(os.path.join(out_dir, f"{name}.int8.onnx")).run(None, feeds)
        _check(f"{name}.int8.onnx", got, [w.shape for w in want])
        report[f"{name}.int8.onnx max |diff|"] = max(float(np.abs(g - w).max())
                                                     for g, w in zip(got, want))
    return report
