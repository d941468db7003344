"""ONNX export for WeNet's own C++ runtime (`wenet-moe export --wenet_runtime`).

WeNet's runtime (`runtime/core/decoder/onnx_asr_model.cc`) loads `encoder.onnx`,
`ctc.onnx` and `decoder.onnx` from one directory and drives them like this:
  * metadata of encoder.onnx, parsed with atoi: `output_size`, `num_blocks`, `head`,
    `cnn_module_kernel`, `subsampling_rate`, `right_context`, `sos_symbol`,
    `eos_symbol`, `is_bidirectional_decoder`, `chunk_size`, `left_chunks`;
  * encoder inputs fed by name (whichever of `chunk`, `offset`, `required_cache_size`,
    `att_cache`, `cnn_cache`, `att_mask` the graph has): chunk float (1, T, F),
    offset and required_cache_size int64 scalars (required = chunk_size x
    left_chunks), att_cache (blocks, head, T_cache, 2 d_k), cnn_cache (blocks, 1, D,
    kernel - 1), att_mask bool (1, 1, required + chunk_size). With left_chunks > 0
    the runtime starts at offset = required with zero caches of that size and masks
    the not yet filled cache slots; with left_chunks <= 0 it starts at offset 0 with
    an empty att_cache and has NO att_mask value, so the graph must not have that
    input. Outputs by position: output, r_att_cache, r_cnn_cache;
  * ctc.onnx: output (1, T', D) -> log-probs (1, T', V), by position;
  * decoder.onnx: exactly three inputs by position: hyps int64 (N, L) = <sos> +
    tokens, padded with 0; hyps_lens int64 (N,) = tokens + 1; encoder_out (1, T, D)
    (all chunk outputs concatenated); outputs by position: l2r and r2l log-probs
    (N, L, V). The runtime weighs them itself with its `--reverse_weight`, and reads
    r2l only when `is_bidirectional_decoder` and its weight > 0.

So, compared with this toolkit's default export: decoder.onnx has no 4th input
`reverse_weight` (the right-to-left decoder always runs when there is one), and with
left_chunks <= 0 encoder.onnx has no `att_mask` input. `WenetRuntimeDriver` drives
graphs exactly as the C++ code does; the export verifies itself with it against the
same procedure run on the PyTorch model.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from wenet_moe.export.common import export_metadata, staged_output, write_symbol_tables
from wenet_moe.export.verify import compare

ENCODER_INPUTS = ["chunk", "offset", "required_cache_size", "att_cache", "cnn_cache", "att_mask"]
ENCODER_OUTPUTS = ["output", "r_att_cache", "r_cnn_cache"]
DECODER_INPUTS = ["hyps", "hyps_lens", "encoder_out"]
DECODER_OUTPUTS = ["score", "r_score"]
RUNTIME_METADATA = ("output_size", "num_blocks", "head", "cnn_module_kernel", "subsampling_rate",
                    "right_context", "sos_symbol", "eos_symbol", "is_bidirectional_decoder",
                    "chunk_size", "left_chunks")
FILES = ("encoder.onnx", "ctc.onnx", "decoder.onnx", "units.txt")


class EncoderChunkNoMask(nn.Module):
    """encoder.onnx for left_chunks <= 0: the five inputs WeNet's runtime feeds
    (no att_mask); otherwise as `wrappers.EncoderChunk`."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, chunk: torch.Tensor, offset: torch.Tensor,
                required_cache_size: torch.Tensor, att_cache: torch.Tensor,
                cnn_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encoder.forward_chunk(
            chunk, int(offset.reshape(-1)[0]), int(required_cache_size.reshape(-1)[0]),
            att_cache, cnn_cache, torch.ones((0, 0, 0), dtype=torch.bool))


