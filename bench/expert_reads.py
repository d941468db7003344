"""Experts an MoE layer reads per streaming chunk: random features vs speech vs trained routing.

At streaming sizes an MoE layer's cost is the bytes of the experts its chunk routes to
(`docs/moe.md`), so the number of distinct experts per chunk decides the MoE / dense
ratio. This runs the PyTorch encoder chunk by chunk (`forward_chunk_by_chunk`) and,
through a hook on every encoder MoE router, counts the distinct experts each chunk's
frames choose (top-k of the router logits, as the layer routes). Printed per model and
input: mean distinct experts per chunk and layer (of E), the share of all expert bytes
read, and the expert bytes read over those of a dense FFN with the same active compute
(= distinct / k: 1.0 would be dense cost).

    python bench/expert_reads.py --config examples/aishell2/s0/conf/train_u2++_moe.yaml
    python bench/expert_reads.py --config D/train.yaml --checkpoint D/avg_3.pt \\
        --wav_scp data/test/wav.scp --utts 20          # trained routing on speech
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402


def distinct_experts(model: torch.nn.Module, feats: List[np.ndarray], chunk: int
                     ) -> Dict[int, List[int]]:
    """{encoder MoE layer index: distinct experts of each chunk} over `feats`."""
    from wenet_moe.layers.moe import MoEFFN

    layers = [m for m in model.encoder.modules() if isinstance(m, MoEFFN)]
    counts: Dict[int, List[int]] = {i: [] for i in range(len(layers))}
    hooks = []
    for i, layer in enumerate(layers):
        def hook(_mod, _inp, logits, i=i, k=layer.n_expert_activated):
            chosen = torch.topk(logits.reshape(-1, logits.size(-1)), k, dim=-1).indices
            counts[i].append(int(torch.unique(chosen).numel()))
        hooks.append(layer.router.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for x in feats:
                model.encoder.forward_chunk_by_chunk(torch.from_numpy(x)[None], chunk, -1)
    finally:
        for h in hooks:
            h.remove()
    return counts


def wav_features(model_conf: dict, wav_scp: str, utts: int, frames: int = 0) -> List[np.ndarray]:
    """Fbank of the first `utts` wavs (< 0: no limit) of a wav.scp with the model's
    fbank_conf (no dither); with `frames` > 0, no more wavs once they hold that many frames."""
    from wenet_moe.data.features import fbank_options
    from wenet_moe_runtime.features import compute_fbank
    from wenet_moe_runtime.wavio import read_wav
    conf = dict((model_conf.get("dataset_conf") or {}).get("fbank_conf") or {})
    conf["dither"] = 0.0
    opts = fbank_options(conf)
    out = []
    with open(wav_scp, encoding="utf-8") as f:
        for line in f:
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                continue
            samples, rate = read_wav(parts[1].strip())
            if np.issubdtype(samples.dtype, np.integer):
                samples = samples.astype(np.float32) / 32768.0
            out.append(np.asarray(compute_fbank(samples, rate, opts), np.float32))
            if len(out) == utts or 0 < frames <= sum(f.shape[0] for f in out):
                break
    if not out:
        raise SystemExit(f"{wav_scp}: no utterances")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="train.yaml / recipe config of an MoE model")
    p.add_argument("--checkpoint", default=None, help="trained weights (default: random)")
    p.add_argument("--wav_scp", default=None, help="speech input (default: random and "
                   "espeak-ng features, bench/rtf.py's)")
    p.add_argument("--utts", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0, help="length of the random / espeak input")
    p.add_argument("--chunk", type=int, default=16)
    args = p.parse_args()
    print(machine.describe())
    import rtf
    from wenet_moe.config import load_yaml
    conf = load_yaml(args.config)
    if args.checkpoint:
        from wenet_moe.export.common import build_and_load, load_configs
        _, conf = load_configs(args.config)
        model = build_and_load(conf, args.checkpoint)
    else:                       # random weights, as bench/rtf.py builds them
        import tempfile
        conf.setdefault("input_dim", 80)
        conf.setdefault("output_dim", 5000)
        units = os.path.join(tempfile.mkdtemp(prefix="expert_reads_"), "units.txt")
        rtf.write_units(units, int(conf["output_dim"]))
        conf.pop("cmvn", None)
        conf.pop("cmvn_conf", None)
        conf.setdefault("tokenizer_conf", {})["symbol_table_path"] = units
        from wenet_moe.model import build_model
        torch.manual_seed(0)
        model = build_model(conf).eval()
    dim = int(conf.get("input_dim", 80))
    inputs: Dict[str, List[np.ndarray]] = {}
    if args.wav_scp:
        inputs["speech (wav.scp)"] = wav_features(conf, args.wav_scp, args.utts)
    else:
        frames = int(args.seconds * 100)
        inputs["random N(0,1)"] = [np.random.default_rng(0).standard_normal((frames, dim)).astype(np.float32)]
        if dim == 80:
            inputs["espeak fbank, normalised"] = [rtf.speech_fbank(args.seconds)]
    enc = (conf.get("encoder_conf") or {})
    n_expert, k = int(enc.get("n_expert", 0)), int(enc.get("n_expert_activated", 0))
    if n_expert < 2:
        raise SystemExit(f"{args.config}: the encoder has no MoE layers")
    weights = "trained " + args.checkpoint if args.checkpoint else "random weights"
    print(f"\n{args.config} ({weights}): {n_expert} experts, top-{k}, chunk {args.chunk}")
    print(f"{'input':<28}{'chunks':>8}{'experts/chunk':>15}{'of all':>8}{'bytes / dense':>15}"
          f"{'min layer':>11}{'max layer':>11}")
    for name, feats in inputs.items():
        counts = distinct_experts(model, feats, args.chunk)
        per_layer = [float(np.mean(c)) for c in counts.values() if c]
        mean = float(np.mean(per_layer))
        print(f"{name:<28}{len(next(iter(counts.values()))):>8}{mean:>15.2f}{mean / n_expert:>8.2f}"
              f"{mean / k:>15.2f}{min(per_layer):>11.2f}{max(per_layer):>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
