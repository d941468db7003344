"""Pipeline stages: generators over sample dicts.

A sample is a dict that grows along the pipeline:
`key, txt, src` (source: raw `list:line` or `tar:member`), `wav` (path or bytes),
optional `start`/`end` (s) -> `samples` float32 (N,), `sample_rate` ->
`tokens`, `label` -> `feats` float32 (T, F) (waveform dropped).

Items that cannot be used are dropped and counted in a `SkipCounter`
(a warning names the item once); nothing here is fatal.
"""
from __future__ import annotations

import json
import logging
import tarfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wenet_moe.data.audio import AudioError, load_audio, resample
from wenet_moe_runtime.features import FbankOptions, compute_fbank

SKIP_KINDS = ("bad_json", "missing_wav", "corrupt_wav", "empty_wav", "bad_rate", "bad_segment",
              "bad_text", "bad_shard", "filtered", "too_long_for_batch")
AUDIO_SUFFIXES = ("wav", "flac", "mp3", "m4a", "ogg", "opus", "wma")

Sample = Dict[str, Any]


class SkipCounter:
    """Counts of dropped items since the last `take()`, by kind."""

    def __init__(self) -> None:
        self.counts = {k: 0 for k in SKIP_KINDS}

    def skip(self, kind: str, message: str, warn: bool = True) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if warn:
            logging.warning("skipped (%s): %s", kind, message)
        else:
            logging.debug("skipped (%s): %s", kind, message)

    def take(self) -> Dict[str, int]:
        out = dict(self.counts)
        self.counts = {k: 0 for k in SKIP_KINDS}
        return out

    def any(self) -> bool:
        return any(self.counts.values())


# ---------------------------------------------------------------- sources
def raw_source(lines: Iterable[Tuple[str, int, str]], skips: SkipCounter) -> Iterator[Sample]:
    """JSON lines `{"key","wav","txt"[,"start","end"]}`; `lines` yields (file, lineno, text)."""
    for path, lineno, text in lines:
        src = f"{path}:{lineno}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            skips.skip("bad_json", f"{src}: bad JSON line ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            skips.skip("bad_json", f"{src}: a JSON object is expected, got {type(obj).__name__}")
            continue
        missing = [k for k in ("key", "wav", "txt") if not isinstance(obj.get(k), str)]
        if missing:
            skips.skip("bad_json", f"{src}: field '{missing[0]}' missing or not a string")
            continue
        sample = {"key": obj["key"], "wav": obj["wav"], "txt": obj["txt"], "src": src}
        bad = False
        for k in ("start", "end"):
            if obj.get(k) is not None:
                try:
                    sample[k] = float(obj[k])
                except (TypeError, ValueError):
                    skips.skip("bad_json", f"{src}: field '{k}' is not a number")
                    bad = True
                    break
        if not bad:
            yield sample


