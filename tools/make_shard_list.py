#!/usr/bin/env python3
"""Pack utterances into tar shards (WeNet's shard format) and list them.

    make_shard_list.py --num_utts_per_shard 1000 --num_threads 4 \
        [--segments segments] [--resample 16000] wav.scp text shards_dir shards.list

Each utterance becomes two consecutive members, `{key}.txt` (utf-8 transcript)
and `{key}.wav` (16-bit PCM, resampled when --resample is given, cut to the
segment with --segments). Shards are `shards_dir/shards_{i:09d}.tar`; member
metadata is fixed (mtime 0, mode 644), so equal input gives byte-identical
shards. Every shard and the list are written to a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_raw_list import read_segments  # noqa: E402
from tool_util import ToolError, atomic_output, read_key_value, run_tool  # noqa: E402

Item = Tuple[str, str, str, Optional[float], Optional[float]]  # key, wav path, text, start, end


def wav_bytes(path: str, start: Optional[float], end: Optional[float], resample: int) -> bytes:
    """16-bit PCM WAV bytes of (a segment of) `path`, resampled if `resample` > 0."""
    import soundfile as sf

    try:
        x, sr = sf.read(path, dtype="int16", always_2d=True)
    except Exception as e:
        raise ToolError(f"{path}: cannot read audio ({str(e).splitlines()[0]})") from None
    x = x[:, 0]
    if start is not None:
        x = x[int(start * sr): int(end * sr)]
    if resample > 0 and sr != resample:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, resample)
        y = resample_poly(x.astype(np.float64), resample // g, sr // g)
        x = np.clip(np.round(y), -32768, 32767).astype(np.int16)
        sr = resample
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(items: List[Item], path: str, resample: int) -> str:
    with atomic_output(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, wav, txt, start, end in items:
                _add(tar, key + ".txt", txt.encode("utf-8"))
                _add(tar, key + ".wav", wav_bytes(wav, start, end, resample))
    return path


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_utts_per_shard", type=int, default=1000, help="utterances per tar")
    p.add_argument("--num_threads", type=int, default=1, help="threads writing shards")
    p.add_argument("--prefix", default="shards", help="shard file name prefix")
    p.add_argument("--segments", default=None, help="Kaldi segments file")
    p.add_argument("--resample", type=int, default=16000, help="output sample rate (0: keep)")
    p.add_argument("wav_file", help="wav.scp")
    p.add_argument("text_file", help="text")
    p.add_argument("shards_dir", help="directory for the tar files")
    p.add_argument("shards_list", help="list of shard paths to write")
    return p


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    if a.num_utts_per_shard < 1 or a.num_threads < 1:
        raise ToolError("--num_utts_per_shard and --num_threads must be >= 1")
    wavs = dict(read_key_value(a.wav_file))
    texts = read_key_value(a.text_file, allow_empty_value=True)
    segments = read_segments(a.segments) if a.segments else None
    items: List[Item] = []
    for key, txt in texts:
        if segments is not None:
            if key in segments and segments[key][0] in wavs:
                rec, s, e = segments[key]
                items.append((key, wavs[rec], txt, s, e))
        elif key in wavs:
            items.append((key, wavs[key], txt, None, None))
    if not items:
        raise ToolError(f"{a.text_file}: no utterance has audio in {a.wav_file}")
    for key, wav, *_ in items:
        if not os.path.isfile(wav):
            raise ToolError(f"{a.wav_file}: wav of {key} not found: {wav}")
    os.makedirs(a.shards_dir, exist_ok=True)
    chunks = [items[i:i + a.num_utts_per_shard] for i in range(0, len(items), a.num_utts_per_shard)]
    paths = [os.path.join(os.path.abspath(a.shards_dir), f"{a.prefix}_{i:09d}.tar") for i in range(len(chunks))]
    with ThreadPoolExecutor(a.num_threads) as ex:
        list(ex.map(lambda cp: write_shard(cp[0], cp[1], a.resample), zip(chunks, paths)))
    with atomic_output(a.shards_list) as f:
        f.writelines(p + "\n" for p in paths)
    print(f"make_shard_list.py: {len(items)} utterances in {len(paths)} shards -> {a.shards_list}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_tool(main, "make_shard_list.py")
