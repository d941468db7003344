"""synth_corpus.py: AISHELL-2 layout, determinism for a seed (whatever --nj), disjoint splits."""
import hashlib
import json
import os
import subprocess
import sys

import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "synth_corpus.py")
SMALL = ["--hours", "0.006", "--dev_utts", "3", "--test_utts", "3", "--dev_voices", "1", "--test_voices", "1",
         "--train_voices", "3", "--noise_prob", "0.5", "--reverb_prob", "0.5", "--vocab_size", "80"]


def synth(out, *extra):
    r = subprocess.run([sys.executable, TOOL, str(out), *SMALL, *extra], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return r


def tree_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if f == "synth_info.json":
                continue
            out[os.path.relpath(p, root)] = hashlib.md5(open(p, "rb").read()).hexdigest()
    return out


def read_list(path):
    return dict(line.rstrip("\n").split("\t", 1) for line in open(path, encoding="utf-8") if line.strip())


def test_layout_determinism_and_disjoint_splits(tmp_path):
    r1 = synth(tmp_path / "a", "--seed", "5", "--nj", "1")
    synth(tmp_path / "b", "--seed", "5", "--nj", "2")
    synth(tmp_path / "c", "--seed", "6", "--nj", "2")
    a, b, c = (tree_hashes(tmp_path / x) for x in "abc")
    assert a == b                      # same seed, different worker counts: identical bytes
    assert a != c                      # another seed: another corpus
    assert "train:" in r1.stdout and "hours" in r1.stdout and "dev: 3 utterances" in r1.stdout
    info = json.load(open(tmp_path / "a" / "synth_info.json", encoding="utf-8"))
    texts, voices = {}, {}
    for split, sub in (("train", "data"), ("dev", "dev"), ("test", "test")):
        d = tmp_path / "a" / "iOS" / sub
        scp, trans = read_list(d / "wav.scp"), read_list(d / "trans.txt")
        assert set(scp) == set(trans) and len(scp) == info["stats"][split]["utterances"]
        seconds = 0.0
        for key, rel in scp.items():
            assert not os.path.isabs(rel)
            x, sr = sf.read(str(d / rel), dtype="int16")
            assert sr == 16000 and x.ndim == 1 and len(x) > 8000
            assert sf.info(str(d / rel)).subtype == "PCM_16"
            seconds += len(x) / sr
            assert all(ch in info["vocab"] for ch in trans[key])
        assert abs(seconds / 3600 - info["stats"][split]["hours"]) < 1e-3
        texts[split], voices[split] = set(trans.values()), set(info["stats"][split]["voices"])
    assert len(texts["train"]) >= 4
    for x, y in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not texts[x] & texts[y], (x, y)
        assert not voices[x] & voices[y], (x, y)
    assert sorted(os.listdir(tmp_path / "a" / "iOS" / "data" / "wav"))[0] == "C0001"
    assert next(iter(read_list(tmp_path / "a" / "iOS" / "dev" / "wav.scp"))).startswith("ID0001W")


def test_rerun_is_a_no_op_and_conflicts_are_errors(tmp_path):
    synth(tmp_path / "a", "--seed", "1")
    before = os.stat(tmp_path / "a" / "iOS" / "data" / "wav.scp").st_mtime_ns
    r = synth(tmp_path / "a", "--seed", "1", "--nj", "1")
    assert "up to date" in r.stderr
    assert os.stat(tmp_path / "a" / "iOS" / "data" / "wav.scp").st_mtime_ns == before
    r = subprocess.run([sys.executable, TOOL, str(tmp_path / "a"), *SMALL, "--seed", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "other arguments" in r.stderr


def test_text_file_and_bad_arguments(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"第{i}句话\n" for i in "一二三四五六七八九十") + "\n第一句话\n", encoding="utf-8")
    r = subprocess.run([sys.executable, TOOL, str(tmp_path / "o"), "--text", str(text), "--hours", "0.001",
                        "--dev_utts", "2", "--test_utts", "2", "--train_voices", "2", "--dev_voices", "1",
                        "--test_voices", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    all_text = set()
    for sub in ("data", "dev", "test"):
        all_text |= set(read_list(tmp_path / "o" / "iOS" / sub / "trans.txt").values())
    assert all_text <= {f"第{i}句话" for i in "一二三四五六七八九十"}
    r = subprocess.run([sys.executable, TOOL, str(tmp_path / "p"), "--text", str(text), "--hours", "5"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "t.txt" in r.stderr and "distinct sentences" in r.stderr
    assert not (tmp_path / "p").exists()
    r = subprocess.run([sys.executable, TOOL, str(tmp_path / "q"), "--rate", "300", "100"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--rate" in r.stderr