def _shard_group(tar_path: str, prefix: str, members: Dict[str, bytes], skips: SkipCounter) -> Optional[Sample]:
    src = f"{tar_path}:{prefix}"
    audio = [s for s in AUDIO_SUFFIXES if s in members]
    if "txt" not in members or not audio:
        what = "text (.txt)" if "txt" not in members else "audio (.wav)"
        skips.skip("bad_shard", f"{src}: shard item has no {what} member")
        return None
    try:
        txt = members["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        skips.skip("bad_text", f"{src}.txt: text is not UTF-8")
        return None
    return {"key": prefix.rsplit("/", 1)[-1], "wav": members[audio[0]], "txt": txt, "src": f"{src}.{audio[0]}"}


def shard_source(lines: Iterable[Tuple[str, int, str]], skips: SkipCounter) -> Iterator[Sample]:
    """Tar shards (one path per list line); members `{key}.txt` + `{key}.wav`
    grouped by prefix (the name before the last '.')."""
    for list_path, lineno, text in lines:
        tar_path = text.strip()
        try:
            tar = tarfile.open(tar_path, mode="r|*")
        except (OSError, tarfile.TarError) as e:
            skips.skip("bad_shard", f"{list_path}:{lineno}: cannot open shard '{tar_path}': {e}")
            continue
        prefix: Optional[str] = None
        members: Dict[str, bytes] = {}
        try:
            with tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    name = info.name
                    if "." not in name.rsplit("/", 1)[-1]:
                        skips.skip("bad_shard", f"{tar_path}:{name}: member name has no suffix")
                        continue
                    pre, suffix = name.rsplit(".", 1)
                    if prefix is not None and pre != prefix:
                        s = _shard_group(tar_path, prefix, members, skips)
                        if s is not None:
                            yield s
                        members = {}
                    prefix = pre
                    f = tar.extractfile(info)
                    members[suffix] = f.read() if f is not None else b""
        except (OSError, tarfile.TarError, EOFError) as e:
            skips.skip("bad_shard", f"{tar_path}: shard is truncated or corrupt after "
                       f"'{prefix}': {e}")
            prefix = None
        if prefix is not None:
            s = _shard_group(tar_path, prefix, members, skips)
            if s is not None:
                yield s


# ---------------------------------------------------------------- waveform
def decode_audio(data: Iterable[Sample], skips: SkipCounter) -> Iterator[Sample]:
    """wav (path or bytes) -> samples (first channel), sample_rate."""
    for s in data:
        name = s["src"] if isinstance(s["wav"], bytes) else f"{s['src']}: {s['wav']}"
        try:
            samples, rate = load_audio(s.pop("wav"), s.get("start"), s.get("end"), name=name)
        except AudioError as e:
            skips.skip(e.kind, str(e))
            continue
        s["samples"], s["sample_rate"] = samples, rate
        yield s


def resample_stage(data: Iterable[Sample], skips: SkipCounter, target_rate: int,
                   allowed_rates: Optional[Sequence[int]] = None) -> Iterator[Sample]:
    """Resample to `target_rate`; rates outside `allowed_rates` (if given) are skipped."""
    announced = set()
    for s in data:
        rate = s["sample_rate"]
        if rate != target_rate:
            if allowed_rates is not None and rate not in allowed_rates:
                skips.skip("bad_rate", f"{s['src']}: sample rate {rate} Hz is neither {target_rate} Hz "
                           f"nor one of resample_conf.allowed_rates {list(allowed_rates)}")
                continue
            if rate not in announced:  # resampling is configured, but never unnoticed
                announced.add(rate)
                logging.info("resampling %d Hz audio to %d Hz (first: %s)", rate, target_rate, s["src"])
            s["samples"] = resample(s["samples"], rate, target_rate)
            s["sample_rate"] = target_rate
        yield s


def tokenize_stage(data: Iterable[Sample], skips: SkipCounter, tokenizer) -> Iterator[Sample]:
    for s in data:
        try:
            s["tokens"], s["label"] = tokenizer.tokenize(s["txt"])
        except ValueError as e:
            skips.skip("bad_text", f"{s['src']}: {e}")
            continue
        yield s


def filter_stage(data: Iterable[Sample], skips: SkipCounter, max_length: float = 10240, min_length: float = 10,
                 token_max_length: int = 200, token_min_length: int = 1,
                 min_output_input_ratio: float = 0.0005, max_output_input_ratio: float = 1.0) -> Iterator[Sample]:
    """WeNet's filters; lengths in 10 ms frames computed from the waveform."""
    for s in data:
        frames = s["samples"].size / s["sample_rate"] * 100
        n_tok = len(s["label"])
        why = None
        if frames < min_length or frames > max_length:
            why = f"{frames:.0f} frames outside [{min_length}, {max_length}]"
        elif n_tok < token_min_length or n_tok > token_max_length:
            why = f"{n_tok} tokens outside [{token_min_length}, {token_max_length}]"
        elif frames > 0 and not (min_output_input_ratio <= n_tok / frames <= max_output_input_ratio):
            why = f"tokens/frames {n_tok / frames:.4f} outside [{min_output_input_ratio}, {max_output_input_ratio}]"
        if why:
            skips.skip("filtered", f"{s['src']}: {why}", warn=False)
            continue
        yield s


def map_stage(data: Iterable[Sample], fn: Callable[[Sample, np.random.Generator], None],
              rng: np.random.Generator) -> Iterator[Sample]:
    """Apply `fn(sample, rng)` (in place) to every sample."""
    for s in data:
        fn(s, rng)
        yield s


def fbank_stage(data: Iterable[Sample], opts: FbankOptions, rng: np.random.Generator) -> Iterator[Sample]:
    """samples -> feats (T, bins); dither drawn from `rng` (reproducible)."""
    for s in data:
        s["feats"] = compute_fbank(s.pop("samples"), s["sample_rate"], opts, rng=rng)
        yield s


# ---------------------------------------------------------------- order
def shuffle_stage(data: Iterable[Sample], rng: np.random.Generator, shuffle_size: int = 10000) -> Iterator[Sample]:
    buf: List[Sample] = []
    for s in data:
        buf.append(s)
        if len(buf) >= shuffle_size:
            for i in rng.permutation(len(buf)):
                yield buf[i]
            buf = []
    for i in rng.permutation(len(buf)):
        yield buf[i]


def sort_stage(data: Iterable[Sample], sort_size: int = 500) -> Iterator[Sample]:
    """Sort by frame count (ascending) within windows of `sort_size` (stable)."""
    buf: List[Sample] = []
    for s in data:
        buf.append(s)
        if len(buf) >= sort_size:
            buf.sort(key=lambda x: x["feats"].shape[0])
            yield from buf
            buf = []
    buf.sort(key=lambda x: x["feats"].shape[0])
    yield from buf


# ---------------------------------------------------------------- batches
def static_batch(data: Iterable[Sample], batch_size: int = 16) -> Iterator[List[Sample]]:
    buf: List[Sample] = []
    for s in data:
        buf.append(s)
        if len(buf) >= batch_size:
            yield buf
            buf = []
    if buf:
        yield buf


def bucket_batch(data: Iterable[Sample], bucket_boundaries: Sequence[int],
                 bucket_batch_sizes: Sequence[int]) -> Iterator[List[Sample]]:
    """Bucket i holds frames in [boundary[i-1], boundary[i]); full buckets are emitted."""
    buckets: List[List[Sample]] = [[] for _ in bucket_batch_sizes]
    for s in data:
        t = s["feats"].shape[0]
        i = int(np.searchsorted(np.asarray(bucket_boundaries), t, side="right"))
        buckets[i].append(s)
        if len(buckets[i]) >= bucket_batch_sizes[i]:
            yield buckets[i]
            buckets[i] = []
    for b in buckets:
        if b:
            yield b


def dynamic_batch(data: Iterable[Sample], skips: SkipCounter, max_frames_in_batch: int = 12000) -> Iterator[List[Sample]]:
    """Batches whose padded size B * T_max never exceeds `max_frames_in_batch`;
    an utterance longer than that on its own is skipped (`too_long_for_batch`)."""
    buf: List[Sample] = []
    longest = 0
    for s in data:
        t = s["feats"].shape[0]
        if t > max_frames_in_batch:
            skips.skip("too_long_for_batch", f"{s['src']}: {t} frames exceed "
                       f"batch_conf.max_frames_in_batch={max_frames_in_batch}")
            continue
        new_longest = max(longest, t)
        if buf and new_longest * (len(buf) + 1) > max_frames_in_batch:
            yield buf
            buf, new_longest = [], t
        buf.append(s)
        longest = new_longest
    if buf:
        yield buf


def pad_batch(samples: List[Sample], skipped: Dict[str, int], feat_dim: int) -> Dict[str, Any]:
    """List of samples -> batch dict, longest first.

    Returns: keys [B], feats float32 (B, T_max, F) zero-padded, feats_lengths int64 (B,),
    target int64 (B, L_max) padded -1, target_lengths int64 (B,), skipped {kind: count}.
    """
    order = sorted(range(len(samples)), key=lambda i: -samples[i]["feats"].shape[0])
    samples = [samples[i] for i in order]
    b = len(samples)
    t_max = max((s["feats"].shape[0] for s in samples), default=0)
    l_max = max((len(s["label"]) for s in samples), default=0)
    feats = torch.zeros(b, t_max, feat_dim, dtype=torch.float32)
    target = torch.full((b, l_max), -1, dtype=torch.int64)
    for i, s in enumerate(samples):
        feats[i, :s["feats"].shape[0]] = torch.from_numpy(s["feats"])
        target[i, :len(s["label"])] = torch.as_tensor(s["label"], dtype=torch.int64)
    return {
        "keys": [s["key"] for s in samples],
        "feats": feats,
        "feats_lengths": torch.tensor([s["feats"].shape[0] for s in samples], dtype=torch.int64),
        "target": target,
        "target_lengths": torch.tensor([len(s["label"]) for s in samples], dtype=torch.int64),
        "skipped": skipped,
    }
