"""TorchScript and ONNX export with self-verification.

`export_model(...)` writes everything into a staging directory, verifies the
written files against the eager model (raising `ParityError` with the largest
difference if they disagree; int8 copies pass the accuracy gate of `gate`, or
raise `Int8GateError`), and only then puts the staging directory in place of
`output_dir` as a whole.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch

from wenet_moe.export.common import (build_and_load, export_metadata, load_configs,
                                     staged_output, write_symbol_tables)
from wenet_moe.export.gate import DEFAULT_MAX_DISAGREEMENT, Int8GateError
from wenet_moe.export.verify import ParityError, compare
from wenet_moe.model.loading import has_moe_layers

__all__ = ["export_model", "export_loaded", "ParityError", "Int8GateError", "compare",
           "FORMATS"]

FORMATS = ("onnx", "torchscript")
ONNX_FILES = ("encoder.onnx", "ctc.onnx", "decoder.onnx", "model.onnx", "model_streaming.onnx")
# the streaming encoder over a batch of streams (fp32 only: int8 MatMulInteger quantizes
# activations per tensor, so a stream's result would depend on its batch mates)
BATCH_ENCODER_FILE = "encoder_batch.onnx"
# attention rescoring on the n-best's prefix trees (and its int8 copy with --quantize int8)
DECODER_TREE_FILE = "decoder_tree.onnx"
EXPERT_PRECISIONS = ("fp32", "bf16", "int8")     # --expert_precision of the fp32 ONNX graphs


def export_loaded(model: torch.nn.Module, configs: Dict, raw_configs: Dict, output_dir: str,
                  fmt: str = "onnx", chunk_size: int = 16, left_chunks: int = -1,
                  quantize: Optional[str] = None, reverse_weight: Optional[float] = None,
                  verify: bool = True,
                  int8_max_disagreement: float = DEFAULT_MAX_DISAGREEMENT,
                  int8_verify_data: Optional[str] = None,
                  expert_precision: Optional[str] = None) -> Dict[str, float]:
    """Export an already built eval-mode model; returns {check: max |diff|} of the
    verification (plus the int8 gate's rates). See `export_model`."""
    from wenet_moe.export import gate, onnx_export

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if quantize not in (None, "", "int8"):
        raise ValueError(f"--quantize must be int8, got '{quantize}'")
    int8_max_disagreement = gate.check_limit(int8_max_disagreement)
    expert_precision = resolve_expert_precision(expert_precision, configs, fmt)
    if int8_verify_data and quantize != "int8" and expert_precision != "int8":
        raise ValueError("--int8_verify_data is only used with --quantize int8 or "
                         "--expert_precision int8")
    if chunk_size == 0 or chunk_size < -1:
        raise ValueError(f"--chunk_size must be > 0 (streaming) or -1 (full context), "
                         f"got {chunk_size}")
    if reverse_weight is None:
        reverse_weight = float((configs.get("model_conf") or {}).get("reverse_weight", 0.0))
    if not 0.0 <= reverse_weight <= 1.0:
        raise ValueError(f"--reverse_weight must be in [0, 1], got {reverse_weight}")
    if not model.is_bidirectional_decoder():
        reverse_weight = 0.0
    # `--expert_precision bf16`: the fp32 MoE FFNs take bf16 values
    model = experts_as_computed(model.float().eval(), "bf16" if expert_precision == "bf16" else "fp32")
    onnx_export.set_feature_dim(model, int(configs["input_dim"]))
    meta = export_metadata(model, configs, raw_configs, chunk_size, left_chunks, reverse_weight)
    # the runtimes size the cnn cache as (blocks, 1, D, cnn_module_kernel - 1)
    meta["cnn_module_kernel"] = str(onnx_export.cache_shapes(model)[1][3] + 1)
    inputs = None
    if (quantize == "int8" or expert_precision == "int8") and verify:
        # read before the export: bad data fails fast
        inputs = gate.gate_inputs(model, configs, int8_verify_data)
    report: Dict[str, float] = {}
    with staged_output(output_dir) as stage:
        write_symbol_tables(configs, stage)
        if fmt == "torchscript":
            from wenet_moe.export import torchscript_export as ts
            path = os.path.join(stage, "final.zip")
            ts.export_torchscript(model, path, meta)
            if verify:
                report.update(ts.verify_torchscript(model, path, chunk_size, left_chunks,
                                                    reverse_weight))
            if quantize == "int8":
                q_path = os.path.join(stage, "final.int8.zip")
                ts.quantize_torchscript(model, q_path, meta)
                if verify:
                    report.update(ts.check_quantized_torchscript(
                        model, q_path, inputs, chunk_size, left_chunks, reverse_weight,
                        int8_max_disagreement))
        else:
            from wenet_moe.export import quantize as q8
            from wenet_moe.export import verify as check
            onnx_export.export_onnx(model, stage, chunk_size, left_chunks, reverse_weight, meta)
            batch_path = os.path.join(stage, BATCH_ENCODER_FILE)
            onnx_export.export_encoder_batch(model, batch_path, chunk_size, left_chunks, meta)
            tree_path = os.path.join(stage, DECODER_TREE_FILE)
            onnx_export.export_decoder_tree(model, tree_path, meta)
            kernel_graphs = _kernel_graphs(model, stage, chunk_size, left_chunks, meta,
                                           expert_precision)
            if verify:
                report.update(check.verify_onnx(model, stage, chunk_size, left_chunks,
                                                reverse_weight))
                report.update(check.verify_encoder_batch(model, batch_path, chunk_size,
                                                         left_chunks))
                report.update(check.verify_decoder_tree(model, tree_path))
                report.update(_verify_kernel_graphs(model, kernel_graphs, chunk_size, left_chunks))
            if quantize == "int8":
                for name in ONNX_FILES + (DECODER_TREE_FILE,):
                    q8.quantize_onnx(os.path.join(stage, name),
                                     os.path.join(stage, q8.int8_name(name)))
                if kernel_graphs:       # the int8 runtime's encoder (no int8 batched graph)
                    from wenet_moe.export import expert_split
                    expert_split.write_int8_kernel_graph(kernel_graphs[0], q8.quantize_onnx)
                if verify:
                    report.update(q8.verify_int8(model, stage, chunk_size, left_chunks, inputs,
                                                 int8_max_disagreement, reverse_weight))
            if expert_precision == "int8":
                report.update(_int8_experts(model, stage, chunk_size, left_chunks, inputs,
                                            int8_max_disagreement, reverse_weight, verify))
    for key, value in report.items():
        logging.info("export check %s: %.3g", key, value)
    return report


def _kernel_graphs(model: torch.nn.Module, stage: str, chunk_size: int, left_chunks: int,
                   meta: Dict[str, str], expert_precision: str) -> List[str]:
    """`encoder.kernel/` and `encoder_batch.kernel/` (`expert_split`: the streaming
    encoders with their MoE FFNs run by the C kernel in the runtime) of an MoE model
    whose layers the kernel runs, its experts stored as fp32 or bf16 (`expert_precision`;
    the model's expert weights then hold bf16 values); not with int8 experts (their
    `MatMulNBits` graphs are faster). Returns the directories written."""
    from wenet_moe.export import expert_split, onnx_export

    if not expert_split.has_moe(model) or expert_precision == "int8":
        return []
    why = expert_split.unsupported(model)
    if why:
        logging.info("no encoder.kernel: %s", why)
        return []
    encoder = os.path.join(stage, "encoder.onnx")
    batch = os.path.join(stage, BATCH_ENCODER_FILE)
    first = expert_split.write_kernel_graph(model, encoder, lambda m, p: onnx_export.export_encoder(
        m, p, chunk_size, left_chunks, meta), expert_precision)
    # the same experts: one experts.npz on disk, linked from both directories
    return [first, expert_split.write_kernel_graph(
        model, batch, lambda m, p: onnx_export.export_encoder_batch(m, p, chunk_size, left_chunks, meta),
        expert_precision, weights_from=os.path.join(first, expert_split.WEIGHTS))]


def _verify_kernel_graphs(model: torch.nn.Module, kernel_graphs: List[str], chunk_size: int,
                          left_chunks: int) -> Dict[str, float]:
    """The kernel graphs' streaming parity with PyTorch (`verify.verify_encoder` /
    `verify_encoder_batch` through the runtime's `ExpertSplitEncoder`), where this
    machine builds the kernel (else they are checked where they are served)."""
    from wenet_moe.export import verify as check
    from wenet_moe_runtime import native

    if not kernel_graphs:
        return {}
    if native.library() is None:
        logging.warning("encoder.kernel not verified here: MoE CPU kernel unavailable (%s)",
                        native.disabled_reason())
        return {}
    report = check.verify_encoder(model, kernel_graphs[0], chunk_size, left_chunks)
    report.update(check.verify_encoder_batch(model, kernel_graphs[1], chunk_size, left_chunks))
    return report


def experts_as_computed(model: torch.nn.Module, fp32_experts: str = "fp32") -> torch.nn.Module:
    """A copy of `model` whose MoE experts hold the weight values it computes with
    (`cpu_kernel.expert_weight_values` of each FFN's `expert_precision`, which the copy
    then runs as fp32: the same numbers), so that the exported graphs equal the eager
    model (up to the activations that w8a8 and bf16a round and the fp32 graphs do
    not); `fp32_experts` ("bf16": `--expert_precision bf16` of an fp32 model) is the
    precision whose values the fp32 FFNs take. `model` itself when nothing changes."""
    import copy

    from wenet_moe.layers.cpu_kernel import expert_weight_values
    from wenet_moe.layers.moe import MoEFFN

    def values_of(m: MoEFFN) -> str:
        return fp32_experts if m.expert_precision == "fp32" else m.expert_precision

    if not any(isinstance(m, MoEFFN) and values_of(m) != "fp32" for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoEFFN) and values_of(m) != "fp32":
                for weight in (m.w1, m.w2):
                    weight.copy_(expert_weight_values(weight, values_of(m)))
                m.expert_precision = "fp32"
    return model


def resolve_expert_precision(expert_precision: Optional[str], configs: Dict, fmt: str) -> str:
    """--expert_precision: fp32, bf16 or int8; by default int8 when the model's
    `moe_conf.expert_precision` is int8 or w8a8 (the graph's MatMulNBits quantizes its
    activations itself), bf16 when it is bf16 or bf16a (ONNX Runtime has no bf16 CPU
    kernel: the graphs hold the bf16 values in fp32, the kernel graphs read bf16)."""
    if expert_precision is None:
        conf = str((configs.get("moe_conf") or {}).get("expert_precision", "fp32"))
        moe = has_moe_layers(configs) and fmt == "onnx"
        expert_precision = ("int8" if conf in ("int8", "w8a8") and moe
                            else "bf16" if conf in ("bf16", "bf16a") and moe else "fp32")
    if expert_precision not in EXPERT_PRECISIONS:
        raise ValueError(f"--expert_precision must be one of {', '.join(EXPERT_PRECISIONS)}, "
                         f"got '{expert_precision}'")
    if expert_precision != "fp32" and fmt != "onnx":
        raise ValueError(f"--expert_precision {expert_precision} applies to --format onnx (TorchScript "
                         "computes in fp32 with the expert values of moe_conf.expert_precision)")
    return expert_precision


def _int8_experts(model: torch.nn.Module, stage: str, chunk_size: int, left_chunks: int,
                  inputs, max_disagreement: float, reverse_weight: float,
                  verify: bool) -> Dict[str, float]:
    """Replace the experts of every fp32 graph in `stage` by int8 ones
    (`quantize.int8_experts`), after the int8 accuracy gate compared each graph with
    its fp32 original (when `verify`); int8 copies, if any, are left as they are."""
    import onnx

    from wenet_moe.export import quantize as q8
    from wenet_moe.export.onnx_export import save_onnx

    rewritten = []       # one graph in memory at a time (a large model's are GBs)
    try:
        for name in ONNX_FILES + (BATCH_ENCODER_FILE, DECODER_TREE_FILE):
            proto = onnx.load(os.path.join(stage, name))
            if q8.int8_experts(proto):
                entry = proto.metadata_props.add()
                entry.key, entry.value = "expert_precision", "int8"
                save_onnx(proto, os.path.join(stage, q8.experts_int8_name(name)), check=False)
                rewritten.append(name)
            del proto
        if "encoder.onnx" not in rewritten:
            raise ValueError("--expert_precision int8: the model has no MoE experts")
        report: Dict[str, float] = {}
        if verify:
            report = q8.verify_int8(model, stage, chunk_size, left_chunks, inputs,
                                    max_disagreement, reverse_weight,
                                    variant=q8.experts_int8_name)
        for name in rewritten:   # reload: the external data file is named after the graph
            save_onnx(onnx.load(os.path.join(stage, q8.experts_int8_name(name))),
                      os.path.join(stage, name), check=False)
    finally:
        for name in rewritten:
            for suffix in ("", ".data"):
                path = os.path.join(stage, q8.experts_int8_name(name)) + suffix
                if os.path.exists(path):
                    os.unlink(path)
    return report


def export_model(config: str, checkpoint: str, output_dir: str, fmt: str = "onnx",
                 chunk_size: int = 16, left_chunks: int = -1, quantize: Optional[str] = None,
                 reverse_weight: Optional[float] = None,
                 int8_max_disagreement: float = DEFAULT_MAX_DISAGREEMENT,
                 int8_verify_data: Optional[str] = None,
                 expert_precision: Optional[str] = None) -> Dict[str, float]:
    """`wenet-moe export`: train.yaml + checkpoint -> verified files in output_dir.

    Args:
        config: the resolved train.yaml (with input_dim/output_dim).
        checkpoint: any checkpoint of that model.
        output_dir: created if needed; an existing one (holding only export files)
            is replaced as a whole, only after every check passed.
        fmt: "onnx" or "torchscript".
        chunk_size, left_chunks: recorded in the metadata and used as the example
            and the first verification case (the graphs take any chunk/cache size).
        quantize: "int8" adds dynamically quantized copies, gated: the export fails
            when int8 greedy decisions differ from fp32's on more than
            `int8_max_disagreement` of the frames fp32 decides (see `gate`).
        int8_verify_data: data.list, wav.scp or audio file whose first utterances
            the int8 gate runs on (default: random CMVN-centred features).
        expert_precision: "int8" stores the MoE experts of the fp32 ONNX graphs as
            8-bit weights (`com.microsoft::MatMulNBits`; the PyTorch kernel's int8
            values, activations quantized per row inside ONNX Runtime's int8 kernel),
            gated like int8 copies; everything else stays fp32. "bf16" rounds them to
            bfloat16 values (fp32 in the .onnx graphs; the runtime's kernel graphs,
            `encoder.kernel/`, hold them in bf16: half the bytes). Default: int8 when
            `moe_conf.expert_precision` is int8 or w8a8, bf16 when bf16 or bf16a, else fp32.
        reverse_weight: rescoring weight recorded in the metadata (default
            model_conf.reverse_weight; 0 without a bidirectional decoder).
    """
    raw, configs = load_configs(config)
    model = build_and_load(configs, checkpoint)
    return export_loaded(model, configs, raw, output_dir, fmt, chunk_size, left_chunks,
                         quantize, reverse_weight, int8_max_disagreement=int8_max_disagreement,
                         int8_verify_data=int8_verify_data, expert_precision=expert_precision)
