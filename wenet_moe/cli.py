"""The `wenet-moe` command: one sub-command per module in `wenet_moe.bin`.

Each module `wenet_moe.bin.<name>` defines `add_arguments(parser)` and
`main(args) -> int`; modules are imported only when their command runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "train": "train a model from a YAML config and data lists",
    "recognize": "decode a data list with a checkpoint, writing result_dir/<mode>/text",
    "average": "average checkpoints (last N, or best N by cv loss)",
    "export": "export a checkpoint to ONNX or TorchScript",
    "transcribe": "transcribe wav files with a trained model directory",
    "moe-heatmap": "plot per-layer expert load of a checkpoint over a data list (PNG)",
    "import-wenet": "import a WeNet model directory (dense or WeNet-MoE) as a model directory",
    "upcycle": "turn a dense checkpoint into an MoE one (every expert a copy of the FFN)",
    "export-wenet": "write a dense model as a WeNet model directory (WeNet's keys and config)",
}


def _module(name: str):
    return importlib.import_module("wenet_moe.bin." + name.replace("-", "_"))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="wenet-moe", description="U2++ MoE speech recognition toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"wenet-moe: error: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    mod = _module(name)
    cmd_parser = argparse.ArgumentParser(prog=f"wenet-moe {name}", description=COMMANDS[name])
    mod.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        rc = mod.main(args)
    except KeyboardInterrupt:
        print(f"wenet-moe {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one-line reason, non-zero exit
        if getattr(args, "debug", False) or __import__("os").environ.get("WENET_MOE_DEBUG"):
            raise
        print(f"wenet-moe {name}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
