"""examples/aishell2/s0/local/fill_config.py: assignments and --model_from."""
import os
import subprocess
import sys

import yaml

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "aishell2", "s0", "local",
                      "fill_config.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


def test_model_from_takes_model_blocks_keeps_training(tmp_path):
    recipe = {"encoder": "conformer", "encoder_conf": {"output_size": 32, "mlp_type": "moe"},
              "model_conf": {"ctc_weight": 0.5}, "moe_conf": {"router": "switch"},
              "tokenizer_conf": {"symbol_table_path": "data/dict/units.txt"},
              "dataset_conf": {"fbank_conf": {"num_mel_bins": 40}, "batch_conf": {"batch_size": 8}},
              "max_epoch": 9, "optim": "adam"}
    model = {"encoder": "conformer", "encoder_conf": {"output_size": 64, "n_expert": 4},
             "model_conf": {"ctc_weight": 0.3}, "moe_conf": {"router": "topk"},
             "tokenizer_conf": {"symbol_table_path": "/m/units.txt"},
             "dataset_conf": {"fbank_conf": {"num_mel_bins": 80, "snip_edges": True}},
             "max_epoch": 1}
    yaml.safe_dump(recipe, open(tmp_path / "in.yaml", "w"))
    yaml.safe_dump(model, open(tmp_path / "model.yaml", "w"))
    r = run(tmp_path / "in.yaml", tmp_path / "out.yaml", "--model_from", tmp_path / "model.yaml",
            "cmvn_conf.cmvn_file=/m/global_cmvn")
    assert r.returncode == 0, r.stderr
    out = yaml.safe_load(open(tmp_path / "out.yaml"))
    assert out["encoder_conf"] == {"output_size": 64, "n_expert": 4}
    assert out["moe_conf"] == {"router": "topk"}
    assert out["tokenizer_conf"] == {"symbol_table_path": "/m/units.txt"}
    assert out["dataset_conf"] == {"fbank_conf": {"num_mel_bins": 80, "snip_edges": True},
                                   "batch_conf": {"batch_size": 8}}
    assert out["model_conf"] == {"ctc_weight": 0.5}          # training objective: the recipe's
    assert out["max_epoch"] == 9 and out["optim"] == "adam"
    assert out["cmvn_conf"] == {"cmvn_file": "/m/global_cmvn"}


def test_model_from_missing_file_is_one_line_error(tmp_path):
    yaml.safe_dump({"max_epoch": 1}, open(tmp_path / "in.yaml", "w"))
    r = run(tmp_path / "in.yaml", tmp_path / "out.yaml", "--model_from", tmp_path / "nope.yaml")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nope.yaml" in r.stderr
    assert not (tmp_path / "out.yaml").exists()
