"""`wenet-moe import-wenet`: a WeNet model directory -> this toolkit's model directory.

    wenet-moe import-wenet --wenet_dir 20220506_u2pp_conformer_exp \\
        --output_dir exp/imported [--checkpoint final.pt]

DIR holds WeNet's `train.yaml`, `final.pt` (or the `--checkpoint` given), `units.txt`
and `global_cmvn`. OUT (new or empty) receives `train.yaml`, `final.pt`, `units.txt`
and the CMVN file, ready for `recognize`, `export`, `transcribe` and the server.
Key and layout mapping: wenet_moe/interop/wenet_import.py. An option or a weight
this toolkit does not implement is an error naming it; nothing is written then.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wenet_dir", required=True,
                        help="WeNet model directory (train.yaml, final.pt, units.txt, global_cmvn)")
    parser.add_argument("--output_dir", required=True, help="new (or empty) output directory")
    parser.add_argument("--checkpoint", default=None,
                        help="WeNet checkpoint to import (default: WENET_DIR/final.pt)")


def main(args: argparse.Namespace) -> int:
    from wenet_moe.interop.wenet_import import import_wenet

    report = import_wenet(args.wenet_dir, args.output_dir, args.checkpoint)
    kind = "MoE" if report["moe"] else "dense"
    dropped = ", ".join(report["dropped"]) or "nothing"
    print(f"wenet-moe import-wenet: {report['checkpoint']} -> {args.output_dir} ({kind}, "
          f"{report['parameters']} parameters; training settings not imported: {dropped})",
          file=sys.stderr)
    return 0
