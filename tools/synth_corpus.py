#!/usr/bin/env python3
"""Synthesize an AISHELL-2-shaped Mandarin corpus with espeak-ng (voice cmn).

Layout written under OUT (wav paths in wav.scp are relative to the list's dir):
  OUT/iOS/data/{wav.scp,trans.txt,wav/C0001/IC0001W0001.wav...}   train
  OUT/iOS/dev/{wav.scp,trans.txt,wav/D0001/...}                  dev
  OUT/iOS/test/{wav.scp,trans.txt,wav/T0001/...}                 test
  OUT/synth_info.json                                             parameters + statistics
Audio is 16 kHz 16-bit mono. Splits use disjoint espeak voice variants and
disjoint sentences. The output depends only on the arguments (not on --nj):
each speaker is rendered by a fresh worker process, because espeak-ng carries
synthesis state from one utterance to the next.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import espeak_tts  # noqa: E402
import synth_text  # noqa: E402

SAMPLE_RATE = 16000
SPLITS = (("train", "data", "C"), ("dev", "dev", "D"), ("test", "test", "T"))
SECONDS_PER_CHAR_AT_175 = 0.26  # espeak cmn speaking time per character at 175 wpm


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="output directory (created; must not hold another corpus)")
    p.add_argument("--hours", type=float, default=3.0, help="approximate hours of training speech")
    p.add_argument("--dev_utts", type=int, default=200, help="dev utterances")
    p.add_argument("--test_utts", type=int, default=200, help="test utterances")
    p.add_argument("--dev_voices", type=int, default=8, help="voice variants reserved for dev")
    p.add_argument("--test_voices", type=int, default=8, help="voice variants reserved for test")
    p.add_argument("--train_voices", type=int, default=0, help="voice variants for train (0: all others)")
    p.add_argument("--text", default="", help="text file, one sentence per line (default: built-in generator)")
    p.add_argument("--vocab_size", type=int, default=300, help="characters of the built-in generator")
    p.add_argument("--homophones", default="none", choices=["none", "tone", "all"],
                   help="built-in generator: one char per toneless syllable (none), per toned syllable, or any")
    p.add_argument("--min_chars", type=int, default=6, help="shortest built-in sentence (characters)")
    p.add_argument("--max_chars", type=int, default=16, help="longest built-in sentence (characters)")
    p.add_argument("--rate", type=int, nargs=2, default=[140, 230], help="speaker rate range, words/minute")
    p.add_argument("--pitch", type=int, nargs=2, default=[25, 75], help="speaker pitch range (0..100)")
    p.add_argument("--noise_prob", type=float, default=0.0, help="probability of adding noise to an utterance")
    p.add_argument("--snr", type=float, nargs=2, default=[15.0, 35.0], help="noise SNR range in dB")
    p.add_argument("--reverb_prob", type=float, default=0.0, help="probability of room reverberation")
    p.add_argument("--rt60", type=float, nargs=2, default=[0.15, 0.5], help="reverberation time range, s")
    p.add_argument("--seed", type=int, default=1, help="random seed (output depends only on arguments)")
    p.add_argument("--nj", type=int, default=2, help="worker processes")
    return p


def check_args(a) -> None:
    if a.hours <= 0:
        raise ValueError(f"--hours must be positive, got {a.hours}")
    if a.train_voices < 0:
        raise ValueError(f"--train_voices must be >= 0, got {a.train_voices}")
    for name in ("dev_utts", "test_utts", "dev_voices", "test_voices", "nj", "vocab_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(a, name)}")
    if not 1 <= a.min_chars <= a.max_chars:
        raise ValueError(f"need 1 <= --min_chars <= --max_chars, got {a.min_chars} {a.max_chars}")
    if not (80 <= a.rate[0] <= a.rate[1] <= 450):
        raise ValueError(f"--rate must be an increasing range within 80..450, got {a.rate}")
    if not (0 <= a.pitch[0] <= a.pitch[1] <= 100):
        raise ValueError(f"--pitch must be an increasing range within 0..100, got {a.pitch}")
    for name in ("noise_prob", "reverb_prob"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(a, name)}")
    if a.text and not os.path.isfile(a.text):
        raise ValueError(f"--text {a.text}: no such file")


def plan(a) -> Dict:
    """Everything random is decided here, from the seed: voices, sentences, parameters."""
    rng = random.Random(a.seed)
    variants = espeak_tts.list_variants()
    if a.dev_voices + a.test_voices + 1 > len(variants):
        raise ValueError(f"only {len(variants)} voice variants: lower --dev_voices/--test_voices")
    rng.shuffle(variants)
    voices = {"dev": variants[:a.dev_voices], "test": variants[a.dev_voices:a.dev_voices + a.test_voices],
              "train": variants[a.dev_voices + a.test_voices:]}
    if a.train_voices > 0:
        voices["train"] = voices["train"][:a.train_voices]
    mean_rate = sum(a.rate) / 2
    if a.text:
        pool = synth_text.read_text_file(a.text)
        rng.shuffle(pool)
        mean_chars = sum(len(s) for s in pool) / len(pool)
    else:
        mean_chars = (a.min_chars + a.max_chars) / 2
    sec_per_utt = mean_chars * SECONDS_PER_CHAR_AT_175 * 175.0 / mean_rate + 0.3
    n_train = max(1, int(round(a.hours * 3600 / sec_per_utt)))
    counts = {"train": n_train, "dev": a.dev_utts, "test": a.test_utts}
    total = sum(counts.values())
    if a.text:
        if len(pool) < total:
            raise ValueError(f"--text {a.text}: {len(pool)} distinct sentences, {total} needed "
                             "(lower --hours/--dev_utts/--test_utts)")
        sentences = pool[:total]
        vocab = sorted({c for s in sentences for c in s})
    else:
        words = synth_text.read_lexicon(synth_text.jieba_dict_path())
        vocab = synth_text.choose_vocabulary(words, a.vocab_size, a.homophones)
        sentences = synth_text.make_sentences(words, vocab, total, a.min_chars, a.max_chars, a.seed)
    texts = {"dev": sentences[:counts["dev"]], "test": sentences[counts["dev"]:counts["dev"] + counts["test"]],
             "train": sentences[counts["dev"] + counts["test"]:]}
    speakers = []
    for split, subdir, letter in SPLITS:
        vs = voices[split]
        per = [len(texts[split]) // len(vs) + (1 if i < len(texts[split]) % len(vs) else 0) for i in range(len(vs))]
        start = 0
        for i, (variant, n) in enumerate(zip(vs, per)):
            if n == 0:
                continue
            spk = f"{letter}{i + 1:04d}"
            base_rate, base_pitch = rng.uniform(*a.rate), rng.uniform(*a.pitch)
            utts = []
            for j, text in enumerate(texts[split][start:start + n]):
                utts.append({
                    "key": f"I{spk}W{j + 1:04d}", "text": text,
                    "rate": int(np.clip(base_rate * rng.uniform(0.9, 1.1), 80, 450)),
                    "pitch": int(np.clip(base_pitch + rng.uniform(-6, 6), 0, 100)),
                    "range": rng.randint(30, 80), "seed": rng.randrange(1 << 30),
                    "noise_snr": rng.uniform(*a.snr) if rng.random() < a.noise_prob else None,
                    "rt60": rng.uniform(*a.rt60) if rng.random() < a.reverb_prob else None,
                })
            start += n
            speakers.append({"split": split, "subdir": subdir, "spk": spk, "variant": variant, "utts": utts})
    return {"speakers": speakers, "vocab": vocab, "voices": voices}


def room_impulse_response(rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Impulse response (N,) of a random shoebox room (pyroomacoustics image method)."""
    import pyroomacoustics as pra

    dim = rng.uniform([3.0, 3.0, 2.4], [8.0, 6.0, 3.5])
    absorption, max_order = pra.inverse_sabine(rt60, dim)
    room = pra.ShoeBox(dim, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=min(max_order, 12))
    room.add_source(rng.uniform(0.5, dim - 0.5))
    room.add_microphone(rng.uniform(0.5, dim - 0.5))
    room.compute_rir()
    return np.asarray(room.rir[0][0], dtype=np.float64)


