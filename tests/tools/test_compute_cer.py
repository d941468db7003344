"""compute_cer.py: alignments and counts against hand-computed examples."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import compute_cer  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "compute_cer.py")


def counts(ref, hyp):
    return compute_cer.count(compute_cer.align(list(ref), list(hyp)))


def edit_distance(a, b):
    # independent reference: recursive definition with memoisation
    from functools import lru_cache

    @lru_cache(None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


@pytest.mark.parametrize("ref,hyp,expected", [
    ("今天天气很好", "今天天气很好", dict(C=6, S=0, D=0, I=0)),
    ("今天天气很好", "今天天汽很好", dict(C=5, S=1, D=0, I=0)),      # one substitution
    ("今天天气很好", "今天气很好", dict(C=5, S=0, D=1, I=0)),         # one deletion
    ("今天天气很好", "今天天气很好啊", dict(C=6, S=0, D=0, I=1)),      # one insertion
    ("ABCD", "XAB", dict(C=2, S=0, D=2, I=1)),                       # X inserted, C D deleted
    ("", "你好", dict(C=0, S=0, D=0, I=2)),
    ("你好", "", dict(C=0, S=0, D=2, I=0)),
])
def test_hand_computed_counts(ref, hyp, expected):
    assert counts(ref, hyp) == expected


def test_alignment_ops_and_positions():
    ops = compute_cer.align(list("ABCD"), list("ABXD"))
    assert ops == [("C", "A", "A"), ("C", "B", "B"), ("S", "C", "X"), ("C", "D", "D")]
    ops = compute_cer.align(list("ABCD"), list("ACD"))
    assert ops == [("C", "A", "A"), ("D", "B", ""), ("C", "C", "C"), ("C", "D", "D")]


def test_errors_equal_edit_distance_on_random_strings():
    import random
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("甲乙丙丁") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("甲乙丙丁") for _ in range(rng.randint(0, 9)))
        c = counts(a, b)
        assert c["S"] + c["D"] + c["I"] == edit_distance(a, b)
        assert c["C"] + c["S"] + c["D"] == len(a)
        assert c["C"] + c["S"] + c["I"] == len(b)


def test_char_tokenization_keeps_latin_words():
    assert compute_cer.tokenize("我爱 hello world 你", char=True) == ["我", "爱", "HELLO", "WORLD", "你"]
    assert compute_cer.tokenize("a b  c", char=False) == ["A", "B", "C"]


def test_cli_summary_and_detail(tmp_path):
    ref = tmp_path / "ref"
    hyp = tmp_path / "hyp"
    ref.write_text("u1 今天天气很好\nu2 你好世界\nu3 再见\n", encoding="utf-8")
    # u1: 1 S; u2: 1 D + 1 I; u3 missing -> 2 D
    hyp.write_text("u1 今天天汽很好\nu2 你世界啊\n", encoding="utf-8")
    out = subprocess.run([sys.executable, TOOL, "--char=1", "--v=1", str(ref), str(hyp)],
                         capture_output=True, text=True, check=True).stdout
    # N = 6 + 4 + 2 = 12; errors = 1 + 2 + 2 = 5 -> 41.67 %
    assert "Overall -> 41.67 % N=12 C=8 S=1 D=3 I=1" in out
    assert "utt: u1" in out and "WER: 16.67 % N=6 C=5 S=1 D=0 I=0" in out
    assert "Missing hypotheses: 1" in out


def test_cli_errors_name_the_file(tmp_path):
    ref = tmp_path / "ref"
    hyp = tmp_path / "hyp"
    ref.write_text("u1 好\n", encoding="utf-8")
    hyp.write_text("zz 好\n", encoding="utf-8")
    r = subprocess.run([sys.executable, TOOL, "--char=1", str(ref), str(hyp)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "hyp" in r.stderr and "no reference" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, TOOL, str(tmp_path / "nope"), str(hyp)], capture_output=True, text=True)
    assert r.returncode == 1 and "nope: no such file" in r.stderr
    ref.write_text("u1 好\nu1 坏\n", encoding="utf-8")
    r = subprocess.run([sys.executable, TOOL, str(ref), str(hyp)], capture_output=True, text=True)
    assert r.returncode == 1 and "ref:2" in r.stderr
