"""tool_util.read_transcripts: the one transcript reader of the tools (make_hotwords,
train_bpe, train_ngram_lm), its two policies for a key without text, and its errors."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from tool_util import ToolError, read_transcripts  # noqa: E402


def test_keys_blank_lines_and_empty_transcripts(tmp_path):
    path = tmp_path / "text"
    path.write_text("u1  你好 世界 \n\n   \nu2\nu3 a  b\n", encoding="utf-8")
    assert read_transcripts(str(path), has_key=True) == ["你好 世界", "a  b"]
    assert read_transcripts(str(path), has_key=False) == ["u1  你好 世界", "u2", "u3 a  b"]
    with pytest.raises(ToolError, match=r"text:4: expected 'key transcript', got 'u2'"):
        read_transcripts(str(path), has_key=True, keyed_without_text="error")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ToolError, match="none: no such file"):
        read_transcripts(str(tmp_path / "none"), has_key=True)
    bad = tmp_path / "latin1"
    bad.write_bytes("k caf\xe9\n".encode("latin-1"))
    with pytest.raises(ToolError, match="latin1: not UTF-8 text"):
        read_transcripts(str(bad), has_key=True)
    with pytest.raises(ValueError, match="keyed_without_text"):
        read_transcripts(str(bad), has_key=True, keyed_without_text="keep")
