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
