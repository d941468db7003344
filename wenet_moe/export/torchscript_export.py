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

import numpy as np
import torch

from wenet_moe.export.gate import DEFAULT_MAX_DISAGREEMENT, Agreement, GateInputs
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


def _ts_stream(module, x: torch.Tensor, chunk: int, required: int, sub: int, rc: int
               ) -> torch.Tensor:
    """forward_encoder_chunk over x (1, T, F) chunk by chunk from empty caches (as
    WeNet's LibTorch runtime); returns the concatenated output (1, T', D)."""
    caches = [torch.zeros(0, 0, 0, 0), torch.zeros(0, 0, 0, 0)]
    offset, outs = 0, []
    for start, end in chunk_windows(x.size(1), chunk, sub, rc):
        out, caches[0], caches[1] = module.forward_encoder_chunk(x[:, start:end], offset,
                                                                 required, *caches)
        outs.append(out)
        offset += out.size(1)
    return torch.cat(outs, 1) if outs else torch.zeros(1, 0, 0)


def check_quantized_torchscript(model: torch.nn.Module, path: str, inputs: GateInputs,
                                chunk_size: int, left_chunks: int, reverse_weight: float,
                                max_disagreement: float = DEFAULT_MAX_DISAGREEMENT
                                ) -> Dict[str, float]:
    """The int8 accuracy gate (see `gate`) on `final.int8.zip` against the eager
    fp32 model, on the gate's inputs: CTC of the full-context encoder (the whole
    utterance as one chunk), CTC of the streaming encoder at the export's chunk and
    left chunks, and both decoders teacher-forced on the fp32 greedy hypothesis
    given the encoder output of their own precision. Raises Int8GateError (one
    line) beyond `max_disagreement`; returns the report."""
    from wenet_moe.train.diagnostics import greedy_collapse

    loaded = torch.jit.load(path, map_location="cpu").eval()
    base = os.path.basename(path)
    blank = int(model.blank_id)
    chunk = chunk_size if chunk_size > 0 else 16
    required = chunk * left_chunks if (chunk_size > 0 and left_chunks > 0) else -1
    sub, rc = model.subsampling_rate(), model.right_context()
    rw = float(reverse_weight) if model.is_bidirectional_decoder() else 0.0
    full = Agreement(f"{base} full-context CTC", blank_id=blank)
    stream = Agreement(f"{base} chunk-{chunk} streaming CTC", blank_id=blank)
    decoder = Agreement(f"{base} forward_attention_decoder", ctc=False)
    with torch.no_grad():
        for feat in inputs.feats:
            x = torch.from_numpy(np.ascontiguousarray(feat, dtype=np.float32))[None]
            if x.size(1) < rc + 1:
                continue
            enc = [m.forward_encoder_chunk(x, 0, -1)[0] for m in (model, loaded)]
            lp = [m.ctc_activation(h) for m, h in zip((model, loaded), enc)]
            full.add(lp[0][0].numpy(), lp[1][0].numpy())
            hs = [_ts_stream(m, x, chunk, required, sub, rc) for m in (model, loaded)]
            stream.add(*(m.ctc_activation(h)[0].numpy() for m, h in zip((model, loaded), hs)))
            hyp = greedy_collapse(lp[0][0].argmax(-1).tolist(), blank)
            hyps = torch.tensor([[model.sos_symbol()] + hyp], dtype=torch.long)
            lens = torch.tensor([hyps.size(1)], dtype=torch.long)
            outs = [m.forward_attention_decoder(hyps, lens, h, rw)
                    for m, h in zip((model, loaded), enc)]
            decoder.add(outs[0][0][0].numpy(), outs[1][0][0].numpy())
            if rw > 0:
                decoder.add(outs[0][1][0].numpy(), outs[1][1][0].numpy())
    report: Dict[str, float] = {}
    for tally in (full, stream, decoder):
        report.update(tally.check(max_disagreement, inputs))
    return report
