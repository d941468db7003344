"""Sparse upcycling: a dense checkpoint -> an MoE checkpoint (`wenet-moe upcycle`).

Every dense FFN (`w_1`, `w_2` of the encoder's macaron and normal FFNs and of every
decoder block) becomes an MoE FFN whose E experts all start as copies of it:
w1[e] = w_1.weight^T, b1[e] = w_1.bias, w2[e] = w_2.weight^T, b2[e] = w_2.bias, plus
optional relative noise: each expert tensor t gets `noise * std(t) * N(0, 1)` added
(independent per expert and element; the noise breaks the experts' symmetry). All
other weights are copied unchanged. New weights (routers; the SpeechMoE frame
embedding network) keep the MoE model's initialisation from `seed`, except that
`router_init: zero` zeroes the routers.

What the upcycled model computes, with noise 0 (tested in tests/interop/test_upcycle.py):
  * topk, omni (gates = softmax over the k chosen logits, summing to one): every MoE
    FFN outputs sum_e g_e * FFN(x) = FFN(x), whatever the router chose, so the model
    equals the dense one (up to float rounding) with either router initialisation.
  * switch, speechmoe (gates = the full-softmax probabilities p_e of the chosen
    experts, summing to P = sum of the k largest p_e < 1 unless k = E): every MoE FFN
    outputs P(x) * FFN(x). With `router_init: zero` all logits are 0, p_e = 1/E, so
    every MoE FFN outputs exactly (k / E) * FFN(x): the FFN residual branches are
    scaled by k/E and the model's outputs differ from the dense model's. With a
    random router P(x) varies per frame (between k/E and 1). `scale_experts: true`
    multiplies w2 and b2 of every expert by E/k, which makes a zero-initialised
    switch/speechmoe model equal the dense one at the start (the scale stays in the
    weights: as the router sharpens, P grows towards 1 and the FFN outputs towards
    E/k times the dense ones).
"""
from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import torch

from wenet_moe.checkpoint_io import new_model_dir
from wenet_moe.config import ConfigError, save_yaml

ROUTERS = ("topk", "switch", "speechmoe", "omni")
_EXPERT = re.compile(r"^(?P<ffn>.+)\.(?P<name>w1|b1|w2|b2)$")
_DENSE = {"w1": ("w_1.weight", True), "b1": ("w_1.bias", False),
          "w2": ("w_2.weight", True), "b2": ("w_2.bias", False)}


def upcycle_config(configs: Dict[str, Any], n_expert: int, n_expert_activated: int,
                   router: str) -> Dict[str, Any]:
    """The dense config with every FFN (encoder and decoder) an MoE FFN."""
    if router not in ROUTERS:
        raise ConfigError(f"router: unknown router '{router}' (choose from {', '.join(ROUTERS)})")
    if isinstance(n_expert, bool) or not isinstance(n_expert, int) or n_expert < 1:
        raise ConfigError(f"n_expert: expected an integer >= 1, got {n_expert!r}")
    if not isinstance(n_expert_activated, int) or not 1 <= n_expert_activated <= n_expert:
        raise ConfigError(f"n_expert_activated: expected an integer in 1..{n_expert}, "
                          f"got {n_expert_activated!r}")
    out = copy.deepcopy(configs)
    for block in ("encoder_conf", "decoder_conf"):
        conf = dict(out.get(block) or {})
        if conf.get("mlp_type", "position_wise_feed_forward") == "moe":
            raise ConfigError(f"{block}.mlp_type is already moe: upcycling needs a dense model")
        conf.update({"mlp_type": "moe", "n_expert": n_expert,
                     "n_expert_activated": n_expert_activated})
        out[block] = conf
    moe_conf = dict(out.get("moe_conf") or {})
    moe_conf["router"] = router
    out["moe_conf"] = moe_conf
    return out


