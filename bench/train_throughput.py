"""Training step throughput, MoE / Dense-S: forward + backward + optimizer on the same batches.

Both models come from the recipe configs (`--dense` / `--moe`, default Dense-S
train_u2++_conformer.yaml and MoE train_u2++_moe.yaml: the same active FFN compute per
frame), with `--blocks` encoder blocks and `--decoder-blocks` decoder blocks per
direction (smaller than the paper's 12/3 so a CPU run takes minutes; 0 keeps the
config's). Dropout, SpecAugment and the MoE auxiliary losses are as in training
(`model.train()`, the config's `moe_conf`); the optimizer is the trainer's Adam (lr 1e-3, fused) with the
config's grad clipping. Batches: `--batch` utterances of random fbank of 2..`--seconds`
seconds and random token sequences, the same list for both models. Every repetition
runs one step of each model, in alternating order; the medians give steps per second
and the ratio MoE / Dense-S (>= 0.97 is the target of issue 14).

`--dtype bf16` runs forward and loss under bf16 autocast (the trainer's `dtype: bf16`);
`--accelerator-dispatch` picks the MoE dispatch off the CPU (loop / grouped / dense;
auto: grouped GEMM for bf16 on CUDA 9.0+, else loop).

    python bench/train_throughput.py [--threads 2] [--steps 10] [--device cpu|cuda] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402
from wenet_moe.layers import moe as moe_module  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(ROOT, "examples", "aishell2", "s0", "conf")


def prepared(path: str, vocab: int, blocks: int, decoder_blocks: int, units: str) -> dict:
    from wenet_moe.config import load_yaml
    conf = load_yaml(path)
    conf.update({"input_dim": 80, "output_dim": vocab})
    conf.pop("cmvn", None)
    conf.pop("cmvn_conf", None)
    conf["tokenizer_conf"]["symbol_table_path"] = units
    if blocks > 0:
        conf["encoder_conf"]["num_blocks"] = blocks
    if decoder_blocks > 0:
        conf["decoder_conf"]["num_blocks"] = decoder_blocks
        if "r_num_blocks" in conf["decoder_conf"]:
            conf["decoder_conf"]["r_num_blocks"] = decoder_blocks
    return conf


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", default=os.path.join(CONF_DIR, "train_u2++_conformer.yaml"))
    p.add_argument("--moe", default=os.path.join(CONF_DIR, "train_u2++_moe.yaml"))
    p.add_argument("--blocks", type=int, default=4, help="encoder blocks (0: the config's)")
    p.add_argument("--decoder-blocks", type=int, default=1, help="decoder blocks per direction (0: config's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0, help="longest utterance of a batch")
    p.add_argument("--tokens", type=int, default=20, help="longest transcript of a batch")
    p.add_argument("--vocab", type=int, default=500)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: keep)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype of forward + loss")
    p.add_argument("--accelerator-dispatch", default="auto", choices=list(moe_module.ACCELERATOR_PATHS),
                   help="MoE dispatch off the CPU (wenet_moe.layers.moe.ACCELERATOR_DISPATCH)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    moe_module.ACCELERATOR_DISPATCH = args.accelerator_dispatch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from wenet_moe.model import build_model
    from wenet_moe.train.optim import build_optimizer
    import tempfile
    units = os.path.join(tempfile.mkdtemp(prefix="wm_train_bench_"), "units.txt")
    with open(units, "w", encoding="utf-8") as f:
        f.writelines(f"{chr(0x4E00 + i)} {i}\n" for i in range(args.vocab))
    print(machine.describe())
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, device {args.device} ({where}), dtype {args.dtype}, "
          f"MoE dispatch off the CPU {args.accelerator_dispatch}")

    gen = torch.Generator().manual_seed(0)
    batches = []
    frames = int(args.seconds * 100)
    for _ in range(args.steps + 2):
        lens = torch.randint(frames // 2, frames + 1, (args.batch,), generator=gen)
        lens[0] = frames
        speech = torch.randn(args.batch, frames, 80, generator=gen)
        text_lens = torch.randint(args.tokens // 2, args.tokens + 1, (args.batch,), generator=gen)
        text = torch.randint(3, args.vocab, (args.batch, args.tokens), generator=gen)
        text[torch.arange(args.tokens)[None, :] >= text_lens[:, None]] = -1
        batches.append(tuple(t.to(device) for t in (speech, lens, text, text_lens)))

    runs = {}
    for name, path in (("dense_s", args.dense), ("moe", args.moe)):
        conf = prepared(path, args.vocab, args.blocks, args.decoder_blocks, units)
        torch.manual_seed(0)
        model = build_model(copy.deepcopy(conf)).to(device).train()
        optim = build_optimizer(model, "adam", {"lr": 1e-3})     # the trainer's (fused) Adam
        clip = float(conf.get("grad_clip", 5.0))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"  {name:<8} {path}: {params:.1f} M parameters")
        runs[name] = (model, optim, clip)

    def step(name: str, batch) -> None:
        model, optim, clip = runs[name]
        optim.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(*batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optim.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in runs}
    for i, batch in enumerate(batches):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            step(name, batch)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, t in med.items():
        print(f"  {name:<8} {t * 1e3:8.1f} ms/step (median of {len(times[name])}), "
              f"{args.batch / t:6.2f} utterances/s")
    ratio = med["dense_s"] / med["moe"]
    print(f"SUMMARY training throughput MoE / Dense-S = {ratio:.3f} (target >= 0.97); "
          f"batch {args.batch} x <= {args.seconds:g} s, {args.blocks or 'config'} encoder blocks, "
          f"{args.device} {args.dtype}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} at end (other processes share this machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
