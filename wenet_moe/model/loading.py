"""Loading a trained model from its resolved `train.yaml` and a checkpoint.

One place for what `export`, `transcribe` and other consumers of a training
directory need: path resolution of the symbol table and CMVN file, building the
model with the checkpoint's weights, and the evaluation feature options.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch

from wenet_moe.config import ConfigError, load_yaml


def _find(path: Optional[str], config_dir: str) -> Optional[str]:
    """`path` as given if it exists, else the file of that name beside the config."""
    if not path:
        return None
    if os.path.exists(path):
        return path
    beside = os.path.join(config_dir, os.path.basename(path))
    return beside if os.path.exists(beside) else None


def load_configs(config_path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(configs as written, configs with file paths resolved) of a train.yaml.

    Relative paths that do not exist from the current directory (symbol table, CMVN)
    are looked up by file name beside the config. The symbol table must exist; a
    missing CMVN file becomes `cmvn_file: None`, and `build_and_load` then takes the
    statistics from the checkpoint's buffers.
    """
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path}: config file not found")
    raw = load_yaml(config_path)
    configs = copy.deepcopy(raw)
    config_dir = os.path.dirname(os.path.abspath(config_path))
    tok = dict(configs.get("tokenizer_conf") or {})
    units = _find(tok.get("symbol_table_path"), config_dir) or _find("units.txt", config_dir)
    if units is None:
        raise ConfigError(f"{config_path}: tokenizer_conf.symbol_table_path "
                          f"{tok.get('symbol_table_path')!r} not found (nor units.txt beside it)")
    tok["symbol_table_path"] = units
    configs["tokenizer_conf"] = tok
    cmvn = dict(configs.get("cmvn_conf") or {})
    if cmvn.get("cmvn_file"):
        cmvn["cmvn_file"] = _find(cmvn["cmvn_file"], config_dir)
        configs["cmvn_conf"] = cmvn
    for key in ("input_dim", "output_dim"):
        if not isinstance(configs.get(key), int):
            raise ConfigError(f"{config_path}: '{key}' missing (a resolved train.yaml, as "
                              f"written by `wenet-moe train`, is needed)")
    return raw, configs


def has_moe_layers(configs: Dict[str, Any]) -> bool:
    """True when the encoder or the decoder of `configs` has MoE FFNs (mlp_type moe)."""
    return any((configs.get(part) or {}).get("mlp_type") == "moe" for part in ("encoder_conf", "decoder_conf"))


def with_expert_precision(configs: Dict[str, Any], precision: Optional[str]) -> Dict[str, Any]:
    """`configs` with `moe_conf.expert_precision` = `precision` (a decode-time choice:
    the packed experts' weights, and rows for w8a8; the parameters are unchanged), or
    `configs` itself for None. ConfigError (one line) for an unknown value or a model
    without MoE layers."""
    if precision is None:
        return configs
    from wenet_moe.layers.moe_router import EXPERT_PRECISIONS
    if precision not in EXPERT_PRECISIONS:
        raise ConfigError(f"--expert_precision: expected one of {', '.join(EXPERT_PRECISIONS)}, "
                          f"got {precision!r}")
    if not has_moe_layers(configs):
        raise ConfigError(f"--expert_precision {precision}: the model has no MoE layers "
                          f"(encoder_conf / decoder_conf mlp_type is not moe)")
    configs = copy.deepcopy(configs)
    configs["moe_conf"] = dict(configs.get("moe_conf") or {}, expert_precision=precision)
    return configs


def build_and_load(configs: Dict[str, Any], checkpoint: str) -> torch.nn.Module:
    """The ASRModel of `configs` with the weights of `checkpoint`, in eval mode, CPU fp32."""
    from wenet_moe.model import build_model
    from wenet_moe.checkpoint_io import load_model_weights

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    configs = copy.deepcopy(configs)
    cmvn = dict(configs.get("cmvn_conf") or {})
    placeholder = None
    if configs.get("cmvn") is not None and "cmvn_file" in cmvn and cmvn["cmvn_file"] is None:
        # statistics are restored from the checkpoint's buffers below
        fd, placeholder = tempfile.mkstemp(suffix=".json")
        dim = int(configs["input_dim"])
        with os.fdopen(fd, "w") as f:
            json.dump({"mean_stat": [0.0] * dim, "var_stat": [1.0] * dim, "frame_num": 1}, f)
        cmvn.update({"cmvn_file": placeholder, "is_json_cmvn": True})
        configs["cmvn_conf"] = cmvn
    try:
        model = build_model(configs)
    finally:
        if placeholder:
            os.unlink(placeholder)
    load_model_weights(model, checkpoint)
    return model.float().eval()


def eval_fbank_options(configs: Dict[str, Any]):
    """The runtime `FbankOptions` the model was trained with, dither 0 (evaluation)."""
    from wenet_moe.data.features import fbank_options

    ds = configs.get("dataset_conf") or {}
    rate = int((ds.get("resample_conf") or {}).get("resample_rate", 16000))
    opts = fbank_options(ds.get("fbank_conf"), sample_rate=rate)
    opts.dither = 0.0
    return opts
