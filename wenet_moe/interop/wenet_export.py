"""This toolkit's dense model -> a WeNet model directory (`wenet-moe export-wenet`).

The inverse of wenet_import.py for dense models: writes `train.yaml` (WeNet's keys),
`final.pt` (a state dict with WeNet's key names, the sinusoid tables WeNet keeps as
persistent buffers included), `units.txt` and `global_cmvn`, the layout WeNet's
`wenet.cli.model.load_model` / `init_model` read.

WeNet must compute what this model computes. Where this toolkit's configuration has
no WeNet equivalent, export fails naming the option, unless `allow_mismatch`, which
writes the model anyway and reports each difference (with the encoder's measured
change for the convolution padding):
  * `encoder_conf.cnn_module_pad: glu` (this toolkit's default) with a convolution
    module: WeNet pads/masks the module input (`input`), see layers/convolution.py;
  * fbank options other than WeNet's (torchaudio Kaldi defaults: `snip_edges: true`,
    `high_freq: 0`, `low_freq: 20`, povey window, pre-emphasis 0.97, DC removal,
    energy floor 0; this toolkit defaults to sherpa-onnx's `snip_edges: false`,
    `high_freq: -400`);
  * MoE models are refused (dense only).
"""
from __future__ import annotations

import copy
import os
import shutil
from typing import Any, Dict, List, Tuple

import torch

from wenet_moe.checkpoint_io import new_model_dir, require_empty_dir
from wenet_moe.config import ConfigError, save_yaml
from wenet_moe.interop.wenet_import import WENET_FBANK

WENET_PE_LEN = 5000   # max_len of WeNet's PositionalEncoding buffers
# dataset_conf keys of this toolkit that WeNet's data pipeline does not know
_OUR_DATASET_KEYS = ("add_noise", "noise_conf", "reverb", "rir_conf", "feats_type")


def _fbank_mismatches(configs: Dict[str, Any]) -> List[str]:
    fbank = dict(((configs.get("dataset_conf") or {}).get("fbank_conf")) or {})
    from wenet_moe_runtime.features import FbankOptions

    defaults = FbankOptions()
    names = {"preemph_coeff": "preemph_coeff"}
    out = []
    for key, want in WENET_FBANK.items():
        have = fbank.get(key, getattr(defaults, names.get(key, key)))
        if have != want:
            out.append(f"dataset_conf.fbank_conf.{key}: {have!r} (WeNet computes {want!r})")
    return out


