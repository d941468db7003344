"""Reading checkpoints: one place for every consumer of trained weights.

Below both the model package (`wenet_moe.model.loading`: export, transcribe) and the
trainer (`wenet_moe.train`: resume, averaging, diagnostics), so that neither imports
the other. Writing training checkpoints (RNG states, optimizer, atomic saves) stays
in `wenet_moe.train.checkpoint`; `new_model_dir` stages a whole new model directory
(import-wenet, upcycle, export-wenet).

A checkpoint is a training checkpoint dict with a `model` state dict (`N.pt`,
`step_S.pt`, `final.pt`) or a plain model state dict (`avg_N.pt`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List

import torch

__all__ = ["load_checkpoint", "extract_state_dict", "unwrap_model", "load_model_weights",
           "require_empty_dir", "new_model_dir"]


def require_empty_dir(output_dir: str) -> None:
    """FileExistsError unless `output_dir` is absent or an empty directory."""
    if os.path.lexists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir}: exists and is not empty")


@contextlib.contextmanager
def new_model_dir(output_dir: str, prefix: str) -> Iterator[str]:
    """Yield a staging directory beside `output_dir` (absent or empty); on success it is
    renamed to `output_dir`, on any failure it is removed and `output_dir` is untouched.
    Files written inside should name their final location (`os.path.abspath(output_dir)`)."""
    require_empty_dir(output_dir)
    final_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        require_empty_dir(final_dir)  # nothing appeared there meanwhile
        if os.path.isdir(final_dir):
            os.rmdir(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(path: str) -> Any:
    """torch.load on CPU with a one-line error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / foreign file
        raise ValueError(f"{path}: cannot read checkpoint: {str(e).splitlines()[0]}") from e


def extract_state_dict(ckpt: Any, path: str = "") -> Dict[str, torch.Tensor]:
    """Model state dict from a training checkpoint dict or a plain state dict."""
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        sd = ckpt["model"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    else:
        raise ValueError(f"{path}: not a model checkpoint (no 'model' state dict and not a state dict)")
    # tolerate weights saved from a DDP-wrapped model
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


def _shared_keys(model: torch.nn.Module) -> List[List[str]]:
    """Groups of state-dict keys that name one shared tensor of `model` (e.g. the
    Omni-Router of a stack appears under every block that uses it)."""
    groups: Dict[int, List[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_model_weights(model: torch.nn.Module, path: str, strict: bool = True) -> Dict[str, Any]:
    """Load the weights of any checkpoint (epoch, step, averaged) into `model`.

    Returns the whole checkpoint object (a dict) so callers can read its metadata.
    Missing or unexpected keys raise ValueError naming the file and the first keys; so
    do different values under keys that are one shared tensor in `model` (a checkpoint
    of a model where they were separate tensors would otherwise load silently).
    """
    ckpt = load_checkpoint(path)
    sd = extract_state_dict(ckpt, path)
    target = unwrap_model(model)
    for names in _shared_keys(target):
        present = [n for n in names if n in sd]
        for other in present[1:]:
            if sd[other].shape != sd[present[0]].shape or not torch.equal(sd[other], sd[present[0]]):
                raise ValueError(f"{path}: checkpoint has different values for {present[0]} and "
                                 f"{other}, which are one shared tensor in this model")
    missing, unexpected = target.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise ValueError(f"{path}: checkpoint does not match the model: {'; '.join(parts)}")
    return ckpt if isinstance(ckpt, dict) else {}
