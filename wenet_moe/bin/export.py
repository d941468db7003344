"""`wenet-moe export`: a checkpoint and its train.yaml -> ONNX or TorchScript models.

    wenet-moe export --config exp/x/train.yaml --checkpoint exp/x/avg_5.pt \\
        --output_dir exp/x/onnx --format onnx [--chunk_size 16] \\
        [--num_decoding_left_chunks -1] [--quantize int8] [--reverse_weight 0.5] \\
        [--int8_verify_data data/dev/data.list] [--int8_max_disagreement 0.02] \\
        [--expert_precision int8]

ONNX writes encoder.onnx, ctc.onnx, decoder.onnx (WeNet runtime), model.onnx and
model_streaming.onnx (sherpa-onnx `from_wenet_ctc`), units.txt and tokens.txt;
TorchScript writes final.zip. `--wenet_runtime` writes instead only what WeNet's C++
runtime loads (encoder.onnx, ctc.onnx, decoder.onnx with its 3 inputs, units.txt;
see wenet_moe/export/wenet_runtime.py). Everything is verified against PyTorch before it
is moved into --output_dir; on failure nothing there changes.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="resolved train.yaml of the model")
    parser.add_argument("--checkpoint", required=True, help="checkpoint to export")
    parser.add_argument("--output_dir", required=True, help="directory for the exported files")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                        help="onnx (five graphs + symbol tables) or torchscript (final.zip)")
    parser.add_argument("--chunk_size", type=int, default=16,
                        help="decoding chunk in encoder frames (-1: full context); metadata")
    parser.add_argument("--num_decoding_left_chunks", type=int, default=-1,
                        help="left chunks kept in the attention cache (-1: all); metadata")
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="also write dynamically int8-quantized copies")
    parser.add_argument("--wenet_runtime", action="store_true",
                        help="ONNX for WeNet's C++ runtime: encoder/ctc/decoder.onnx with its "
                             "interface (decoder without a reverse_weight input, no att_mask "
                             "input when --num_decoding_left_chunks <= 0)")
    parser.add_argument("--reverse_weight", type=float, default=None,
                        help="right-to-left decoder weight for rescoring (metadata; default "
                             "model_conf.reverse_weight)")
    parser.add_argument("--int8_max_disagreement", type=float, default=0.02,
                        help="int8 accuracy gate (wenet_moe/export/gate.py): the export fails, "
                             "writing nothing, when int8 differs from fp32 on more than this "
                             "share of the frames fp32 decides (best token ahead by >= 1 nat)")
    parser.add_argument("--expert_precision", default=None, choices=["fp32", "bf16", "int8"],
                        help="MoE experts of the fp32 ONNX graphs: int8 stores them as 8-bit "
                             "weights (com.microsoft::MatMulNBits, gated like --quantize int8; "
                             "all else fp32); bf16 rounds them to bfloat16 values, which the "
                             "runtime's kernel graphs (encoder.kernel/) hold in half the bytes. "
                             "Default: int8 when moe_conf.expert_precision is int8 or w8a8, "
                             "bf16 when it is bf16 or bf16a, else fp32")
    parser.add_argument("--int8_verify_data", default=None,
                        help="data.list, wav.scp or audio file whose first 20 utterances the "
                             "int8 gate runs on (default: random CMVN-centred features)")


def main(args: argparse.Namespace) -> int:
    from wenet_moe.export import export_model

    if args.wenet_runtime:
        return _wenet_runtime(args)
    report = export_model(args.config, args.checkpoint, args.output_dir, args.format,
                          args.chunk_size, args.num_decoding_left_chunks, args.quantize,
                          args.reverse_weight, args.int8_max_disagreement,
                          args.int8_verify_data, args.expert_precision)
    for key, value in report.items():
        print(f"wenet-moe export: check {key}: {value:.3g}", file=sys.stderr)
    print(f"wenet-moe export: wrote {args.output_dir}", file=sys.stderr)
    return 0


def _wenet_runtime(args: argparse.Namespace) -> int:
    from wenet_moe.export.common import build_and_load, load_configs
    from wenet_moe.export.wenet_runtime import export_wenet_runtime

    if args.format != "onnx" or args.quantize:
        raise ValueError("--wenet_runtime writes fp32 ONNX only (no --format torchscript, "
                         "no --quantize)")
    raw, configs = load_configs(args.config)
    model = build_and_load(configs, args.checkpoint)
    report = export_wenet_runtime(model, configs, raw, args.output_dir, args.chunk_size,
                                  args.num_decoding_left_chunks, args.reverse_weight)
    for key, value in report.items():
        print(f"wenet-moe export: check {key}: {value:.3g}", file=sys.stderr)
    print(f"wenet-moe export: wrote {args.output_dir} (WeNet runtime)", file=sys.stderr)
    return 0
