"""The recipe configs: each builds, matches the dense active compute, and trains a step."""
import json
from pathlib import Path

import pytest
import torch

from wenet_moe.config import load_yaml
from wenet_moe.model import build_model

CONF_DIR = Path(__file__).resolve().parents[1] / "examples" / "aishell2" / "s0" / "conf"
CONFIGS = {
    "train_u2++_conformer.yaml": None,
    "train_u2++_moe.yaml": "topk",
    "train_switch.yaml": "switch",
    "train_speechmoe.yaml": "speechmoe",
    "train_omni.yaml": "omni",
}
AUX = {None: set(), "topk": set(), "switch": {"loss_balance"}, "omni": {"loss_balance"},
       "speechmoe": {"loss_sparsity", "loss_importance", "loss_embed_ctc"}}
VOCAB = 12
WENET_DATASET_KEYS = {"filter_conf", "resample_conf", "speed_perturb", "fbank_conf", "spec_aug",
                      "spec_aug_conf", "spec_sub", "spec_sub_conf", "spec_trim",
                      "spec_trim_conf", "shuffle", "shuffle_conf", "sort", "sort_conf",
                      "batch_conf"}


def load(name, tmp_path):
    """The config with input/output dims and a real CMVN file in tmp_path."""
    configs = load_yaml(str(CONF_DIR / name))
    assert configs["tokenizer_conf"]["symbol_table_path"] == "data/dict/units.txt"
    assert configs["cmvn_conf"]["cmvn_file"] == "data/train/global_cmvn"
    cmvn = tmp_path / "global_cmvn"
    cmvn.write_text(json.dumps({"mean_stat": [10.0] * 80, "var_stat": [120.0] * 80,
                                "frame_num": 10}))
    configs["cmvn_conf"]["cmvn_file"] = str(cmvn)
    configs["input_dim"] = 80
    configs["output_dim"] = VOCAB
    return configs


def shrink(configs):
    """Same keys and routing, small sizes (the test machine has 2 shared cores)."""
    enc, dec = configs["encoder_conf"], configs["decoder_conf"]
    enc.update(output_size=32, attention_heads=2, num_blocks=2,
               linear_units=enc["linear_units"] // 32)
    dec.update(attention_heads=2, num_blocks=1, r_num_blocks=1,
               linear_units=dec["linear_units"] // 32)
    if "moe_conf" in configs and configs["moe_conf"].get("router") == "speechmoe":
        configs["moe_conf"]["embed_dim"] = 8
    return configs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_keys_and_active_compute(name, tmp_path):
    configs = load(name, tmp_path)
    assert set(configs["dataset_conf"]) == WENET_DATASET_KEYS
    for block in ("encoder_conf", "decoder_conf"):
        conf = configs[block]
        k = conf.get("n_expert_activated", 1) if conf.get("mlp_type") == "moe" else 1
        assert k * conf["linear_units"] == 2048, f"{name}: {block} active hidden units"
    router = CONFIGS[name]
    if router is not None:
        assert configs["moe_conf"]["router"] == router
        assert configs["encoder_conf"]["n_expert"] == 8


def count_full_size(name, tmp_path):
    from wenet_moe.model.builder import count_parameters
    # build a small one first, so that every lazily imported module (and any tensor it
    # creates at import time) is imported outside the meta-device context
    build_model(shrink(load(name, tmp_path)))
    with torch.device("meta"):
        model = build_model(load(name, tmp_path))
    return count_parameters(model)


@pytest.mark.slow
def test_full_size_active_parameters_match_dense(tmp_path):
    """Built at full size on the meta device (no memory): every MoE config's active
    parameters per frame are the dense model's, up to its routers/embedding network."""
    dense_total, dense_active = count_full_size("train_u2++_conformer.yaml", tmp_path)
    assert dense_total == dense_active
    for name, router in CONFIGS.items():
        if router is None:
            continue
        total, active = count_full_size(name, tmp_path)
        assert total > 3 * dense_total, name
        assert dense_total <= active <= 1.03 * dense_total, (name, active, dense_total)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_builds_and_trains_one_step(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(shrink(load(name, tmp_path)))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    speech = torch.randn(2, 60, 80) * 3 + 10
    speech_lengths = torch.tensor([60, 45])
    text = torch.tensor([[3, 4, 5, 6], [7, 8, 9, -1]])
    text_lengths = torch.tensor([4, 3])
    out = model(speech, speech_lengths, text, text_lengths)
    router = CONFIGS[name]
    assert AUX[router] <= set(out), sorted(out)
    assert torch.isfinite(out["loss"])
    optimizer.zero_grad()
    out["loss"].backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert changed
    if router is not None:
        routers = [n for n, p in model.named_parameters() if "router" in n and p.grad is not None
                   and p.grad.abs().sum() > 0]
        assert routers, "no router received a gradient"
        loads = model.expert_load()
        assert loads and all(v.shape == (8,) for v in loads.values())
        if router == "omni":
            ids = {id(m.router) for n, m in model.named_modules() if hasattr(m, "router_kind")
                   and n.startswith("encoder")}
            assert len(ids) == 1


@pytest.mark.parametrize("name", ["train_u2++_moe.yaml", "train_speechmoe.yaml",
                                  "train_omni.yaml"])
def test_moe_encoder_scripts(name, tmp_path):
    """The whole MoE encoder passes torch.jit.script and matches eager."""
    torch.manual_seed(0)
    model = build_model(shrink(load(name, tmp_path))).eval()
    scripted = torch.jit.script(model.encoder)
    xs = torch.randn(2, 50, 80) * 3 + 10
    lens = torch.tensor([50, 33])
    with torch.no_grad():
        want, want_mask = model.encoder(xs, lens, -1)   # full context (0 = random chunk)
        got, got_mask = scripted(xs, lens, -1)
    assert torch.equal(got_mask, want_mask)
    assert torch.allclose(got, want, atol=1e-5)


def test_demo_dense_upcycles_to_the_demo_moe():
    """The upcycling evidence (local/upcycle_experiment.sh) compares at one architecture:
    `upcycle --n_expert 4 --n_expert_activated 2 --router topk` of the dense demo config
    is the demo MoE config, every key (training settings included)."""
    from wenet_moe.interop.upcycle import upcycle_config
    dense = load_yaml(str(CONF_DIR / "train_demo_dense.yaml"))
    moe = load_yaml(str(CONF_DIR / "train_demo_moe.yaml"))
    for block in ("encoder_conf", "decoder_conf"):
        assert dense[block].get("mlp_type", "position_wise_feed_forward") != "moe"
        assert dense[block]["linear_units"] == moe[block]["linear_units"]
    assert "moe_conf" not in dense
    assert upcycle_config(dense, 4, 2, "topk") == moe
