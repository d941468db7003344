#!/usr/bin/env python3
"""Copy a training YAML with some keys set (the recipe fills in data paths).

    fill_config.py IN.yaml OUT.yaml key.sub=value ...

Values are parsed as YAML (`true`, `16`, `null`, `[1, 2]`); dotted keys create
missing mappings. OUT is rewritten only when its content changes (so a rerun
leaves its mtime alone), atomically. Prints the value of a key with --get KEY.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml


def set_dotted(conf: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = conf
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ValueError(f"cannot set {dotted}: '{k}' is not a mapping")
        node = node[k]
    node[keys[-1]] = value


def get_dotted(conf: dict, dotted: str):
    node = conf
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            raise KeyError(dotted)
        node = node[k]
    return node


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="input YAML")
    p.add_argument("output", nargs="?", default="", help="output YAML")
    p.add_argument("assignments", nargs="*", help="key.sub=value")
    p.add_argument("--get", default="", help="print the value of this dotted key and exit")
    a = p.parse_args(argv)
    try:
        with open(a.config, encoding="utf-8") as f:
            conf = yaml.safe_load(f) or {}
        if a.get:
            try:
                v = get_dotted(conf, a.get)
            except KeyError:
                print("")
                return 0
            print("" if v is None else v)
            return 0
        if not a.output:
            raise ValueError("an output file is required")
        for item in a.assignments:
            if "=" not in item:
                raise ValueError(f"expected key=value, got {item!r}")
            key, value = item.split("=", 1)
            set_dotted(conf, key, yaml.safe_load(value) if value != "" else None)
        text = yaml.safe_dump(conf, allow_unicode=True, sort_keys=False)
        if os.path.isfile(a.output):
            with open(a.output, encoding="utf-8") as f:
                if f.read() == text:
                    return 0
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        tmp = a.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, a.output)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"fill_config.py: error: {a.config}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
