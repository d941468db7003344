#!/usr/bin/env python3
"""Write WeNet's raw `data.list`: one JSON object {"key", "wav", "txt"} per line.

    make_raw_list.py [--segments segments] wav.scp text data.list

With --segments (Kaldi `utt rec start end`, seconds) each line also has
"start" and "end", and "wav" is the recording's path. Utterances without a
transcript (or without audio) are left out and counted on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tool_util import ToolError, atomic_output, read_key_value, run_tool  # noqa: E402


def read_segments(path: str):
    out = {}
    for key, rest in read_key_value(path):
        cols = rest.split()
        try:
            if len(cols) != 3:
                raise ValueError
            out[key] = (cols[0], float(cols[1]), float(cols[2]))
        except ValueError:
            raise ToolError(f"{path}: segment {key!r}: expected 'utt recording start end'") from None
        if out[key][2] <= out[key][1]:
            raise ToolError(f"{path}: segment {key!r} ends before it starts")
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segments", default=None, help="Kaldi segments file")
    p.add_argument("wav_file", help="wav.scp (key path)")
    p.add_argument("text_file", help="text (key transcript)")
    p.add_argument("output_file", help="data.list to write (atomically)")
    return p


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    wavs = dict(read_key_value(a.wav_file))
    texts = read_key_value(a.text_file, allow_empty_value=True)
    segments = read_segments(a.segments) if a.segments else None
    lines, no_audio = [], 0
    for key, txt in texts:
        if segments is not None:
            if key not in segments or segments[key][0] not in wavs:
                no_audio += 1
                continue
            rec, start, end = segments[key]
            obj = {"key": key, "wav": wavs[rec], "txt": txt, "start": start, "end": end}
        else:
            if key not in wavs:
                no_audio += 1
                continue
            obj = {"key": key, "wav": wavs[key], "txt": txt}
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    if not lines:
        raise ToolError(f"{a.text_file}: no utterance has audio in {a.wav_file}")
    with atomic_output(a.output_file) as f:
        f.writelines(lines)
    no_text = len(set(wavs) - {k for k, _ in texts}) if segments is None else 0
    print(f"make_raw_list.py: {len(lines)} utterances -> {a.output_file}"
          f" (skipped: {no_audio} without audio, {no_text} without transcript)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_tool(main, "make_raw_list.py")
