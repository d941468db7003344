"""Tokenizers: text <-> token ids, through the runtime's `SymbolTable`.

`tokenizer: char` (Mandarin): every CJK character is one unit. Latin words
inside the text are uppercased and then, with `tokenizer_conf.bpe_path`, split
into that sentencepiece model's pieces (`▁HE`, `LLO`); without a BPE model each
Latin word is one whole-word unit (`HELLO`), `<unk>` when it is not in
`units.txt`. Digits belong to Latin words; other characters (punctuation) are
single-character units. `split_with_space: true` instead makes every
space-separated word a unit. Symbols listed in `non_lang_syms_path` (e.g.
`<noise>`, `[laughter]`) are kept whole.

`tokenizer: bpe`: the sentencepiece model splits the text as it is (no case
change); its pieces are looked up in `units.txt`.

Detokenisation is `SymbolTable.detokenize` (runtime), shared with the server.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from wenet_moe.config import ConfigError, check_keys
from wenet_moe_runtime.symbols import SymbolTable, is_cjk, is_word_char

TOKENIZER_KEYS = ("symbol_table_path", "split_with_space", "bpe_path", "non_lang_syms_path",
                  "is_multilingual", "num_languages", "special_tokens")


def read_non_lang_syms(path: Optional[str]) -> List[str]:
    """One symbol per line; blank lines ignored; errors name the file."""
    if not path:
        return []
    try:
        with open(path, "r", encoding="utf-8") as f:
            syms = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read non_lang_syms: {e.strerror}") from None
    for i, s in enumerate(syms, 1):
        if " " in s or "\t" in s:
            raise ConfigError(f"{path}:{i}: a non-language symbol must not hold whitespace: '{s}'")
    return syms


def load_sentencepiece(path: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{path}: cannot load sentencepiece model: {str(e).splitlines()[0]}") from None
    if ok is False:
        raise ConfigError(f"{path}: cannot load sentencepiece model")
    return sp


class Tokenizer:
    """Common part: id lookup and detokenisation through the symbol table."""

    def __init__(self, symbol_table: SymbolTable, non_lang_syms: Sequence[str] = ()):
        self.symbol_table = symbol_table
        self.non_lang_syms = list(non_lang_syms)
        self._nls_re = (re.compile("(" + "|".join(re.escape(s) for s in
                                                   sorted(self.non_lang_syms, key=len, reverse=True)) + ")")
                        if self.non_lang_syms else None)

    def _segments(self, text: str) -> List[Tuple[bool, str]]:
        """Split text into (is_non_lang_sym, piece)."""
        if self._nls_re is None:
            return [(False, text)]
        out = []
        for i, part in enumerate(self._nls_re.split(text)):
            if part:
                out.append((i % 2 == 1, part))
        return out

    def text2tokens(self, text: str) -> List[str]:
        raise NotImplementedError

    def tokens2ids(self, tokens: Sequence[str]) -> List[int]:
        """Ids of `tokens`; unknown tokens map to `<unk>` (ValueError without one)."""
        unk = self.symbol_table.unk_id
        ids = []
        for t in tokens:
            i = self.symbol_table.get(t)
            if i is None:
                if unk < 0:
                    raise ValueError(f"token '{t}' is not in the symbol table, which has no <unk>")
                i = unk
            ids.append(i)
        return ids

    def tokenize(self, text: str) -> Tuple[List[str], List[int]]:
        """text -> (tokens, ids)."""
        tokens = self.text2tokens(text)
        return tokens, self.tokens2ids(tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.symbol_table.detokenize(ids)

    def vocab_size(self) -> int:
        return len(self.symbol_table)


class CharTokenizer(Tokenizer):
    """Mandarin characters as units; Latin words as BPE pieces or whole words."""

    def __init__(self, symbol_table: SymbolTable, non_lang_syms: Sequence[str] = (),
                 split_with_space: bool = False, bpe_model=None):
        super().__init__(symbol_table, non_lang_syms)
        self.split_with_space = bool(split_with_space)
        self.bpe_model = bpe_model

    def _latin_word(self, word: str) -> List[str]:
        word = word.upper()
        if self.bpe_model is None:
            return [word]
        return [p for p in self.bpe_model.EncodeAsPieces(word) if p]

    def text2tokens(self, text: str) -> List[str]:
        tokens: List[str] = []
        for is_nls, part in self._segments(text):
            if is_nls:
                tokens.append(part)
            elif self.split_with_space:
                tokens.extend(part.split())
            else:
                word = ""
                for ch in part:
                    if is_word_char(ch):
                        word += ch
                        continue
                    if word:
                        tokens.extend(self._latin_word(word))
                        word = ""
                    if not ch.isspace():
                        tokens.append(ch)
                if word:
                    tokens.extend(self._latin_word(word))
        return tokens


class BpeTokenizer(Tokenizer):
    """sentencepiece pieces looked up in the symbol table."""

    def __init__(self, symbol_table: SymbolTable, bpe_model, non_lang_syms: Sequence[str] = ()):
        super().__init__(symbol_table, non_lang_syms)
        self.bpe_model = bpe_model

    def text2tokens(self, text: str) -> List[str]:
        tokens: List[str] = []
        for is_nls, part in self._segments(text):
            if is_nls:
                tokens.append(part)
            elif part.strip():
                tokens.extend(p for p in self.bpe_model.EncodeAsPieces(part.strip()) if p)
        return tokens


def _check_special_tokens(table: SymbolTable, special: Dict[str, Any]) -> None:
    expected = {"<blank>": table.blank_id, "<unk>": table.unk_id,
                "<sos>": table.sos_eos_id, "<eos>": table.sos_eos_id, "<sos/eos>": table.sos_eos_id}
    for name, idx in special.items():
        want = expected.get(name, table.get(name, -1))
        if int(idx) != want:
            raise ConfigError(f"tokenizer_conf.special_tokens.{name}: {idx} disagrees with the "
                              f"symbol table ({name} is {want})")


def build_tokenizer(configs: Dict[str, Any]) -> Tokenizer:
    """Tokenizer from `configs['tokenizer']` (char | bpe) and `configs['tokenizer_conf']`."""
    kind = configs.get("tokenizer", "char")
    conf = dict(configs.get("tokenizer_conf") or {})
    check_keys(conf, TOKENIZER_KEYS, "tokenizer_conf")
    if kind not in ("char", "bpe"):
        raise ConfigError(f"tokenizer: '{kind}' is not supported (char | bpe)")
    if conf.get("is_multilingual", False) or int(conf.get("num_languages", 1) or 1) != 1:
        raise ConfigError("tokenizer_conf.is_multilingual: multilingual tokenizers are not supported")
    path = conf.get("symbol_table_path")
    if not path:
        raise ConfigError("tokenizer_conf.symbol_table_path is required")
    try:
        table = SymbolTable.read(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if conf.get("special_tokens"):
        _check_special_tokens(table, conf["special_tokens"])
    nls = read_non_lang_syms(conf.get("non_lang_syms_path"))
    bpe_path = conf.get("bpe_path")
    if kind == "bpe":
        if not bpe_path:
            raise ConfigError("tokenizer_conf.bpe_path is required for tokenizer: bpe")
        if conf.get("split_with_space"):
            raise ConfigError("tokenizer_conf.split_with_space applies to tokenizer: char only")
        return BpeTokenizer(table, load_sentencepiece(bpe_path), nls)
    sp = load_sentencepiece(bpe_path) if bpe_path else None
    return CharTokenizer(table, nls, bool(conf.get("split_with_space", False)), sp)


__all__ = ["Tokenizer", "CharTokenizer", "BpeTokenizer", "build_tokenizer", "is_cjk"]
