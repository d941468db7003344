"""Margins of models trained in tests, so that a test's outcome is decided by a wide,
asserted margin rather than by the CPU's floating-point details.

`greedy_ctc_stable(log_probs, delta)`: CTC greedy output cannot change under any
perturbation of the log-probs smaller than delta/2 per entry (every frame whose
runner-up is within delta of its best is tried with each candidate; frames where the
choice only moves a token's timing are harmless).
`jittered(model, rel)`: a copy of the model with every floating parameter multiplied
by (1 + rel * N(0, 1)).
`perturbations()`: the execution variants a CPU may pick (1 or 2 threads, oneDNN on or
off), as context managers.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch


def _emissions(prev: int, frames: Sequence[int], blank: int) -> List[int]:
    """Tokens emitted by greedy CTC at `frames`, given the frame before them (`prev`)."""
    out = []
    for tok in frames:
        if tok != blank and tok != prev:
            out.append(tok)
        prev = tok
    return out


def greedy_ctc_stable(log_probs: np.ndarray, delta: float, blank: int = 0, max_choices: int = 4096) -> bool:
    """True when every per-frame choice among tokens within `delta` of the frame's best
    gives the greedy CTC output of the argmax path. log_probs: (T, V)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    best = lp.argmax(-1)
    cands = [np.flatnonzero(lp[t] >= lp[t, best[t]] - delta).tolist() for t in range(lp.shape[0])]
    t = 0
    while t < len(cands):
        if len(cands[t]) == 1:
            t += 1
            continue
        a = t
        while t < len(cands) and len(cands[t]) > 1:
            t += 1
        run = cands[a:t]
        if np.prod([len(c) for c in run], dtype=np.float64) > max_choices:
            return False
        prev = int(best[a - 1]) if a > 0 else -1
        tail = [int(best[t])] if t < len(cands) else []     # the next fixed frame's emission depends on the run
        ref = _emissions(prev, [int(x) for x in best[a:t]] + tail, blank)
        for choice in itertools.product(*run):
            if _emissions(prev, list(choice) + tail, blank) != ref:
                return False
    return True


def greedy_ctc_margin(log_probs: np.ndarray, blank: int = 0, hi: float = 20.0) -> float:
    """The largest delta (within 1e-3 nats, capped at `hi`) for which the greedy output is stable."""
    lo, top = 0.0, hi
    if greedy_ctc_stable(log_probs, hi, blank):
        return hi
    while top - lo > 1e-3:
        mid = (lo + top) / 2
        if greedy_ctc_stable(log_probs, mid, blank):
            lo = mid
        else:
            top = mid
    return lo


def jittered(model: torch.nn.Module, rel: float = 1e-3, seed: int = 0) -> torch.nn.Module:
    """A copy of `model` with every floating parameter scaled by (1 + rel * N(0, 1))."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.mul_(1.0 + rel * torch.randn(p.shape, generator=g))
    return out


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def perturbations() -> List[Tuple[str, contextlib.AbstractContextManager]]:
    """(name, context manager) for 1 thread, 2 threads, and oneDNN (mkldnn) disabled."""
    return [("1 thread", _threads(1)), ("2 threads", _threads(2)),
            ("mkldnn off", torch.backends.mkldnn.flags(enabled=False))]
