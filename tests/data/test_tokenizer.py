"""Tokenizers (char, bpe, mixed Mandarin/English) and tools/train_bpe.py."""
import os
import random
import subprocess
import sys

import pytest

from wenet_moe.config import ConfigError
from wenet_moe.data import build_tokenizer
from wenet_moe_runtime.symbols import SymbolTable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_BPE = os.path.join(ROOT, "tools", "train_bpe.py")
WORDS = "hello world python speech model data train test open source deep learning".split()
HANZI = "我们今天用写代码训练模型数据语音识别很好的"


def _units(tmp_path, syms, name="units.txt"):
    SymbolTable(["<blank>", "<unk>"] + syms + ["<sos/eos>"]).write(str(tmp_path / name))
    return str(tmp_path / name)


def _char(tmp_path, syms, **conf):
    return build_tokenizer({"tokenizer": "char",
                            "tokenizer_conf": dict(symbol_table_path=_units(tmp_path, syms), **conf)})


def test_char_round_trip_mandarin(tmp_path):
    tok = _char(tmp_path, list("今天气很好"))
    tokens, ids = tok.tokenize("今天 天气很好")
    assert tokens == list("今天天气很好")
    assert ids == [tok.symbol_table.sym2id(c) for c in "今天天气很好"]
    assert tok.detokenize(ids) == "今天天气很好"
    assert tok.vocab_size() == 2 + 5 + 1  # 天 once


def test_char_whole_english_words_uppercased(tmp_path):
    tok = _char(tmp_path, list("我用写代码") + ["PYTHON", "C++"])
    tokens, ids = tok.tokenize("我用python写代码, ok")
    assert tokens == ["我", "用", "PYTHON", "写", "代", "码", ",", "OK"]
    unk = tok.symbol_table.unk_id
    assert ids[2] == tok.symbol_table.sym2id("PYTHON") and ids[6] == unk and ids[7] == unk
    assert tok.detokenize(ids[:6]) == "我用PYTHON写代码"


def test_non_lang_syms_and_split_with_space(tmp_path):
    nls = tmp_path / "nls.txt"
    nls.write_text("<noise>\n[laughter]\n")
    tok = _char(tmp_path, list("你好") + ["<noise>", "[laughter]"], non_lang_syms_path=str(nls))
    assert tok.tokenize("你<noise>好[laughter]")[0] == ["你", "<noise>", "好", "[laughter]"]
    assert tok.detokenize(tok.tokenize("你<noise>好")[1]) == "你好"  # tags are not text
    sws = _char(tmp_path, ["AB", "CD"], split_with_space=True)
    assert sws.tokenize("AB CD  AB")[0] == ["AB", "CD", "AB"]


def _train_bpe(tmp_path, lines, vocab, *extra):
    text = tmp_path / "train.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix, units = str(tmp_path / "bpe"), str(tmp_path / "bpe_units.txt")
    r = subprocess.run([sys.executable, TRAIN_BPE, "--input", str(text), "--vocab_size", str(vocab),
                        "--model_prefix", prefix, "--units", units, *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return prefix + ".model", units


def test_bpe_round_trip(tmp_path):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS).upper() for _ in range(6)) for _ in range(200)]
    model, units = _train_bpe(tmp_path, lines, 60)
    table = SymbolTable.read(units)
    assert table.id2sym(0) == "<blank>" and table.id2sym(1) == "<unk>" and table.id2sym(len(table) - 1) == "<sos/eos>"
    tok = build_tokenizer({"tokenizer": "bpe", "tokenizer_conf": {"symbol_table_path": units, "bpe_path": model}})
    for sent in ["HELLO WORLD", "DEEP LEARNING MODEL", "OPEN SOURCE SPEECH DATA"]:
        tokens, ids = tok.tokenize(sent)
        assert all(i != table.unk_id for i in ids)
        assert "".join(tokens).replace("\u2581", " ").strip() == sent
        assert tok.detokenize(ids) == sent
    assert len(tok.tokenize("HELLO")[0]) < len("HELLO")  # merges happened


