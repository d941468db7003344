"""Search cost of LM (TLG graph) decoding and of hotword biasing, as ratios against
the plain CTC prefix beam search measured in the same run.

    python bench/decode_lm.py [--vocab 3000] [--utts 40] [--hotwords 1000] [--order 3]

Self-contained: a character vocabulary of `--vocab` CJK units, a training text
drawn from a seeded Zipf-like bigram process, a character n-gram LM on it
(tools/train_ngram_lm.py) compiled into TLG.fst (tools/make_tlg.py), and CTC
log-posteriors of held-out sentences of the same process (each unit peaked over 2
frames at 40 ms, blanks between, Gaussian noise on the logits). Only the search is
timed (the encoder's cost is the same for every variant). RTF = search seconds /
audio seconds; ratios are against `prefix beam` (beam 10). Single thread. Rows:
without LM (prefix beam), with the LM graph (1-best and the lattice n-best behind
ctc_wfst_rescoring), each also with `--hotwords` phrases (prefix search: the trie;
graph: TLG composed with the biasing acceptor, composition timed separately), and
the n-best at the lattice decoder's former search beam (15) for comparison.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "runtime"))

from common import edit_distance  # noqa: E402 (bench/common.py)
from wenet_moe_runtime.context import build_context_graph  # noqa: E402
from wenet_moe_runtime.ctc_search import ctc_prefix_beam_search  # noqa: E402
from wenet_moe_runtime.symbols import SymbolTable  # noqa: E402

FRAME_S = 0.04


def cpu_description() -> str:
    """lscpu model name, SIMD flags and cache sizes (or platform info)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    flags = set(info.get("Flags", "").split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "asimd", "sve") if f in flags]
    caches = ", ".join(f"{k} {info[k]}" for k in ("L1d cache", "L2 cache", "L3 cache") if k in info)
    return (f"{info.get('Model name', platform.machine())}; {info.get('CPU(s)', '?')} CPUs; "
            f"flags {' '.join(simd) or '-'}; {caches}")


def make_corpus(rng, vocab: int, n: int):
    """Sentences (lists of unit indices 3..vocab+2) from a sparse bigram process."""
    units = np.arange(3, vocab + 3)
    zipf = 1.0 / np.arange(1, vocab + 1)
    zipf /= zipf.sum()
    succ = {int(u): rng.choice(units, size=8, p=zipf) for u in units}
    sents = []
    for _ in range(n):
        length = int(rng.integers(8, 21))
        s = [int(rng.choice(units, p=zipf))]
        while len(s) < length:
            s.append(int(rng.choice(succ[s[-1]])) if rng.random() < 0.8 else int(rng.choice(units, p=zipf)))
        sents.append(s)
    return sents


def posteriors(rng, sent, vocab_size: int, noise: float) -> np.ndarray:
    frames = []
    for u in sent:
        frames += [u, u, 0] + ([0] if rng.random() < 0.5 else [])
    logits = rng.normal(0.0, noise, (len(frames), vocab_size))
    logits[np.arange(len(frames)), frames] += 7.0
    logits[:, 1] -= 30.0
    logits[:, vocab_size - 1] -= 30.0
    return (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)


