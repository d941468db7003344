"""Whole-utterance decoding of an export (torch-free).

Computes the fbank of the complete waveform at once, runs the encoder over it in
the export's chunks (windows of `(chunk-1)*subsampling + right_context + 1` frames
with stride `chunk*subsampling`, the caches carried as in WeNet's
`forward_chunk_by_chunk`), the CTC head over all frames, then the search. No
endpointing: one result per waveform.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .ctc_search import ctc_greedy_search, ctc_prefix_beam_search
from .decoder import DecodeOptions, format_nbest, rescore, resolve_chunk_size, wfst_hyps
from .features import compute_fbank
from .model import OnnxAsrModel


def encode_chunks(model: OnnxAsrModel, feats: np.ndarray, chunk_size: int) -> List[np.ndarray]:
    """(T, bins) fbank -> list of (T'_i, D) encoder outputs, one per chunk window
    (one window for `chunk_size <= 0`)."""
    info = model.info
    context = info.right_context + 1
    num_frames = feats.shape[0]
    state = model.new_state(chunk_size)
    if num_frames < context:
        return []
    if chunk_size <= 0:
        return [model.forward_encoder_chunk(feats, state)]
    window = (chunk_size - 1) * info.subsampling_rate + context
    stride = chunk_size * info.subsampling_rate
    return [model.forward_encoder_chunk(feats[start: min(start + window, num_frames)], state)
            for start in range(0, num_frames - context + 1, stride)]


def encode_utterance(model: OnnxAsrModel, feats: np.ndarray, chunk_size: int) -> np.ndarray:
    """(T, bins) fbank -> (T', D) encoder output, chunk by chunk."""
    outs = encode_chunks(model, feats, chunk_size)
    if not outs:
        return np.zeros((0, model.info.output_size), np.float32)
    return np.concatenate(outs, axis=0)


def decode_samples(model: OnnxAsrModel, samples: np.ndarray, opts: DecodeOptions) -> List[Dict]:
    """Decode one waveform (int16 PCM or float32 in [-1, 1]) at the model's rate.

    Returns:
        WeNet nbest list `[{"sentence", "word_pieces"}]`, best first.
    """
    samples = np.asarray(samples)
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) / 32768.0
    rate = int(model.info.fbank.sample_rate)
    feats = np.asarray(compute_fbank(samples.astype(np.float32), rate, model.info.fbank),
                       dtype=np.float32)
    chunk = resolve_chunk_size(model, opts.chunk_size)
    chunks = encode_chunks(model, feats, chunk)
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
