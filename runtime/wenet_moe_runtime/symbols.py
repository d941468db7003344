"""Symbol table (`units.txt`) and detokenisation, shared by training and serving.

`units.txt` has one `symbol id` per line, ids 0..V-1 each exactly once;
`<blank> 0`, `<unk> 1`, ..., `<sos/eos>` last by convention.

Detokenisation rules (one place, so training-side decoding and the server agree):
- symbols written `<...>` (blank, unk, sos/eos, non-language tags) are dropped;
- in a table with BPE pieces (any symbol holding `▁`), `▁` becomes a space and
  nothing else adds spaces; otherwise two adjacent Latin/digit units (whole
  words such as `HELLO`) are separated by one space;
- spaces are collapsed and stripped, and never kept next to a CJK character,
  so Mandarin characters are written without spaces between them.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

BPE_SPACE = "\u2581"  # ▁

_CJK_RANGES = (
    (0x3040, 0x30FF),    # hiragana, katakana
    (0x3400, 0x4DBF),    # CJK ext A
    (0x4E00, 0x9FFF),    # CJK unified
    (0xAC00, 0xD7AF),    # hangul syllables
    (0xF900, 0xFAFF),    # CJK compatibility
    (0x20000, 0x2FA1F),  # CJK ext B.. and compatibility supplement
)


def is_cjk(ch: str) -> bool:
    """True for a Han/kana/hangul character (written without spaces)."""
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


def is_word_char(ch: str) -> bool:
    """True for a character of a Latin-script word (letters, digits, apostrophe)."""
    return (ch.isalnum() or ch == "'") and not is_cjk(ch)


_SPACES = re.compile(r"\s+")


def normalize_spaces(text: str) -> str:
    """Collapse whitespace, strip it, and drop spaces next to CJK characters."""
    text = _SPACES.sub(" ", text).strip()
    if " " not in text:
        return text
    out = []
    for i, ch in enumerate(text):
        if ch == " " and ((i > 0 and is_cjk(text[i - 1])) or (i + 1 < len(text) and is_cjk(text[i + 1]))):
            continue
        out.append(ch)
    return "".join(out)


def is_special(sym: str) -> bool:
    """Symbols written `<...>` are control/non-language units, never output text."""
    return len(sym) >= 3 and sym[0] == "<" and sym[-1] == ">"


class SymbolTable:
    """Bidirectional map between unit symbols and integer ids."""

    def __init__(self, symbols: Sequence[str]):
        """`symbols[i]` is the symbol of id i; symbols must be unique and non-empty."""
        self._id2sym: List[str] = list(symbols)
        self._sym2id: Dict[str, int] = {}
        for i, s in enumerate(self._id2sym):
            if not s or any(c.isspace() for c in s):
                raise ValueError(f"SymbolTable: symbol {i} '{s}' is empty or holds whitespace")
            if s in self._sym2id:
                raise ValueError(f"SymbolTable: symbol '{s}' appears twice (ids {self._sym2id[s]} and {i})")
            self._sym2id[s] = i
        if not self._id2sym:
            raise ValueError("SymbolTable: no symbols")
        self.is_bpe = any(BPE_SPACE in s for s in self._id2sym)
        self._special = [is_special(s) for s in self._id2sym]

    # ---- construction -------------------------------------------------
    @classmethod
    def read(cls, path: str) -> "SymbolTable":
        """Read `units.txt`; errors name `path:line`."""
        try:
            with open(path, "r", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ValueError(f"{path}: cannot read symbol table: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from e
        by_id: Dict[int, str] = {}
        seen: Dict[str, int] = {}
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'symbol id', got '{line.strip()}'")
            sym, sid = parts
            try:
                idx = int(sid)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: id '{sid}' is not an integer") from None
            if idx < 0:
                raise ValueError(f"{path}:{lineno}: negative id {idx}")
            if idx in by_id:
                raise ValueError(f"{path}:{lineno}: id {idx} already used by '{by_id[idx]}'")
            if sym in seen:
                raise ValueError(f"{path}:{lineno}: symbol '{sym}' already defined on line {seen[sym]}")
            by_id[idx] = sym
            seen[sym] = lineno
        if not by_id:
            raise ValueError(f"{path}: symbol table is empty")
        n = len(by_id)
        missing = [i for i in range(n) if i not in by_id]
        if missing:
            raise ValueError(f"{path}: ids must be 0..{n - 1} without gaps; id {missing[0]} is missing")
        return cls([by_id[i] for i in range(n)])

    def write(self, path: str) -> None:
        """Write `units.txt` atomically."""
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp.units.", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for i, s in enumerate(self._id2sym):
                    f.write(f"{s} {i}\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # ---- lookups --------------------------------------------------------
    def __len__(self) -> int:
        return len(self._id2sym)

    def __contains__(self, sym: str) -> bool:
        return sym in self._sym2id

    def id2sym(self, idx: int) -> str:
        return self._id2sym[idx]

    def sym2id(self, sym: str) -> int:
        """Id of `sym` (KeyError if absent)."""
        return self._sym2id[sym]

    def get(self, sym: str, default: Optional[int] = None) -> Optional[int]:
        return self._sym2id.get(sym, default)

    @property
    def symbols(self) -> List[str]:
        return list(self._id2sym)

    @property
    def blank_id(self) -> int:
        """Id of `<blank>` (0 if the table has none)."""
        return self._sym2id.get("<blank>", 0)

    @property
    def unk_id(self) -> int:
        """Id of `<unk>` (or `<UNK>`), -1 if the table has none."""
        return self._sym2id.get("<unk>", self._sym2id.get("<UNK>", -1))

    @property
    def sos_eos_id(self) -> int:
        """Id of `<sos/eos>` (or `<sos>`/`<eos>`); the last id if none (WeNet's rule)."""
        for s in ("<sos/eos>", "<sos>", "<eos>"):
            if s in self._sym2id:
                return self._sym2id[s]
        return len(self._id2sym) - 1

    # ---- text -----------------------------------------------------------
    def _pieces(self, ids: Iterable[int]) -> List[str]:
        out = []
        for i in ids:
            i = int(i)
            if i < 0 or i >= len(self._id2sym):
                raise IndexError(f"SymbolTable: id {i} outside 0..{len(self._id2sym) - 1}")
            if not self._special[i]:
                out.append(self._id2sym[i])
        return out

    def _join(self, pieces: List[str]) -> str:
        if self.is_bpe:
            return normalize_spaces("".join(pieces).replace(BPE_SPACE, " "))
        text = ""
        for p in pieces:
            if text and is_word_char(text[-1]) and is_word_char(p[0]):
                text += " "
            text += p
        return normalize_spaces(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of a token-id sequence (rules in the module docstring)."""
        return self._join(self._pieces(ids))

    def word_pieces(self, ids: Sequence[int], times_ms: Sequence[float]) -> List[Dict[str, object]]:
        """Words with times, as WeNet's server reports them.

        Args:
            ids: token ids (N,).
            times_ms: time of each token's CTC peak in ms (N,).
        Returns:
            [{"word", "start", "end"}] with integer ms. A token's span runs from the
            midpoint with the previous token's peak to the midpoint with the next
            (at most 100 ms either side of its peak at the edges). Consecutive
            BPE pieces of one word merge into that word; each CJK character, and
            each unit of a table without BPE pieces, is its own word.
        """
        if len(ids) != len(times_ms):
            raise ValueError(f"word_pieces: {len(ids)} ids but {len(times_ms)} times")
        toks = [(self._id2sym[int(i)], float(t)) for i, t in zip(ids, times_ms)
                if not self._special[int(i)]]
        n = len(toks)
        spans = []
        for k, (_, t) in enumerate(toks):
            start = max(0.0, t - 100.0) if k == 0 else max((toks[k - 1][1] + t) / 2, t - 100.0)
            end = t + 100.0 if k == n - 1 else min((t + toks[k + 1][1]) / 2, t + 100.0)
            spans.append((start, end))
        words: List[Dict[str, object]] = []
        cur: Optional[Dict[str, object]] = None
        for (sym, _), (start, end) in zip(toks, spans):
            if self.is_bpe:
                new_word = sym.startswith(BPE_SPACE) or is_cjk(sym[0]) or cur is None \
                    or is_cjk(str(cur["word"])[-1])
                text = sym.replace(BPE_SPACE, "")
            else:
                new_word = True
                text = sym
            if not text:
                cur = None  # a bare '▁': the next piece starts a word
                continue
            if new_word or cur is None:
                cur = {"word": text, "start": int(round(start)), "end": int(round(end))}
                words.append(cur)
            else:
                cur["word"] = str(cur["word"]) + text
                cur["end"] = int(round(end))
        return words
