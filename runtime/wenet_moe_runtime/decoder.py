"""Per-connection streaming decoder: fbank -> encoder chunks -> CTC prefix beam
search -> endpoint -> attention rescoring (torch-free).

In `ctc_greedy` mode the search is the best path (`CtcGreedySearch`), equal to
the offline greedy result; otherwise CTC prefix beam search.

Memory stays bounded over long sessions: fbank frames are freed once consumed, a
segment that decodes nothing is restarted silently when it reaches rule 3's length
(so noise that never triggers an endpoint cannot grow the caches), and
`max_left_chunks` caps the attention cache of full-context exports at serving time.

Feature windows follow WeNet's runtime: the first chunk of a segment needs
`(chunk-1)*subsampling + right_context + 1` fbank frames, later chunks
`chunk*subsampling` new frames, and the last `right_context + 1 - subsampling`
frames of each window are kept and prepended to the next one (the subsampling
convolution has no cache). Each `advance()` returns result events:
`("partial", nbest)`, `("final", nbest)` and `("speech_end", None)`, where
`nbest` is a list of `{"sentence", "word_pieces"}` dicts (word pieces only in
finals, times in ms from the start of the stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .context import ContextGraph
from .ctc_search import CtcGreedySearch, CtcPrefixBeamSearch
from .endpoint import CtcEndpoint, EndpointConfig
from .features import OnlineFbank
from .model import OnnxAsrModel

Event = Tuple[str, Optional[List[Dict]]]
MODES = ("ctc_greedy", "ctc_prefix_beam", "attention_rescoring")


@dataclass
class DecodeOptions:
    """Search and scoring options (WeNet runtime defaults)."""
    chunk_size: int = 0             # 0: the export's chunk size
    beam_size: int = 10             # prefixes kept by the CTC search (= rescored n-best)
    nbest: int = 1                  # hypotheses returned to the client
    mode: str = "attention_rescoring"
    ctc_weight: float = 0.5
    rescoring_weight: float = 1.0
    reverse_weight: Optional[float] = None   # None: the export's reverse_weight
    continuous_decoding: bool = False
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    context: Optional[ContextGraph] = None   # hotword biasing of the CTC prefix search
    # (and, with a graph, of the graph search: wfst becomes wfst.for_context(context))
    # TLG graph search (wfst.WfstDecoder) replacing the prefix search in results:
    # partials from the graph's best active path; finals: ctc_prefix_beam -> graph
    # 1-best, attention_rescoring -> rescored graph n-best
    wfst: Optional[object] = None
    max_left_chunks: int = -1       # > 0: attention cache kept to this many chunks (serving)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.beam_size < 1 or self.nbest < 1:
            raise ValueError(f"beam_size and nbest must be >= 1, got {self.beam_size} and {self.nbest}")
        if self.context is not None and self.mode == "ctc_greedy":
            raise ValueError("hotwords (context) need a beam search mode, not ctc_greedy")
        if self.wfst is not None and self.mode == "ctc_greedy":
            raise ValueError("the LM graph needs mode ctc_prefix_beam or attention_rescoring")
        if self.wfst is not None and hasattr(self.wfst, "for_context"):
            # hotwords with a graph: search TLG o B(context) (wfst.bias_fst), composed
            # once per distinct list; None -> the unbiased graph
            self.wfst = self.wfst.for_context(self.context)


def resolve_chunk_size(model: OnnxAsrModel, chunk_size: int) -> int:
    """The chunk size to run: the export's unless overridden; <= 0 is non-streaming."""
    info = model.info
    if chunk_size == 0:
        return info.chunk_size
    if info.left_chunks > 0 and chunk_size != info.chunk_size:
        raise ValueError(f"chunk_size {chunk_size} differs from the export's {info.chunk_size}, "
                         f"which is fixed for left_chunks={info.left_chunks}")
    return chunk_size


def rescore(model: OnnxAsrModel, hyps: Sequence[Tuple[List[int], float, List[int]]],
            encoder_out: np.ndarray, opts: DecodeOptions) -> List[Tuple[List[int], float, List[int]]]:
    """Attention rescoring of CTC n-best: `rescoring_weight*att + ctc_weight*ctc`.

    Args:
        hyps: (tokens, ctc log score, token frame times) per hypothesis.
        encoder_out: (T, D) encoder output of the segment.
    Returns:
        the hypotheses re-sorted best first with their combined score.
    """
    if not hyps or encoder_out.shape[0] == 0 or all(len(h[0]) == 0 for h in hyps):
        return list(hyps)
    rw = model.info.reverse_weight if opts.reverse_weight is None else opts.reverse_weight
    att = model.attention_scores([h[0] for h in hyps], encoder_out, rw)
    scored = [(h[0], opts.rescoring_weight * float(a) + opts.ctc_weight * h[1], h[2])
              for h, a in zip(hyps, att)]
    scored.sort(key=lambda h: h[1], reverse=True)
    return scored


