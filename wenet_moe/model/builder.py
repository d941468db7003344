"""Config (the resolved train.yaml as a dict) -> ASRModel, through one registry."""
from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Dict, Tuple

from torch import nn

from wenet_moe.config import ConfigError, check_keys

# The one registry: component kind -> config string -> "module:Class".
REGISTRY: Dict[str, Dict[str, str]] = {
    "encoder": {
        "conformer": "wenet_moe.model.encoder:ConformerEncoder",
        "transformer": "wenet_moe.model.encoder:TransformerEncoder",
    },
    "decoder": {
        "transformer": "wenet_moe.model.decoder:TransformerDecoder",
        "bitransformer": "wenet_moe.model.decoder:BiTransformerDecoder",
    },
    "ctc": {"ctc": "wenet_moe.model.ctc:CTC"},
    "cmvn": {"global_cmvn": "wenet_moe.layers.cmvn:GlobalCMVN"},
    "model": {"asr_model": "wenet_moe.model.asr_model:ASRModel"},
}

DEFAULTS = {"encoder": "conformer", "decoder": "bitransformer", "ctc": "ctc",
            "cmvn": None, "model": "asr_model"}

TOP_LEVEL_KEYS = (
    "encoder", "encoder_conf", "decoder", "decoder_conf", "ctc", "ctc_conf", "cmvn",
    "cmvn_conf", "model", "model_conf", "moe_conf", "tokenizer", "tokenizer_conf",
    "dataset", "dataset_conf", "optim", "optim_conf", "scheduler", "scheduler_conf",
    "grad_clip", "accum_grad", "max_epoch", "log_interval", "save_interval", "dtype",
    "seed", "input_dim", "output_dim",
)
MODEL_CONF_KEYS = ("ctc_weight", "reverse_weight", "lsm_weight", "length_normalized_loss",
                   "ignore_id", "special_tokens")
CTC_CONF_KEYS = ("ctc_blank_id",)
CMVN_CONF_KEYS = ("cmvn_file", "is_json_cmvn")
# Constructor arguments the builder fills in itself (not accepted in *_conf blocks).
_RESERVED = {"self", "input_size", "vocab_size", "encoder_output_size", "moe_conf",
             "global_cmvn", "args", "kwargs"}


def resolve(kind: str, name: Any) -> type:
    """Class registered for `kind` (e.g. "encoder") under config string `name`."""
    table = REGISTRY[kind]
    if name not in table:
        raise ConfigError(f"unknown {kind} '{name}' (choose from {', '.join(sorted(table))})")
    module, cls = table[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _conf(configs: Dict[str, Any], key: str) -> Dict[str, Any]:
    conf = configs.get(key) or {}
    if not isinstance(conf, dict):
        raise ConfigError(f"'{key}' must be a mapping, got {type(conf).__name__}")
    return dict(conf)


def _constructor_keys(cls: type) -> Tuple[str, ...]:
    params = inspect.signature(cls.__init__).parameters
    return tuple(p for p in params if p not in _RESERVED)


def _accepts(cls: type, arg: str) -> bool:
    return arg in inspect.signature(cls.__init__).parameters


def _validates_itself(cls: type) -> bool:
    """Classes taking **conf check their own keys (naming `<where>.<key>`)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(cls.__init__).parameters.values())


def _build(cls: type, where: str, conf: Dict[str, Any], *args: Any, **extra: Any) -> nn.Module:
    if not _validates_itself(cls):
        check_keys(conf, _constructor_keys(cls), where)
    extra = {k: v for k, v in extra.items() if _accepts(cls, k)}
    try:
        return cls(*args, **conf, **extra)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if where in msg else f"{where}: {msg}") from e


def _special_tokens(configs: Dict[str, Any], model_conf: Dict[str, Any]) -> Dict[str, int]:
    tokens = dict(_conf(configs, "tokenizer_conf").get("special_tokens") or {})
    tokens.update(model_conf.get("special_tokens") or {})
    return tokens


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(total parameters, parameters active per frame).

    For MoE FFNs only `n_expert_activated` of the `n_expert` experts run per frame;
    `wenet_moe.layers.moe.active_parameters(model)` is used when it exists, otherwise
    every module with integer `n_expert` / `n_expert_activated` attributes counts the
    parameters under its `experts` child (or of its own, minus its router, if it has
    no such child) scaled by n_expert_activated / n_expert.
    """
    total = sum(p.numel() for p in model.parameters())
    try:
        moe = importlib.import_module("wenet_moe.layers.moe")
    except ModuleNotFoundError:
        moe = None
    if moe is not None and hasattr(moe, "active_parameters"):
        return total, int(moe.active_parameters(model))
    inactive = 0.0
    for module in model.modules():
        n = getattr(module, "n_expert", None)
        k = getattr(module, "n_expert_activated", None)
        if not (isinstance(n, int) and isinstance(k, int) and n > 0 and k < n):
            continue
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module):
            expert_params = sum(p.numel() for p in experts.parameters())
        else:
            expert_params = sum(p.numel() for name, p in module.named_parameters()
                                if not name.startswith(("router", "gate")))
        inactive += expert_params * (n - k) / n
    return total, int(round(total - inactive))


