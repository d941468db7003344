"""Shared pieces of the exporters: loading a checkpoint, export metadata, symbol
tables, and the staging directory that makes an export all-or-nothing (it
replaces the output directory as a whole).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from typing import Any, Dict, Iterator

import torch

from wenet_moe.config import ConfigError
from wenet_moe.model.loading import build_and_load, eval_fbank_options, load_configs  # noqa: F401


def config_hash(configs: Dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the config as canonical JSON (sorted keys)."""
    text = json.dumps(configs, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fbank_conf_json(configs: Dict[str, Any]) -> str:
    """JSON of the runtime `FbankOptions` the model was trained with (dither 0)."""
    return json.dumps(eval_fbank_options(configs).to_dict(), sort_keys=True)


def decoding_window(model: torch.nn.Module, chunk_size: int) -> int:
    """Input frames of one streaming chunk: (chunk-1)*subsampling + right_context + 1
    (67 for chunk 16 with conv2d; WeNet uses 67 for chunk -1 too)."""
    chunk = chunk_size if chunk_size > 0 else 16
    return (chunk - 1) * model.subsampling_rate() + model.right_context() + 1


def export_metadata(model: torch.nn.Module, configs: Dict[str, Any], raw_configs: Dict[str, Any],
                    chunk_size: int, left_chunks: int, reverse_weight: float) -> Dict[str, str]:
    """WeNet's `export_onnx_cpu` keys, sherpa-onnx's keys, `fbank_conf`, `config_hash`."""
    enc = model.encoder
    head = int(enc.attention_heads)
    enc_conf = configs.get("encoder_conf") or {}
    meta = {
        "model_type": "wenet_ctc",
        "batch": 1,
        "chunk_size": chunk_size,
        "left_chunks": left_chunks,
        "reverse_weight": float(reverse_weight),
        "output_size": int(enc.output_size()),
        "num_blocks": int(enc.num_blocks),
        "cnn_module_kernel": int(enc.cnn_module_kernel),
        "head": head,
        "feature_size": int(configs["input_dim"]),
        "vocab_size": int(configs["output_dim"]),
        "decoding_window": decoding_window(model, chunk_size),
        "encoder": str(configs.get("encoder", "conformer")),
        "decoder": str(configs.get("decoder", "bitransformer")),
        "subsampling_rate": int(model.subsampling_rate()),
        "subsampling_factor": int(model.subsampling_rate()),
        "right_context": int(model.right_context()),
        "sos_symbol": int(model.sos_symbol()),
        "eos_symbol": int(model.eos_symbol()),
        "blank_id": int(model.blank_id),
        "is_bidirectional_decoder": int(bool(model.is_bidirectional_decoder())),
        "mlp_type": str(enc_conf.get("mlp_type", "position_wise_feed_forward")),
        "router": str((configs.get("moe_conf") or {}).get("router", "")),
        "fbank_conf": fbank_conf_json(configs),
        "config_hash": config_hash(raw_configs),
        "producer": "wenet-moe",
    }
    return {k: str(v) for k, v in meta.items()}


def write_symbol_tables(configs: Dict[str, Any], out_dir: str) -> None:
    """Copy the symbol table as `units.txt` (WeNet) and `tokens.txt` (sherpa-onnx).

    sherpa-onnx needs `<blank>` in it; its ids must cover the model's vocabulary.
    """
    from wenet_moe_runtime.symbols import SymbolTable

    path = configs["tokenizer_conf"]["symbol_table_path"]
    try:
        table = SymbolTable.read(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(table) != int(configs["output_dim"]):
        raise ConfigError(f"{path}: {len(table)} symbols, but output_dim is "
                          f"{configs['output_dim']}")
    if "<blank>" not in table:
        raise ConfigError(f"{path}: no <blank> symbol (sherpa-onnx needs it)")
    for name in ("units.txt", "tokens.txt"):
        shutil.copyfile(path, os.path.join(out_dir, name))


# what an export directory may hold: graphs (+ external weights), TorchScript
# files, symbol tables, and the recipe's completion marker
EXPORT_FILE = re.compile(r"^(.+\.onnx(\.data)?|.+\.zip|units\.txt|tokens\.txt|\.done)$")
# and `<graph>.kernel/` directories of those files (`expert_split`)
KERNEL_DIR = re.compile(r"^.+\.kernel$")
KERNEL_FILE = re.compile(r"^(piece_\d+\.onnx(\.data)?|whole\.onnx(\.data)?|manifest\.json|experts\.npz)$")


def _export_entry(output_dir: str, name: str) -> bool:
    path = os.path.join(output_dir, name)
    if os.path.isfile(path):
        return bool(EXPORT_FILE.match(name))
    return (bool(KERNEL_DIR.match(name)) and os.path.isdir(path) and not os.path.islink(path)
            and all(KERNEL_FILE.match(n) and os.path.isfile(os.path.join(path, n))
                    for n in os.listdir(path)))


def check_replaceable(output_dir: str) -> None:
    """Refuse an existing `output_dir` that is not a directory or holds anything an
    export does not write (a model directory given by mistake would be deleted
    by replacing it); ConfigError names the directory and the first such entries."""
    if not os.path.lexists(output_dir):
        return
    if not os.path.isdir(output_dir):
        raise ConfigError(f"{output_dir}: exists and is not a directory")
    foreign = sorted(n for n in os.listdir(output_dir) if not _export_entry(output_dir, n))
    if foreign:
        shown = ", ".join(foreign[:3])
        if len(foreign) > 3:
            shown += f" (+{len(foreign) - 3} more)"
        raise ConfigError(f"{output_dir}: holds {shown}, which an export does not write; the "
                          f"export replaces the whole directory: choose a new or export-only "
                          f"--output_dir")


def _new_dir_mode(output_dir: str) -> int:
    """Permissions for the replacing directory: the old one's, else 0o777 & ~umask
    (mkdtemp creates 0o700)."""
    if os.path.isdir(output_dir):
        return stat.S_IMODE(os.stat(output_dir).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def replace_dir(new: str, output_dir: str) -> None:
    """Put directory `new` in place of `output_dir` as a whole: the old directory is
    renamed aside, `new` renamed in, the old one deleted; if the second rename
    fails the old directory is put back unchanged."""
    if not os.path.lexists(output_dir):
        os.rename(new, output_dir)
        return
    aside = tempfile.mkdtemp(prefix=".export-old-", dir=os.path.dirname(output_dir))
    os.rename(output_dir, aside)  # replaces the empty `aside`
    try:
        os.rename(new, output_dir)
    except BaseException:
        os.rename(aside, output_dir)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_output(output_dir: str) -> Iterator[str]:
    """Yield a fresh staging directory beside `output_dir`; on success it replaces
    `output_dir` as a whole (no file of an earlier export survives), on failure
    it is removed and `output_dir` stays untouched. An existing `output_dir`
    holding files an export does not write is refused before any work."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    check_replaceable(output_dir)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        os.chmod(stage, _new_dir_mode(output_dir))
        yield stage
        check_replaceable(output_dir)  # nothing foreign appeared while exporting
        replace_dir(stage, output_dir)
    finally:
        if os.path.isdir(stage):
            shutil.rmtree(stage, ignore_errors=True)
