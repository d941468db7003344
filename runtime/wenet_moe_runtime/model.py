"""ONNX Runtime model of a wenet-moe export (torch-free).

`OnnxAsrModel(model_dir)` loads `encoder.onnx`, `ctc.onnx` and `decoder.onnx`
(or their `*.int8.onnx` versions), `units.txt`, and the metadata stored on
`encoder.onnx` (WeNet's `export_onnx_cpu` keys plus `fbank_conf`); the graphs
must agree on `config_hash` and `vocab_size` must match `units.txt`. The model
object holds no per-stream state: streams keep their caches in an `EncoderState`,
so one model serves every connection (ONNX Runtime sessions are thread-safe).

Cross-stream batching: when the export has `encoder_batch.onnx` (fp32 exports;
int8 ones keep per-stream graphs) and `batch_encoder` is on, `forward_encoder_chunks`
advances the chunks of several streams in one encoder call: their windows are
right-padded to the longest, their attention caches left-padded to the longest
history (the mask hides the padding), and the outputs and new caches split back.
An MoE layer then reads each expert's weights once per call, not once per stream.
The batched graph then also runs single streams (a batch of one: the same numbers as
`encoder.onnx`, a few % slower) and `encoder.onnx` is not loaded, so the encoder's
weights are held once (loading both graphs cost the paper MoE 0.8 GB more RSS).
`batch_encoder` is off by default (offline tools decode one stream at a time); the
server turns it on.

MoE FFNs in the C kernel: an fp32 MoE export also holds `encoder.kernel/` and
`encoder_batch.kernel/` (the same streaming graphs cut at their MoE FFNs; with
`--quantize int8` also `encoder.int8.kernel/`: int8 pieces, w8a8 experts); where the
kernel builds (a C compiler, `native.library()`), those run instead of the `.onnx`
files: ONNX Runtime runs the pieces, the kernel each MoE FFN in one call
(`expert_encoder`). `kernel_experts` "auto" (the default) times the kernel graph
against the `.onnx` graph once on this CPU and keeps the faster (`encoder_choice`;
the decision is cached), "on" takes the kernel graph without measuring, "off" /
False (server `--no_kernel_experts`) keeps the `.onnx` graphs.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import onnxruntime as ort

from . import encoder_choice, native
from .expert_encoder import ExpertSplitEncoder, first_line, kernel_dir
from .features import FbankOptions
from .prefix_tree import DECODER_TREE_INPUTS, decoder_tree_feeds
from .symbols import SymbolTable

LOG = logging.getLogger(__name__)
MODEL_FILES = ("encoder", "ctc", "decoder")
BATCH_ENCODER = "encoder_batch"
DECODER_TREE = "decoder_tree"
BATCH_ENCODER_INPUTS = ("chunk", "chunk_lens", "offsets", "required_cache_size", "att_cache",
                        "cnn_cache", "att_mask")
REQUIRED_METADATA = ("chunk_size", "left_chunks", "subsampling_rate", "right_context",
                     "sos_symbol", "eos_symbol", "output_size", "num_blocks", "head",
                     "cnn_module_kernel")


class ModelError(Exception):
    """A model directory that cannot be served (one-line reason naming the file)."""


@dataclass
class ModelInfo:
    """Metadata of an export (integers as in WeNet's `export_onnx_cpu`)."""
    chunk_size: int
    left_chunks: int
    subsampling_rate: int
    right_context: int
    sos: int
    eos: int
    vocab_size: int
    output_size: int
    num_blocks: int
    head: int
    cnn_module_kernel: int
    is_bidirectional_decoder: bool
    reverse_weight: float
    fbank: FbankOptions

    @property
    def frame_ms(self) -> int:
        """Milliseconds per encoder output frame (10 ms fbank shift x subsampling)."""
        return int(round(self.fbank_shift_ms * self.subsampling_rate))

    @property
    def fbank_shift_ms(self) -> float:
        return float(self.fbank.frame_shift_ms)


def _int_meta(meta: Dict[str, str], key: str, path: str) -> int:
    try:
        return int(float(meta[key]))
    except KeyError:
        raise ModelError(f"{path}: metadata key '{key}' is missing") from None
    except ValueError:
        raise ModelError(f"{path}: metadata '{key}' is not a number: {meta[key]!r}") from None


def read_model_info(meta: Dict[str, str], path: str) -> ModelInfo:
    """Parse the encoder metadata map; raise ModelError naming the missing key."""
    for key in REQUIRED_METADATA:
        if key not in meta:
            raise ModelError(f"{path}: metadata key '{key}' is missing")
    fbank = FbankOptions()
    if "fbank_conf" in meta:
        try:
            fbank = FbankOptions.from_dict(json.loads(meta["fbank_conf"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"{path}: metadata 'fbank_conf' is invalid: {exc}") from None
    bidir = str(meta.get("is_bidirectional_decoder", "0")).strip().lower() in ("1", "true")
    return ModelInfo(
        chunk_size=_int_meta(meta, "chunk_size", path),
        left_chunks=_int_meta(meta, "left_chunks", path),
        subsampling_rate=_int_meta(meta, "subsampling_rate", path),
        right_context=_int_meta(meta, "right_context", path),
        sos=_int_meta(meta, "sos_symbol", path),
        eos=_int_meta(meta, "eos_symbol", path),
        vocab_size=_int_meta(meta, "vocab_size", path) if "vocab_size" in meta else -1,
        output_size=_int_meta(meta, "output_size", path),
        num_blocks=_int_meta(meta, "num_blocks", path),
        head=_int_meta(meta, "head", path),
        cnn_module_kernel=_int_meta(meta, "cnn_module_kernel", path),
        is_bidirectional_decoder=bidir,
        reverse_weight=float(meta.get("reverse_weight", 0.0) or 0.0),
        fbank=fbank,
    )


def check_graph_metadata(metas: Dict[str, Dict[str, str]], units_path: str,
                         num_symbols: int) -> None:
    """Graphs of one export belong together: every `config_hash` present is the
    same (graphs without one, e.g. hand-made models, are not compared) and every
    `vocab_size` present equals the symbol table's size.

    Args:
        metas: graph path -> its metadata map, in load order.
        units_path, num_symbols: the symbol table and its number of symbols.
    Raises:
        ModelError naming the first graph that disagrees.
    """
    first = None
    for path, meta in metas.items():
        value = meta.get("config_hash", "").strip()
        if value:
            if first is None:
                first = (path, value)
            elif value != first[1]:
                raise ModelError(f"{path}: config_hash {value} differs from {first[1]} of "
                                 f"{first[0]} (graphs of different exports; re-export the "
                                 f"whole directory)")
        if "vocab_size" in meta:
            vocab = _int_meta(meta, "vocab_size", path)
            if vocab != num_symbols:
                raise ModelError(f"{path}: metadata vocab_size {vocab}, but {units_path} has "
                                 f"{num_symbols} symbols")


class EncoderState:
    """Caches of one stream: `att_cache (blocks, head, T_cache, 2*d_k)`,
    `cnn_cache (blocks, 1, D, kernel-1)`, the positional `offset` (encoder frames)
    and the number of chunks run (for the left-chunk attention mask)."""

    def __init__(self, info: ModelInfo, chunk_size: int) -> None:
        d_k2 = 2 * (info.output_size // info.head)
        self.required_cache_size = chunk_size * info.left_chunks if info.left_chunks > 0 else -1
        cache_t = max(self.required_cache_size, 0)
        self.att_cache = np.zeros((info.num_blocks, info.head, cache_t, d_k2), np.float32)
        lorder = max(info.cnn_module_kernel - 1, 0)
        self.cnn_cache = np.zeros((info.num_blocks, 1, info.output_size, lorder), np.float32)
        # With a fixed-size left cache the first chunks see a zero "fake" history that
        # the mask hides; positions then start at the cache size (as WeNet's runtime).
        self.offset = cache_t
        self.valid_cache = 0  # encoder frames of real history held in att_cache


class OnnxAsrModel:
    """The three ONNX sessions of an export plus its metadata and symbol table.

    Args:
        model_dir: directory with encoder/ctc/decoder `.onnx` and `units.txt`.
        int8: load `*.int8.onnx` instead of the fp32 files.
        num_threads: intra-op threads per session (1 suits many concurrent streams).
        batch_encoder: load `encoder_batch.onnx` instead of `encoder.onnx` when the
            export has it (fp32 only) and run ready streams' chunks together
            (`forward_encoder_chunks`); single streams run as a batch of one.
        max_encoder_batch: most streams in one batched encoder call (larger groups
            are split).
        tree_decoder: rescore with `decoder_tree.onnx` (`decoder_tree.int8.onnx`) when
            the export has it: each distinct prefix (suffix, right to left) of the
            n-best is decoded once (`prefix_tree`); else `decoder.onnx`, one padded
            row per hypothesis. fp32 graphs give the same scores (within float
            rounding); int8 ones quantize the activations of each call's rows.
        kernel_experts: "auto" (True: `$WENET_MOE_KERNEL_EXPERTS`, else "auto") runs
            the MoE FFNs in the C kernel (`<graph>.kernel/`) unless the `.onnx` graph
            measured faster on this CPU (`encoder_choice`: measured once, cached);
            "on": the kernel graph without measuring; "off" / False: the `.onnx` graph.
    Raises:
        ModelError naming the file for a missing or bad graph, ValueError for a bad
        argument.
    """

    def __init__(self, model_dir: str, int8: bool = False, num_threads: int = 1,
                 batch_encoder: bool = False, max_encoder_batch: int = 16,
                 tree_decoder: bool = True, kernel_experts=True) -> None:
        self.model_dir = model_dir
        policy = encoder_choice.policy(kernel_experts)
        self.int8 = bool(int8)
        if int(max_encoder_batch) < 1:
            raise ValueError(f"max_encoder_batch must be >= 1, got {max_encoder_batch}")
        self.max_encoder_batch = int(max_encoder_batch)
        # counters of encoder calls (read by tests and /health)
        self._count_lock = threading.Lock()
        self.batched_calls = 0       # encoder calls advancing >= 2 streams
        self.batched_streams = 0     # stream chunks they advanced
        self.single_calls = 0        # encoder calls advancing one stream
        # CPU seconds of the calling threads inside each session's run (ONNX Runtime
        # computes in the caller's thread with one intra-op thread): what a server's
        # CPU goes to, apart from feature extraction and search (/health)
        self.session_cpu_s = {"encoder": 0.0, "ctc": 0.0, "decoder": 0.0}
        if not os.path.isdir(model_dir):
            raise ModelError(f"{model_dir}: model directory does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(num_threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        # Streaming shapes change every chunk (the attention cache grows, rescoring's
        # n-best lengths vary): ONNX Runtime's memory patterns, cached per input shape,
        # then only add memory (a 30-min session: RSS/stream 1.27x -> 1.02x the first
        # minute's) for about 2 % more encoder time (bench/server_abuse.py --memory).
        opts.enable_mem_pattern = False
        if opts.intra_op_num_threads > 1:
            # every session has its own pool, whose workers spin for a while after its run
            # returns: stopped, they leave the cores to the next session's run
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.sessions: Dict[str, ort.InferenceSession] = {}
        self.paths: Dict[str, str] = {}
        names = list(MODEL_FILES)
        batch_path = os.path.join(model_dir, f"{BATCH_ENCODER}.onnx")
        if batch_encoder and not self.int8 and os.path.isfile(batch_path):
            names[names.index("encoder")] = BATCH_ENCODER
        tree_path = os.path.join(model_dir, f"{DECODER_TREE}.int8.onnx" if int8
                                 else f"{DECODER_TREE}.onnx")
        if tree_decoder and os.path.isfile(tree_path):
            names[names.index("decoder")] = DECODER_TREE
        # why the encoder's MoE FFNs do not run in the C kernel ("" when they do)
        self.kernel_experts = ""
        # how they do: "whole" (`whole.onnx`, one session) or "pieces" ("" when they do not)
        self.kernel_graph = ""
        # the measurement that chose between the kernel graph and the .onnx graph ("" when
        # none was made: kernel_experts "on" / "off", or no kernel graph)
        self.encoder_choice = ""
        onnx_paths: Dict[str, str] = {}     # the .onnx graph of a session run as a kernel graph
        for name in names:
            path = os.path.join(model_dir, f"{name}.int8.onnx" if int8 else f"{name}.onnx")
            if not os.path.isfile(path):
                raise ModelError(f"{path}: model file not found")
            self.paths[name] = path
            split = kernel_dir(path)
            if name in ("encoder", BATCH_ENCODER) and os.path.isdir(split):
                whole = ExpertSplitEncoder.has_whole_graph(split)
                if policy == "off":
                    self.kernel_experts = ("off (kernel_experts=False)" if kernel_experts is not True
                                           else f"off ({encoder_choice.ENV}=off)")
                elif opts.intra_op_num_threads > 1 and not whole:
                    # 25 pieces = 25 ONNX Runtime thread pools on the same cores: spinning,
                    # they ran the paper MoE 12x slower at 2 threads; not spinning, still
                    # 1.27x slower than encoder.onnx (the kernel's calls on one thread)
                    self.kernel_experts = f"off (num_threads {opts.intra_op_num_threads}: the pieces' thread pools)"
                elif native.library() is None:
                    self.kernel_experts = f"off ({native.disabled_reason()})"
                    LOG.warning("%s: MoE CPU kernel unavailable (%s); running %s", split,
                                native.disabled_reason(), os.path.basename(path))
                elif int8 and native.int8_dot_native(native.library()) < 2:
                    # w8a8 without VNNI runs at about the fp32 rate: ONNX Runtime's int8
                    # GEMMs are faster (paper MoE, 10 s offline: 120 vs 218 ms)
                    self.kernel_experts = "off (int8 experts: the kernel's build has no VNNI)"
                else:
                    try:
                        encoder = ExpertSplitEncoder(split, opts, threads=1)
                    except Exception as exc:  # onnxruntime raises several types
                        first = first_line(exc)
                        if not isinstance(exc, (ValueError, OSError)):
                            first = f"{split}: cannot load: {first}"
                        raise ModelError(f"{first} (kernel_experts=False / --no_kernel_experts "
                                         f"runs {os.path.basename(path)})") from None
                    if encoder.mode == "whole" or opts.intra_op_num_threads == 1:
                        self.sessions[name] = encoder
                        self.paths[name] = split
                        onnx_paths[name] = path
                        self.kernel_experts, self.kernel_graph = "on", encoder.mode
                        continue
                    # the whole graph did not load: pieces at 2+ threads are slower than the .onnx
                    self.kernel_experts = f"off ({encoder.pieces_reason})"
            self.sessions[name] = self._load_session(path, opts)
        enc_name = BATCH_ENCODER if BATCH_ENCODER in self.sessions else "encoder"
        enc_path = self.paths[enc_name]
        meta = self.sessions[enc_name].get_modelmeta().custom_metadata_map
        self.info = read_model_info(meta, enc_path)
        units = os.path.join(model_dir, "units.txt")
        if not os.path.isfile(units):
            raise ModelError(f"{units}: symbol table not found")
        try:
            self.symbols = SymbolTable.read(units)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        check_graph_metadata(
            {p: self.sessions[n].get_modelmeta().custom_metadata_map
             for n, p in self.paths.items()}, units, len(self.symbols))
        if self.info.vocab_size < 0:
            self.info.vocab_size = len(self.symbols)
        self._enc_inputs = [i.name for i in self.sessions[enc_name].get_inputs()]
        dec_name = DECODER_TREE if DECODER_TREE in self.sessions else "decoder"
        self._dec_inputs = [i.name for i in self.sessions[dec_name].get_inputs()]
        if dec_name == DECODER_TREE and self._dec_inputs != list(DECODER_TREE_INPUTS):
            raise ModelError(f"{tree_path}: inputs {self._dec_inputs}, expected "
                             f"{list(DECODER_TREE_INPUTS)}")
        self._ctc_input = self.sessions["ctc"].get_inputs()[0].name
        missing = {"chunk", "att_cache", "cnn_cache"} - set(self._enc_inputs)
        if missing:
            raise ModelError(f"{enc_path}: encoder input(s) missing: {sorted(missing)}")
        if BATCH_ENCODER in self.sessions:
            got = [i.name for i in self.sessions[BATCH_ENCODER].get_inputs()]
            if got != list(BATCH_ENCODER_INPUTS):
                raise ModelError(f"{batch_path}: inputs {got}, expected "
                                 f"{list(BATCH_ENCODER_INPUTS)}")
        if policy == "auto" and enc_name in onnx_paths:
            self._choose_encoder(enc_name, onnx_paths[enc_name], opts)

    def _choose_encoder(self, name: str, graph: str, opts: ort.SessionOptions) -> None:
        """Keep the kernel graph of session `name` or replace it by its `.onnx` graph
        `graph`, whichever `encoder_choice` measured (or cached) as faster here."""
        split = self.paths[name]
        key = encoder_choice.choice_key(graph, split, opts.intra_op_num_threads)
        choice = encoder_choice.cached_choice(key)
        plain = None
        if choice is None:
            plain = self._load_session(graph, opts)
            kernel = self.sessions[name]
            graphs = {"kernel": kernel, "onnx": plain}
            run = encoder_choice.workload(self)

            def run_graph(kind: str) -> None:
                self.sessions[name] = graphs[kind]
                run()
            try:
                choice = encoder_choice.decide(encoder_choice.measure(run_graph))
            except Exception as exc:  # onnxruntime raises several types
                raise ModelError(f"{split}: timing it against {os.path.basename(graph)} failed: "
                                 f"{first_line(exc)} (kernel_experts 'on' / 'off' does not time "
                                 f"them)") from None
            finally:
                self.sessions[name] = kernel
                self.reset_counters()
            encoder_choice.write_cache(key, choice, graph)
        self.encoder_choice = choice.describe()
        LOG.info("%s: the %s graph runs (%s)", graph, "kernel" if choice.graph == "kernel" else ".onnx",
                 self.encoder_choice)
        if choice.graph == "onnx":
            self.sessions[name] = plain if plain is not None else self._load_session(graph, opts)
            self.paths[name] = graph
            self.kernel_experts, self.kernel_graph = f"off ({self.encoder_choice})", ""
            self._enc_inputs = [i.name for i in self.sessions[name].get_inputs()]

    @staticmethod
    def _load_session(path: str, opts: ort.SessionOptions) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several types
            raise ModelError(f"{path}: cannot load: {first_line(exc)}") from None

    def reset_counters(self) -> None:
        """Zero the encoder call counters and `session_cpu_s`."""
        with self._count_lock:
            self.batched_calls = self.batched_streams = self.single_calls = 0
            for part in self.session_cpu_s:
                self.session_cpu_s[part] = 0.0

    @property
    def batched(self) -> bool:
        """Whether chunks of several streams run in one encoder call."""
        return BATCH_ENCODER in self.sessions
    # ----------------------------------------------------------------- encoder
    def chunk_frames(self, num_fbank_frames: int) -> int:
        """Encoder frames produced by `num_fbank_frames` of input (0 if too short)."""
        rc, sub = self.info.right_context, self.info.subsampling_rate
        return 0 if num_fbank_frames < rc + 1 else (num_fbank_frames - rc - 1) // sub + 1

    def new_state(self, chunk_size: int) -> EncoderState:
        return EncoderState(self.info, chunk_size)

    def forward_encoder_chunk(self, feats: np.ndarray, state: EncoderState) -> np.ndarray:
        """Run one chunk, updating `state` in place.

        Args:
            feats: (T, bins) float32 fbank frames, T >= right_context + 1.
        Returns:
            (T', D) encoder output, T' = (T - right_context - 1) // subsampling + 1.
        """
        if self.batched:
            return self._forward_batch([feats], [state])[0]
        t_out = self.chunk_frames(feats.shape[0])
        cache_t = state.att_cache.shape[2]
        feeds = {"chunk": np.ascontiguousarray(feats[None], dtype=np.float32),
                 "att_cache": state.att_cache, "cnn_cache": state.cnn_cache}
        if "offset" in self._enc_inputs:
            feeds["offset"] = np.array(state.offset, dtype=np.int64)
        if "required_cache_size" in self._enc_inputs:
            feeds["required_cache_size"] = np.array(state.required_cache_size, dtype=np.int64)
        if "att_mask" in self._enc_inputs:
            mask = np.ones((1, 1, cache_t + t_out), dtype=bool)
            if state.required_cache_size > 0:
                mask[:, :, : cache_t - min(state.valid_cache, cache_t)] = False
            feeds["att_mask"] = mask
        out, att_cache, cnn_cache = self._run("encoder", "encoder", feeds)
        with self._count_lock:
            self.single_calls += 1
        state.att_cache, state.cnn_cache = att_cache, cnn_cache
        state.offset += out.shape[1]
        state.valid_cache += out.shape[1]
        return out[0]

    def forward_encoder_chunks(self, windows: Sequence[np.ndarray],
                               states: Sequence[EncoderState]) -> List[np.ndarray]:
        """One chunk of each of several streams, updating each `states[i]` in place.

        With `encoder_batch.onnx` loaded, streams that share `required_cache_size`
        run together, at most `max_encoder_batch` per call; each result equals
        `forward_encoder_chunk(windows[i], states[i])` within float rounding (GEMM
        sums may round differently with the batch size). Without it the streams run
        one by one through `encoder.onnx`.

        Args:
            windows: (T_i, bins) float32 fbank windows, T_i >= right_context + 1.
            states: the streams' states (distinct objects).
        Returns:
            [(T_i', D)] encoder outputs, in order.
        """
        if len(windows) != len(states):
            raise ValueError(f"{len(windows)} windows for {len(states)} states")
        outs: List[np.ndarray] = [np.zeros((0, self.info.output_size), np.float32)] * len(windows)
        groups: Dict[int, List[int]] = {}
        for i, st in enumerate(states):
            groups.setdefault(st.required_cache_size, []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.max_encoder_batch):
                part = members[start: start + self.max_encoder_batch]
                if not self.batched:
                    for i in part:
                        outs[i] = self.forward_encoder_chunk(windows[i], states[i])
                else:
                    for i, out in zip(part, self._forward_batch([windows[i] for i in part],
                                                                [states[i] for i in part])):
                        outs[i] = out
        return outs

    def _forward_batch(self, windows: Sequence[np.ndarray], states: Sequence[EncoderState]
                       ) -> List[np.ndarray]:
        """One `encoder_batch.onnx` call over streams with one required_cache_size."""
        n = len(windows)
        lens = [int(w.shape[0]) for w in windows]
        t_in = max(lens)
        t_out = self.chunk_frames(t_in)
        outs = [self.chunk_frames(t) for t in lens]
        bins = windows[0].shape[1]
        chunk = np.zeros((n, t_in, bins), np.float32)
        cache_t = max(st.att_cache.shape[2] for st in states)
        ref = states[0].att_cache
        att = np.zeros((n, ref.shape[0], ref.shape[1], cache_t, ref.shape[3]), np.float32)
        mask = np.zeros((n, 1, cache_t + t_out), dtype=bool)
        for r, (w, st) in enumerate(zip(windows, states)):
            chunk[r, :lens[r]] = w
            held = st.att_cache.shape[2]
            att[r, :, :, cache_t - held:] = st.att_cache
            # a fixed-size cache starts as zeros that the mask hides (see EncoderState)
            seen = min(st.valid_cache, held) if st.required_cache_size > 0 else held
            mask[r, 0, cache_t - seen: cache_t + outs[r]] = True
        feeds = {"chunk": chunk, "chunk_lens": np.array(lens, np.int64),
                 "offsets": np.array([st.offset for st in states], np.int64),
                 "required_cache_size": np.array(states[0].required_cache_size, np.int64),
                 "att_cache": att,
                 "cnn_cache": np.stack([st.cnn_cache[:, 0] for st in states]),
                 "att_mask": mask}
        out, _, r_att, r_cnn = self._run(BATCH_ENCODER, "encoder", feeds)
        with self._count_lock:
            if n == 1:
                self.single_calls += 1
            else:
                self.batched_calls += 1
                self.batched_streams += n
        t_next = r_att.shape[3]
        results = []
        for r, st in enumerate(states):
            keep = min(st.att_cache.shape[2] + outs[r], t_next)
            st.att_cache = np.ascontiguousarray(r_att[r, :, :, t_next - keep:])
            st.cnn_cache = np.ascontiguousarray(r_cnn[r][:, None])
            st.offset += outs[r]
            st.valid_cache += outs[r]
            results.append(out[r, :outs[r]].copy())
        return results

    def _run(self, session: str, part: str, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """sessions[session].run(None, feeds), its thread CPU time added to
        `session_cpu_s[part]`."""
        start = time.thread_time()
        outs = self.sessions[session].run(None, feeds)
        spent = time.thread_time() - start
        with self._count_lock:
            self.session_cpu_s[part] += spent
        return outs

    # --------------------------------------------------------------------- ctc
    def ctc_log_probs(self, hidden: np.ndarray) -> np.ndarray:
        """(T, D) encoder output -> (T, V) CTC log-posteriors."""
        if hidden.shape[0] == 0:
            return np.zeros((0, self.info.vocab_size), np.float32)
        return self._run("ctc", "ctc", {self._ctc_input: hidden[None]})[0][0]

    def ctc_log_probs_many(self, hiddens: Sequence[np.ndarray]) -> List[np.ndarray]:
        """CTC of several streams in one ONNX Runtime call.

        The CTC head is frame-wise, so the (T_i, D) chunks are concatenated along
        time into one (1, sum T_i, D) input and the output is split back.
        """
        sizes = [h.shape[0] for h in hiddens]
        if sum(sizes) == 0:
            return [np.zeros((0, self.info.vocab_size), np.float32) for _ in hiddens]
        joined = self.ctc_log_probs(np.concatenate(hiddens, axis=0))
        return np.split(joined, np.cumsum(sizes)[:-1], axis=0)

    # ----------------------------------------------------------------- decoder
    def attention_scores(self, hyps: Sequence[Sequence[int]], encoder_out: np.ndarray,
                         reverse_weight: float) -> np.ndarray:
        """Decoder log-likelihood of each hypothesis (including <eos>).

        Args:
            hyps: N token-id lists (without <sos>/<eos>).
            encoder_out: (T, D) encoder output of the utterance.
            reverse_weight: weight of the right-to-left decoder (0 uses L2R only).
        Returns:
            (N,) float64 `(1 - rw) * l2r + rw * r2l`, as WeNet's rescoring.
        """
        n = len(hyps)
        if n == 0:
            return np.zeros((0,), np.float64)
        use_reverse = self.info.is_bidirectional_decoder and reverse_weight > 0
        if DECODER_TREE in self.sessions:
            return self._tree_scores(hyps, encoder_out, reverse_weight if use_reverse else 0.0)
        lens = np.array([len(h) for h in hyps], dtype=np.int64)
        width = int(lens.max()) + 1
        pad = np.full((n, width), self.info.eos, dtype=np.int64)
        pad[:, 0] = self.info.sos
        for i, h in enumerate(hyps):
            pad[i, 1: 1 + len(h)] = h
        feeds = {"hyps": pad, "hyps_lens": lens + 1,
                 "encoder_out": np.ascontiguousarray(encoder_out[None], dtype=np.float32)}
        if "reverse_weight" in self._dec_inputs:
            feeds["reverse_weight"] = np.array(reverse_weight if use_reverse else 0.0,
                                               dtype=np.float32)
        outs = self._run("decoder", "decoder", feeds)
        # Gold targets: the hypothesis then <eos>; right-to-left: reversed, then <eos>.
        rows = np.arange(n)[:, None]
        pos = np.arange(width)[None, :]
        valid = pos <= lens[:, None]
        gold = np.where(pos < lens[:, None], pad[:, np.minimum(pos[0] + 1, width - 1)], self.info.eos)
        l2r = np.where(valid, outs[0][rows, pos, gold], 0.0).sum(axis=1, dtype=np.float64)
        if not (use_reverse and len(outs) > 1):
            return l2r
        rev_src = np.clip(lens[:, None] - pos, 1, width - 1)  # pad index of token L-1-j
        gold_r = np.where(pos < lens[:, None], pad[rows, rev_src], self.info.eos)
        r2l = np.where(valid, outs[1][rows, pos, gold_r], 0.0).sum(axis=1, dtype=np.float64)
        return (1.0 - reverse_weight) * l2r + reverse_weight * r2l

    def _tree_scores(self, hyps: Sequence[Sequence[int]], encoder_out: np.ndarray,
                     reverse_weight: float) -> np.ndarray:
        """`attention_scores` by `decoder_tree.onnx`: the n-best's prefix tree (and,
        with reverse_weight > 0, its reversed hypotheses' tree; else a root-only one)."""
        n = len(hyps)
        feeds, left, right = decoder_tree_feeds(hyps, [0] * n, self.info.sos, self.info.eos,
                                                encoder_out[None], right_to_left=reverse_weight > 0)
        outs = self._run(DECODER_TREE, "decoder", feeds)
        l2r = left.scores(outs[0], n)
        if reverse_weight <= 0:
            return l2r
        return (1.0 - reverse_weight) * l2r + reverse_weight * right.scores(outs[1], n)