def wenet_config(configs: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """(WeNet train.yaml dict, mismatches) of a dense config of this toolkit.

    Raises ConfigError for MoE models. File paths become `units.txt` and
    `global_cmvn` (WeNet's loader looks them up in the model directory).
    """
    out = copy.deepcopy(configs)
    mismatches: List[str] = []
    for block in ("encoder_conf", "decoder_conf"):
        conf = dict(out.get(block) or {})
        if conf.get("mlp_type", "position_wise_feed_forward") not in ("position_wise_feed_forward", "dense"):
            raise ConfigError(f"{block}.mlp_type {conf['mlp_type']!r}: export-wenet writes dense "
                              f"models only")
        for key in ("mlp_type", "n_expert", "n_expert_activated"):
            conf.pop(key, None)
        if block == "encoder_conf":
            pad = conf.pop("cnn_module_pad", "glu")
            uses_conv = out.get("encoder", "conformer") == "conformer" and conf.get("use_cnn_module", True)
            if uses_conv and pad != "input":
                mismatches.append(f"encoder_conf.cnn_module_pad: {pad!r} (WeNet pads and masks the "
                                  f"convolution module's input: 'input')")
        out[block] = conf
    out.pop("moe_conf", None)
    mismatches += _fbank_mismatches(configs)
    model_conf = dict(out.get("model_conf") or {})
    tok = dict(out.get("tokenizer_conf") or {})
    special = dict(tok.get("special_tokens") or {})
    special.update(model_conf.pop("special_tokens", None) or {})
    vocab = int(out["output_dim"])
    special.setdefault("<sos>", vocab - 1)
    special.setdefault("<eos>", vocab - 1)
    tok["special_tokens"] = special
    tok["symbol_table_path"] = "units.txt"
    for key in ("bpe_path", "non_lang_syms_path"):
        if tok.get(key):
            tok[key] = os.path.basename(tok[key])
    out["tokenizer_conf"] = tok
    out["model_conf"] = model_conf
    if out.get("cmvn") is not None:
        cmvn = dict(out.get("cmvn_conf") or {})
        cmvn["cmvn_file"] = "global_cmvn"
        cmvn.setdefault("is_json_cmvn", True)
        out["cmvn_conf"] = cmvn
    ds = dict(out.get("dataset_conf") or {})
    for key in _OUR_DATASET_KEYS:
        ds.pop(key, None)
    if isinstance(ds.get("resample_conf"), dict):
        ds["resample_conf"] = {k: v for k, v in ds["resample_conf"].items() if k != "allowed_rates"}
    if isinstance(ds.get("fbank_conf"), dict):
        ds["fbank_conf"] = {k: v for k, v in ds["fbank_conf"].items()
                            if k in ("num_mel_bins", "frame_shift", "frame_length", "dither")}
    out["dataset_conf"] = ds
    out.setdefault("dataset", "asr")
    out["vocab_size"] = vocab
    return out, mismatches


def wenet_state_dict(model: torch.nn.Module, configs: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """State dict of `model` under WeNet's key names, with WeNet's `pe` buffers."""
    from wenet_moe.layers.embedding import PositionalEncoding

    sd = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    d = int(model.encoder.output_size())
    table = PositionalEncoding(d, 0.0).sinusoid(0, WENET_PE_LEN).contiguous()
    decoders = [name for name in ("decoder", "decoder.left_decoder", "decoder.right_decoder")
                if name + ".embed.weight" in sd]
    for key, value in sd.items():
        if key.endswith((".w1", ".b1", ".w2", ".b2", ".router.gate.weight", ".router.gate.bias")):
            raise ValueError(f"'{key}': export-wenet writes dense models only")
        if key.startswith("encoder.route_embed."):
            raise ValueError(f"'{key}': export-wenet writes dense models only")
        done = False
        for dec in decoders:
            if key == dec + ".embed.weight":
                out[dec + ".embed.0.weight"] = value.clone()
                out[dec + ".embed.1.pe"] = table.clone()
                done = True
        if not done:
            out[key] = value.clone()
    pos = (configs.get("encoder_conf") or {}).get("pos_enc_layer_type")
    if pos is None:
        pos = "rel_pos" if configs.get("encoder", "conformer") == "conformer" else "abs_pos"
    if pos in ("abs_pos", "rel_pos"):
        out["encoder.embed.pos_enc.pe"] = table.clone()
    return out


def _conv_padding_change(model: torch.nn.Module, input_dim: int) -> float:
    """Max abs change of the encoder output (random 3 s input, full context) when the
    convolution modules pad their input as WeNet does."""
    from wenet_moe.layers.convolution import ConvolutionModule

    convs = [m for m in model.modules() if isinstance(m, ConvolutionModule)]
    x = torch.randn(1, 300, input_dim, generator=torch.Generator().manual_seed(0))
    if hasattr(model.encoder, "global_cmvn") and model.encoder.global_cmvn is not None:
        x = x / model.encoder.global_cmvn.istd + model.encoder.global_cmvn.mean
    lens = torch.tensor([300])
    with torch.no_grad():
        a, _ = model.encoder(x, lens, -1, -1)
        for m in convs:
            m.pad_input = True
        try:
            b, _ = model.encoder(x, lens, -1, -1)
        finally:
            for m in convs:
                m.pad_input = False
    return float((a - b).abs().max())


def export_wenet(config: str, checkpoint: str, output_dir: str,
                 allow_mismatch: bool = False) -> Dict[str, Any]:
    """Write the WeNet model directory `output_dir` (new or empty), atomically.

    Returns a report: `mismatches` (list of strings; empty when WeNet computes
    exactly this model) and `keys` (number of checkpoint keys).
    """
    from wenet_moe.model.loading import build_and_load, load_configs
    from wenet_moe.train.checkpoint import atomic_torch_save

    require_empty_dir(output_dir)
    raw, configs = load_configs(config)
    wenet_conf, mismatches = wenet_config(configs)
    if mismatches and not allow_mismatch:
        raise ConfigError(f"{config}: {mismatches[0]}: WeNet would compute a different model "
                          f"(--allow_mismatch writes it anyway)")
    model = build_and_load(configs, checkpoint)
    sd = wenet_state_dict(model, configs)
    if any("cnn_module_pad" in m for m in mismatches):
        change = _conv_padding_change(model, int(configs["input_dim"]))
        mismatches = [m + (f"; encoder output changes by up to {change:.3g}"
                           if "cnn_module_pad" in m else "") for m in mismatches]
    with new_model_dir(output_dir, ".export-wenet.") as tmp:
        tok = configs.get("tokenizer_conf") or {}
        shutil.copyfile(tok["symbol_table_path"], os.path.join(tmp, "units.txt"))
        for key in ("bpe_path", "non_lang_syms_path"):
            if tok.get(key):
                shutil.copyfile(tok[key], os.path.join(tmp, os.path.basename(tok[key])))
        if configs.get("cmvn") is not None:
            cmvn_file = (configs.get("cmvn_conf") or {}).get("cmvn_file")
            if cmvn_file:
                shutil.copyfile(cmvn_file, os.path.join(tmp, "global_cmvn"))
            else:  # statistics only in the checkpoint: write them as WeNet JSON
                from wenet_moe.interop.wenet_import import _cmvn_file_from_buffers
                _cmvn_file_from_buffers(sd["encoder.global_cmvn.mean"],
                                        sd["encoder.global_cmvn.istd"],
                                        os.path.join(tmp, "global_cmvn"))
                wenet_conf["cmvn_conf"]["is_json_cmvn"] = True
        atomic_torch_save(sd, os.path.join(tmp, "final.pt"))
        save_yaml(wenet_conf, os.path.join(tmp, "train.yaml"))
    return {"mismatches": mismatches, "keys": len(sd)}