def wfst_hyps(opts: DecodeOptions, log_probs: np.ndarray
              ) -> List[Tuple[List[int], float, List[int]]]:
    """Graph search of a segment's (T, V) CTC log-posteriors: the 1-best for
    ctc_prefix_beam, the n-best for attention_rescoring; with hotwords the graph is
    TLG o B(context) (`DecodeOptions` composes it), so scores include the bonus of
    completed phrases; (tokens, score, times) best first."""
    wfst = opts.wfst
    if opts.mode != "attention_rescoring":
        hyps = [(h.tokens, h.score, h.times) for h in wfst.decode(log_probs)]
    else:
        hyps = [(h.tokens, h.score, h.times) for h in wfst.decode_nbest(log_probs)]
    return hyps or [([], float("-inf"), [])]


def format_nbest(model: OnnxAsrModel, hyps: Sequence[Tuple[List[int], float, List[int]]],
                 n: int, offset_ms: int, with_pieces: bool) -> List[Dict]:
    """WeNet's nbest list: `[{"sentence", "word_pieces": [{"word","start","end"}]}]`."""
    out = []
    for tokens, _, times in list(hyps)[: max(1, n)]:
        item: Dict = {"sentence": model.symbols.detokenize(tokens)}
        if with_pieces:
            times_ms = [offset_ms + t * model.info.frame_ms for t in times]
            item["word_pieces"] = model.symbols.word_pieces(tokens, times_ms)
        out.append(item)
    if not out:
        out.append({"sentence": "", "word_pieces": []} if with_pieces else {"sentence": ""})
    return out


