"""`wenet-moe moe-heatmap`: per-layer expert load of a checkpoint over a data list, as a PNG.

Runs the encoder (full context by default, or `--decoding_chunk_size`) and both
attention decoders (teacher-forced on the reference text) over every utterance,
accumulates `wenet_moe.layers.moe.expert_load` per MoE layer with padding excluded,
and writes a heat map: one row per layer (encoder first, in depth order), one column
per expert, colour = share of that layer's (frame, expert) assignments. The PNG is
written to a temporary name and renamed; a one-line summary per layer (entropy in nats,
max share) goes to stdout.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Dict, List

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="resolved config (model_dir/train.yaml)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (N.pt, avg_N.pt, final.pt)")
    parser.add_argument("--data_type", default="raw", choices=["raw", "shard"], help="list type")
    parser.add_argument("--test_data", required=True, help="data.list or shards list")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--batch_size", type=int, default=16, help="utterances per batch")
    parser.add_argument("--decoding_chunk_size", type=int, default=-1,
                        help="-1: full context; > 0: chunk size in encoder frames")
    parser.add_argument("--num_decoding_left_chunks", type=int, default=-1, help="left chunks (-1: all)")
    parser.add_argument("--no_decoder", action="store_true", help="encoder layers only")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def accumulate_loads(model, batches, decoding_chunk_size: int = -1,
                     num_decoding_left_chunks: int = -1, decoder: bool = True
                     ) -> Dict[str, torch.Tensor]:
    """Sum of `expert_load` over batches: {layer: int64 (n_expert,)}, padding excluded.

    `batches` yields dicts with feats (B,T,F), feats_lengths, target (B,L), target_lengths.
    """
    from wenet_moe.layers.moe import expert_load

    device = next(model.parameters()).device
    totals: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in batches:
            feats = batch["feats"].to(device)
            feats_lengths = batch["feats_lengths"].to(device)
            out, mask = model.encoder(feats, feats_lengths, decoding_chunk_size,
                                      num_decoding_left_chunks)
            enc_lens = mask.squeeze(1).sum(1)
            text_lengths = None
            if decoder:
                text = batch["target"].to(device)
                text_lengths = batch["target_lengths"].to(device)
                ys_in, _, r_ys_in, _ = model.attention_targets(text, text_lengths)
                model.decoder(out, mask, ys_in, text_lengths + 1, r_ys_in, 1.0)
            loads = expert_load(model, enc_lens, text_lengths)
            for name, counts in loads.items():
                if not decoder and "decoder" in name:
                    continue
                totals[name] = totals[name] + counts if name in totals else counts.clone()
    return totals


def short_name(name: str) -> str:
    """encoder.encoders.3.feed_forward_macaron -> enc 3 ffn_macaron (for axis labels)."""
    parts = name.split(".")
    head = "enc" if parts[0] == "encoder" else "dec"
    if "right_decoder" in parts:
        head = "r-dec"
    elif "left_decoder" in parts:
        head = "l-dec"
    index = next((p for p in parts if p.isdigit()), "")
    tail = parts[-1].replace("feed_forward", "ffn")
    return f"{head} {index} {tail}".replace("  ", " ")


def plot_heatmap(loads: Dict[str, torch.Tensor], output: str, title: str = "") -> None:
    """Write the layer x expert share-of-assignments heat map to `output` (atomic)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not loads:
        raise ValueError("no MoE layer routed any frame (is this a dense model?)")
    names: List[str] = list(loads)
    counts = torch.stack([loads[n].double() for n in names])
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n_layers, n_expert = shares.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * n_expert, 1.2 + 0.28 * n_layers))
    image = ax.imshow(shares.numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                      vmax=max(float(shares.max()), 1e-9))
    ax.set_xticks(range(n_expert))
    ax.set_xlabel("expert")
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([short_name(n) for n in names], fontsize=7)
    ax.set_title(title or "share of frames routed to each expert", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".heatmap.", suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from wenet_moe.bin.recognize import load_model, test_configs
    from wenet_moe.config import load_yaml
    from wenet_moe.data import Dataset, build_tokenizer
    from wenet_moe.layers.moe import expert_load_entropy

    for flag, path in (("--config", args.config), ("--checkpoint", args.checkpoint),
                       ("--test_data", args.test_data)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    configs = test_configs(load_yaml(args.config), args.batch_size)
    tokenizer = build_tokenizer(configs)
    configs.setdefault("output_dim", tokenizer.vocab_size())
    configs.setdefault("input_dim", int(configs["dataset_conf"].get("fbank_conf", {})
                                        .get("num_mel_bins", 80)))
    model = load_model(configs, args.checkpoint, torch.device(args.device))
    dataset = Dataset(args.data_type, args.test_data, tokenizer, configs["dataset_conf"],
                      partition=False)
    loads = accumulate_loads(model, dataset, args.decoding_chunk_size,
                             args.num_decoding_left_chunks, decoder=not args.no_decoder)
    title = f"{os.path.basename(args.checkpoint)}: share of frames per expert"
    plot_heatmap(loads, args.output, title)
    entropy = expert_load_entropy(loads)
    for name, counts in loads.items():
        share = counts.max().item() / max(counts.sum().item(), 1)
        print(f"{name}\tentropy {entropy[name]:.3f}\tmax_share {share:.3f}")
    print(f"wrote {args.output} ({len(loads)} MoE layers)")
    return 0
