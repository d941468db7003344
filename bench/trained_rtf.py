"""Trained routing: a trained MoE checkpoint against its dense twin, on speech.

A streaming MoE costs the bytes of the experts its chunks route to, so the routing a
model learned decides its cost as much as its shape. `bench/rtf.py` times random-weight
models of the recipe configs; this times a trained checkpoint (train.yaml beside it)
on its own test speech against
  dense_s     the checkpoint's config with dense FFNs of n_expert_activated x the
              expert hidden units (the same active compute), random weights,
  moe_random  the checkpoint's config with random weights (routing by chance),
all three with the checkpoint's CMVN and fbank options, one utterance of the first
wavs of `--wav_scp` joined to `--seconds`. Cases (encoder only: random weights decode
nothing comparable): PyTorch offline / chunk 16 with caches, and the ONNX export
through the runtime, fp32 as served (MoE FFNs in the C kernel, `encoder.kernel/`,
where it builds) and fp32-ort (every graph in ONNX Runtime), chunk 16 / offline.
Also printed: the distinct experts per chunk and layer of both MoEs
(`bench/expert_reads.py`), and one SUMMARY line of ratios to dense_s.

    python bench/trained_rtf.py --checkpoint exp/moe/avg_3.pt --wav_scp data/test/wav.scp
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import expert_reads  # noqa: E402
import machine  # noqa: E402
import rtf  # noqa: E402


def dense_twin(conf: dict) -> dict:
    """`conf` with every MoE FFN stack dense: FFN of n_expert_activated x linear_units."""
    twin = copy.deepcopy(conf)
    for key in ("encoder_conf", "decoder_conf"):
        sub = twin.get(key) or {}
        if sub.get("mlp_type") != "moe":
            continue
        sub["linear_units"] = int(sub["n_expert_activated"]) * int(sub["linear_units"])
        for moe_key in ("mlp_type", "n_expert", "n_expert_activated"):
            sub.pop(moe_key, None)
    twin.pop("moe_conf", None)
    return twin


def utterance(conf: dict, wav_scp: str, seconds: float) -> np.ndarray:
    """(frames, bins) fbank of the first wavs of `wav_scp` (the model's fbank options,
    no dither), joined and cut to `seconds` (100 frames per second)."""
    frames = int(seconds * 100)
    feats = expert_reads.wav_features(conf, wav_scp, utts=-1, frames=frames)
    joined = np.concatenate(feats, axis=0)[:frames]
    if joined.shape[0] < frames:
        print(f"{wav_scp}: only {joined.shape[0] / 100:.1f} s of speech; timing that")
    return np.ascontiguousarray(joined, np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="trained MoE checkpoint (train.yaml beside it)")
    p.add_argument("--wav_scp", required=True, help="speech to time (its first wavs, joined)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precisions", nargs="*", default=["fp32", "fp32-ort"], choices=["fp32", "fp32-ort"],
                   help="runtime cases (none: PyTorch only)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "wenet_moe_trained_rtf"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine.describe())
    print(f"torch {torch.__version__}, {sys.argv[0]} {' '.join(sys.argv[1:])}")
    from wenet_moe.model.loading import build_and_load, load_configs
    _, conf = load_configs(os.path.join(os.path.dirname(args.checkpoint), "train.yaml"))
    enc = conf.get("encoder_conf") or {}
    if enc.get("mlp_type") != "moe":
        raise SystemExit(f"{args.checkpoint}: the encoder has no MoE layers")
    feats = utterance(conf, args.wav_scp, args.seconds)
    seconds = feats.shape[0] / 100.0
    x = torch.from_numpy(feats)[None]

    models: "OrderedDict[str, torch.nn.Module]" = OrderedDict()
    confs = {"dense_s": dense_twin(conf), "moe": conf, "moe_random": conf}
    models["dense_s"] = rtf.build_random(confs["dense_s"], x)
    models["moe"] = build_and_load(conf, args.checkpoint).eval()
    models["moe_random"] = rtf.build_random(conf, x)
    for name, model in models.items():
        print(f"  {name:<12}{rtf.params_m(model):7.1f} M parameters")

    n_expert, k = int(enc["n_expert"]), int(enc["n_expert_activated"])
    reads = {}
    for name in ("moe", "moe_random"):
        counts = expert_reads.distinct_experts(models[name], [feats], rtf.CHUNK)
        reads[name] = float(np.mean([np.mean(c) for c in counts.values() if c]))
        print(f"  {name}: {reads[name]:.2f} of {n_expert} experts per chunk and layer "
              f"(top-{k}; expert bytes / dense FFN bytes {reads[name] / k:.2f})")

    results: Dict[str, Dict[str, float]] = {n: {} for n in models}
    with torch.inference_mode():
        for case in ("torch offline", "torch chunk16"):
            t = rtf.interleaved({n: rtf.torch_cases(m, x)[case] for n, m in models.items()}, args.reps)
            for n in models:
                results[n][case] = t[n]
    if args.precisions:
        from wenet_moe_runtime.model import OnnxAsrModel
        os.makedirs(args.work_dir, exist_ok=True)
        exports = {}
        for name, model in models.items():
            exports[name] = os.path.join(args.work_dir, name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rtf.export_model(model, confs[name], exports[name], int8=False)
        for prec in args.precisions:
            rts = {n: OnnxAsrModel(d, num_threads=args.threads, kernel_experts=prec != "fp32-ort")
                   for n, d in exports.items()}
            if prec == "fp32":
                print(f"  runtime fp32: MoE FFNs in the C kernel {rts['moe'].kernel_experts}")
            for case in [c for c in rtf.runtime_cases(rts["moe"], feats, prec) if " dec " not in c]:
                t = rtf.interleaved({n: rtf.runtime_cases(rt, feats, prec)[case] for n, rt in rts.items()},
                                    args.reps)
                for n in rts:
                    results[n][case] = t[n]
    rtf.print_table(f"{args.threads} thread(s), {os.path.basename(args.wav_scp)} speech, batch 1",
                    results, list(models), seconds)
    cells = [f"experts per chunk trained {reads['moe']:.2f} / random {reads['moe_random']:.2f} of {n_expert}"]
    for case in results["moe"]:
        cells.append(f"{case} {results['moe'][case] / results['dense_s'][case]:.2f} "
                     f"(random {results['moe_random'][case] / results['dense_s'][case]:.2f})")
    print("SUMMARY trained MoE / dense twin: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
