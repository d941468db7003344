"""`wenet-moe moe-heatmap`: loads accumulated over a data list, PNG written atomically."""
import json
import os

import numpy as np
import pytest
import soundfile
import torch

from wenet_moe.cli import main as cli_main
from wenet_moe.config import load_yaml, save_yaml

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "aishell2", "s0", "conf",
                    "train_u2++_moe.yaml")


@pytest.fixture()
def setup(tmp_path):
    """Tiny MoE model config + checkpoint + a 3-utterance raw data list."""
    units = tmp_path / "units.txt"
    units.write_text("<blank> 0\n<unk> 1\n<sos/eos> 2\na 3\nb 4\nc 5\n")
    cmvn = tmp_path / "global_cmvn"
    cmvn.write_text(json.dumps({"mean_stat": [5.0] * 80, "var_stat": [40.0] * 80, "frame_num": 1}))
    configs = load_yaml(CONF)
    configs["tokenizer_conf"]["symbol_table_path"] = str(units)
    configs["cmvn_conf"]["cmvn_file"] = str(cmvn)
    configs["encoder_conf"].update(output_size=16, attention_heads=2, num_blocks=2, linear_units=8)
    configs["decoder_conf"].update(attention_heads=2, num_blocks=1, r_num_blocks=1, linear_units=8)
    configs["input_dim"], configs["output_dim"] = 80, 6
    config_path = tmp_path / "train.yaml"
    save_yaml(configs, str(config_path))
    from wenet_moe.model import build_model
    torch.manual_seed(0)
    model = build_model(configs)
    ckpt = tmp_path / "0.pt"
    torch.save(model.state_dict(), str(ckpt))
    rng = np.random.default_rng(0)
    lines = []
    for i, (seconds, text) in enumerate([(0.6, "abc"), (0.9, "cab"), (0.4, "b")]):
        wav = tmp_path / f"u{i}.wav"
        soundfile.write(str(wav), (0.1 * rng.standard_normal(int(16000 * seconds))).astype("float32"),
                        16000, subtype="PCM_16")
        lines.append(json.dumps({"key": f"u{i}", "wav": str(wav), "txt": text}))
    data_list = tmp_path / "data.list"
    data_list.write_text("\n".join(lines) + "\n")
    return tmp_path, config_path, ckpt, data_list, model


def test_heatmap_command_writes_png(setup, capsys):
    tmp_path, config_path, ckpt, data_list, _ = setup
    out = tmp_path / "plots" / "heat.png"
    rc = cli_main(["moe-heatmap", "--config", str(config_path), "--checkpoint", str(ckpt),
                   "--data_type", "raw", "--test_data", str(data_list), "--output", str(out),
                   "--batch_size", "2"])
    assert rc == 0
    import matplotlib.image
    image = matplotlib.image.imread(str(out))
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert not [p for p in os.listdir(out.parent) if p.startswith(".heatmap.")]
    printed = capsys.readouterr().out
    # 2 encoder blocks x 2 FFNs (macaron) + 1 left + 1 right decoder FFN
    assert "(6 MoE layers)" in printed


def test_accumulated_loads_count_every_valid_frame(setup):
    from wenet_moe.bin.moe_heatmap import accumulate_loads
    from wenet_moe.bin.recognize import test_configs
    from wenet_moe.data import Dataset, build_tokenizer
    tmp_path, config_path, _, data_list, model = setup
    configs = test_configs(load_yaml(str(config_path)), 2)
    tokenizer = build_tokenizer(configs)
    model.eval()
    batches = list(Dataset("raw", str(data_list), tokenizer, configs["dataset_conf"],
                           partition=False))
    loads = accumulate_loads(model, batches)
    enc_frames = 0
    dec_steps = 0
    for batch in batches:
        _, mask = model.encoder(batch["feats"], batch["feats_lengths"], -1)
        enc_frames += int(mask.sum())
        dec_steps += int((batch["target_lengths"] + 1).sum())
    k = 2
    assert len(loads) == 6
    for name, counts in loads.items():
        want = enc_frames if name.startswith("encoder") else dec_steps
        assert int(counts.sum()) == k * want, name


def test_heatmap_bad_checkpoint_one_line_error(setup, capsys):
    tmp_path, config_path, _, data_list, _ = setup
    rc = cli_main(["moe-heatmap", "--config", str(config_path), "--checkpoint",
                   str(tmp_path / "missing.pt"), "--test_data", str(data_list),
                   "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "missing.pt" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()
