"""Configuration helpers: YAML loading and strict key checking.

Every `*_conf` block is checked against the keys its consumer accepts; an unknown
key is an error that names it (with a did-you-mean suggestion), never a silent default.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key or file."""


def check_keys(conf: Dict[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise ConfigError if `conf` has a key outside `allowed`.

    Args:
        conf: the mapping to check (e.g. `configs['encoder_conf']`).
        allowed: accepted key names.
        where: dotted location used in the message, e.g. "encoder_conf".
    """
    allowed = list(allowed)
    for key in conf:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown key '{where}.{key}'{extra}" if where else f"unknown key '{key}'{extra}")


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def save_yaml(data: Dict[str, Any], path: str) -> None:
    """Write YAML atomically (temporary name, then rename)."""
    import os
    import tempfile

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=".yaml", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, allow_unicode=True, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