def test_mixed_mandarin_english_with_bpe(tmp_path):
    rng = random.Random(1)
    lines = ["".join(rng.choice(HANZI) for _ in range(4)) + " " + " ".join(rng.sample(WORDS, 2))
             + "".join(rng.choice(HANZI) for _ in range(3)) for _ in range(300)]
    model, units = _train_bpe(tmp_path, lines, 40, "--mixed")
    table = SymbolTable.read(units)
    assert all(ch in table for ch in HANZI)
    tok = build_tokenizer({"tokenizer": "char",
                           "tokenizer_conf": {"symbol_table_path": units, "bpe_path": model}})
    tokens, ids = tok.tokenize("我们用python写deep learning代码")
    assert tokens[:2] == ["我", "们"] and tokens[-2:] == ["代", "码"]
    assert any(t.startswith("\u2581") for t in tokens)  # Latin words became pieces
    assert table.unk_id not in ids
    assert tok.detokenize(ids) == "我们用PYTHON写DEEP LEARNING代码"


def test_train_bpe_errors(tmp_path):
    r = subprocess.run([sys.executable, TRAIN_BPE, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--vocab_size" in r.stdout
    r = subprocess.run([sys.executable, TRAIN_BPE, "--input", str(tmp_path / "none.txt"), "--vocab_size", "10",
                        "--model_prefix", str(tmp_path / "m"), "--units", str(tmp_path / "u.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "none.txt: no such file" in r.stderr
    (tmp_path / "t.txt").write_text("AB AB\n")
    r = subprocess.run([sys.executable, TRAIN_BPE, "--input", str(tmp_path / "t.txt"), "--vocab_size", "5000",
                        "--model_prefix", str(tmp_path / "m"), "--units", str(tmp_path / "u.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Vocabulary size too high" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]  # nothing half-written
    (tmp_path / "k.txt").write_text("utt1\n")
    r = subprocess.run([sys.executable, TRAIN_BPE, "--input", str(tmp_path / "k.txt"), "--has_key",
                        "--vocab_size", "5", "--model_prefix", str(tmp_path / "m"), "--units", str(tmp_path / "u.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "k.txt:1: expected 'key transcript'" in r.stderr


def test_config_errors(tmp_path):
    units = _units(tmp_path, list("你好"))
    with pytest.raises(ConfigError, match="tokenizer_conf.bpe_pth"):
        build_tokenizer({"tokenizer": "char", "tokenizer_conf": {"symbol_table_path": units, "bpe_pth": "x"}})
    with pytest.raises(ConfigError, match="tokenizer: 'whisper' is not supported"):
        build_tokenizer({"tokenizer": "whisper", "tokenizer_conf": {"symbol_table_path": units}})
    with pytest.raises(ConfigError, match="bpe_path is required"):
        build_tokenizer({"tokenizer": "bpe", "tokenizer_conf": {"symbol_table_path": units}})
    with pytest.raises(ConfigError, match="special_tokens.<sos>: 2 disagrees"):
        build_tokenizer({"tokenizer": "char", "tokenizer_conf": {
            "symbol_table_path": units, "special_tokens": {"<blank>": 0, "<unk>": 1, "<sos>": 2}}})
    ok = build_tokenizer({"tokenizer": "char", "tokenizer_conf": {
        "symbol_table_path": units, "special_tokens": {"<blank>": 0, "<unk>": 1, "<sos>": 4, "<eos>": 4}}})
    assert ok.vocab_size() == 5
    bad = tmp_path / "bad.txt"
    bad.write_text("<blank> 0\n<unk> x\n")
    with pytest.raises(ConfigError, match="bad.txt:2"):
        build_tokenizer({"tokenizer": "char", "tokenizer_conf": {"symbol_table_path": str(bad)}})
    with pytest.raises(ConfigError, match="nope.model: cannot load sentencepiece model"):
        build_tokenizer({"tokenizer": "bpe", "tokenizer_conf": {"symbol_table_path": units,
                                                                "bpe_path": str(tmp_path / "nope.model")}})


def test_no_unk_in_table_is_a_clear_error(tmp_path):
    SymbolTable(["<blank>", "你", "<sos/eos>"]).write(str(tmp_path / "u.txt"))
    tok = build_tokenizer({"tokenizer": "char", "tokenizer_conf": {"symbol_table_path": str(tmp_path / "u.txt")}})
    with pytest.raises(ValueError, match="token '好' is not in the symbol table"):
        tok.tokenize("你好")
