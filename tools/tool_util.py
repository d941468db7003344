"""Small helpers shared by the Kaldi-style tools: key/value files and atomic output."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator, List, Tuple


class ToolError(ValueError):
    """Bad input; the message names the file and line."""


def read_key_value(path: str, allow_empty_value: bool = False) -> List[Tuple[str, str]]:
    """`key value...` lines of a Kaldi-style file (blank lines ignored).

    Raises ToolError naming the file and line for a line without a value or a
    repeated key.
    """
    if not os.path.isfile(path):
        raise ToolError(f"{path}: no such file")
    rows, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) < 2 and not allow_empty_value:
                raise ToolError(f"{path}:{lineno}: expected 'key value', got {line.strip()!r}")
            key = parts[0]
            if key in seen:
                raise ToolError(f"{path}:{lineno}: key {key!r} repeats line {seen[key]}")
            seen[key] = lineno
            rows.append((key, parts[1].strip() if len(parts) > 1 else ""))
    return rows


def read_transcripts(path: str, has_key: bool, keyed_without_text: str = "skip") -> List[str]:
    """The text of each non-blank line of a transcript file (stripped); with `has_key`
    (Kaldi `text`) the text after the first field. A keyed line without text is left
    out (`keyed_without_text="skip"`, an utterance with an empty transcript) or raises
    ToolError naming the file and line ("error"). Raises ToolError for a missing or
    non-UTF-8 file."""
    if keyed_without_text not in ("skip", "error"):
        raise ValueError(f"keyed_without_text: 'skip' or 'error', got {keyed_without_text!r}")
    if not os.path.isfile(path):
        raise ToolError(f"{path}: no such file")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if has_key:
                    parts = line.split(maxsplit=1)
                    if len(parts) < 2:
                        if keyed_without_text == "error":
                            raise ToolError(f"{path}:{lineno}: expected 'key transcript', got '{line}'")
                        continue
                    line = parts[1]
                out.append(line)
    except UnicodeDecodeError as e:
        raise ToolError(f"{path}: not UTF-8 text ({e.reason})") from None
    return out


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w") -> Iterator:
    """Open a temporary file beside `path`; rename it to `path` on success only."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_tool(main, prog: str) -> None:
    """Run `main()`; a ToolError/ValueError/OSError becomes a one-line message and exit 1."""
    try:
        rc = main()
    except (ToolError, ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(int(rc or 0))
