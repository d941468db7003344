"""Tiny U2++ configs (dense and every MoE router) and a written train.yaml +
checkpoint, shared by the export tests (no tests of its own)."""
import copy
import os

import torch

from wenet_moe.config import save_yaml
from wenet_moe.model import build_model

FEAT = 20
UNITS = ["<blank>", "<unk>", "<sos/eos>"] + list("abcdefgh")
ROUTERS = ["dense", "topk", "switch", "speechmoe", "omni"]


def write_units(path):
    with open(path, "w", encoding="utf-8") as f:
        for i, sym in enumerate(UNITS):
            f.write(f"{sym} {i}\n")
    return path


def tiny_config(router="topk", units_path="units.txt", num_blocks=2, output_size=16,
                linear_units=24, n_expert=4):
    """Resolved-train.yaml-like dict for a tiny causal Conformer + bitransformer."""
    mlp = "position_wise_feed_forward" if router == "dense" else "moe"
    k = 1 if router == "switch" else 2
    enc = {"output_size": output_size, "attention_heads": 2, "linear_units": linear_units,
           "num_blocks": num_blocks, "cnn_module_kernel": 4, "causal": True,
           "use_dynamic_chunk": True, "cnn_module_norm": "layer_norm", "input_layer": "conv2d",
           "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0,
           "mlp_type": mlp}
    dec = {"attention_heads": 2, "linear_units": linear_units, "num_blocks": 1,
           "r_num_blocks": 1, "dropout_rate": 0.0, "positional_dropout_rate": 0.0,
           "self_attention_dropout_rate": 0.0, "src_attention_dropout_rate": 0.0,
           "mlp_type": mlp}
    if mlp == "moe":
        for block in (enc, dec):
            block.update({"n_expert": n_expert, "n_expert_activated": k})
    conf = {
        "input_dim": FEAT, "output_dim": len(UNITS),
        "encoder": "conformer", "encoder_conf": enc,
        "decoder": "bitransformer", "decoder_conf": dec,
        "ctc": "ctc", "ctc_conf": {"ctc_blank_id": 0},
        "model": "asr_model",
        "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3, "lsm_weight": 0.0,
                       "length_normalized_loss": False},
        "tokenizer": "char",
        "tokenizer_conf": {"symbol_table_path": units_path, "split_with_space": False,
                           "special_tokens": {"<blank>": 0, "<unk>": 1, "<sos>": 2, "<eos>": 2}},
        "dataset_conf": {"fbank_conf": {"num_mel_bins": FEAT, "frame_shift": 10,
                                        "frame_length": 25, "dither": 0.0}},
    }
    if mlp == "moe":
        conf["moe_conf"] = {"router": router}
    return conf


def randomize(model, seed=0):
    """Non-trivial norms and biases so that eval-mode layers are not identities."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
    return model


def tiny_model(router="topk", seed=0, **kw):
    torch.manual_seed(seed)
    conf = tiny_config(router, **kw)
    return randomize(build_model(copy.deepcopy(conf)).eval(), seed), conf


def write_model_dir(tmp_path, router="topk", seed=0, model=None, **kw):
    """tmp_path/model with units.txt, train.yaml and 0.pt; returns (dir, model, conf)."""
    d = os.path.join(str(tmp_path), "model")
    os.makedirs(d, exist_ok=True)
    units = write_units(os.path.join(d, "units.txt"))
    conf = tiny_config(router, units_path=units, **kw)
    if model is None:
        torch.manual_seed(seed)
        model = randomize(build_model(copy.deepcopy(conf)).eval(), seed)
    save_yaml(conf, os.path.join(d, "train.yaml"))
    torch.save({"model": model.state_dict()}, os.path.join(d, "0.pt"))
    return d, model, conf
