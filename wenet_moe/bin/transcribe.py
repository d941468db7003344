"""`wenet-moe transcribe --model_dir DIR WAV...`: print `key<TAB>text` per file.

DIR is a training `model_dir` (train.yaml + checkpoints). The checkpoint is
`--checkpoint` if given, else the newest `avg_*.pt`, else `final.pt`, else the
last epoch `N.pt`. The key is the file name without its extension. Paths in
train.yaml that do not exist from the current directory (units.txt, CMVN) are
looked up by file name inside DIR; the CMVN statistics are stored in the
checkpoint as well, so a missing CMVN file is not an error.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Dict, Optional

import torch

MODES = ("ctc_greedy_search", "ctc_prefix_beam_search", "attention", "attention_rescoring")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_dir", required=True, help="training directory with train.yaml")
    parser.add_argument("wavs", nargs="+", metavar="WAV", help="audio files")
    parser.add_argument("--checkpoint", default="", help="checkpoint (default: avg_*.pt, final.pt, N.pt)")
    parser.add_argument("--mode", default="attention_rescoring", choices=MODES, help="decoding method")
    parser.add_argument("--beam_size", type=int, default=10, help="beam size")
    parser.add_argument("--decoding_chunk_size", type=int, default=-1, help="-1 full context, > 0 chunk")
    parser.add_argument("--num_decoding_left_chunks", type=int, default=-1, help="left chunks (-1: all)")
    parser.add_argument("--ctc_weight", type=float, default=0.3, help="CTC weight in rescoring")
    parser.add_argument("--reverse_weight", type=float, default=0.5, help="right-to-left decoder weight")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    from wenet_moe.layers.cpu_kernel import PRECISIONS
    parser.add_argument("--expert_precision", default=None, choices=list(PRECISIONS),
                        help="moe_conf.expert_precision for this decode (CPU; default: the config's)")


def pick_checkpoint(model_dir: str) -> str:
    """Newest avg_*.pt, else final.pt, else the highest-numbered N.pt."""
    avgs = sorted(glob.glob(os.path.join(model_dir, "avg_*.pt")), key=os.path.getmtime)
    if avgs:
        return avgs[-1]
    final = os.path.join(model_dir, "final.pt")
    if os.path.isfile(final):
        return final
    epochs = [p for p in glob.glob(os.path.join(model_dir, "*.pt")) if re.fullmatch(r"\d+\.pt", os.path.basename(p))]
    if epochs:
        return max(epochs, key=lambda p: int(os.path.basename(p)[:-3]))
    raise FileNotFoundError(f"{model_dir}: no avg_*.pt, final.pt or N.pt checkpoint")


def load_model_dir(model_dir: str, checkpoint: str = "", device: str = "cpu",
                   expert_precision: Optional[str] = None):
    """(model, tokenizer, configs, checkpoint path) of a training directory;
    `expert_precision` overrides moe_conf.expert_precision (None: the config's)."""
    from wenet_moe.data import build_tokenizer
    from wenet_moe.model.loading import build_and_load, load_configs, with_expert_precision

    cfg_path = os.path.join(model_dir, "train.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{model_dir}: no train.yaml (not a training directory)")
    _, configs = load_configs(cfg_path)
    configs = with_expert_precision(configs, expert_precision)
    ckpt = checkpoint or pick_checkpoint(model_dir)
    model = build_and_load(configs, ckpt)
    return model.to(torch.device(device)), build_tokenizer(configs), configs, ckpt


def features(path: str, configs: Dict) -> torch.Tensor:
    """(T, bins) float32 fbank of one file, as the model was trained (dither 0)."""
    from wenet_moe.data.audio import load_audio, resample
    from wenet_moe.model.loading import eval_fbank_options
    from wenet_moe_runtime.features import compute_fbank

    opts = eval_fbank_options(configs)
    samples, sr = load_audio(path)
    return torch.from_numpy(compute_fbank(resample(samples, sr, opts.sample_rate), opts.sample_rate, opts))


def main(args: argparse.Namespace) -> int:
    model, tokenizer, configs, ckpt = load_model_dir(args.model_dir, args.checkpoint, args.device,
                                                     args.expert_precision)
    print(f"wenet-moe transcribe: {ckpt}, mode {args.mode}", file=sys.stderr)
    failed = 0
    for path in args.wavs:
        key = os.path.splitext(os.path.basename(path))[0]
        try:
            feats = features(path, configs)
        except ValueError as e:  # AudioError is a ValueError
            print(f"wenet-moe transcribe: error: {e}", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            x = feats.unsqueeze(0).to(args.device)
            lens = torch.tensor([feats.size(0)], device=args.device)
            hyp = model.decode([args.mode], x, lens, beam_size=args.beam_size,
                               decoding_chunk_size=args.decoding_chunk_size,
                               num_decoding_left_chunks=args.num_decoding_left_chunks,
                               ctc_weight=args.ctc_weight, reverse_weight=args.reverse_weight)[args.mode][0]
        print(f"{key}\t{tokenizer.detokenize(list(hyp))}", flush=True)
    return 1 if failed else 0
