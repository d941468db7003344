"""CTC health on the CV set: blank rate and greedy token error rate.

A U2/U2++ model first learns to emit blank on every frame (the "all-blank plateau":
the CTC loss drops fast while recognising nothing); `ctc_blank_rate` near 1 and
`ctc_greedy_ter` near 1 after warmup mean the run has not left it (docs/training.md).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def edit_distance(ref: Sequence[int], hyp: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def greedy_collapse(frame_ids: Sequence[int], blank_id: int) -> List[int]:
    """CTC greedy rule: merge repeats, drop blanks."""
    out, last = [], -1
    for t in frame_ids:
        if t != last and t != blank_id:
            out.append(int(t))
        last = t
    return out


def supports_ctc_stats(model: torch.nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("encode", "ctc_activation", "blank_id"))


@torch.no_grad()
def ctc_greedy_stats(model: torch.nn.Module, feats: torch.Tensor, feats_lengths: torch.Tensor,
                     target: torch.Tensor, target_lengths: torch.Tensor) -> Tuple[float, float, float, float]:
    """(blank frames, encoder frames, token errors, reference tokens) of one batch.

    feats (B, T, F), target (B, L) padded with -1; full-context encoder.
    """
    out, mask = model.encode(feats, feats_lengths)
    logp = model.ctc_activation(out)                 # (B, T', V)
    best = logp.argmax(-1)
    lens = mask.squeeze(1).sum(-1)
    blank_id = int(model.blank_id)
    blanks = frames = errors = refs = 0
    for b in range(best.size(0)):
        ids = best[b, : int(lens[b])].tolist()
        blanks += sum(1 for t in ids if t == blank_id)
        frames += len(ids)
        ref = target[b, : int(target_lengths[b])].tolist()
        errors += edit_distance(ref, greedy_collapse(ids, blank_id))
        refs += len(ref)
    return float(blanks), float(frames), float(errors), float(refs)


def report(model_dir: str, data_list: str, data_type: str = "raw", checkpoints: str = "") -> List[Tuple]:
    """(epoch, cv_loss_ctc, blank rate, greedy TER) for each epoch checkpoint of a run,
    evaluated on `data_list` with the run's train.yaml (no augmentation)."""
    import os

    from wenet_moe.config import load_yaml
    from wenet_moe.data import Dataset, build_dataloader, build_tokenizer, eval_dataset_conf
    from wenet_moe.model import build_model
    from wenet_moe.train.average import list_epoch_checkpoints
    from wenet_moe.checkpoint_io import load_model_weights

    configs = load_yaml(os.path.join(model_dir, "train.yaml"))
    tokenizer = build_tokenizer(configs)
    ds = Dataset(data_type, data_list, tokenizer, eval_dataset_conf(configs.get("dataset_conf"), 16),
                 partition=False)
    model = build_model(configs).eval()
    rows = []
    for epoch, path in list_epoch_checkpoints(model_dir):
        load_model_weights(model, path)
        tot = [0.0, 0.0, 0.0, 0.0]
        for b in build_dataloader(ds, 0):
            if b["feats"].size(0):
                s = ctc_greedy_stats(model, b["feats"], b["feats_lengths"], b["target"], b["target_lengths"])
                tot = [x + y for x, y in zip(tot, s)]
        info = load_yaml(path[:-3] + ".yaml")
        rows.append((epoch, (info.get("cv") or {}).get("loss_ctc"), tot[0] / max(tot[1], 1), tot[2] / max(tot[3], 1)))
    return rows


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="CTC blank rate and greedy token error rate per epoch checkpoint")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--data", required=True, help="raw data.list to evaluate on")
    a = p.parse_args()
    print("epoch  cv_loss_ctc  blank_rate  greedy_TER")
    for e, l, br, ter in report(a.model_dir, a.data):
        print(f"{e:5d}  {l if l is None else round(l, 2)!s:>11}  {br:10.3f}  {ter:10.3f}")
