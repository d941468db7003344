"""Stage 0 (local/prepare_data.py) on an AISHELL-2-shaped tree with odd cases."""
import os
import subprocess
import sys

import numpy as np
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "examples", "aishell2", "s0")
sys.path.insert(0, os.path.join(RECIPE, "local"))
import prepare_data  # noqa: E402


def make_tree(root):
    d = root / "iOS" / "data"
    for spk, utt in [("C0001", "IC0001W0001"), ("C0001", "IC0001W0002"), ("C0002", "IC0002W0001"),
                     ("C0002", "IC0002W0002"), ("C0002", "IC0002W0003")]:
        (d / "wav" / spk).mkdir(parents=True, exist_ok=True)
        sf.write(str(d / "wav" / spk / f"{utt}.wav"), np.zeros(1600, np.int16), 16000, subtype="PCM_16")
    # extra wav on disk, never listed
    sf.write(str(d / "wav" / "C0002" / "IC0002W0099.wav"), np.zeros(160, np.int16), 16000, subtype="PCM_16")
    (d / "wav.scp").write_text(
        "IC0001W0001\twav/C0001/IC0001W0001.wav\n"
        "\n"                                            # blank line
        "IC0001W0002\twav/C0001/IC0001W0002.wav\n"
        "IC0002W0001\twav/C0002/IC0002W0001.wav\n"      # no transcript
        "IC0002W0002\twav/C0002/IC0002W0002.wav\n"
        "IC0002W0003\twav/C0002/IC0002W0003.wav\n"      # transcript is punctuation only
        "IC0002W0004\twav/C0002/IC0002W0004.wav\n",     # file missing on disk
        encoding="utf-8")
    (d / "trans.txt").write_text(
        "\ufeffIC0001W0001\t今天 天气，很好！\n"
        "IC0001W0002\t我爱 hello world\n"
        "   \n"                                         # blank line (spaces)
        "IC0002W0002\tＡＢＣ 测试\n"
        "IC0002W0003\t。。\n"
        "IC0002W0004\t丢失\n"
        "IC0003W0001\t没有音频\n",                        # transcript without wav.scp entry
        encoding="utf-8")
    return d


def test_prepare_reports_and_normalises(tmp_path):
    corpus = make_tree(tmp_path)
    out = tmp_path / "data" / "train"
    r = subprocess.run([sys.executable, os.path.join(RECIPE, "local", "prepare_data.py"), str(corpus), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 utterances" in r.stderr
    for reason in ("1 x missing transcript", "1 x extra wav", "1 x transcript without wav.scp entry",
                   "1 x wav file missing on disk", "1 x empty transcript", "1 x blank line in wav.scp",
                   "1 x blank line in trans.txt"):
        assert reason in r.stderr, (reason, r.stderr)
    text = (out / "text").read_text(encoding="utf-8").splitlines()
    assert text == ["IC0001W0001 今天天气很好", "IC0001W0002 我爱HELLO▁WORLD", "IC0002W0002 ABC测试"]
    scp = (out / "wav.scp").read_text(encoding="utf-8").splitlines()
    assert [ln.split()[0] for ln in scp] == ["IC0001W0001", "IC0001W0002", "IC0002W0002"]
    assert all(os.path.isabs(ln.split()[1]) and os.path.isfile(ln.split()[1]) for ln in scp)
    assert (out / "utt2spk").read_text().splitlines()[0] == "IC0001W0001 C0001"


def test_rerun_leaves_files_untouched(tmp_path):
    corpus = make_tree(tmp_path)
    out = tmp_path / "d"
    prepare_data.prepare(str(corpus), str(out))
    before = {p: os.stat(out / p).st_mtime_ns for p in ("wav.scp", "text", "utt2spk")}
    prepare_data.prepare(str(corpus), str(out))
    assert before == {p: os.stat(out / p).st_mtime_ns for p in ("wav.scp", "text", "utt2spk")}


def test_missing_lists_are_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(RECIPE, "local", "prepare_data.py"), str(tmp_path),
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no wav.scp" in r.stderr and str(tmp_path) in r.stderr


def test_normalize():
    n = prepare_data.normalize
    assert n("你好 world hello ！") == "你好WORLD▁HELLO"
    assert n("ＡＢＣ　你好，ok thank you.") == "ABC你好OK▁THANK▁YOU"
    assert n("我 爱 北京") == "我爱北京"
    assert n("it's OK") == "IT'S▁OK"
    assert n("，。！") == ""
