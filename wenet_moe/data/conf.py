"""`dataset_conf`: accepted keys, defaults, and the evaluation variant.

Keys follow WeNet's `dataset_conf` (filter_conf, resample_conf, speed_perturb,
fbank_conf, spec_aug(_conf), spec_sub(_conf), spec_trim(_conf), shuffle(_conf),
sort(_conf), batch_conf, list_shuffle(_conf)) plus `resample_conf.allowed_rates`,
`speed_perturb_conf.speeds`, `add_noise`/`noise_conf` and `reverb`/`rir_conf`.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

from wenet_moe.config import ConfigError, check_keys
from wenet_moe.data.features import FBANK_KEYS, fbank_options

SUB_KEYS = {
    "filter_conf": ("max_length", "min_length", "token_max_length", "token_min_length",
                    "min_output_input_ratio", "max_output_input_ratio"),
    "resample_conf": ("resample_rate", "allowed_rates"),
    "speed_perturb_conf": ("speeds",),
    "fbank_conf": FBANK_KEYS,
    "spec_aug_conf": ("num_t_mask", "num_f_mask", "max_t", "max_f"),
    "spec_sub_conf": ("max_t", "num_t_sub"),
    "spec_trim_conf": ("max_t",),
    "shuffle_conf": ("shuffle_size",),
    "sort_conf": ("sort_size",),
    "list_shuffle_conf": ("shuffle_size",),
    "batch_conf": ("batch_type", "batch_size", "bucket_boundaries", "bucket_batch_sizes",
                   "max_frames_in_batch"),
    "noise_conf": ("noise_list", "snr_db", "prob"),
    "rir_conf": ("num_rirs", "rt60", "room_dim", "prob", "seed"),
}
SWITCHES = ("speed_perturb", "spec_aug", "spec_sub", "spec_trim", "shuffle", "sort", "list_shuffle",
            "add_noise", "reverb")
# WeNet's defaults for the switches (a missing switch means this).
SWITCH_DEFAULTS = {"speed_perturb": False, "spec_aug": True, "spec_sub": False, "spec_trim": False,
                   "shuffle": True, "sort": True, "list_shuffle": True, "add_noise": False, "reverb": False}
DATASET_KEYS = tuple(SUB_KEYS) + SWITCHES + ("feats_type",)

DEFAULTS: Dict[str, Dict[str, Any]] = {
    "filter_conf": {"max_length": 10240, "min_length": 10, "token_max_length": 200, "token_min_length": 1,
                    "min_output_input_ratio": 0.0005, "max_output_input_ratio": 1.0},
    "resample_conf": {"resample_rate": 16000, "allowed_rates": None},
    "speed_perturb_conf": {"speeds": [0.9, 1.0, 1.1]},
    "spec_aug_conf": {"num_t_mask": 2, "num_f_mask": 2, "max_t": 50, "max_f": 10},
    "spec_sub_conf": {"max_t": 20, "num_t_sub": 3},
    "spec_trim_conf": {"max_t": 20},
    "shuffle_conf": {"shuffle_size": 10000},
    "sort_conf": {"sort_size": 500},
    "list_shuffle_conf": {"shuffle_size": 0},
    "batch_conf": {"batch_type": "static", "batch_size": 16, "max_frames_in_batch": 12000,
                   "bucket_boundaries": None, "bucket_batch_sizes": None},
    "noise_conf": {"noise_list": None, "snr_db": [5.0, 20.0], "prob": 0.5},
    "rir_conf": {"num_rirs": 16, "rt60": [0.2, 0.8], "room_dim": [[3.0, 10.0], [3.0, 10.0], [2.5, 4.0]],
                 "prob": 0.3, "seed": 0},
}


def _positive_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{where}: a positive integer is expected, got {v!r}")
    return v


def resolve_dataset_conf(conf: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Check keys and values of `dataset_conf`; return it with every default filled in.

    Raises ConfigError naming `dataset_conf.<key>` (or `dataset_conf.<block>.<key>`).
    """
    conf = copy.deepcopy(dict(conf or {}))
    check_keys(conf, DATASET_KEYS, "dataset_conf")
    for sw in SWITCHES:
        v = conf.get(sw, SWITCH_DEFAULTS[sw])
        if not isinstance(v, bool):
            raise ConfigError(f"dataset_conf.{sw}: true or false expected, got {v!r}")
        conf[sw] = v
    if conf.get("feats_type", "fbank") != "fbank":
        raise ConfigError(f"dataset_conf.feats_type: only 'fbank' is supported, got {conf['feats_type']!r}")
    conf["feats_type"] = "fbank"
    for block, keys in SUB_KEYS.items():
        sub = conf.get(block) or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"dataset_conf.{block}: a mapping is expected")
        check_keys(sub, keys, f"dataset_conf.{block}")
        merged = dict(DEFAULTS.get(block, {}))
        merged.update(sub)
        conf[block] = merged
    rate = _positive_int(conf["resample_conf"]["resample_rate"], "dataset_conf.resample_conf.resample_rate")
    fbank_options(conf["fbank_conf"], rate)  # validates
    bc = conf["batch_conf"]
    kind = bc["batch_type"]
    if kind == "static":
        _positive_int(bc["batch_size"], "dataset_conf.batch_conf.batch_size")
    elif kind == "dynamic":
        _positive_int(bc["max_frames_in_batch"], "dataset_conf.batch_conf.max_frames_in_batch")
    elif kind == "bucket":
        bnd, sizes = bc["bucket_boundaries"], bc["bucket_batch_sizes"]
        if not isinstance(bnd, list) or not isinstance(sizes, list) or len(sizes) != len(bnd) + 1:
            raise ConfigError("dataset_conf.batch_conf.bucket_batch_sizes: needs one more entry than "
                              "bucket_boundaries (both lists)")
        if sorted(bnd) != bnd:
            raise ConfigError("dataset_conf.batch_conf.bucket_boundaries: must be increasing")
        for i, v in enumerate(sizes):
            _positive_int(v, f"dataset_conf.batch_conf.bucket_batch_sizes[{i}]")
    else:
        raise ConfigError(f"dataset_conf.batch_conf.batch_type: '{kind}' is not static, bucket or dynamic")
    speeds = conf["speed_perturb_conf"]["speeds"]
    if not speeds or any(not (0.5 <= float(x) <= 2.0) for x in speeds):
        raise ConfigError("dataset_conf.speed_perturb_conf.speeds: a list of factors in [0.5, 2] is expected")
    for block in ("noise_conf", "rir_conf"):
        p = conf[block]["prob"]
        if not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"dataset_conf.{block}.prob: must be in [0, 1], got {p!r}")
    snr = conf["noise_conf"]["snr_db"]
    if not isinstance(snr, (list, tuple)) or len(snr) != 2 or float(snr[0]) > float(snr[1]):
        raise ConfigError(f"dataset_conf.noise_conf.snr_db: [min, max] expected, got {snr!r}")
    allowed = conf["resample_conf"]["allowed_rates"]
    if allowed is not None and (not isinstance(allowed, list) or not all(isinstance(r, int) for r in allowed)):
        raise ConfigError("dataset_conf.resample_conf.allowed_rates: a list of integer rates (Hz) or null")
    for block, key in (("shuffle_conf", "shuffle_size"), ("sort_conf", "sort_size")):
        _positive_int(conf[block][key], f"dataset_conf.{block}.{key}")
    return conf


def eval_dataset_conf(conf: Optional[Dict[str, Any]], batch_size: Optional[int] = None) -> Dict[str, Any]:
    """The recognition variant of `dataset_conf`: no speed perturbation, noise,
    reverberation, spec_aug/sub/trim, shuffles or sort; dither 0; static batches
    (`batch_size`, else the conf's static size, else 1). Length and token filters
    are opened up as WeNet's recognize.py does, so no test utterance is dropped."""
    out = copy.deepcopy(dict(conf or {}))
    for sw in SWITCHES:
        out[sw] = False
    fb = dict(out.get("fbank_conf") or {})
    fb["dither"] = 0.0
    out["fbank_conf"] = fb
    fc = dict(out.get("filter_conf") or {})
    fc.update(max_length=102400, min_length=0, token_max_length=102400, token_min_length=0,
              min_output_input_ratio=0.0, max_output_input_ratio=1e9)
    out["filter_conf"] = fc
    bc = dict(out.get("batch_conf") or {})
    if batch_size is None:
        batch_size = bc.get("batch_size", 1) if bc.get("batch_type", "static") == "static" else 1
    out["batch_conf"] = {"batch_type": "static", "batch_size": int(batch_size)}
    return out
