"""Attention-rescoring cost: the decoder on an n-best list, three ways, in one run.

    python bench/rescoring.py [--exports DENSE_EXPORT MOE_EXPORT] [--threads 1]

For the recipe's paper-size decoders (random weights; Dense-S `train_u2++_conformer.yaml`,
MoE `train_u2++_moe.yaml`: 3 + 3 blocks, d=256, vocab 5000) and n-best lists shaped like
a CTC prefix beam's (N = 10 hypotheses: the 1-best and variants of it with one token
substituted, inserted or dropped at a random place), it times, per n-best list
(median of interleaved repetitions, both directions, reverse_weight 0.3):

  PyTorch  naive    the decoder on N padded rows over N copies of the encoder output (the
                    cross-attention keys / values projected N times: WeNet's way and this
                    toolkit's before)
           shared   the same padded rows, one copy of the encoder output for all N
                    (`forward_attention_decoder`: keys / values projected once)
           tree     the n-best's prefix trees (`decoder_scores`: each distinct prefix, and
                    suffix for the right-to-left decoder, decoded once)
  runtime  padded   decoder.onnx through `OnnxAsrModel(tree_decoder=False)`
           tree     decoder_tree.onnx (the runtime's default when the export has it)

and prints naive/shared, naive/tree, padded/tree (speed-ups) and rows/nodes (decoder rows
of the padded layout over prefix-tree nodes, both directions), at an utterance of 1.6 s
(T=40 encoder frames, L=12 tokens: the demo test set's) and 10 s (T=250, L=35). Every
way's scores are checked against the naive one's (1e-3).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine as host  # noqa: E402
import rtf  # noqa: E402
from wenet_moe.decode.search import decoder_scores  # noqa: E402


def nbest(vocab: int, num: int, length: int, rng: np.random.Generator) -> List[List[int]]:
    """The 1-best (random tokens) and num-1 variants: one token substituted, inserted
    or dropped at a uniformly random place (as a CTC prefix beam's n-best differs)."""
    best = rng.integers(3, vocab, length).tolist()
    out, seen = [best], {tuple(best)}
    while len(out) < num:
        hyp = list(best)
        pos = int(rng.integers(0, length))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            hyp[pos] = int(rng.integers(3, vocab))
        elif kind == 1:
            hyp.insert(pos, int(rng.integers(3, vocab)))
        else:
            del hyp[pos]
        if tuple(hyp) not in seen:
            seen.add(tuple(hyp))
            out.append(hyp)
    return out


def naive_scores(model, hyps: List[List[int]], enc: torch.Tensor, rw: float) -> np.ndarray:
    """Padded rows over N copies of the encoder output (keys / values projected N times)."""
    n = len(hyps)
    lens = torch.tensor([len(h) + 1 for h in hyps])
    pad = torch.full((n, int(lens.max())), model.eos, dtype=torch.long)
    pad[:, 0] = model.sos
    for i, h in enumerate(hyps):
        pad[i, 1:len(h) + 1] = torch.tensor(h)
    memory = enc.repeat(n, 1, 1)
    mask = torch.ones(n, 1, enc.size(1), dtype=torch.bool)
    l_logits, r_logits, _ = model.decoder(memory, mask, pad, lens, model.reverse_hyps(pad, lens), rw)
    scores = np.zeros(n)
    for logits, rev, weight in ((l_logits, False, 1.0 - rw), (r_logits, True, rw)):
        logp = torch.log_softmax(logits, -1).double().numpy()
        for i, h in enumerate(hyps):
            seq = (h[::-1] if rev else h) + [model.eos]
            scores[i] += weight * sum(logp[i, j, t] for j, t in enumerate(seq))
    return scores


def timed(fns: Dict[str, Callable[[], None]], reps: int) -> Dict[str, float]:
    """Median ms of each function, interleaved."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exports", nargs=2, metavar=("DENSE", "MOE"),
                   help="ONNX exports of the same two configs (bench/rtf.py's work dir) for "
                        "the runtime rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--nbest", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(host.describe())
    vocab, rw = 5000, 0.3
    units = os.path.join("/tmp", f"rescoring_units_{os.getpid()}.txt")
    rtf.write_units(units, vocab)
    confs = rtf.model_configs(["topk"], vocab, units)
    os.unlink(units)
    rng = np.random.default_rng(args.seed)
    print(f"threads {args.threads}, n-best {args.nbest}, reverse_weight {rw}, medians of "
          f"{args.reps}; ms per n-best list")
    header = ("model", "T", "L", "rows/nodes", "naive", "shared", "tree", "naive/shared",
              "naive/tree", "rt padded", "rt tree", "padded/tree")
    print(" | ".join(f"{h:>11}" for h in header))
    for i, name in enumerate(("dense_s", "moe_topk")):
        torch.manual_seed(0)
        from wenet_moe.model import build_model
        model = build_model(confs[name]).eval()
        runtimes = {}
        if args.exports:
            from wenet_moe_runtime.model import OnnxAsrModel
            runtimes = {"padded": OnnxAsrModel(args.exports[i], num_threads=args.threads,
                                               tree_decoder=False),
                        "tree": OnnxAsrModel(args.exports[i], num_threads=args.threads)}
        for t, length in ((40, 12), (250, 35)):
            enc = torch.randn(1, t, 256, generator=torch.Generator().manual_seed(t))
            mask = torch.ones(1, 1, t, dtype=torch.bool)
            hyps = nbest(vocab, args.nbest, length, rng)
            nodes = sum(len({tuple(s[:j]) for s in seqs for j in range(len(s) + 1)})
                        for seqs in (hyps, [h[::-1] for h in hyps]))
            rows = 2 * len(hyps) * (max(len(h) for h in hyps) + 1)
            with torch.inference_mode():
                want = naive_scores(model, hyps, enc, rw)

                def shared():
                    lens = torch.tensor([len(h) + 1 for h in hyps])
                    pad = torch.full((len(hyps), int(lens.max())), model.eos, dtype=torch.long)
                    pad[:, 0] = model.sos
                    for j, h in enumerate(hyps):
                        pad[j, 1:len(h) + 1] = torch.tensor(h)
                    return model.forward_attention_decoder(pad, lens, enc, rw)

                def tree():
                    l2r, r2l = decoder_scores(model, hyps, [0] * len(hyps), enc, mask, rw)
                    return ((1 - rw) * l2r + rw * r2l).double().numpy()

                fns = {"naive": lambda: naive_scores(model, hyps, enc, rw), "shared": shared,
                       "tree": tree}
                got = tree()
                if np.abs(got - want).max() > 1e-3:
                    raise SystemExit(f"{name}: tree scores differ from the naive ones by "
                                     f"{np.abs(got - want).max():.3g}")
                enc_np = enc[0].numpy()
                for kind, rt in runtimes.items():
                    got = rt.attention_scores(hyps, enc_np, rw)
                    if np.abs(got - want).max() > 1e-3:
                        raise SystemExit(f"{name}: runtime {kind} scores differ by "
                                         f"{np.abs(got - want).max():.3g}")
                    fns[f"rt {kind}"] = (lambda r=rt: r.attention_scores(hyps, enc_np, rw))
                ms = timed(fns, args.reps)
            cells = [name, t, length, f"{rows / nodes:.2f}", f"{ms['naive']:.1f}",
                     f"{ms['shared']:.1f}", f"{ms['tree']:.1f}", f"{ms['naive'] / ms['shared']:.2f}",
                     f"{ms['naive'] / ms['tree']:.2f}"]
            if runtimes:
                cells += [f"{ms['rt padded']:.1f}", f"{ms['rt tree']:.1f}",
                          f"{ms['rt padded'] / ms['rt tree']:.2f}"]
            print(" | ".join(f"{c:>11}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