def timed(fn, inputs):
    t0 = time.perf_counter()
    outs = [fn(x) for x in inputs]
    return time.perf_counter() - t0, outs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--train_sents", type=int, default=20000)
    p.add_argument("--utts", type=int, default=40)
    p.add_argument("--hotwords", type=int, default=1000)
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--noise", type=float, default=1.5)
    p.add_argument("--beam_size", type=int, default=10)
    p.add_argument("--skip_wide", action="store_true",
                   help="skip the n-best at the old lattice search beam (15, slow)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import make_tlg
    import train_ngram_lm
    from wenet_moe_runtime.wfst import WfstDecoder, WfstOptions

    rng = np.random.default_rng(0)
    syms = ["<blank>", "<unk>", "<pad>"] + [chr(0x4E00 + i) for i in range(args.vocab)] + ["<sos/eos>"]
    syms[2] = chr(0x4E00 + args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        units_path = os.path.join(tmp, "units.txt")
        with open(units_path, "w", encoding="utf-8") as f:
            f.writelines(f"{s} {i}\n" for i, s in enumerate(syms))
        symbols = SymbolTable.read(units_path)
        corpus = make_corpus(rng, args.vocab, args.train_sents + args.utts)
        train, test = corpus[: args.train_sents], corpus[args.train_sents:]
        t0 = time.perf_counter()
        lm = train_ngram_lm.KneserNeyLM([[syms[u] for u in s] for s in train], args.order)
        lm.write_arpa(os.path.join(tmp, "lm.arpa"))
        t_lm = time.perf_counter() - t0
        t0 = time.perf_counter()
        sizes = make_tlg.build_tlg(units_path, os.path.join(tmp, "lm.arpa"), os.path.join(tmp, "g"))
        t_graph = time.perf_counter() - t0
        graph_mb = os.path.getsize(os.path.join(tmp, "g", "TLG.fst")) / 2 ** 20
        hot = []
        for _ in range(args.hotwords):
            s = train[int(rng.integers(len(train)))]
            a = int(rng.integers(0, len(s) - 2))
            hot.append("".join(syms[u] for u in s[a: a + int(rng.integers(2, 7))]))
        t0 = time.perf_counter()
        context = build_context_graph(symbols, hot, 3.0)
        t_ctx = time.perf_counter() - t0
        lps = [posteriors(rng, s, len(syms), args.noise) for s in test]
        audio_s = sum(lp.shape[0] for lp in lps) * FRAME_S
        wfst = WfstDecoder(os.path.join(tmp, "g"), symbols, WfstOptions())
        t0 = time.perf_counter()
        biased = wfst.for_context(context)
        t_compose = time.perf_counter() - t0
        wide = WfstDecoder(os.path.join(tmp, "g"), symbols,
                           WfstOptions(lattice_search_beam=WfstOptions().beam))
        hw = f"{args.hotwords} hotwords"
        variants = [
            ("prefix beam", lambda lp: ctc_prefix_beam_search(lp, args.beam_size)[0][0]),
            (f"prefix beam + {hw}",
             lambda lp: ctc_prefix_beam_search(lp, args.beam_size, context=context)[0][0]),
            ("TLG 1-best (ctc_wfst)", lambda lp: wfst.decode(lp)[0].tokens),
            (f"TLG 1-best + {hw} (TLG o B)", lambda lp: biased.decode(lp)[0].tokens),
            ("TLG n-best (lattice, for rescoring)", lambda lp: wfst.decode_nbest(lp)[0].tokens),
            (f"TLG n-best + {hw} (TLG o B)", lambda lp: biased.decode_nbest(lp)[0].tokens),
        ]
        if not args.skip_wide:
            variants.append((f"TLG n-best, lattice search beam {wide.nbest_search_beam:g} (before)",
                             lambda lp: wide.decode_nbest(lp)[0].tokens))
        print(f"CPU: {cpu_description()}")
        print(f"vocabulary {args.vocab} units; LM: order {args.order} on {args.train_sents} sentences "
              f"({t_lm:.1f} s); graph: {sizes['TLG_states']} states, {graph_mb:.1f} MiB "
              f"({t_graph:.1f} s); {args.hotwords} hotwords compiled in {t_ctx * 1000:.1f} ms "
              f"(trie), composed with TLG in {t_compose:.2f} s ({biased.graph.num_states} states)")
        print(f"{len(lps)} utterances, {audio_s:.1f} s of audio (40 ms frames); WFST beam "
              f"{wfst.opts.beam:g}, max active {wfst.opts.max_active}, lattice beam "
              f"{wfst.opts.lattice_beam:g}, lattice search beam {wfst.nbest_search_beam:g}\n")
        print("| search | RTF | x prefix beam | unit errors |\n|---|---|---|---|")
        base = None
        for name, fn in variants:
            fn(lps[0])  # warm-up
            secs, outs = timed(fn, lps)
            errs = sum(edit_distance(o, s) for o, s in zip(outs, test)) / sum(len(s) for s in test)
            base = base or secs
            print(f"| {name} | {secs / audio_s:.4f} | {secs / base:.2f} | {errs:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
