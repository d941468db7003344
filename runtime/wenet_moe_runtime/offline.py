"""Whole-utterance decoding of an export (torch-free).

Computes the fbank of the complete waveform at once, runs the encoder over it in
the export's chunks (windows of `(chunk-1)*subsampling + right_context + 1` frames
with stride `chunk*subsampling`, the caches carried as in WeNet's
`forward_chunk_by_chunk`), the CTC head over all frames, then the search. No
endpointing: one result per waveform. `decode_many` advances the chunks of several
waveforms together (one `encoder_batch.onnx` call per step when the model loaded it).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from .ctc_search import ctc_greedy_search, ctc_prefix_beam_search
from .decoder import DecodeOptions, format_nbest, rescore, resolve_chunk_size, wfst_hyps
from .features import compute_fbank
from .model import OnnxAsrModel


def chunk_windows(model: OnnxAsrModel, feats: np.ndarray, chunk_size: int) -> List[np.ndarray]:
    """The encoder windows of a (T, bins) fbank, in order: windows of
    `(chunk-1)*subsampling + right_context + 1` frames with stride `chunk*subsampling`
    (the whole input for `chunk_size <= 0`; none when it is shorter than one frame's
    context)."""
    info = model.info
    context = info.right_context + 1
    num_frames = feats.shape[0]
    if num_frames < context:
        return []
    if chunk_size <= 0:
        return [feats]
    window = (chunk_size - 1) * info.subsampling_rate + context
    stride = chunk_size * info.subsampling_rate
    return [feats[start: min(start + window, num_frames)]
            for start in range(0, num_frames - context + 1, stride)]


def encode_chunks(model: OnnxAsrModel, feats: np.ndarray, chunk_size: int) -> List[np.ndarray]:
    """(T, bins) fbank -> list of (T'_i, D) encoder outputs, one per chunk window
    (one window for `chunk_size <= 0`)."""
    state = model.new_state(chunk_size)
    return [model.forward_encoder_chunk(w, state) for w in chunk_windows(model, feats, chunk_size)]


def encode_many(model: OnnxAsrModel, feats: Sequence[np.ndarray], chunk_size: int
                ) -> List[List[np.ndarray]]:
    """`encode_chunks` of several utterances, advanced together: each step runs the
    next window of every utterance that has one through `forward_encoder_chunks`
    (with the batched encoder loaded, one `encoder_batch.onnx` call, so an MoE layer
    reads each chosen expert once per step rather than once per utterance). Each
    utterance's outputs equal `encode_chunks` of it alone within float rounding."""
    windows = [chunk_windows(model, f, chunk_size) for f in feats]
    states = [model.new_state(chunk_size) for _ in feats]
    outs: List[List[np.ndarray]] = [[] for _ in feats]
    for step in range(max((len(w) for w in windows), default=0)):
        live = [i for i, w in enumerate(windows) if step < len(w)]
        got = model.forward_encoder_chunks([windows[i][step] for i in live], [states[i] for i in live])
        for i, out in zip(live, got):
            outs[i].append(out)
    return outs


def encode_utterance(model: OnnxAsrModel, feats: np.ndarray, chunk_size: int) -> np.ndarray:
    """(T, bins) fbank -> (T', D) encoder output, chunk by chunk."""
    outs = encode_chunks(model, feats, chunk_size)
    if not outs:
        return np.zeros((0, model.info.output_size), np.float32)
    return np.concatenate(outs, axis=0)


def utterance_fbank(model: OnnxAsrModel, samples: np.ndarray) -> np.ndarray:
    """(T, bins) float32 fbank of one waveform (int16 PCM or float32 in [-1, 1]) at
    the model's rate, with the model's fbank options."""
    samples = np.asarray(samples)
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) / 32768.0
    rate = int(model.info.fbank.sample_rate)
    return np.asarray(compute_fbank(samples.astype(np.float32), rate, model.info.fbank),
                      dtype=np.float32)


def decode_samples(model: OnnxAsrModel, samples: np.ndarray, opts: DecodeOptions) -> List[Dict]:
    """Decode one waveform (int16 PCM or float32 in [-1, 1]) at the model's rate.

    Returns:
        WeNet nbest list `[{"sentence", "word_pieces"}]`, best first.
    """
    chunk = resolve_chunk_size(model, opts.chunk_size)
    return search_chunks(model, encode_chunks(model, utterance_fbank(model, samples), chunk), opts)


def decode_many(model: OnnxAsrModel, samples: Sequence[np.ndarray], opts: DecodeOptions
                ) -> List[List[Dict]]:
    """`decode_samples` of several waveforms, their encoder chunks advanced together
    (`encode_many`); the searches run one utterance at a time. Results equal
    `decode_samples` of each alone up to float rounding of the encoder sums (which
    can flip a near-tie)."""
    chunk = resolve_chunk_size(model, opts.chunk_size)
    feats = [utterance_fbank(model, s) for s in samples]
    return [search_chunks(model, chunks, opts) for chunks in encode_many(model, feats, chunk)]


def search_chunks(model: OnnxAsrModel, chunks: Sequence[np.ndarray], opts: DecodeOptions) -> List[Dict]:
    """The nbest of one utterance from its encoder chunk outputs: the CTC head, the
    search of `opts.mode`, attention rescoring."""
    encoder_out = (np.concatenate(chunks, axis=0) if chunks
                   else np.zeros((0, model.info.output_size), np.float32))
    # CTC per chunk, as the streaming decoder runs it: int8 models quantize
    # activations per call, so this keeps offline and streaming results identical.
    log_probs = (np.concatenate([model.ctc_log_probs(h) for h in chunks], axis=0) if chunks
                 else np.zeros((0, model.info.vocab_size), np.float32))
    blank = model.symbols.blank_id
    if opts.mode == "ctc_greedy":
        tokens, times = ctc_greedy_search(log_probs, blank)
        hyps = [(tokens, 0.0, times)]
    else:
        if opts.wfst is not None:
            hyps = wfst_hyps(opts, log_probs)
        else:
            hyps = ctc_prefix_beam_search(log_probs, opts.beam_size, blank, context=opts.context)
        if opts.mode == "attention_rescoring":
            hyps = rescore(model, hyps, encoder_out, opts)
    return format_nbest(model, hyps, opts.nbest, 0, True)
