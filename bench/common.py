"""Small helpers shared by the bench scripts (run as `python bench/X.py`, so this
directory is on sys.path)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Sequence

import numpy as np


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two strings or token sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def write_json_atomic(path: str, obj) -> None:
    """Writes `obj` as indented JSON to a temporary file beside `path`, then renames it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def blank_shift(scores: np.ndarray, fraction: float) -> float:
    """How far to raise the CTC blank score (index 0) of (frames, vocab) logits or
    log-posteriors so that `fraction` of the frames are blank-best: that quantile of
    max(non-blank) - blank (the same for logits and their log-softmax)."""
    return float(np.quantile(scores[:, 1:].max(axis=1) - scores[:, 0], fraction))


def model_blank_shift(model, feats, fraction: float, chunk: int) -> float:
    """`blank_shift` of an `ASRModel`'s CTC logits on `feats` (1, T, bins), encoded at
    `chunk`."""
    import torch
    with torch.no_grad():
        enc, _ = model.encoder(feats, torch.tensor([feats.size(1)], device=feats.device), chunk, -1)
        return blank_shift(model.ctc.ctc_lo(enc)[0].float().cpu().numpy(), fraction)


def raise_blank_(model, feats, fraction: float, chunk: int) -> None:
    """Raises the CTC blank bias of a (random-weight) `ASRModel` by `model_blank_shift`
    on `feats`, so that its outputs are peaky."""
    import torch
    shift = model_blank_shift(model, feats, fraction, chunk)
    with torch.no_grad():
        model.ctc.ctc_lo.bias[0] += shift
