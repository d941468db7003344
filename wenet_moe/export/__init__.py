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
from typing import Dict, Optional

import torch

from wenet_moe.export.common import (build_and_load, export_metadata, load_configs,
                                     staged_output, write_symbol_tables)
from wenet_moe.export.gate import DEFAULT_MAX_DISAGREEMENT, Int8GateError
from wenet_moe.export.verify import ParityError, compare

__all__ = ["export_model", "export_loaded", "ParityError", "Int8GateError", "compare",
           "FORMATS"]

FORMATS = ("onnx", "torchscript")
ONNX_FILES = ("encoder.onnx", "ctc.onnx", "decoder.onnx", "model.onnx", "model_streaming.onnx")
# the streaming encoder over a batch of streams (fp32 only: int8 MatMulInteger quantizes
# activations per tensor, so a stream's result would depend on its batch mates)
BATCH_ENCODER_FILE = "encoder_batch.onnx"


def export_loaded(model: torch.nn.Module, configs: Dict, raw_configs: Dict, output_dir: str,
                  fmt: str = "onnx", chunk_size: int = 16, left_chunks: int = -1,
                  quantize: Optional[str] = None, reverse_weight: Optional[float] = None,
                  verify: bool = True,
                  int8_max_disagreement: float = DEFAULT_MAX_DISAGREEMENT,
                  int8_verify_data: Optional[str] = None) -> Dict[str, float]:
    """Export an already built eval-mode model; returns {check: max |diff|} of the
    verification (plus the int8 gate's rates). See `export_model`."""
    from wenet_moe.export import gate, onnx_export

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if quantize not in (None, "", "int8"):
        raise ValueError(f"--quantize must be int8, got '{quantize}'")
    int8_max_disagreement = gate.check_limit(int8_max_disagreement)
    if int8_verify_data and quantize != "int8":
        raise ValueError("--int8_verify_data is only used with --quantize int8")
    if chunk_size == 0 or chunk_size < -1:
        raise ValueError(f"--chunk_size must be > 0 (streaming) or -1 (full context), "
                         f"got {chunk_size}")
    if reverse_weight is None:
        reverse_weight = float((configs.get("model_conf") or {}).get("reverse_weight", 0.0))
    if not 0.0 <= reverse_weight <= 1.0:
        raise ValueError(f"--reverse_weight must be in [0, 1], got {reverse_weight}")
    if not model.is_bidirectional_decoder():
        reverse_weight = 0.0
    model = model.float().eval()
    onnx_export.set_feature_dim(model, int(configs["input_dim"]))
    meta = export_metadata(model, configs, raw_configs, chunk_size, left_chunks, reverse_weight)
    # the runtimes size the cnn cache as (blocks, 1, D, cnn_module_kernel - 1)
    meta["cnn_module_kernel"] = str(onnx_export.cache_shapes(model)[1][3] + 1)
    inputs = None
    if quantize == "int8" and verify:  # read before the export: bad data fails fast
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
            if verify:
                report.update(check.verify_onnx(model, stage, chunk_size, left_chunks,
                                                reverse_weight))
                report.update(check.verify_encoder_batch(model, batch_path, chunk_size,
                                                         left_chunks))
            if quantize == "int8":
                for name in ONNX_FILES:
                    q8.quantize_onnx(os.path.join(stage, name),
                                     os.path.join(stage, q8.int8_name(name)))
                if verify:
                    report.update(q8.verify_int8(model, stage, chunk_size, left_chunks, inputs,
                                                 int8_max_disagreement, reverse_weight))
    for key, value in report.items():
        logging.info("export check %s: %.3g", key, value)
    return report


def export_model(config: str, checkpoint: str, output_dir: str, fmt: str = "onnx",
                 chunk_size: int = 16, left_chunks: int = -1, quantize: Optional[str] = None,
                 reverse_weight: Optional[float] = None,
                 int8_max_disagreement: float = DEFAULT_MAX_DISAGREEMENT,
                 int8_verify_data: Optional[str] = None) -> Dict[str, float]:
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
        reverse_weight: rescoring weight recorded in the metadata (default
            model_conf.reverse_weight; 0 without a bidirectional decoder).
    """
    raw, configs = load_configs(config)
    model = build_and_load(configs, checkpoint)
    return export_loaded(model, configs, raw, output_dir, fmt, chunk_size, left_chunks,
                         quantize, reverse_weight, int8_max_disagreement=int8_max_disagreement,
                         int8_verify_data=int8_verify_data)
