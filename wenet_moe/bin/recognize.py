"""`wenet-moe recognize`: decode a data list with a checkpoint.

Writes `result_dir/<mode>/text` (`key text` lines, in data-list order; each
file written to a temporary name and renamed) for every mode in `--modes`.
The model is built from `--config` (the resolved `model_dir/train.yaml`), the
features from its `dataset_conf` in evaluation form (no augmentation, dither 0,
static batches, no length filter so that every utterance is scored).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
from typing import Dict, List

import torch

MODES = ("ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring",
         "ctc_wfst", "ctc_wfst_rescoring")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="resolved config (model_dir/train.yaml)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (N.pt, avg_N.pt, final.pt)")
    parser.add_argument("--data_type", default="raw", choices=["raw", "shard"], help="test list type")
    parser.add_argument("--test_data", required=True, help="data.list or shards list")
    parser.add_argument("--result_dir", required=True, help="writes result_dir/<mode>/text")
    parser.add_argument("--modes", nargs="+", default=["attention_rescoring"], choices=MODES,
                        help="decoding methods")
    parser.add_argument("--beam_size", type=int, default=10, help="beam of prefix and attention search")
    parser.add_argument("--batch_size", type=int, default=16, help="utterances per batch")
    parser.add_argument("--decoding_chunk_size", type=int, default=-1,
                        help="-1: full context; > 0: chunk size in encoder frames")
    parser.add_argument("--num_decoding_left_chunks", type=int, default=-1, help="left chunks (-1: all)")
    parser.add_argument("--ctc_weight", type=float, default=0.3, help="CTC weight in attention rescoring")
    parser.add_argument("--reverse_weight", type=float, default=0.5, help="right-to-left decoder weight")
    parser.add_argument("--simulate_streaming", action="store_true",
                        help="encode chunk by chunk with caches (batch 1 per utterance)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--gpu", type=int, default=-1, help="WeNet's flag: GPU id (-1: use --device)")
    parser.add_argument("--num_workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    from wenet_moe.layers.cpu_kernel import PRECISIONS
    parser.add_argument("--expert_precision", default=None, choices=list(PRECISIONS),
                        help="moe_conf.expert_precision for this decode (CPU; default: the config's)")
    from wenet_moe_runtime.context import add_context_arguments
    from wenet_moe_runtime.wfst import add_wfst_arguments
    add_context_arguments(parser)  # hotwords: --context_path, --context_score, bounds
    parser.add_argument("--graph_dir", default=None,
                        help="TLG.fst + words.txt (tools/make_tlg.py) for ctc_wfst modes")
    add_wfst_arguments(parser)


def test_configs(configs: Dict, batch_size: int) -> Dict:
    """`configs` with the evaluation dataset_conf and every length filter opened."""
    from wenet_moe.data.conf import eval_dataset_conf

    configs = copy.deepcopy(configs)
    ds = eval_dataset_conf(configs.get("dataset_conf"), batch_size=batch_size)
    fc = dict(ds.get("filter_conf") or {})
    fc.update({"max_length": 1 << 30, "min_length": 0, "token_max_length": 1 << 30, "token_min_length": 0,
               "min_output_input_ratio": 0.0, "max_output_input_ratio": float(1 << 30)})
    ds["filter_conf"] = fc
    configs["dataset_conf"] = ds
    return configs


def load_model(configs: Dict, checkpoint: str, device: torch.device):
    from wenet_moe.model import build_model
    from wenet_moe.checkpoint_io import load_model_weights

    model = build_model(configs)
    load_model_weights(model, checkpoint)
    return model.to(device).eval()


def write_text(path: str, lines: List[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".text.", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(args: argparse.Namespace) -> int:
    from wenet_moe.config import ConfigError, load_yaml
    from wenet_moe.data import Dataset, build_dataloader, build_tokenizer
    from wenet_moe_runtime.context import context_from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.beam_size < 1:
        raise ValueError("--batch_size and --beam_size must be >= 1")
    if args.decoding_chunk_size == 0:
        raise ValueError("--decoding_chunk_size 0 is not a decoding setting (use -1 or > 0)")
    if not os.path.isfile(args.test_data):
        raise FileNotFoundError(f"--test_data {args.test_data}: no such file")
    device = torch.device(f"cuda:{args.gpu}" if args.gpu >= 0 else args.device)
    from wenet_moe.model.loading import with_expert_precision
    configs = test_configs(load_yaml(args.config), 1 if args.simulate_streaming else args.batch_size)
    configs = with_expert_precision(configs, args.expert_precision)
    if "input_dim" not in configs or "output_dim" not in configs:
        raise ConfigError(f"{args.config}: no input_dim/output_dim; pass the train.yaml written by train")
    tokenizer = build_tokenizer(configs)
    context = context_from_args(args, tokenizer.symbol_table)
    biased = {"ctc_prefix_beam_search", "attention_rescoring", "ctc_wfst", "ctc_wfst_rescoring"}
    if context is not None and not set(args.modes) & biased:
        raise ValueError(f"--context_path biases {', '.join(sorted(biased))}; "
                         f"--modes {' '.join(args.modes)} has none of them")
    wfst = None
    if {"ctc_wfst", "ctc_wfst_rescoring"} & set(args.modes):
        from wenet_moe_runtime.wfst import wfst_from_args
        if not args.graph_dir:
            raise ValueError("--modes ctc_wfst/ctc_wfst_rescoring need --graph_dir (TLG.fst, words.txt)")
        wfst = wfst_from_args(args, args.graph_dir, tokenizer.symbol_table)
    model = load_model(configs, args.checkpoint, device)
    dataset = Dataset(args.data_type, args.test_data, tokenizer, configs["dataset_conf"], partition=False)
    loader = build_dataloader(dataset, num_workers=args.num_workers, prefetch=2)
    results: Dict[str, List[str]] = {m: [] for m in args.modes}
    n_utts, n_frames, t0 = 0, 0, time.time()
    skipped: Dict[str, int] = {}
    with torch.no_grad():
        for batch in loader:
            for k, v in (batch.get("skipped") or {}).items():
                skipped[k] = skipped.get(k, 0) + int(v)
            feats = batch["feats"].to(device)
            lens = batch["feats_lengths"].to(device)
            if feats.size(0) == 0:
                continue
            hyps = model.decode(list(args.modes), feats, lens, beam_size=args.beam_size,
                                decoding_chunk_size=args.decoding_chunk_size,
                                num_decoding_left_chunks=args.num_decoding_left_chunks,
                                ctc_weight=args.ctc_weight, reverse_weight=args.reverse_weight,
                                simulate_streaming=args.simulate_streaming, context=context,
                                wfst=wfst)
            for mode in args.modes:
                for key, ids in zip(batch["keys"], hyps[mode]):
                    results[mode].append(f"{key} {tokenizer.detokenize(list(ids))}\n")
            n_utts += len(batch["keys"])
            n_frames += int(lens.sum())
    if n_utts == 0:
        raise ValueError(f"{args.test_data}: no utterance could be decoded (skipped: {skipped})")
    for mode in args.modes:
        write_text(os.path.join(args.result_dir, mode, "text"), results[mode])
    elapsed = time.time() - t0
    logging.info("decoded %d utterances (%.1f s of audio) in %.1f s, modes %s%s", n_utts, n_frames / 100.0,
                 elapsed, " ".join(args.modes), f"; skipped {skipped}" if any(skipped.values()) else "")
    return 0
