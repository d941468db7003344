"""Tiny corpora for the data tests: wavs, units.txt, data.list and tar shards."""
import io
import json
import os
import tarfile

import numpy as np
import soundfile as sf

CHARS = list("你好世界我们今天天气很")


def write_units(path, extra=()):
    syms = ["<blank>", "<unk>"] + sorted(set(CHARS)) + list(extra) + ["<sos/eos>"]
    with open(path, "w", encoding="utf-8") as f:
        for i, s in enumerate(syms):
            f.write(f"{s} {i}\n")
    return str(path)


def make_corpus(root, n=10, rate=16000, seed=0, min_s=0.3, max_s=1.2):
    """n utterances of random length; returns [(key, wav_path, txt)]."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    utts = []
    for i in range(n):
        dur = rng.uniform(min_s, max_s)
        t = np.arange(int(dur * rate)) / rate
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(t.size)
        key = f"utt{i:03d}"
        path = os.path.join(root, key + ".wav")
        sf.write(path, x.astype(np.float32), rate, subtype="PCM_16")
        txt = "".join(rng.choice(CHARS, size=int(rng.integers(1, 6))))
        utts.append((key, path, txt))
    return utts


def write_list(path, utts, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for key, wav, txt in utts:
            f.write(json.dumps({"key": key, "wav": wav, "txt": txt}, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def write_shards(root, utts, per_shard=3):
    """Tar shards of `{key}.txt` + `{key}.wav`; returns the shard list path."""
    paths = []
    for s in range(0, len(utts), per_shard):
        p = os.path.join(root, f"shards_{s // per_shard:09d}.tar")
        with tarfile.open(p, "w") as tar:
            for key, wav, txt in utts[s:s + per_shard]:
                for name, data in ((key + ".txt", txt.encode("utf-8")), (key + ".wav", open(wav, "rb").read())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(p)
    lst = os.path.join(root, "shards.list")
    with open(lst, "w") as f:
        f.write("\n".join(paths) + "\n")
    return lst
