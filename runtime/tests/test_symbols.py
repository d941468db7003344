"""SymbolTable: reading units.txt, special ids, detokenisation, word pieces."""
import pytest

from wenet_moe_runtime.symbols import SymbolTable, is_cjk, normalize_spaces


def _write(tmp_path, text, name="units.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_read_and_special_ids(tmp_path):
    path = _write(tmp_path, "<blank> 0\n<unk> 1\n你 2\n好 3\n\n<sos/eos> 4\n")
    t = SymbolTable.read(path)
    assert len(t) == 5
    assert (t.blank_id, t.unk_id, t.sos_eos_id) == (0, 1, 4)
    assert t.id2sym(2) == "你" and t.sym2id("好") == 3 and "好" in t and t.get("x") is None
    t.write(str(tmp_path / "copy.txt"))
    assert SymbolTable.read(str(tmp_path / "copy.txt")).symbols == t.symbols


def test_ids_may_be_listed_out_of_order(tmp_path):
    t = SymbolTable.read(_write(tmp_path, "b 1\na 0\n"))
    assert t.symbols == ["a", "b"]
    assert t.blank_id == 0 and t.unk_id == -1 and t.sos_eos_id == 1  # WeNet: last id


@pytest.mark.parametrize("text,msg", [
    ("<blank> 0\n<unk>\n", "units.txt:2: expected 'symbol id'"),
    ("<blank> 0\n<unk> one\n", "units.txt:2: id 'one' is not an integer"),
    ("<blank> 0\n<unk> 0\n", "units.txt:2: id 0 already used by '<blank>'"),
    ("a 0\nb 1\na 2\n", "units.txt:3: symbol 'a' already defined on line 1"),
    ("a 0\nb 2\n", "id 1 is missing"),
    ("a 0\nb -1\n", "units.txt:2: negative id"),
    ("\n\n", "symbol table is empty"),
])
def test_read_errors_name_file_and_line(tmp_path, text, msg):
    with pytest.raises(ValueError, match=msg):
        SymbolTable.read(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.txt: cannot read symbol table"):
        SymbolTable.read(str(tmp_path / "nope.txt"))


def test_detokenize_char_table_with_whole_english_words():
    t = SymbolTable(["<blank>", "<unk>", "我", "爱", "HELLO", "WORLD", "A", "<noise>", "<sos/eos>"])
    ids = [t.sym2id(s) for s in ["我", "HELLO", "WORLD", "爱", "<noise>", "A", "<unk>", "我", "<sos/eos>"]]
    assert t.detokenize(ids) == "我HELLO WORLD爱A我"
    assert t.detokenize([]) == ""
    with pytest.raises(IndexError, match="id 99"):
        t.detokenize([99])


def test_detokenize_bpe_table():
    t = SymbolTable(["<blank>", "<unk>", "\u2581HE", "LLO", "\u2581WORLD", "\u2581", "S", "我", "们", "<sos/eos>"])
    assert t.is_bpe
    ids = [t.sym2id(s) for s in ["\u2581HE", "LLO", "\u2581WORLD", "\u2581", "S"]]
    assert t.detokenize(ids) == "HELLO WORLD S"
    mixed = [t.sym2id(s) for s in ["我", "\u2581HE", "LLO", "\u2581WORLD", "们", "我"]]
    assert t.detokenize(mixed) == "我HELLO WORLD们我"


def test_normalize_spaces_and_cjk():
    assert normalize_spaces("  我 们  HELLO   WORLD 你 ") == "我们HELLO WORLD你"
    assert is_cjk("我") and is_cjk("の") and not is_cjk("A") and not is_cjk("1")


def test_word_pieces_chars_get_midpoint_spans():
    t = SymbolTable(["<blank>", "<unk>", "你", "好", "<sos/eos>"])
    pieces = t.word_pieces([2, 3, 2], [400, 600, 1000])
    assert [p["word"] for p in pieces] == ["你", "好", "你"]
    assert [(p["start"], p["end"]) for p in pieces] == [(300, 500), (500, 700), (900, 1100)]


def test_word_pieces_merge_bpe_words():
    t = SymbolTable(["<blank>", "<unk>", "\u2581HE", "LLO", "\u2581WORLD", "我", "<sos/eos>"])
    ids = [5, 2, 3, 4]
    pieces = t.word_pieces(ids, [100, 300, 400, 700])
    assert pieces == [{"word": "我", "start": 0, "end": 200},
                      {"word": "HELLO", "start": 200, "end": 500},  # at most 100 ms past a peak
                      {"word": "WORLD", "start": 600, "end": 800}]
    with pytest.raises(ValueError, match="2 ids but 1 times"):
        t.word_pieces([2, 3], [0])


def test_word_pieces_drop_specials():
    t = SymbolTable(["<blank>", "<unk>", "好", "<sos/eos>"])
    assert [p["word"] for p in t.word_pieces([1, 2, 3], [0, 40, 80])] == ["好"]