def build_model(configs: Dict[str, Any]) -> nn.Module:
    """Build the ASRModel described by `configs` (the resolved train.yaml).

    Raises ConfigError naming the key for unknown keys, unknown component names
    and missing `input_dim` / `output_dim`.
    """
    if not isinstance(configs, dict):
        raise ConfigError(f"config must be a mapping, got {type(configs).__name__}")
    check_keys(configs, TOP_LEVEL_KEYS, "")
    for key in ("input_dim", "output_dim"):
        if not isinstance(configs.get(key), int) or configs[key] <= 0:
            raise ConfigError(f"config needs a positive integer '{key}', got {configs.get(key)!r}")
    input_dim, vocab_size = configs["input_dim"], configs["output_dim"]
    names = {k: configs.get(k, d) for k, d in DEFAULTS.items()}
    moe_conf = _conf(configs, "moe_conf")
    if moe_conf:  # checked even for dense models, so a typo never goes unnoticed
        importlib.import_module("wenet_moe.layers.moe_router").resolve_moe_conf(moe_conf)
    model_conf = _conf(configs, "model_conf")
    ctc_conf = _conf(configs, "ctc_conf")
    cmvn_conf = _conf(configs, "cmvn_conf")
    check_keys(model_conf, MODEL_CONF_KEYS, "model_conf")
    check_keys(ctc_conf, CTC_CONF_KEYS, "ctc_conf")
    check_keys(cmvn_conf, CMVN_CONF_KEYS, "cmvn_conf")

    global_cmvn = None
    if names["cmvn"] is not None and cmvn_conf.get("cmvn_file"):
        from wenet_moe.layers.cmvn import load_cmvn
        mean, istd = load_cmvn(cmvn_conf["cmvn_file"], bool(cmvn_conf.get("is_json_cmvn", True)))
        if mean.shape[0] != input_dim:
            raise ConfigError(f"cmvn_conf.cmvn_file {cmvn_conf['cmvn_file']}: {mean.shape[0]} dims, "
                              f"but input_dim is {input_dim}")
        global_cmvn = resolve("cmvn", names["cmvn"])(mean, istd)

    encoder_cls = resolve("encoder", names["encoder"])
    encoder = _build(encoder_cls, "encoder_conf", _conf(configs, "encoder_conf"), input_dim,
                     global_cmvn=global_cmvn, moe_conf=moe_conf)
    if global_cmvn is not None and not _accepts(encoder_cls, "global_cmvn"):
        raise ConfigError(f"encoder '{names['encoder']}' does not take a global CMVN")
    d_model = encoder.output_size()
    decoder = _build(resolve("decoder", names["decoder"]), "decoder_conf",
                     _conf(configs, "decoder_conf"), vocab_size, d_model, moe_conf=moe_conf)
    blank_id = ctc_conf.get("ctc_blank_id", 0)
    if isinstance(blank_id, bool) or not isinstance(blank_id, int) or not 0 <= blank_id < vocab_size:
        raise ConfigError(f"ctc_conf.ctc_blank_id: expected an id in 0..{vocab_size - 1}, "
                          f"got {blank_id!r}")
    ctc = resolve("ctc", names["ctc"])(vocab_size, d_model, blank_id=blank_id)
    model_cls = resolve("model", names["model"])
    args = {k: v for k, v in model_conf.items() if k != "special_tokens"}
    args["special_tokens"] = _special_tokens(configs, model_conf)
    try:
        model = model_cls(vocab_size, encoder, decoder, ctc, **args)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    total, active = count_parameters(model)
    logging.info("model: %d parameters, %d active per frame (%.2f M / %.2f M)",
                 total, active, total / 1e6, active / 1e6)
    return model
