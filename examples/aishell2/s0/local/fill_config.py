#!/usr/bin/env python3
"""Copy a training YAML with some keys set (the recipe fills in data paths).

    fill_config.py IN.yaml OUT.yaml [--model_from MODEL.yaml] key.sub=value ...

`--model_from` replaces the model-defining blocks of IN (encoder, decoder, ctc, cmvn,
model, tokenizer and their *_conf except model_conf, moe_conf,
dataset_conf.fbank_conf and resample_conf) by those of MODEL.yaml (e.g. the
train.yaml of `wenet-moe upcycle`), keeping IN's training settings (model_conf's
loss weights included). Values are parsed as YAML (`true`, `16`, `null`, `[1, 2]`); dotted keys create
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


MODEL_BLOCKS = ("encoder", "encoder_conf", "decoder", "decoder_conf", "ctc", "ctc_conf", "cmvn",
                "cmvn_conf", "model", "moe_conf", "tokenizer", "tokenizer_conf")


def take_model(conf: dict, model: dict) -> None:
    """Model-defining blocks of `model` replace those of `conf` (see the docstring)."""
    for key in MODEL_BLOCKS:
        conf.pop(key, None)
        if key in model:
            conf[key] = model[key]
    ds = dict(conf.get("dataset_conf") or {})
    for key in ("fbank_conf", "resample_conf"):
        ds.pop(key, None)
        if key in (model.get("dataset_conf") or {}):
            ds[key] = model["dataset_conf"][key]
    conf["dataset_conf"] = ds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="input YAML")
    p.add_argument("output", nargs="?", default="", help="output YAML")
    p.add_argument("assignments", nargs="*", help="key.sub=value")
    p.add_argument("--get", default="", help="print the value of this dotted key and exit")
    p.add_argument("--model_from", default="", help="take the model blocks from this YAML")
    a = p.parse_intermixed_args(argv)
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
        if a.model_from:
            with open(a.model_from, encoding="utf-8") as f:
                take_model(conf, yaml.safe_load(f) or {})
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
