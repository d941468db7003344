"""TorchScript export: the whole ASRModel scripted into one file (`final.zip`) with
WeNet's export API (`subsampling_rate`, `right_context`, `sos_symbol`,
`eos_symbol`, `is_bidirectional_decoder`, `forward_encoder_chunk`,
`ctc_activation`, `forward_attention_decoder`), plus its verification against the
eager model. `--quantize int8` adds `final.int8.zip` (dynamic int8 nn.Linear).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, Optional, Sequence

import torch

from wenet_moe.export.verify import (ParityError, chunk_windows, compare, feature_dim,
                                     random_hyps)

EXPORT_API = ("subsampling_rate", "right_context", "sos_symbol", "eos_symbol",
              "is_bidirectional_decoder", "forward_encoder_chunk", "ctc_activation",
              "forward_attention_decoder")


def export_torchscript(model: torch.nn.Module, path: str,
                       metadata: Optional[Dict[str, str]] = None) -> None:
    """Script `model` and save it to `path`; `metadata` goes in as extra file
    `metadata.json` (read it with `torch.jit.load(path, _extra_files=...)`)."""
    import json

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notice
        scripted = torch.jit.script(model.eval())
    extra = {"metadata.json": json.dumps(metadata or {}, sort_keys=True)}
    torch.jit.save(scripted, path, _extra_files=extra)


def quantize_torchscript(model: torch.nn.Module, path: str,
                         metadata: Optional[Dict[str, str]] = None) -> None:
    """Dynamic int8 quantization of every nn.Linear (weights int8, activations
    quantized on the fly), scripted and saved to `path`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)
    export_torchscript(quantized, path, metadata)


def verify_torchscript(model: torch.nn.Module, path: str, chunk_size: int, left_chunks: int,
                       reverse_weight: float, seed: int = 0,
                       lengths: Sequence[int] = (7, 30, 257)) -> Dict[str, float]:
    """Load `path` and compare every export method with the eager model: integer
    methods exactly, streaming chunks (the export's chunk, and 1-frame chunks with
    unlimited history), CTC and both decoders within `verify.compare`'s tolerance."""
    loaded = torch.jit.load(path, map_location="cpu").eval()
    for name in EXPORT_API:
        if not hasattr(loaded, name):
            raise ParityError(f"{os.path.basename(path)}: export method '{name}' is missing")
    for name in EXPORT_API[:5]:
        got, want = getattr(loaded, name)(), getattr(model, name)()
        if got != want:
            raise ParityError(f"{os.path.basename(path)}: {name}() = {got}, eager {want}")
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    base = os.path.basename(path)
    sub, rc = model.subsampling_rate(), model.right_context()
    chunk = chunk_size if chunk_size > 0 else 16
    cases = [(chunk, chunk * left_chunks if left_chunks > 0 else -1), (1, -1)]
    with torch.no_grad():
        for t in lengths:
            x = torch.randn(1, t, feature_dim(model), generator=gen)
            for chunk_i, required in cases:
                caches = [torch.zeros(0, 0, 0, 0)] * 2
                ref = [torch.zeros(0, 0, 0, 0)] * 2
                offset = 0
                for start, end in chunk_windows(t, chunk_i, sub, rc):
                    got = loaded.forward_encoder_chunk(x[:, start:end], offset, required, *caches)
                    want = model.forward_encoder_chunk(x[:, start:end], offset, required, *ref)
                    tag = f"T={t} chunk={chunk_i} frames {start}:{end}"
                    for what, g, w in zip(("output", "att_cache", "cnn_cache"), got, want):
                        worst = max(worst, compare(f"{base} forward_encoder_chunk {what} {tag}",
                                                   g.numpy(), w.numpy()))
                    caches, ref = [got[1], got[2]], [want[1], want[2]]
                    offset += want[0].size(1)
            enc_out, _ = model.encoder(x, torch.tensor([t]), -1, -1)
            worst = max(worst, compare(f"{base} ctc_activation T={t}",
                                       loaded.ctc_activation(enc_out).numpy(),
                                       model.ctc_activation(enc_out).numpy()))
            hyps, lens = random_hyps(model, gen, 4, 7)
            for rw in sorted({0.0, float(reverse_weight)}):
                got = loaded.forward_attention_decoder(hyps, lens, enc_out, rw)
                want = model.forward_attention_decoder(hyps, lens, enc_out, rw)
                for what, g, w in zip(("l2r", "r2l"), got, want):
                    worst = max(worst, compare(
                        f"{base} forward_attention_decoder {what} T={t} reverse_weight={rw}",
                        g.numpy(), w.numpy()))
    return {base: worst}


def check_quantized_torchscript(model: torch.nn.Module, path: str, seed: int = 0
                                ) -> Dict[str, float]:
    """Load the int8 file and run a chunk, the CTC head and both decoders beside the
    eager fp32 model: equal shapes and finite values (int8 is not expected to be
    close). Returns {"final.int8.zip greedy agreement": fraction of frames whose
    CTC argmax equals fp32's}."""
    loaded = torch.jit.load(path, map_location="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 120, feature_dim(model), generator=gen)
    with torch.no_grad():
        got = loaded.forward_encoder_chunk(x, 0, -1)
        want = model.forward_encoder_chunk(x, 0, -1)
        got_lp, want_lp = loaded.ctc_activation(got[0]), model.ctc_activation(want[0])
        hyps, lens = random_hyps(model, gen, 3, 5)
        dec = loaded.forward_attention_decoder(hyps, lens, want[0], 0.5)
    for g, w in zip(list(got) + [got_lp] + list(dec),
                    list(want) + [want_lp] + list(model.forward_attention_decoder(
                        hyps, lens, want[0], 0.5))):
        if g.shape != w.shape or not bool(torch.isfinite(g).all()):
            raise ParityError(f"{os.path.basename(path)}: output of shape {tuple(g.shape)} "
                              f"(fp32 {tuple(w.shape)}) or not finite")
    agree = (got_lp.argmax(-1) == want_lp.argmax(-1)).float().mean().item()
    return {f"{os.path.basename(path)} greedy agreement": agree}

