"""make_hotwords.py: phrases of test sentences absent from the training text, a
deterministic choice, one-line errors; cer_table.py --lm reads the stage 8-9 dirs."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_hotwords  # noqa: E402


def test_phrases_absent_from_training_text_in_order(tmp_path, capsys):
    (tmp_path / "train").write_text("k1 你好世界\nk2 语音 识别\n", encoding="utf-8")
    (tmp_path / "test").write_text("t1 你好世界语\nt2 识别语音好\nt3 世界你好\nt4 好世界语音\n",
                                   encoding="utf-8")
    out = tmp_path / "hot.txt"
    args = ["--test", str(tmp_path / "test"), "--train", str(tmp_path / "train"),
            "--has_key", "--length", "3", "--out", str(out)]
    assert make_hotwords.main(args + ["--num", "10"]) == 0
    # t1: 你好世, 好世界 are in the training text, 世界语 is not; t2: 识别语 is not
    # (the training sentence 语音 识别 reads 语音识别 without its space);
    # t3: 世界你 is not; t4: 好世界 is, 世界语 is taken, 界语音 is not.
    assert out.read_text(encoding="utf-8").split() == ["世界语", "识别语", "世界你", "界语音"]
    # --num 2 over 4 sentences: every second one (t1, t3)
    assert make_hotwords.main(args + ["--num", "2"]) == 0
    assert out.read_text(encoding="utf-8").split() == ["世界语", "世界你"]
    assert make_hotwords.main(["--test", str(tmp_path / "none"), "--train", str(tmp_path / "train"),
                               "--out", str(out)]) == 1
    assert f"{tmp_path / 'none'}: no such file" in capsys.readouterr().err
    assert make_hotwords.main(args + ["--length", "9"]) == 1
    assert "no 9-character phrase absent from" in capsys.readouterr().err


def test_cer_table_lm(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "examples", "aishell2", "s0", "local"))
    import cer_table
    exp = tmp_path / "exp"
    for sub, mode, cer in (("decode_dev_full", "attention_rescoring", 6.7),
                           ("decode_dev_full_lm", "ctc_wfst", 5.1),
                           ("decode_test_full_lm", "ctc_wfst", 7.25),
                           ("decode_test_full_lm_hotwords", "ctc_wfst_rescoring", 3.0)):
        (exp / sub / mode).mkdir(parents=True)
        (exp / sub / mode / "wer").write_text(f"Overall -> {cer:.2f} % N=100 C=1 S=0 D=0 I=0\n")
    assert cer_table.main([str(exp), "--lm", "full"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| decoding | mode | dev | test |" in lines
    assert "| without LM | attention_rescoring | 6.70 | - |" in lines
    assert "| with LM | ctc_wfst | 5.10 | 7.25 |" in lines
    assert "| LM + hotwords | ctc_wfst_rescoring | - | 3.00 |" in lines
    assert not any("hotwords | ctc_prefix" in ln for ln in lines)
    assert cer_table.main([str(exp), "--lm", "chunk16"]) == 1
    assert "no decode_*_chunk16_lm" in capsys.readouterr().err
