"""Kaldi-style tools: raw lists, shards, text2token, CMVN statistics, parse_options."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")


def run(tool, *args, check=True):
    r = subprocess.run([sys.executable, os.path.join(TOOLS, tool), *map(str, args)],
                       capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def kaldi_dir(tmp_path):
    rng = np.random.default_rng(0)
    wavs = []
    for i, n in enumerate([8000, 12000, 4000]):
        p = tmp_path / f"u{i}.wav"
        sf.write(str(p), (rng.standard_normal(n) * 3000).astype(np.int16), 16000, subtype="PCM_16")
        wavs.append(p)
    # an 8 kHz file, to check resampling in shards
    sf.write(str(tmp_path / "u3.wav"), (rng.standard_normal(4000) * 3000).astype(np.int16), 8000,
             subtype="PCM_16")
    (tmp_path / "wav.scp").write_text("".join(f"u{i} {tmp_path}/u{i}.wav\n" for i in range(4)))
    (tmp_path / "text").write_text("u0 你好\nu1 世界 和平\nu3 再见\nu9 没有音频\n", encoding="utf-8")
    return tmp_path


def test_make_raw_list(kaldi_dir):
    out = kaldi_dir / "data.list"
    r = run("make_raw_list.py", kaldi_dir / "wav.scp", kaldi_dir / "text", out)
    rows = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"key": "u0", "wav": f"{kaldi_dir}/u0.wav", "txt": "你好"},
                    {"key": "u1", "wav": f"{kaldi_dir}/u1.wav", "txt": "世界 和平"},
                    {"key": "u3", "wav": f"{kaldi_dir}/u3.wav", "txt": "再见"}]
    assert "1 without audio" in r.stderr and "1 without transcript" in r.stderr


def test_make_raw_list_segments(kaldi_dir):
    (kaldi_dir / "segments").write_text("s1 u0 0.10 0.30\ns2 u1 0.0 0.5\n")
    (kaldi_dir / "stext").write_text("s1 一\ns2 二\n", encoding="utf-8")
    out = kaldi_dir / "seg.list"
    run("make_raw_list.py", "--segments", kaldi_dir / "segments", kaldi_dir / "wav.scp", kaldi_dir / "stext", out)
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"key": "s1", "wav": f"{kaldi_dir}/u0.wav", "txt": "一", "start": 0.1, "end": 0.3}
    (kaldi_dir / "segments").write_text("s1 u0 0.30 0.10\n")
    r = run("make_raw_list.py", "--segments", kaldi_dir / "segments", kaldi_dir / "wav.scp",
            kaldi_dir / "stext", out, check=False)
    assert r.returncode == 1 and "segments" in r.stderr and "ends before it starts" in r.stderr


def test_make_shard_list(kaldi_dir):
    shards = kaldi_dir / "shards"
    lst = kaldi_dir / "shards.list"
    run("make_shard_list.py", "--num_utts_per_shard", 2, "--num_threads", 2, kaldi_dir / "wav.scp",
        kaldi_dir / "text", shards, lst)
    paths = lst.read_text().split()
    assert [os.path.basename(p) for p in paths] == ["shards_000000000.tar", "shards_000000001.tar"]
    with tarfile.open(paths[0]) as t:
        names = t.getnames()
        assert names == ["u0.txt", "u0.wav", "u1.txt", "u1.wav"]
        assert t.extractfile("u1.txt").read().decode() == "世界 和平"
        import io
        x, sr = sf.read(io.BytesIO(t.extractfile("u0.wav").read()), dtype="int16")
        ref, _ = sf.read(str(kaldi_dir / "u0.wav"), dtype="int16")
        assert sr == 16000 and np.array_equal(x, ref)
    with tarfile.open(paths[1]) as t:
        import io
        x, sr = sf.read(io.BytesIO(t.extractfile("u3.wav").read()), dtype="int16")
        assert sr == 16000 and abs(len(x) - 8000) <= 1  # resampled from 8 kHz
    first = open(paths[0], "rb").read()
    run("make_shard_list.py", "--num_utts_per_shard", 2, kaldi_dir / "wav.scp", kaldi_dir / "text", shards, lst)
    assert open(paths[0], "rb").read() == first  # byte-identical on a rerun


def test_text2token(tmp_path):
    (tmp_path / "text").write_text("k1 今天 AB好\nk2 <noise>你好\n\n", encoding="utf-8")
    (tmp_path / "nls").write_text("<noise>\n")
    r = run("text2token.py", "-s", 1, "-n", 1, "--space", "▁", "-l", tmp_path / "nls", tmp_path / "text")
    assert r.stdout.splitlines() == ["k1 今 天 ▁ A B 好", "k2 <noise> 你 好"]
    r = run("text2token.py", "-n", 2, tmp_path / "text")
    assert r.stdout.splitlines()[0].split()[:2] == ["k1", "1<space>"]
    r = run("text2token.py", tmp_path / "missing", check=False)
    assert r.returncode == 1 and "missing: no such file" in r.stderr


def test_compute_cmvn_stats_sums(kaldi_dir):
    sys.path.insert(0, os.path.join(ROOT, "runtime"))
    from wenet_moe_runtime.features import FbankOptions, compute_fbank
    cfg = kaldi_dir / "train.yaml"
    cfg.write_text("dataset_conf:\n  fbank_conf:\n    num_mel_bins: 40\n    frame_shift: 10\n"
                   "    frame_length: 25\n    dither: 1.0\n")
    scp = kaldi_dir / "scp3"
    scp.write_text("".join(f"u{i} {kaldi_dir}/u{i}.wav\n" for i in range(3)))
    out1, out2 = kaldi_dir / "cmvn1", kaldi_dir / "cmvn2"
    run("compute_cmvn_stats.py", "--num_workers", 1, "--train_config", cfg, "--in_scp", scp, "--out_cmvn", out1)
    run("compute_cmvn_stats.py", "--num_workers", 2, "--train_config", cfg, "--in_scp", scp, "--out_cmvn", out2)
    a, b = json.loads(out1.read_text()), json.loads(out2.read_text())
    opts = FbankOptions(num_mel_bins=40)  # dither must be forced to 0
    feats = np.concatenate([compute_fbank(sf.read(str(kaldi_dir / f"u{i}.wav"), dtype="float32")[0], 16000, opts)
                            for i in range(3)]).astype(np.float64)
    assert a["frame_num"] == b["frame_num"] == feats.shape[0] == 50 + 75 + 25
    np.testing.assert_allclose(a["mean_stat"], feats.sum(0), rtol=1e-6)
    np.testing.assert_allclose(a["var_stat"], (feats ** 2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(a["mean_stat"], b["mean_stat"], rtol=1e-9)
    r = run("compute_cmvn_stats.py", "--train_config", cfg, "--in_scp", kaldi_dir / "wav.scp",
            "--out_cmvn", kaldi_dir / "bad", check=False)
    scp.write_text(f"u0 {kaldi_dir}/nothere.wav\n")
    r = run("compute_cmvn_stats.py", "--train_config", cfg, "--in_scp", scp, "--out_cmvn", kaldi_dir / "x",
            check=False)
    assert r.returncode == 1 and "nothere.wav" in r.stderr and not (kaldi_dir / "x").exists()


def test_parse_options(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text(f'stage=0\nstop_stage=5\ndecode_modes="a b"\n. {TOOLS}/parse_options.sh\n'
                      'echo "$stage|$stop_stage|$decode_modes|$*"\n')
    r = subprocess.run(["bash", str(script), "--stage", "3", "--decode_modes", "x y", "--stop_stage=7", "rest"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "3|7|x y|rest"
    r = subprocess.run(["bash", str(script), "--stgae", "3"], capture_output=True, text=True)
    assert r.returncode == 1 and "unknown option --stgae" in r.stderr
    r = subprocess.run(["bash", str(script), "--stage"], capture_output=True, text=True)
    assert r.returncode == 1 and "needs a value" in r.stderr


@pytest.mark.parametrize("tool", ["compute_cmvn_stats.py", "make_raw_list.py", "make_shard_list.py",
                                  "text2token.py", "compute_cer.py", "synth_corpus.py"])
def test_help(tool):
    r = run(tool, "--help")
    assert "usage" in r.stdout.lower()
