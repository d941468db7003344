"""Loading train.yaml + checkpoint for export: paths beside the config, CMVN
statistics from the checkpoint when the CMVN file is gone, config hash."""
import json
import os

import numpy as np
import pytest
import torch

from export_tiny import tiny_config, write_units
from wenet_moe.config import ConfigError, save_yaml
from wenet_moe.export.common import build_and_load, config_hash, load_configs
from wenet_moe.model import build_model


def _model_dir(tmp_path):
    d = str(tmp_path)
    units = write_units(os.path.join(d, "units.txt"))
    rng = np.random.default_rng(0)
    frames = rng.normal(3.0, 2.0, (500, 20))
    cmvn = os.path.join(d, "global_cmvn")
    with open(cmvn, "w") as f:
        json.dump({"mean_stat": frames.sum(0).tolist(), "var_stat": (frames ** 2).sum(0).tolist(),
                   "frame_num": 500}, f)
    conf = tiny_config("topk", units_path="units.txt")
    conf.update(cmvn="global_cmvn", cmvn_conf={"cmvn_file": "global_cmvn", "is_json_cmvn": True})
    save_yaml(conf, os.path.join(d, "train.yaml"))
    resolved = dict(conf, tokenizer_conf=dict(conf["tokenizer_conf"], symbol_table_path=units),
                    cmvn_conf={"cmvn_file": cmvn, "is_json_cmvn": True})
    torch.manual_seed(0)
    model = build_model(resolved).eval()
    torch.save({"model": model.state_dict()}, os.path.join(d, "0.pt"))
    return d, model


def test_relative_paths_resolve_beside_config_and_cmvn_comes_from_checkpoint(tmp_path, monkeypatch):
    d, model = _model_dir(tmp_path)
    monkeypatch.chdir("/")  # relative paths in train.yaml do not exist from here
    os.unlink(os.path.join(d, "global_cmvn"))
    raw, configs = load_configs(os.path.join(d, "train.yaml"))
    assert raw["cmvn_conf"]["cmvn_file"] == "global_cmvn"
    assert configs["tokenizer_conf"]["symbol_table_path"] == os.path.join(d, "units.txt")
    loaded = build_and_load(configs, os.path.join(d, "0.pt"))
    x = torch.randn(1, 40, 20) * 2 + 3
    with torch.no_grad():
        want = model.encoder(x, torch.tensor([40]), -1, -1)[0]
        got = loaded.encoder(x, torch.tensor([40]), -1, -1)[0]
    assert torch.allclose(got, want, atol=1e-6)  # real CMVN statistics, not the placeholder


def test_missing_symbol_table_and_dims_are_named(tmp_path):
    d, _ = _model_dir(tmp_path)
    os.unlink(os.path.join(d, "units.txt"))
    with pytest.raises(ConfigError, match="symbol_table_path"):
        load_configs(os.path.join(d, "train.yaml"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_configs(os.path.join(d, "nothing.yaml"))


def test_config_hash_is_order_independent_and_content_sensitive():
    a = {"x": 1, "y": {"b": 2, "a": [1, 2]}}
    b = {"y": {"a": [1, 2], "b": 2}, "x": 1}
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 16
    assert config_hash(a) != config_hash({"x": 1, "y": {"b": 3, "a": [1, 2]}})
