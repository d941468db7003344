"""Fixtures for the data tests (helpers live in data_corpus.py)."""
import pytest

from data_corpus import write_units


@pytest.fixture
def units(tmp_path):
    return write_units(tmp_path / "units.txt")


@pytest.fixture
def char_tokenizer(units):
    from wenet_moe.data import build_tokenizer
    return build_tokenizer({"tokenizer": "char", "tokenizer_conf": {"symbol_table_path": units}})
