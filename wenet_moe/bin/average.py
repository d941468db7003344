"""`wenet-moe average`: average epoch checkpoints (last N, or best N by cv loss)."""
from __future__ import annotations

import argparse
import logging

from wenet_moe.train.average import average_checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dst_model", required=True, help="output file (plain model state dict)")
    parser.add_argument("--src_path", required=True, help="model_dir holding N.pt and N.yaml")
    parser.add_argument("--num", type=int, default=5, help="number of checkpoints to average")
    parser.add_argument("--val_best", action="store_true",
                        help="average the N with the lowest cv_loss in N.yaml instead of the last N")
    parser.add_argument("--min_epoch", type=int, default=0, help="first epoch considered")
    parser.add_argument("--max_epoch", type=int, default=1 << 30, help="last epoch considered")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    paths = average_checkpoints(args.dst_model, args.src_path, args.num, args.val_best,
                                args.min_epoch, args.max_epoch)
    logging.info("averaged %d checkpoints into %s: %s", len(paths), args.dst_model, " ".join(paths))
    return 0
