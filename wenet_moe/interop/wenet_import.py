"""WeNet model directory -> this toolkit's model directory (`wenet-moe import-wenet`).

A WeNet model directory holds `train.yaml`, a checkpoint (`final.pt`, a plain state
dict), `units.txt` and `global_cmvn`. Importing writes `train.yaml`, `final.pt`,
`units.txt` and the CMVN file of this toolkit into a new directory, usable by
`recognize`, `export`, `transcribe` and the server.

Configuration (WeNet's key names are this toolkit's, so most blocks pass through):
  * model blocks (`encoder*`, `decoder*`, `ctc*`, `cmvn*`, `model*`, `tokenizer*`,
    `input_dim`, `output_dim`) are kept and checked by this toolkit's builder; WeNet
    options this toolkit does not implement are an error naming the key. WeNet options
    that only have the value this toolkit computes (`query_bias: true`,
    `layer_norm_type: layer_norm`, ...) are accepted at that value and dropped;
    options without numerical effect at inference (`gradient_checkpointing`,
    `use_sdpa`) are dropped.
  * `vocab_size` must equal `output_dim` and is dropped.
  * WeNet MoE (`mlp_type: moe`) becomes `moe_conf: {router: topk, router_bias: false}`:
    WeNet's gate is a bias-free linear layer, and its gates are a softmax over the top-k
    logits only, which is this toolkit's `topk` router.
  * `dataset_conf`: `fbank_conf` and `resample_conf` are kept, with the fbank options
    WeNet computes (torchaudio's Kaldi defaults: `snip_edges: true`, `high_freq: 0`,
    `low_freq: 20`, povey window, pre-emphasis 0.97, DC removal, energy floor 0) filled
    in, because this toolkit's own defaults are sherpa-onnx's (`snip_edges: false`,
    `high_freq: -400`). Training settings (data pipeline, optimizer, scheduler, ...)
    are not imported: they belong to the recipe that fine-tunes the model.

Weights (`map_state_dict`): every WeNet key is mapped explicitly, see `_map_key`;
the sinusoid tables WeNet saves (`*.pe`) are dropped after checking that they equal
this toolkit's encodings (computed on the fly); WeNet's MoE experts
(`experts.{i}.w_{1,2}` Linear layers) are stacked into `w1 (E, D, H)`, `b1`,
`w2 (E, H, D)`, `b2` and its `gate.weight` becomes `router.gate.weight`. A WeNet key
that is not mapped, a missing key and a shape mismatch are errors naming the key.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import shutil
from typing import Any, Dict, Optional, Tuple

import torch

from wenet_moe.checkpoint_io import new_model_dir, require_empty_dir
from wenet_moe.config import ConfigError, load_yaml, save_yaml

# top-level keys of a WeNet train.yaml that describe the model (checked by the builder)
MODEL_KEYS = ("encoder", "encoder_conf", "decoder", "decoder_conf", "ctc", "ctc_conf",
              "cmvn", "cmvn_conf", "model", "model_conf", "tokenizer", "tokenizer_conf",
              "input_dim", "output_dim")
# top-level keys WeNet writes for training runs; not part of the imported model
TRAINING_KEYS = ("dataset", "optim", "optim_conf", "scheduler", "scheduler_conf", "grad_clip",
                 "accum_grad", "max_epoch", "log_interval", "save_interval", "save_states",
                 "dtype", "use_amp", "train_engine", "model_dir", "init_infos", "seed",
                 "deepspeed_config", "enable_full_shard", "fsdp_config", "lfmmi_dir",
                 "checkpoint", "tensorboard_dir", "ddp", "num_workers", "pin_memory",
                 "prefetch", "use_lora", "ctc_weight", "jit")
# WeNet encoder/decoder options accepted only at the value this toolkit computes
FIXED_OPTIONS: Dict[str, Any] = {
    "query_bias": True, "key_bias": True, "value_bias": True, "mlp_bias": True,
    "conv_bias": True, "layer_norm_type": "layer_norm", "norm_eps": 1e-5,
    "conv_norm_eps": 1e-5, "n_kv_head": None, "head_dim": None, "final_norm": True,
    "conv_inner_factor": 2, "src_attention": True, "tie_word_embedding": False,
    "positionwise_conv_kernel_size": 1, "interctc_layer_idx": [], "interctc_use_conditioning": False,
    "stochastic_depth_rate": 0.0,
}
# WeNet options with no numerical effect at inference, dropped
NO_EFFECT_OPTIONS = ("gradient_checkpointing", "use_sdpa")
# Fbank options WeNet computes (torchaudio.compliance.kaldi.fbank defaults, samples
# scaled by 2^15) where this toolkit's defaults (sherpa-onnx's) differ.
WENET_FBANK = {"snip_edges": True, "high_freq": 0.0, "low_freq": 20.0, "window_type": "povey",
               "preemph_coeff": 0.97, "remove_dc_offset": True, "energy_floor": 0.0}
PE_ULPS = 4.0   # allowed |WeNet pe - ours| at position p, in units of eps32 * (p + 1)


def _wenet_conf(configs: Dict[str, Any], block: str, path: str) -> Dict[str, Any]:
    conf = configs.get(block) or {}
    if not isinstance(conf, dict):
        raise ConfigError(f"{path}: '{block}' must be a mapping")
    out = {}
    for key, value in conf.items():
        if key in NO_EFFECT_OPTIONS:
            continue
        if key in FIXED_OPTIONS:
            want = FIXED_OPTIONS[key]
            same = value == want or (isinstance(want, float) and isinstance(value, (int, float))
                                     and abs(value - want) <= 1e-12)
            if not same:
                raise ConfigError(f"{path}: {block}.{key}: {value!r} is not supported (this "
                                  f"toolkit implements only {want!r})")
            continue
        out[key] = value
    return out


def translate_config(wenet: Dict[str, Any], path: str = "train.yaml") -> Dict[str, Any]:
    """WeNet's train.yaml (dict) -> this toolkit's (dict); paths are left as given.

    Raises ConfigError naming `path` and the key for anything not imported.
    """
    for key in wenet:
        if key not in MODEL_KEYS + TRAINING_KEYS + ("vocab_size", "dataset_conf"):
            raise ConfigError(f"{path}: top-level key '{key}' is not understood by the importer")
    for key in ("input_dim", "output_dim"):
        if not isinstance(wenet.get(key), int):
            raise ConfigError(f"{path}: '{key}' missing (WeNet writes it into the model "
                              f"directory's train.yaml)")
    if "vocab_size" in wenet and wenet["vocab_size"] != wenet["output_dim"]:
        raise ConfigError(f"{path}: vocab_size {wenet['vocab_size']} differs from output_dim "
                          f"{wenet['output_dim']}")
    out: Dict[str, Any] = {}
    for key in MODEL_KEYS:
        if key not in wenet:
            continue
        if key in ("encoder_conf", "decoder_conf"):
            out[key] = _wenet_conf(wenet, key, path)
        else:
            out[key] = copy.deepcopy(wenet[key])
    if out.get("encoder", "conformer") == "conformer":
        # WeNet's convolution module pads and masks its input, not the GLU output
        out.setdefault("encoder_conf", {})["cnn_module_pad"] = "input"
    moe = [block for block in ("encoder_conf", "decoder_conf")
           if (out.get(block) or {}).get("mlp_type") == "moe"]
    if moe:
        out["moe_conf"] = {"router": "topk", "router_bias": False}
    ds = wenet.get("dataset_conf") or {}
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: 'dataset_conf' must be a mapping")
    fbank = dict(WENET_FBANK)
    fbank.update(ds.get("fbank_conf") or {})
    dataset_conf: Dict[str, Any] = {"fbank_conf": fbank}
    if ds.get("resample_conf"):
        dataset_conf["resample_conf"] = dict(ds["resample_conf"])
    out["dataset_conf"] = dataset_conf
    if ds.get("feats_type", "fbank") != "fbank":
        raise ConfigError(f"{path}: dataset_conf.feats_type {ds['feats_type']!r} is not "
                          f"supported (fbank only)")
    from wenet_moe.data.conf import resolve_dataset_conf
    try:
        resolve_dataset_conf(dataset_conf)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return out


# ------------------------------------------------------------------------ weights
_EXPERT = re.compile(r"^(?P<ffn>.+)\.experts\.(?P<e>\d+)\.(?P<w>w_[12])\.(?P<p>weight|bias)$")
_DECODER_EMBED = re.compile(r"^(?P<dec>decoder(\.(left|right)_decoder)?)\.embed\.0\.weight$")
_PE = re.compile(r"^(encoder\.embed\.pos_enc|decoder(\.(left|right)_decoder)?\.embed\.1)\.pe$")
_GATE = re.compile(r"^(?P<ffn>.+)\.gate\.weight$")


def _check_pe(key: str, pe: torch.Tensor) -> float:
    """WeNet's saved sinusoid table must equal this toolkit's encodings up to float32
    rounding: sin/cos of the float32 angle p * w_i (|w_i| <= 1) are exact only to
    about one ulp of the angle, so position p may differ by PE_ULPS * eps * (p + 1)
    (measured on the reference bundle: 0.00024 at p = 4999, made on another CPU).
    Returns the largest difference in units of eps * (p + 1)."""
    from wenet_moe.layers.embedding import PositionalEncoding

    if pe.dim() != 3 or pe.size(0) != 1:
        raise ValueError(f"{key}: expected a (1, max_len, D) sinusoid table, got {tuple(pe.shape)}")
    ours = PositionalEncoding(int(pe.size(2)), 0.0).sinusoid(0, int(pe.size(1)))[0]
    scale = torch.finfo(torch.float32).eps * (torch.arange(pe.size(1), dtype=torch.float32) + 1)
    ulps = float(((ours - pe[0].float()).abs().max(1).values / scale).max())
    if not ulps <= PE_ULPS:
        raise ValueError(f"{key}: WeNet's positional encodings differ from this toolkit's "
                         f"sinusoids by {ulps:.3g} x eps x (position + 1) (> {PE_ULPS}); "
                         f"not a standard sinusoid table")
    return ulps


def map_state_dict(wenet_sd: Dict[str, torch.Tensor], model: torch.nn.Module,
                   where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """WeNet state dict -> state dict of `model` (this toolkit's ASRModel).

    Raises ValueError naming `where` and the key: unmapped WeNet keys, model keys left
    without a value, shape mismatches, and non-standard positional tables.
    """
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    experts: Dict[Tuple[str, str, str], Dict[int, torch.Tensor]] = {}
    for key, value in wenet_sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {key} is not a tensor")
        m = _EXPERT.match(key)
        if m and m.group("ffn") + ".w1" in target:
            experts.setdefault((m.group("ffn"), m.group("w"), m.group("p")), {})[
                int(m.group("e"))] = value
            continue
        if _PE.match(key):
            try:
                _check_pe(key, value)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            continue
        m = _DECODER_EMBED.match(key)
        if m:
            out[m.group("dec") + ".embed.weight"] = value
            continue
        m = _GATE.match(key)
        if m and m.group("ffn") + ".router.gate.weight" in target:
            out[m.group("ffn") + ".router.gate.weight"] = value
            continue
        if key in target:
            out[key] = value
            continue
        raise ValueError(f"{where}: WeNet key '{key}' {tuple(value.shape)} has no counterpart "
                         f"in this toolkit's model (unsupported option?)")
    # stack experts: WeNet Linear weights are (out, in); ours w1 (E, D, H), w2 (E, H, D)
    names = {"w_1": ("w1", "b1"), "w_2": ("w2", "b2")}
    for (ffn, w, p), by_index in experts.items():
        n_expert = target[ffn + ".w1"].size(0)
        if sorted(by_index) != list(range(n_expert)):
            raise ValueError(f"{where}: {ffn}.experts.*.{w}.{p}: WeNet has experts "
                             f"{sorted(by_index)}, this model {n_expert}")
        tensors = [by_index[i] for i in range(n_expert)]
        if p == "weight":
            out[f"{ffn}.{names[w][0]}"] = torch.stack([t.t() for t in tensors]).contiguous()
        else:
            out[f"{ffn}.{names[w][1]}"] = torch.stack(tensors).contiguous()
    for key, value in target.items():
        if key not in out:
            if re.search(r"\.b[12]$", key) and key[:-3] + ".w1" in target and \
                    f"{key[:-3]}.experts.0.w_{key[-1]}.weight" in wenet_sd:
                # WeNet experts built without biases (MoEFFNLayer's bias=False): zeros
                out[key] = torch.zeros_like(value)
                continue
            raise ValueError(f"{where}: this toolkit's model needs '{key}' "
                             f"{tuple(value.shape)}, which the WeNet checkpoint lacks")
        if tuple(out[key].shape) != tuple(value.shape):
            raise ValueError(f"{where}: '{key}': WeNet shape {tuple(out[key].shape)}, this "
                             f"model expects {tuple(value.shape)}")
        out[key] = out[key].to(value.dtype)
    return out


# ------------------------------------------------------------------------ directory
def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    from wenet_moe.checkpoint_io import extract_state_dict, load_checkpoint

    return extract_state_dict(load_checkpoint(path), path)


def _cmvn_file_from_buffers(mean: torch.Tensor, istd: torch.Tensor, path: str) -> None:
    """A JSON CMVN file (frame_num 1) reproducing the buffers `mean`, `istd`."""
    import json

    mean64 = mean.double()
    var = 1.0 / istd.double() ** 2
    data = {"mean_stat": mean64.tolist(), "var_stat": (var + mean64 ** 2).tolist(), "frame_num": 1}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def import_wenet(wenet_dir: str, output_dir: str, checkpoint: Optional[str] = None
                 ) -> Dict[str, Any]:
    """Import a WeNet model directory into a new directory `output_dir`.

    Writes `train.yaml`, `final.pt` (a state dict), `units.txt`, the CMVN file (and a
    BPE model / non-language symbol list when the tokenizer names one). Everything is
    written to a temporary directory first and renamed at the end, so a failure
    leaves no output behind. Returns a report dict (keys `checkpoint`, `dropped`,
    `moe`, `parameters`).
    """
    from wenet_moe.model import build_model

    config_path = os.path.join(wenet_dir, "train.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{wenet_dir}: no train.yaml (not a WeNet model directory)")
    ckpt = checkpoint or os.path.join(wenet_dir, "final.pt")
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"{ckpt}: checkpoint not found (give --checkpoint)")
    require_empty_dir(output_dir)
    wenet = load_yaml(config_path)
    configs = translate_config(wenet, config_path)
    dropped = sorted(k for k in wenet if k not in MODEL_KEYS + ("dataset_conf", "vocab_size"))

    def beside(name: Optional[str], what: str, required: bool) -> Optional[str]:
        """A file named in the config: as given, else by file name in wenet_dir."""
        if not name:
            if required:
                raise ConfigError(f"{config_path}: {what} is not set")
            return None
        for cand in (name, os.path.join(wenet_dir, os.path.basename(name))):
            if os.path.isfile(cand):
                return cand
        if required:
            raise ConfigError(f"{config_path}: {what} {name!r} not found (nor in {wenet_dir})")
        return None

    tok = dict(configs.get("tokenizer_conf") or {})
    units = beside(tok.get("symbol_table_path") or "units.txt", "tokenizer_conf.symbol_table_path",
                   True)
    extra_files = {}
    for key in ("bpe_path", "non_lang_syms_path"):
        if tok.get(key):
            extra_files[key] = beside(tok[key], f"tokenizer_conf.{key}", True)
    cmvn = dict(configs.get("cmvn_conf") or {})
    cmvn_src = None
    if configs.get("cmvn") is not None:
        cmvn_src = beside(cmvn.get("cmvn_file"), "cmvn_conf.cmvn_file", False)

    final_dir = os.path.abspath(output_dir)
    with new_model_dir(output_dir, ".import-wenet.") as tmp:
        shutil.copyfile(units, os.path.join(tmp, "units.txt"))
        tok["symbol_table_path"] = os.path.join(final_dir, "units.txt")
        for key, src in extra_files.items():
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
            tok[key] = os.path.join(final_dir, os.path.basename(src))
        configs["tokenizer_conf"] = tok

        wenet_sd = _read_state_dict(ckpt)
        build_conf = copy.deepcopy(configs)
        if configs.get("cmvn") is not None:
            mean = wenet_sd.get("encoder.global_cmvn.mean")
            istd = wenet_sd.get("encoder.global_cmvn.istd")
            cmvn_name = "global_cmvn"
            if cmvn_src is not None:
                shutil.copyfile(cmvn_src, os.path.join(tmp, cmvn_name))
            elif mean is not None and istd is not None:
                # the statistics live in the checkpoint's buffers; write them as JSON
                _cmvn_file_from_buffers(mean, istd, os.path.join(tmp, cmvn_name))
                cmvn["is_json_cmvn"] = True
            else:
                raise ConfigError(f"{config_path}: cmvn_conf.cmvn_file {cmvn.get('cmvn_file')!r} "
                                  f"not found and the checkpoint has no CMVN buffers")
            cmvn["cmvn_file"] = os.path.join(tmp, cmvn_name)
            build_conf["cmvn_conf"] = dict(cmvn)
            cmvn["cmvn_file"] = os.path.join(final_dir, cmvn_name)
            configs["cmvn_conf"] = cmvn
        build_conf["tokenizer_conf"] = dict(tok, symbol_table_path=os.path.join(tmp, "units.txt"))
        try:
            model = build_model(build_conf)
        except ConfigError as e:  # an option this toolkit does not implement
            raise ConfigError(f"{config_path}: {e}") from None
        sd = map_state_dict(wenet_sd, model, ckpt)
        if configs.get("cmvn") is not None:
            _check_cmvn(model, sd, cmvn_src or ckpt)
        model.load_state_dict(sd, strict=True)
        from wenet_moe.train.checkpoint import atomic_torch_save
        atomic_torch_save(model.state_dict(), os.path.join(tmp, "final.pt"))
        save_yaml(configs, os.path.join(tmp, "train.yaml"))
    n_params = sum(p.numel() for p in model.parameters())
    report = {"checkpoint": ckpt, "dropped": dropped, "moe": "moe_conf" in configs,
              "parameters": n_params}
    logging.info("import-wenet: %s -> %s (%d parameters; not imported: %s)", ckpt,
                 output_dir, n_params, ", ".join(dropped) or "nothing")
    return report


def _check_cmvn(model: torch.nn.Module, sd: Dict[str, torch.Tensor], source: str) -> None:
    """The CMVN file must describe the statistics the checkpoint was trained with."""
    cmvn = getattr(model.encoder, "global_cmvn", None)
    if cmvn is None or "encoder.global_cmvn.mean" not in sd:
        return
    for name in ("mean", "istd"):
        ours = getattr(cmvn, name)
        theirs = sd["encoder.global_cmvn." + name].float()
        diff = float((ours - theirs).abs().max())
        scale = float(theirs.abs().max()) or 1.0
        if diff > 1e-5 * scale:
            raise ValueError(f"{source}: CMVN file and checkpoint buffer encoder.global_cmvn."
                             f"{name} differ by {diff:.3g}; the CMVN file is not this model's")