class RescoreDecoder(nn.Module):
    """decoder.onnx with WeNet's three inputs: (hyps (N, L), hyps_lens (N,),
    encoder_out (1, T, D)) -> (l2r, r2l) log-probs (N, L, V); the right-to-left
    decoder runs whenever the model has one (r2l is zeros otherwise)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.run_r2l = 1.0 if bool(model.is_bidirectional_decoder()) else 0.0

    def forward(self, hyps: torch.Tensor, hyps_lens: torch.Tensor, encoder_out: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_attention_decoder(hyps, hyps_lens, encoder_out, self.run_r2l)


# ----------------------------------------------------------------- the runtime's loop
Backend = Tuple[Callable[[Dict[str, np.ndarray]], List[np.ndarray]],
                Callable[[np.ndarray], np.ndarray],
                Callable[[np.ndarray, np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]]


class WenetRuntimeDriver:
    """onnx_asr_model.cc + asr_model.cc's chunking, in Python.

    Args:
        meta: the encoder metadata (string values, as in the ONNX file).
        backend: (encoder(feeds by name) -> [output, r_att_cache, r_cnn_cache],
                  ctc(output) -> log-probs, decoder(hyps, hyps_lens, encoder_out) ->
                  (l2r, r2l)); `onnx_backend` or `torch_backend`.
        encoder_inputs: input names of the encoder graph (fed by name).
    """

    def __init__(self, meta: Dict[str, str], backend: Backend, encoder_inputs: Sequence[str]):
        for key in RUNTIME_METADATA:
            if key not in meta:
                raise ValueError(f"encoder.onnx metadata lacks '{key}' (WeNet's runtime reads it)")
        num = {k: int(float(meta[k])) for k in RUNTIME_METADATA}
        self.output_size, self.num_blocks, self.head = num["output_size"], num["num_blocks"], num["head"]
        self.kernel, self.subsampling = num["cnn_module_kernel"], num["subsampling_rate"]
        self.right_context, self.sos, self.eos = num["right_context"], num["sos_symbol"], num["eos_symbol"]
        self.bidirectional = bool(num["is_bidirectional_decoder"])
        self.chunk_size, self.left_chunks = num["chunk_size"], num["left_chunks"]
        self.encoder, self.ctc, self.decoder = backend
        self.encoder_inputs = list(encoder_inputs)
        self.reset()

    def reset(self) -> None:
        d_k2 = self.output_size // self.head * 2
        self.offset = 0
        self.encoder_outs: List[np.ndarray] = []
        self.cached_feature = np.zeros((0, 0), dtype=np.float32)
        if self.left_chunks > 0:
            required = self.chunk_size * self.left_chunks
            self.offset = required
            self.att_cache = np.zeros((self.num_blocks, self.head, required, d_k2), np.float32)
        else:
            self.att_cache = np.zeros((self.num_blocks, self.head, 0, d_k2), np.float32)
        self.cnn_cache = np.zeros((self.num_blocks, 1, self.output_size, self.kernel - 1), np.float32)

    def frames_for_chunk(self, started: bool) -> int:
        """AsrModel::num_frames_for_chunk."""
        if self.chunk_size <= 0:
            return 1 << 30
        if not started:
            return (self.chunk_size - 1) * self.subsampling + self.right_context + 1
        return self.chunk_size * self.subsampling

    def forward_encoder(self, chunk_feats: np.ndarray) -> np.ndarray:
        """ForwardEncoderFunc + CacheFeature: chunk features (n, F) -> log-probs (T', V)."""
        feats = chunk_feats if self.cached_feature.size == 0 else \
            np.concatenate([self.cached_feature, chunk_feats], 0)
        required = self.chunk_size * self.left_chunks
        feeds = {"chunk": feats[None].astype(np.float32),
                 "offset": np.array(self.offset, dtype=np.int64),
                 "required_cache_size": np.array(required, dtype=np.int64),
                 "att_cache": self.att_cache, "cnn_cache": self.cnn_cache}
        if self.left_chunks > 0:
            mask = np.ones((1, 1, required + self.chunk_size), dtype=bool)
            chunk_idx = self.offset // self.chunk_size - self.left_chunks
            if chunk_idx < self.left_chunks:
                mask[..., :(self.left_chunks - chunk_idx) * self.chunk_size] = False
            feeds["att_mask"] = mask
        elif "att_mask" in self.encoder_inputs:
            raise ValueError("encoder.onnx has an att_mask input, which WeNet's runtime does "
                             "not feed with left_chunks <= 0")
        out, self.att_cache, self.cnn_cache = self.encoder(
            {k: v for k, v in feeds.items() if k in self.encoder_inputs})
        self.offset += out.shape[1]
        self.encoder_outs.append(out)
        keep = 1 + self.right_context - self.subsampling
        if chunk_feats.shape[0] >= keep:
            self.cached_feature = chunk_feats[chunk_feats.shape[0] - keep:]
        return self.ctc(out)[0]

    def stream(self, feats: np.ndarray) -> np.ndarray:
        """Whole utterance (T, F) through the chunk loop; CTC log-probs (T', V). The
        final partial chunk is decoded when it yields at least one output frame."""
        outs, pos, started = [], 0, False
        while pos < feats.shape[0]:
            n = self.frames_for_chunk(started)
            piece = feats[pos:pos + n]
            pos += n
            total = piece.shape[0] + (self.cached_feature.shape[0] if started else 0)
            if total < self.right_context + 1:
                break
            outs.append(self.forward_encoder(piece))
            started = True
        return np.concatenate(outs, 0) if outs else np.zeros((0, 0), np.float32)

    def attention_rescoring(self, hyps: Sequence[Sequence[int]], reverse_weight: float
                            ) -> List[float]:
        """AttentionRescoring: combined decoder score per hypothesis."""
        if not hyps or not self.encoder_outs:
            return [0.0] * len(hyps)
        lens = np.array([len(h) + 1 for h in hyps], dtype=np.int64)
        width = int(lens.max())
        pad = np.zeros((len(hyps), width), dtype=np.int64)
        pad[:, 0] = self.sos
        for i, h in enumerate(hyps):
            pad[i, 1:len(h) + 1] = h
        enc = np.concatenate(self.encoder_outs, 1)
        l2r, r2l = self.decoder(pad, lens, enc)
        scores = []
        for i, h in enumerate(hyps):
            score = sum(float(l2r[i, j, w]) for j, w in enumerate(h)) + float(l2r[i, len(h), self.eos])
            r_score = 0.0
            if self.bidirectional and reverse_weight > 0:
                rh = list(reversed(h))
                r_score = sum(float(r2l[i, j, w]) for j, w in enumerate(rh)) \
                    + float(r2l[i, len(h), self.eos])
            scores.append(score * (1 - reverse_weight) + r_score * reverse_weight)
        return scores


def onnx_backend(model_dir: str) -> Tuple[Dict[str, str], Backend, List[str]]:
    """(encoder metadata, backend, encoder input names) of an exported directory."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = {name: ort.InferenceSession(os.path.join(model_dir, name), opts,
                                       providers=["CPUExecutionProvider"])
            for name in ("encoder.onnx", "ctc.onnx", "decoder.onnx")}
    enc, ctc, dec = sess["encoder.onnx"], sess["ctc.onnx"], sess["decoder.onnx"]
    meta = dict(enc.get_modelmeta().custom_metadata_map)
    enc_in = [i.name for i in enc.get_inputs()]
    ctc_in = ctc.get_inputs()[0].name
    dec_in = [i.name for i in dec.get_inputs()]
    if len(dec_in) != 3:
        raise ValueError(f"decoder.onnx has inputs {dec_in}; WeNet's runtime feeds exactly 3")

    def run_decoder(hyps, lens, enc_out):
        out = dec.run(None, dict(zip(dec_in, (hyps, lens, enc_out))))
        return out[0], out[1]

    backend = (lambda feeds: enc.run(None, feeds), lambda x: ctc.run(None, {ctc_in: x})[0],
               run_decoder)
    return meta, backend, enc_in


def torch_backend(model: nn.Module) -> Backend:
    """The same three calls on the PyTorch model (the verification reference)."""
    def run_encoder(feeds):
        mask = feeds.get("att_mask")
        mask_t = torch.from_numpy(mask) if mask is not None else torch.ones((0, 0, 0), dtype=torch.bool)
        with torch.no_grad():
            out = model.encoder.forward_chunk(
                torch.from_numpy(feeds["chunk"]), int(feeds["offset"]),
                int(feeds["required_cache_size"]), torch.from_numpy(feeds["att_cache"]),
                torch.from_numpy(feeds["cnn_cache"]), mask_t)
        return [t.numpy() for t in out]

    def run_ctc(x):
        with torch.no_grad():
            return model.ctc.log_softmax(torch.from_numpy(x)).numpy()

    def run_decoder(hyps, lens, enc_out):
        with torch.no_grad():
            l2r, r2l = model.forward_attention_decoder(
                torch.from_numpy(hyps), torch.from_numpy(lens), torch.from_numpy(enc_out),
                1.0 if model.is_bidirectional_decoder() else 0.0)
        return l2r.numpy(), r2l.numpy()

    return run_encoder, run_ctc, run_decoder


def verify_wenet_runtime(model: nn.Module, out_dir: str, feature_dim: int, seed: int = 0
                         ) -> Dict[str, float]:
    """Drive the graphs as WeNet's runtime does and the PyTorch model the same way, on
    utterances of several lengths; returns {check: max |diff|} (raises ParityError)."""
    meta, backend, enc_in = onnx_backend(out_dir)
    report: Dict[str, float] = {}
    gen = torch.Generator().manual_seed(seed)
    ref = WenetRuntimeDriver(meta, torch_backend(model), enc_in)
    got = WenetRuntimeDriver(meta, backend, enc_in)
    for n in (7, 23, 67, 130, 301):
        feats = (torch.randn(n, feature_dim, generator=gen) * 2 + 8).numpy()
        ref.reset(), got.reset()
        want_lp, got_lp = ref.stream(feats), got.stream(feats)
        report[f"runtime loop ctc T={n}"] = compare(f"runtime ctc T={n}", got_lp, want_lp)
        if want_lp.shape[0] == 0:
            continue
        hyps = [list(np.argsort(-want_lp.max(0))[:k].astype(int)) for k in (1, 3, 5)] + [[]]
        rw = 0.3 if ref.bidirectional else 0.0
        report[f"runtime rescoring T={n}"] = compare(
            f"runtime rescoring T={n}", np.array(got.attention_rescoring(hyps, rw)),
            np.array(ref.attention_rescoring(hyps, rw)))
    return report


def export_wenet_runtime(model: nn.Module, configs: Dict, raw_configs: Dict, output_dir: str,
                         chunk_size: int = 16, left_chunks: int = -1,
                         reverse_weight: Optional[float] = None, verify: bool = True
                         ) -> Dict[str, float]:
    """Write encoder.onnx, ctc.onnx, decoder.onnx and units.txt for WeNet's runtime
    into output_dir (staged, verified, then moved into place)."""
    from wenet_moe.export import onnx_export
    from wenet_moe.export.wrappers import CtcActivation, EncoderChunk

    if chunk_size == 0 or chunk_size < -1:
        raise ValueError(f"--chunk_size must be > 0 (streaming) or -1 (full context), got {chunk_size}")
    if chunk_size < 0 and left_chunks > 0:
        raise ValueError("--num_decoding_left_chunks > 0 needs --chunk_size > 0")
    if reverse_weight is None:
        reverse_weight = float((configs.get("model_conf") or {}).get("reverse_weight", 0.0))
    if not model.is_bidirectional_decoder():
        reverse_weight = 0.0
    from wenet_moe.export import experts_as_computed
    model = experts_as_computed(model.float().eval())   # bf16 / int8 experts: their values
    dim = int(configs["input_dim"])
    onnx_export.set_feature_dim(model, dim)
    meta = export_metadata(model, configs, raw_configs, chunk_size, left_chunks, reverse_weight)
    meta["cnn_module_kernel"] = str(onnx_export.cache_shapes(model)[1][3] + 1)
    report: Dict[str, float] = {}
    with staged_output(output_dir) as stage:
        write_symbol_tables(configs, stage)
        os.unlink(os.path.join(stage, "tokens.txt"))
        example = onnx_export.encoder_example(model, chunk_size, left_chunks)
        axes = {"chunk": {1: "T"}, "att_cache": {2: "T_cache"}, "att_mask": {2: "T_keys"},
                "output": {1: "T_out"}, "r_att_cache": {2: "T_next"}}
        if left_chunks > 0:
            module, names = EncoderChunk(model.encoder), ENCODER_INPUTS
        else:
            module, names, example = EncoderChunkNoMask(model.encoder), ENCODER_INPUTS[:5], example[:5]
            axes.pop("att_mask")
        onnx_export._export(module, example, os.path.join(stage, "encoder.onnx"), names,
                            ENCODER_OUTPUTS, axes, meta,
                            min_dims={k: v for k, v in onnx_export.ENCODER_MIN_DIMS.items()
                                      if k in names})
        d = model.encoder.output_size()
        gen = torch.Generator().manual_seed(0)
        onnx_export._export(CtcActivation(model.ctc), (torch.randn(1, 7, d, generator=gen),),
                            os.path.join(stage, "ctc.onnx"), ["hidden"], ["probs"],
                            {"hidden": {0: "B", 1: "T"}, "probs": {0: "B", 1: "T"}}, meta)
        hyps = torch.randint(0, model.vocab_size, (3, 5), generator=gen)
        hyps[:, 0] = model.sos_symbol()
        dec_example = (hyps, torch.tensor([5, 3, 1], dtype=torch.int64), torch.randn(1, 9, d, generator=gen))
        onnx_export._export(RescoreDecoder(model), dec_example, os.path.join(stage, "decoder.onnx"),
                            DECODER_INPUTS, DECODER_OUTPUTS,
                            {"hyps": {0: "NBEST", 1: "L"}, "hyps_lens": {0: "NBEST"},
                             "encoder_out": {1: "T"}, "score": {0: "NBEST", 1: "L"},
                             "r_score": {0: "NBEST", 1: "L"}}, meta)
        if verify:
            report.update(verify_wenet_runtime(model, stage, dim))
    for key, value in report.items():
        logging.info("export check %s: %.3g", key, value)
    return report