class StreamingDecoder:
    """Decoding state of one stream; feed int16 PCM, collect events.

    Not thread-safe: one stream is advanced by one thread at a time.
    """

    def __init__(self, model: OnnxAsrModel, opts: DecodeOptions) -> None:
        self.model = model
        self.opts = opts
        self.chunk_size = resolve_chunk_size(model, opts.chunk_size)
        info = model.info
        self.sample_rate = int(info.fbank.sample_rate)
        self.fbank = OnlineFbank(info.fbank)
        self.keep_frames = max(info.right_context + 1 - info.subsampling_rate, 0)
        self.input_done = False
        self.stopped = False          # an endpoint ended the stream (no continuous decoding)
        self.finals_sent = 0
        self.frames_read = 0          # fbank frames taken from the extractor
        self.frames_freed = 0         # of which freed in the extractor
        self.forced_resets = 0        # segments restarted at rule 3 with nothing decoded
        self.samples_received = 0
        self._new_segment()

    # ---------------------------------------------------------------- state
    def _new_segment(self) -> None:
        self.state = self.model.new_state(self.chunk_size)
        blank = self.model.symbols.blank_id
        self.search = (CtcGreedySearch(blank) if self.opts.mode == "ctc_greedy"
                       else CtcPrefixBeamSearch(self.opts.beam_size, blank, context=self.opts.context))
        self.endpoint = CtcEndpoint(self.opts.endpoint, self.model.info.frame_ms)
        self.encoder_outs: List[np.ndarray] = []
        self.log_probs: List[np.ndarray] = []  # kept for the graph's n-best (opts.wfst)
        self.wfst_stream = None
        if self.opts.wfst is not None:
            from .wfst import WfstStream
            self.wfst_stream = WfstStream(self.opts.wfst)
        self.cached = np.zeros((0, self.model.info.fbank.num_mel_bins), np.float32)
        self.segment_started = False
        self.segment_start_ms = int(round(self.frames_read * self.model.info.fbank_shift_ms))

    def decoded_something(self) -> bool:
        best = self.search.nbest(1)
        return bool(best and best[0][0])

    # ---------------------------------------------------------------- input
    def accept_waveform(self, pcm: np.ndarray) -> None:
        """Append samples: int16 PCM, or float32 in [-1, 1]."""
        if self.input_done:
            raise RuntimeError("audio after end of input")
        pcm = np.asarray(pcm)
        samples = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        self.samples_received += samples.shape[0]
        if samples.shape[0]:
            self.fbank.accept_waveform(self.sample_rate, samples)

    def input_finished(self) -> None:
        if not self.input_done:
            self.input_done = True
            self.fbank.input_finished()

    # ------------------------------------------------------------- chunking
    def _frames_needed(self) -> int:
        """New fbank frames of the next streaming window (chunk_size > 0)."""
        info = self.model.info
        return (self.chunk_size * info.subsampling_rate if self.segment_started
                else (self.chunk_size - 1) * info.subsampling_rate + info.right_context + 1)

    def _frames_to_take(self) -> int:
        """New fbank frames the next window reads now: a whole chunk's once ready, the
        rest at end of input (offline: everything at end of input), else 0."""
        if self.stopped:
            return 0
        ready = self.fbank.num_frames_ready - self.frames_read
        if self.chunk_size > 0:
            need = self._frames_needed()
            return need if ready >= need else (ready if self.input_done else 0)
        return ready if self.input_done else 0

    def may_complete_chunk(self, num_samples: int) -> bool:
        """Whether `num_samples` more samples (input not ended) could make an encoder
        window ready: False only when they certainly cannot (no frame is longer than
        one frame shift of new samples)."""
        if self.stopped or self.input_done or self.chunk_size <= 0:
            return False
        if self.chunk_ready():
            return True
        shift = self.model.info.fbank.frame_shift_samples
        most_frames = (self.samples_received + int(num_samples)) // shift + 1
        return most_frames - self.frames_read >= self._frames_needed()

    def chunk_ready(self) -> bool:
        """Whether `next_chunk` would return a window now (or a tail at end of input)."""
        return self._frames_to_take() > 0

    def next_chunk(self) -> Optional[np.ndarray]:
        """The next encoder window (T, bins) if enough frames are ready, else None."""
        take = self._frames_to_take()
        if take <= 0:
            return None
        info = self.model.info
        if self.cached.shape[0] + take < info.right_context + 1:
            if not self.input_done:
                return None
            self.frames_read += take  # a tail too short for one output frame
            self._free_frames()
            return None
        new = np.asarray(self.fbank.get_frames(self.frames_read, take), dtype=np.float32)
        self.frames_read += take
        self._free_frames()
        window = np.concatenate([self.cached, new], axis=0) if self.cached.shape[0] else new
        self.cached = window[window.shape[0] - self.keep_frames:] if self.keep_frames else window[:0]
        self.segment_started = True
        return window

    def _free_frames(self) -> None:
        """Free the extractor's frames that every later window has read already."""
        if self.frames_read > self.frames_freed:
            self.fbank.pop(self.frames_read - self.frames_freed)
            self.frames_freed = self.frames_read

    def encode(self, window: np.ndarray) -> np.ndarray:
        """(T, bins) -> (T', D) encoder output; caches advance."""
        return self.encoded(self.model.forward_encoder_chunk(window, self.state))

    def encoded(self, hidden: np.ndarray) -> np.ndarray:
        """Record a chunk's (T', D) encoder output computed on `self.state` (by
        `encode` or a batched call); returns it."""
        if self.opts.mode == "attention_rescoring":   # only rescoring reads them
            self.encoder_outs.append(hidden)
        return hidden

    def _bound_cache(self) -> None:
        """Keep the last `max_left_chunks` chunks of attention cache (exports with
        unlimited left context only; WeNet's `required_cache_size` cut, at serving
        time). The copy lets the longer array go."""
        keep = self.chunk_size * self.opts.max_left_chunks
        cache = self.state.att_cache
        if (self.opts.max_left_chunks > 0 and self.chunk_size > 0 and self.model.info.left_chunks <= 0
                and cache.ndim == 4 and cache.shape[2] > keep):
            self.state.att_cache = np.ascontiguousarray(cache[:, :, cache.shape[2] - keep:])

    def consume(self, log_probs: np.ndarray) -> List[Event]:
        """Search and endpoint on one chunk's (T', V) CTC log-posteriors."""
        events: List[Event] = []
        self._bound_cache()
        self.search.advance(log_probs)
        if self.wfst_stream is not None:
            self.wfst_stream.accept(log_probs)
            if self.opts.mode == "attention_rescoring":
                self.log_probs.append(log_probs)
        self.endpoint.update(log_probs, self.model.symbols.blank_id)
        decoded = self.decoded_something()
        ep = self.opts.endpoint
        rule3 = ep.rule3_max_utterance_ms if ep.enabled else 0
        if self.endpoint.is_endpoint(decoded):
            events.append(("final", self._final_nbest()))
            if self.opts.continuous_decoding:
                self._new_segment()
            else:
                self.stopped = True
                events.append(("speech_end", None))
        elif not decoded and rule3 > 0 and self.endpoint.utterance_ms >= rule3:
            self.forced_resets += 1   # nothing decoded in a rule-3-long segment: restart it
            self._new_segment()
        elif decoded:
            hyps = self.search.nbest(self.opts.nbest)
            if self.wfst_stream is not None:  # the graph's best active path
                best = self.wfst_stream.best(final=False)
                hyps = [(best.tokens, best.score, best.times)] if best is not None else hyps
            events.append(("partial", format_nbest(self.model, hyps, self.opts.nbest,
                                                   self.segment_start_ms, False)))
        return events

    def finish(self) -> List[Event]:
        """After all chunks of a finished input: the last final result and speech_end."""
        if self.stopped:
            return []
        events: List[Event] = []
        if self.decoded_something() or self.finals_sent == 0:
            events.append(("final", self._final_nbest()))
        self.stopped = True
        events.append(("speech_end", None))
        return events

    def _final_nbest(self) -> List[Dict]:
        self.finals_sent += 1
        hyps = self.search.nbest()
        if self.wfst_stream is not None and self.opts.mode == "attention_rescoring":
            lp = (np.concatenate(self.log_probs, axis=0) if self.log_probs
                  else np.zeros((0, self.model.info.vocab_size), np.float32))
            hyps = wfst_hyps(self.opts, lp)
        elif self.wfst_stream is not None:  # the same search as offline, fed chunk by chunk
            best = self.wfst_stream.best(final=True)
            hyps = [(best.tokens, best.score, best.times)] if best is not None else [([], 0.0, [])]
        if self.opts.mode == "attention_rescoring" and self.encoder_outs:
            hyps = rescore(self.model, hyps, np.concatenate(self.encoder_outs, axis=0), self.opts)
        return format_nbest(self.model, hyps, self.opts.nbest, self.segment_start_ms, True)

    # -------------------------------------------------------------- driving
    def advance(self) -> List[Event]:
        """Decode every ready chunk; at end of input also the final result."""
        events: List[Event] = []
        while True:
            window = self.next_chunk()
            if window is None:
                break
            hidden = self.encode(window)
            events.extend(self.consume(self.model.ctc_log_probs(hidden)))
        if self.input_done and not self.stopped:
            events.extend(self.finish())
        return events