def render_speaker(job) -> List[Dict]:
    """Worker: speak every utterance of one speaker into job['dir']; returns durations."""
    from scipy.signal import fftconvolve, resample_poly
    import soundfile as sf

    speaker, root = job
    tts = espeak_tts.EspeakTTS("cmn")
    out = []
    wav_dir = os.path.join(root, "iOS", speaker["subdir"], "wav", speaker["spk"])
    os.makedirs(wav_dir, exist_ok=True)
    for u in speaker["utts"]:
        raw = tts.synth(u["text"], speaker["variant"], u["rate"], u["pitch"], u["range"], seed=u["seed"])
        x = resample_poly(raw.astype(np.float64), SAMPLE_RATE, tts.sample_rate)
        rng = np.random.default_rng(u["seed"])
        if u["rt60"] is not None:
            rir = room_impulse_response(u["rt60"], rng)
            y = fftconvolve(x, rir)[:len(x) + SAMPLE_RATE // 4]
            x = y * (np.sqrt(np.mean(x ** 2)) / max(np.sqrt(np.mean(y ** 2)), 1e-9))
        if u["noise_snr"] is not None:
            noise = np.cumsum(rng.standard_normal(len(x))) * 0.02 + rng.standard_normal(len(x))  # reddish
            noise -= noise.mean()
            power = np.mean(x ** 2) / (10 ** (u["noise_snr"] / 10))
            x = x + noise * np.sqrt(power / max(np.mean(noise ** 2), 1e-12))
        peak = np.max(np.abs(x)) if len(x) else 0.0
        if peak > 0.99:
            x = x * (0.99 / peak)
        pcm = np.round(x * 32767).astype(np.int16)
        sf.write(os.path.join(wav_dir, u["key"] + ".wav"), pcm, SAMPLE_RATE, subtype="PCM_16")
        out.append({"key": u["key"], "text": u["text"], "seconds": len(pcm) / SAMPLE_RATE,
                    "path": f"wav/{speaker['spk']}/{u['key']}.wav"})
    return out


def args_signature(a) -> Dict:
    sig = {k: v for k, v in vars(a).items() if k not in ("out_dir", "nj")}
    if a.text:
        sig["text"] = os.path.abspath(a.text)
    return sig


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    try:
        check_args(a)
    except ValueError as e:
        print(f"synth_corpus.py: error: {e}", file=sys.stderr)
        return 2
    info_path = os.path.join(a.out_dir, "synth_info.json")
    if os.path.exists(a.out_dir):
        try:
            with open(info_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            print(f"synth_corpus.py: error: {a.out_dir} exists and is not a finished corpus; remove it",
                  file=sys.stderr)
            return 1
        if old.get("args") == args_signature(a):
            print(f"synth_corpus.py: {a.out_dir} is up to date, nothing to do", file=sys.stderr)
            return 0
        print(f"synth_corpus.py: error: {a.out_dir} holds a corpus made with other arguments; remove it",
              file=sys.stderr)
        return 1
    t0 = time.time()
    try:
        p = plan(a)
    except ValueError as e:
        print(f"synth_corpus.py: error: {e}", file=sys.stderr)
        return 1
    tmp = a.out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    jobs = [(s, tmp) for s in p["speakers"]]
    import pyroomacoustics  # noqa: F401  imported once here, inherited by the forked workers
    import scipy.signal  # noqa: F401
    import soundfile  # noqa: F401
    ctx = mp.get_context("fork")
    with ctx.Pool(processes=a.nj, maxtasksperchild=1) as pool:
        results = pool.map(render_speaker, jobs, chunksize=1)
    stats = {}
    for split, subdir, _ in SPLITS:
        rows = [r for s, res in zip(p["speakers"], results) if s["split"] == split for r in res]
        d = os.path.join(tmp, "iOS", subdir)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "wav.scp"), "w", encoding="utf-8") as f:
            f.writelines(f"{r['key']}\t{r['path']}\n" for r in rows)
        with open(os.path.join(d, "trans.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{r['key']}\t{r['text']}\n" for r in rows)
        voices = [s["variant"] for s in p["speakers"] if s["split"] == split]
        stats[split] = {"utterances": len(rows), "hours": round(sum(r["seconds"] for r in rows) / 3600, 4),
                        "voices": voices}
    info = {"args": args_signature(a), "stats": stats, "vocab": "".join(p["vocab"])}
    with open(os.path.join(tmp, "synth_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=1)
    os.replace(tmp, a.out_dir)
    for split in ("train", "dev", "test"):
        s = stats[split]
        print(f"{split}: {s['utterances']} utterances, {s['hours']:.3f} hours, {len(s['voices'])} voices")
    print(f"vocabulary {len(p['vocab'])} characters; wrote {a.out_dir} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