def upcycle_state_dict(dense_sd: Dict[str, torch.Tensor], moe_model: torch.nn.Module,
                       noise: float = 0.0, generator: Optional[torch.Generator] = None,
                       scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """State dict for `moe_model` from the dense state dict (see the module docstring).

    Keys of the MoE model that the dense model lacks and that are not expert tensors
    (routers, SpeechMoE embedding) keep `moe_model`'s values. Raises ValueError for a
    dense key the MoE model has no place for, or a shape mismatch.
    """
    target = moe_model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for key, value in target.items():
        m = _EXPERT.match(key)
        if m and key not in dense_sd and m.group("ffn") + ".w_1.weight" in dense_sd:
            dense_key, transpose = _DENSE[m.group("name")]
            src = dense_sd[m.group("ffn") + "." + dense_key]
            used.add(m.group("ffn") + "." + dense_key)
            one = src.t() if transpose else src
            stacked = one.unsqueeze(0).repeat(value.size(0), *([1] * one.dim())).to(value.dtype)
            if noise > 0.0:
                std = float(one.float().std()) if one.numel() > 1 else 0.0
                stacked = stacked + noise * std * torch.randn(
                    stacked.shape, generator=generator, dtype=torch.float32).to(value.dtype)
            if scale != 1.0 and m.group("name") in ("w2", "b2"):
                stacked = stacked * scale
            out[key] = stacked.contiguous()
        elif key in dense_sd:
            out[key] = dense_sd[key].to(value.dtype)
            used.add(key)
        else:
            out[key] = value.clone()   # router / SpeechMoE embedding: fresh
        if tuple(out[key].shape) != tuple(value.shape):
            raise ValueError(f"'{key}': dense shape {tuple(out[key].shape)}, the MoE model "
                             f"expects {tuple(value.shape)}")
    unused = [k for k in dense_sd if k not in used]
    if unused:
        raise ValueError(f"dense checkpoint key '{unused[0]}' has no place in the MoE model "
                         f"({len(unused)} such keys)")
    return out


def new_parameters(dense_sd: Dict[str, torch.Tensor], moe_sd: Dict[str, torch.Tensor]) -> List[str]:
    """MoE keys initialised fresh (neither copied nor made from a dense FFN)."""
    out = []
    for key in moe_sd:
        m = _EXPERT.match(key)
        from_ffn = m is not None and m.group("ffn") + ".w_1.weight" in dense_sd
        if key not in dense_sd and not from_ffn:
            out.append(key)
    return out


def upcycle(config: str, checkpoint: str, output_dir: str, n_expert: int,
            n_expert_activated: int, router: str, noise: float = 0.0, seed: int = 0,
            router_init: str = "random", scale_experts: bool = False) -> Dict[str, Any]:
    """Write `output_dir/train.yaml` (the MoE config) and `output_dir/final.pt` (a state
    dict), plus copies of the symbol table and CMVN file, atomically (a temporary
    directory renamed at the end). Returns a report (`new_parameters`, `parameters`)."""
    from wenet_moe.model import build_model
    from wenet_moe.model.loading import load_configs
    from wenet_moe.checkpoint_io import extract_state_dict, load_checkpoint, require_empty_dir

    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    if router_init not in ("random", "zero"):
        raise ConfigError(f"router_init: expected random or zero, got {router_init!r}")
    require_empty_dir(output_dir)
    raw, configs = load_configs(config)
    dense_sd = extract_state_dict(load_checkpoint(checkpoint), checkpoint)
    moe_raw = upcycle_config(raw, n_expert, n_expert_activated, router)
    moe_resolved = upcycle_config(configs, n_expert, n_expert_activated, router)
    with tempfile.TemporaryDirectory(prefix="wenet-moe-upcycle.") as scratch:
        _restore_cmvn_file(moe_resolved, moe_raw, dense_sd, scratch, config)
        torch.manual_seed(seed)
        model = build_model(moe_resolved)
        if router_init == "zero":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".router." in name:
                        p.zero_()
        generator = torch.Generator().manual_seed(seed)
        scale = n_expert / n_expert_activated if scale_experts else 1.0
        sd = upcycle_state_dict(dense_sd, model, noise, generator, scale)
        model.load_state_dict(sd, strict=True)
        _write(model, moe_raw, moe_resolved, output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logging.info("upcycle: %s -> %s (%d experts, top-%d, %s router; %d parameters)",
                 checkpoint, output_dir, n_expert, n_expert_activated, router, n_params)
    return {"new_parameters": new_parameters(dense_sd, sd), "parameters": n_params}


def _restore_cmvn_file(resolved: Dict[str, Any], raw: Dict[str, Any],
                       dense_sd: Dict[str, torch.Tensor], scratch: str, config: str) -> None:
    """When the config's CMVN file is gone, write the checkpoint's CMVN buffers as a
    JSON file in `scratch` and point the resolved config at it."""
    if resolved.get("cmvn") is None or (resolved.get("cmvn_conf") or {}).get("cmvn_file"):
        return
    from wenet_moe.interop.wenet_import import _cmvn_file_from_buffers

    mean, istd = dense_sd.get("encoder.global_cmvn.mean"), dense_sd.get("encoder.global_cmvn.istd")
    if mean is None or istd is None:
        raise ConfigError(f"{config}: cmvn_conf.cmvn_file not found and the checkpoint has no "
                          f"CMVN buffers")
    path = os.path.join(scratch, "global_cmvn")
    _cmvn_file_from_buffers(mean, istd, path)
    resolved["cmvn_conf"] = dict(resolved.get("cmvn_conf") or {}, cmvn_file=path, is_json_cmvn=True)
    raw["cmvn_conf"] = dict(raw.get("cmvn_conf") or {}, is_json_cmvn=True)


def _write(model: torch.nn.Module, moe_raw: Dict[str, Any], moe_resolved: Dict[str, Any],
           output_dir: str) -> None:
    """train.yaml, final.pt, units.txt and the CMVN file, via a renamed temporary dir."""
    from wenet_moe.train.checkpoint import atomic_torch_save

    final_dir = os.path.abspath(output_dir)
    with new_model_dir(output_dir, ".upcycle.") as tmp:
        tok = dict(moe_raw.get("tokenizer_conf") or {})
        units = (moe_resolved.get("tokenizer_conf") or {}).get("symbol_table_path")
        shutil.copyfile(units, os.path.join(tmp, "units.txt"))
        tok["symbol_table_path"] = os.path.join(final_dir, "units.txt")
        moe_raw["tokenizer_conf"] = tok
        cmvn_file = (moe_resolved.get("cmvn_conf") or {}).get("cmvn_file")
        if moe_raw.get("cmvn") is not None and cmvn_file:
            name = os.path.basename(cmvn_file)
            shutil.copyfile(cmvn_file, os.path.join(tmp, name))
            moe_raw["cmvn_conf"] = dict(moe_raw.get("cmvn_conf") or {},
                                        cmvn_file=os.path.join(final_dir, name))
        atomic_torch_save(model.state_dict(), os.path.join(tmp, "final.pt"))
        save_yaml(moe_raw, os.path.join(tmp, "train.yaml"))
