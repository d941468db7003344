"""`wenet-moe export-wenet`: a dense model of this toolkit -> a WeNet model directory.

    wenet-moe export-wenet --config exp/x/train.yaml --checkpoint exp/x/avg_10.pt \\
        --output_dir exp/x/wenet [--allow_mismatch]

OUT (new or empty) receives WeNet's layout: `train.yaml`, `final.pt` (WeNet key
names), `units.txt`, `global_cmvn`. If WeNet would compute something else (this
toolkit's default convolution padding `cnn_module_pad: glu`, sherpa-onnx fbank
options, ...), the command fails naming the option; `--allow_mismatch` writes the
directory anyway and lists every difference. MoE models are refused.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="train.yaml of the (dense) model")
    parser.add_argument("--checkpoint", required=True, help="checkpoint to export")
    parser.add_argument("--output_dir", required=True, help="new (or empty) WeNet model directory")
    parser.add_argument("--allow_mismatch", action="store_true",
                        help="write it even where WeNet computes differently (listed)")


def main(args: argparse.Namespace) -> int:
    from wenet_moe.interop.wenet_export import export_wenet

    report = export_wenet(args.config, args.checkpoint, args.output_dir, args.allow_mismatch)
    for item in report["mismatches"]:
        print(f"wenet-moe export-wenet: warning: {item}", file=sys.stderr)
    print(f"wenet-moe export-wenet: wrote {args.output_dir} ({report['keys']} keys)", file=sys.stderr)
    return 0