def advance_many(decoders: Sequence[StreamingDecoder]) -> List[List[Event]]:
    """Advance several streams round by round: each round takes one ready chunk of
    every stream, runs their encoders in one call when the model has the batched
    encoder (`OnnxAsrModel.forward_encoder_chunks`; else one call per stream) and
    their CTC heads in one call (fp32). Returns each stream's events, in order;
    they equal those of each stream advanced alone (within float rounding)."""
    events: List[List[Event]] = [[] for _ in decoders]
    active = list(range(len(decoders)))
    while active:
        windows = [(i, decoders[i].next_chunk()) for i in active]
        ready = [(i, w) for i, w in windows if w is not None]
        if not ready:
            break
        model = decoders[ready[0][0]].model
        # streaming chunks only: whole-utterance windows (chunk_size <= 0) differ in
        # length too much for padding to one to pay
        if model.batched and len(ready) > 1 and all(
                decoders[i].model is model and decoders[i].chunk_size > 0 for i, _ in ready):
            outs = model.forward_encoder_chunks([w for _, w in ready],
                                                [decoders[i].state for i, _ in ready])
            hiddens = [decoders[i].encoded(h) for (i, _), h in zip(ready, outs)]
        else:
            hiddens = [decoders[i].encode(w) for i, w in ready]
        # int8 graphs quantize activations per call: keep each stream's CTC on its own
        # so that its result does not depend on which streams shared the batch.
        log_probs = ([model.ctc_log_probs(h) for h in hiddens] if model.int8
                     else model.ctc_log_probs_many(hiddens))
        for (i, _), lp in zip(ready, log_probs):
            events[i].extend(decoders[i].consume(lp))
        active = [i for i, _ in ready]
    for i, d in enumerate(decoders):
        if d.input_done and not d.stopped:
            events[i].extend(d.finish())
    return events
