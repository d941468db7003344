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
import copy
import glob
import json
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional

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


def _resolve(path: Optional[str], model_dir: str) -> Optional[str]:
    if not path or os.path.exists(path):
        return path
    inside = os.path.join(model_dir, os.path.basename(path))
    return inside if os.path.exists(inside) else None


def load_model_dir(model_dir: str, checkpoint: str = "", device: str = "cpu"):
    """(model, tokenizer, configs, checkpoint path) of a training directory."""
    from wenet_moe.config import ConfigError, load_yaml
    from wenet_moe.data import build_tokenizer
    from wenet_moe.model import build_model
    from wenet_moe.train.checkpoint import load_model_weights

    cfg_path = os.path.join(model_dir, "train.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{model_dir}: no train.yaml (not a training directory)")
    configs = copy.deepcopy(load_yaml(cfg_path))
    tok = dict(configs.get("tokenizer_conf") or {})
    units = _resolve(tok.get("symbol_table_path"), model_dir) or _resolve("units.txt", model_dir)
    if units is None:
        raise ConfigError(f"{cfg_path}: tokenizer_conf.symbol_table_path {tok.get('symbol_table_path')!r} "
                          f"not found (nor units.txt in {model_dir})")
    tok["symbol_table_path"] = units
    configs["tokenizer_conf"] = tok
    tmp_cmvn = None
    cmvn = dict(configs.get("cmvn_conf") or {})
    if cmvn.get("cmvn_file") and _resolve(cmvn["cmvn_file"], model_dir) is None:
        # placeholder statistics; the real ones are buffers in the checkpoint
        fd, tmp_cmvn = tempfile.mkstemp(suffix=".json")
        dim = int(configs["input_dim"])
        with os.fdopen(fd, "w") as f:
            json.dump({"mean_stat": [0.0] * dim, "var_stat": [1.0] * dim, "frame_num": 1}, f)
        cmvn.update({"cmvn_file": tmp_cmvn, "is_json_cmvn": True})
    elif cmvn.get("cmvn_file"):
        cmvn["cmvn_file"] = _resolve(cmvn["cmvn_file"], model_dir)
    configs["cmvn_conf"] = cmvn
    try:
        model = build_model(configs)
    finally:
        if tmp_cmvn:
            os.unlink(tmp_cmvn)
    ckpt = checkpoint or pick_checkpoint(model_dir)
    load_model_weights(model, ckpt)
    return model.to(torch.device(device)).eval(), build_tokenizer(configs), configs, ckpt


def features(path: str, configs: Dict) -> torch.Tensor:
    """(T, bins) float32 fbank of one file, as the model was trained (dither 0)."""
    from wenet_moe.data.audio import load_audio, resample
    from wenet_moe.data.features import fbank_options
    from wenet_moe_runtime.features import compute_fbank

    ds = configs.get("dataset_conf") or {}
    rate = int((ds.get("resample_conf") or {}).get("resample_rate", 16000))
    opts = fbank_options(ds.get("fbank_conf"), sample_rate=rate)
    opts.dither = 0.0
    samples, sr = load_audio(path)
    return torch.from_numpy(compute_fbank(resample(samples, sr, rate), rate, opts))


def main(args: argparse.Namespace) -> int:
    model, tokenizer, configs, ckpt = load_model_dir(args.model_dir, args.checkpoint, args.device)
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
