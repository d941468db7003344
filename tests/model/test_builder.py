"""build_model: key validation, registry, CMVN, special tokens, parameter counts."""
import copy
import json
import logging

import numpy as np
import pytest
import torch

from wenet_moe.config import ConfigError
from wenet_moe.model import ASRModel, build_model, count_parameters
from wenet_moe.model.decoder import BiTransformerDecoder, TransformerDecoder

BASE = {
    "input_dim": 8, "output_dim": 7,
    "encoder": "transformer",
    "encoder_conf": {"output_size": 8, "attention_heads": 2, "linear_units": 12,
                     "num_blocks": 1, "input_layer": "linear"},
    "decoder": "bitransformer",
    "decoder_conf": {"attention_heads": 2, "linear_units": 12, "num_blocks": 1, "r_num_blocks": 1},
    "ctc": "ctc", "ctc_conf": {"ctc_blank_id": 0},
    "model": "asr_model",
    "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3, "lsm_weight": 0.1,
                   "length_normalized_loss": False},
}


DROP = object()


def _conf(**updates):
    conf = copy.deepcopy(BASE)
    for dotted, value in updates.items():
        node = conf
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node[k]
        if value is DROP:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return conf


def test_builds_registered_classes_and_logs_counts(caplog):
    with caplog.at_level(logging.INFO):
        model = build_model(_conf())
    assert isinstance(model, ASRModel)
    assert isinstance(model.decoder, BiTransformerDecoder)
    assert "parameters" in caplog.text and "active per frame" in caplog.text
    uni = build_model(_conf(decoder="transformer", decoder_conf__r_num_blocks=DROP,
                            model_conf__reverse_weight=0.0))
    assert isinstance(uni.decoder, TransformerDecoder) and not uni.is_bidirectional_decoder()


@pytest.mark.parametrize("where,key", [
    ("", "decoder_cof"), ("model_conf", "ctc_wieght"), ("decoder_conf", "num_block"),
    ("ctc_conf", "blank"), ("cmvn_conf", "cmvn_path"), ("encoder_conf", "linear_unit"),
])
def test_unknown_keys_are_named(where, key):
    conf = _conf()
    (conf if not where else conf.setdefault(where, {}))[key] = 1
    name = f"{where}.{key}" if where else key
    with pytest.raises(ConfigError, match=f"'{name}'"):
        build_model(conf)


def test_r_num_blocks_is_not_a_transformer_decoder_key():
    with pytest.raises(ConfigError, match="decoder_conf.r_num_blocks"):
        build_model(_conf(decoder="transformer", model_conf__reverse_weight=0.0))


@pytest.mark.parametrize("key,value,msg", [
    ("encoder", "lstm", "unknown encoder 'lstm'"),
    ("decoder", "rnn", "unknown decoder 'rnn'"),
    ("model", "k2_model", "unknown model 'k2_model'"),
    ("input_dim", None, "input_dim"),
    ("output_dim", 0, "output_dim"),
])
def test_bad_component_names_and_dims(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        build_model(_conf(**{key: value}))


def test_bad_values_become_config_errors():
    with pytest.raises(ConfigError, match="ctc_blank_id"):
        build_model(_conf(ctc_conf__ctc_blank_id=9))
    with pytest.raises(ConfigError, match="reverse_weight"):
        build_model(_conf(decoder="transformer", decoder_conf__r_num_blocks=DROP))


def test_special_tokens_and_defaults():
    model = build_model(_conf())
    assert model.sos_symbol() == model.eos_symbol() == 6
    conf = _conf(tokenizer_conf={"special_tokens": {"<blank>": 0, "<unk>": 1, "<sos>": 2, "<eos>": 2}})
    model = build_model(conf)
    assert model.sos_symbol() == 2 and model.eos_symbol() == 2
    model = build_model(_conf(model_conf__special_tokens={"<sos>": 3, "<eos>": 4}))
    assert (model.sos, model.eos) == (3, 4)


def test_cmvn_file_is_loaded_into_the_encoder(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(2.0, 3.0, size=(50, 8))
    path = tmp_path / "global_cmvn"
    path.write_text(json.dumps({"mean_stat": feats.sum(0).tolist(),
                                "var_stat": (feats ** 2).sum(0).tolist(), "frame_num": 50}))
    model = build_model(_conf(cmvn="global_cmvn", cmvn_conf={"cmvn_file": str(path),
                                                             "is_json_cmvn": True}))
    cmvn = model.encoder.global_cmvn
    np.testing.assert_allclose(cmvn.mean.numpy(), feats.mean(0), rtol=1e-5)
    np.testing.assert_allclose(cmvn.istd.numpy(), 1 / feats.std(0), rtol=1e-4)
    with pytest.raises(ConfigError, match="missing_cmvn"):
        build_model(_conf(cmvn="global_cmvn", cmvn_conf={"cmvn_file": str(tmp_path / "missing_cmvn")}))
    wrong = _conf(cmvn="global_cmvn", cmvn_conf={"cmvn_file": str(path)}, input_dim=10)
    with pytest.raises(ConfigError, match="input_dim"):
        build_model(wrong)


def test_count_parameters_dense_and_moe():
    dense = build_model(_conf())
    total, active = count_parameters(dense)
    assert total == active == sum(p.numel() for p in dense.parameters())
    conf = _conf(encoder_conf__mlp_type="moe", encoder_conf__n_expert=4,
                 encoder_conf__n_expert_activated=1, decoder_conf__mlp_type="moe",
                 decoder_conf__n_expert=3, decoder_conf__n_expert_activated=2)
    moe = build_model(conf)
    total, active = count_parameters(moe)
    assert total == sum(p.numel() for p in moe.parameters())
    d, h = 8, 12
    per_expert = d * h + h + h * d + d
    # encoder: 1 MoE FFN (transformer block), 3 idle experts; decoders: 2 FFNs, 1 idle each.
    assert total - active == 3 * per_expert + 2 * 1 * per_expert


def test_moe_conf_is_checked_even_for_dense_models():
    with pytest.raises(ConfigError, match="moe_conf.routr"):
        build_model(_conf(moe_conf={"routr": "switch"}))


@pytest.mark.parametrize("encoder", ["conformer", "transformer"])
@pytest.mark.parametrize("decoder", ["transformer", "bitransformer"])
def test_every_registered_combination_scripts(encoder, decoder):
    conf = _conf(encoder=encoder, decoder=decoder)
    if decoder == "transformer":
        del conf["decoder_conf"]["r_num_blocks"]
        conf["model_conf"]["reverse_weight"] = 0.0
    model = build_model(conf).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 15, 8)
    lens = torch.tensor([15, 11])
    with torch.no_grad():
        enc, enc_lens = model.batch_forward_encoder(x, lens)
        torch.testing.assert_close(scripted.batch_forward_encoder(x, lens)[0], enc)
        hyps = torch.tensor([[6, 2, 3], [6, 4, 6]])
        for a, b in zip(model.forward_attention_decoder(hyps, torch.tensor([3, 2]), enc[:1], 0.5),
                        scripted.forward_attention_decoder(hyps, torch.tensor([3, 2]), enc[:1], 0.5)):
            torch.testing.assert_close(a, b)
    assert scripted.is_bidirectional_decoder() == (decoder == "bitransformer")
