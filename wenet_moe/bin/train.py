"""`wenet-moe train`: train a model from a YAML config and data lists.

Single process (`--device cpu|cuda`) or many processes / nodes under torchrun
(DistributedDataParallel; gloo on CPU, nccl on GPU, from torchrun's env vars).
The resolved config (with `input_dim`, `output_dim`, `seed`) is written to
`model_dir/train.yaml` before training starts.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
from typing import Any, Dict

from wenet_moe.config import ConfigError, load_yaml, save_yaml

# augmentation / order switches turned off for the cross-validation set (WeNet's cv_conf)
CV_OFF = ("speed_perturb", "spec_aug", "spec_sub", "spec_trim", "shuffle", "list_shuffle", "add_noise", "reverb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML")
    parser.add_argument("--data_type", default="raw", choices=["raw", "shard"], help="data list kind")
    parser.add_argument("--train_data", required=True, help="training data.list (raw) or shard list")
    parser.add_argument("--cv_data", required=True, help="cross-validation data.list or shard list")
    parser.add_argument("--model_dir", required=True, help="output directory (checkpoints, train.yaml)")
    parser.add_argument("--checkpoint", default=None,
                        help="resume from a training checkpoint, or initialise from any checkpoint's weights")
    parser.add_argument("--tensorboard_dir", default=None, help="TensorBoard log directory (rank 0)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--prefetch", type=int, default=2, help="batches prefetched per worker")
    parser.add_argument("--pin_memory", action="store_true", help="pin host memory of batches (CUDA)")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="training device")
    parser.add_argument("--dist_backend", default="", help="process group backend (default gloo/nccl)")
    parser.add_argument("--train_engine", default="torch_ddp", choices=["torch_ddp", "fsdp"],
                        help="torch_ddp (replicated model) or fsdp (sharded; see docs/scaling.md)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar even on a terminal")


def num_mel_bins(configs: Dict[str, Any]) -> int:
    """Feature dimension from `dataset_conf.fbank_conf.num_mel_bins` (default 80)."""
    fb = ((configs.get("dataset_conf") or {}).get("fbank_conf") or {})
    value = fb.get("num_mel_bins", 80)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"'dataset_conf.fbank_conf.num_mel_bins' must be a positive integer, got {value!r}")
    return value


def cv_dataset_conf(conf: Dict[str, Any]) -> Dict[str, Any]:
    """The training `dataset_conf` without augmentation, shuffling or dither."""
    cv = copy.deepcopy(conf or {})
    for key in CV_OFF:
        cv[key] = False
    cv["fbank_conf"] = dict(cv.get("fbank_conf") or {})
    cv["fbank_conf"]["dither"] = 0.0
    return cv


def resolve_configs(args: argparse.Namespace) -> Dict[str, Any]:
    """Read and check the YAML; fill seed (from --seed). input/output dims are added later."""
    from wenet_moe.model.builder import TOP_LEVEL_KEYS
    from wenet_moe.train.launch import validate_optim_conf
    from wenet_moe.train.trainer import check_train_conf
    if not os.path.isfile(args.config):
        raise ConfigError(f"{args.config}: config file not found")
    configs = load_yaml(args.config)
    try:
        conf = check_train_conf(configs, TOP_LEVEL_KEYS)
        if args.seed is not None:
            configs["seed"] = args.seed
        else:
            configs["seed"] = conf.seed
        validate_optim_conf(configs)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    for name in ("train_data", "cv_data"):
        path = getattr(args, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{name} {path}: file not found")
    return configs


def main(args: argparse.Namespace) -> int:
    import torch

    from wenet_moe.train.checkpoint import seed_everything
    from wenet_moe.train.dist import cleanup_distributed, init_distributed
    from wenet_moe.train.launch import run_training

    configs = resolve_configs(args)
    info = init_distributed(args.device, args.dist_backend)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {info.rank}] %(levelname)s %(message)s")
    finished = False
    try:
        from wenet_moe.data import Dataset, build_dataloader, build_tokenizer
        from wenet_moe.model import build_model
        seed_everything(int(configs["seed"]))
        tokenizer = build_tokenizer(configs)
        configs["input_dim"] = num_mel_bins(configs)
        configs["output_dim"] = int(tokenizer.vocab_size())
        if info.is_main:
            os.makedirs(args.model_dir, exist_ok=True)
            save_yaml(configs, os.path.join(args.model_dir, "train.yaml"))
        model = build_model(configs)
        dataset_conf = configs.get("dataset_conf") or {}
        train_set = Dataset(args.data_type, args.train_data, tokenizer, dataset_conf, partition=True,
                            seed=int(configs["seed"]))
        cv_set = Dataset(args.data_type, args.cv_data, tokenizer, cv_dataset_conf(dataset_conf),
                         partition=True, seed=int(configs["seed"]))
        pin = bool(args.pin_memory and args.device == "cuda")
        train_loader = build_dataloader(train_set, args.num_workers, args.prefetch, pin_memory=pin)
        cv_loader = build_dataloader(cv_set, args.num_workers, args.prefetch, pin_memory=pin)
        run_training(configs, model, train_loader, cv_loader, args.model_dir, args.device, info,
                     checkpoint=args.checkpoint, tensorboard_dir=args.tensorboard_dir,
                     engine=args.train_engine, show_bar=False if args.no_progress else None)
        finished = True
    finally:
        cleanup_distributed(info, finished)
    return 0
