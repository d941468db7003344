"""ONNX export of a U2++ (dense or MoE) model.

Every graph is `torch.jit.script`ed first and then exported with the
TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), which keeps
the data-dependent parts dynamic: chunk and cache lengths, `next_cache_start`, and
the MoE dispatch (per-expert frame counts). The torch.export-based exporter
(`dynamo=True`) refuses the MoE dispatch (a guard on a data-dependent size).

Files (WeNet's `export_onnx_cpu` names plus sherpa-onnx's):
    encoder.onnx          chunk, offset, required_cache_size, att_cache, cnn_cache,
                          att_mask -> output, r_att_cache, r_cnn_cache
    ctc.onnx              hidden -> probs (log-softmax)
    decoder.onnx          hyps, hyps_lens, encoder_out, reverse_weight -> score, r_score
    model.onnx            x, x_lens -> log_probs, log_probs_lens (offline CTC)
    model_streaming.onnx  x, offset, required_cache_size, attn_cache, conv_cache,
                          attn_mask -> log_probs, r_attn_cache, r_conv_cache
    encoder_batch.onnx    chunk, chunk_lens, offsets, required_cache_size, att_cache,
                          cnn_cache, att_mask -> output, out_lens, r_att_cache,
                          r_cnn_cache (a batch of streams; `export_encoder_batch`)
    decoder_tree.onnx     tokens, depth, ancestors, r_tokens, r_depth, r_ancestors,
                          encoder_out -> score, r_score (rescoring on the n-best's
                          prefix trees; `export_decoder_tree`)
All carry the same metadata (see common.export_metadata). An input the exporter
dropped because the graph does not read it is put back, so runtimes that feed
inputs by position (sherpa-onnx) always see the documented list.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import onnx
import torch
from wenet_moe_runtime import prefix_tree

from wenet_moe.export.onnx_passes import fold_static_ifs, fuse_expert_split, graphs
from wenet_moe.export.wrappers import (AttentionDecoder, AttentionDecoderTree, CtcActivation,
                                       EncoderBatch, EncoderChunk, OfflineCtc, StreamingCtc)

OPSET = 17
# weights above this many bytes are written as external data (`<file>.data`)
EXTERNAL_DATA_BYTES = 1 << 30

ENCODER_INPUTS = ["chunk", "offset", "required_cache_size", "att_cache", "cnn_cache", "att_mask"]
ENCODER_OUTPUTS = ["output", "r_att_cache", "r_cnn_cache"]
STREAMING_INPUTS = ["x", "offset", "required_cache_size", "attn_cache", "conv_cache", "attn_mask"]
STREAMING_OUTPUTS = ["log_probs", "r_attn_cache", "r_conv_cache"]
CTC_INPUTS, CTC_OUTPUTS = ["hidden"], ["probs"]
DECODER_INPUTS = ["hyps", "hyps_lens", "encoder_out", "reverse_weight"]
DECODER_OUTPUTS = ["score", "r_score"]
OFFLINE_INPUTS, OFFLINE_OUTPUTS = ["x", "x_lens"], ["log_probs", "log_probs_lens"]
BATCH_ENCODER_INPUTS = ["chunk", "chunk_lens", "offsets", "required_cache_size", "att_cache",
                        "cnn_cache", "att_mask"]
BATCH_ENCODER_OUTPUTS = ["output", "out_lens", "r_att_cache", "r_cnn_cache"]
DECODER_TREE_INPUTS = list(prefix_tree.DECODER_TREE_INPUTS)

_TORCH_TO_ONNX = {torch.float32: onnx.TensorProto.FLOAT, torch.int64: onnx.TensorProto.INT64,
                  torch.bool: onnx.TensorProto.BOOL, torch.int32: onnx.TensorProto.INT32}


def cache_shapes(model: torch.nn.Module) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(att_cache shape without its time axis filled (T_cache = 0), cnn_cache shape),
    as the encoder really returns them (one probe chunk)."""
    enc = model.encoder
    feat = enc.embed.right_context + 1 + enc.embed.subsampling_rate
    xs = torch.zeros(1, feat, _feature_dim(model))
    with torch.no_grad():
        _, att, cnn = enc.forward_chunk(xs, 0, -1)
    return (att.size(0), att.size(1), 0, att.size(3)), tuple(cnn.shape)


def _feature_dim(model: torch.nn.Module) -> int:
    dim = getattr(model, "_export_feature_dim", None)
    if dim is None:
        raise ValueError("model._export_feature_dim is not set (call set_feature_dim)")
    return int(dim)


def set_feature_dim(model: torch.nn.Module, dim: int) -> None:
    """Record the input feature dimension F on the model (used for example inputs)."""
    model._export_feature_dim = int(dim)


def encoder_example(model: torch.nn.Module, chunk_size: int, left_chunks: int,
                    offset_shape: Sequence[int] = ()) -> Tuple[torch.Tensor, ...]:
    """Example inputs of one streaming chunk (the export's decoding window)."""
    from wenet_moe.export.common import decoding_window

    att_shape, cnn_shape = cache_shapes(model)
    chunk = chunk_size if chunk_size > 0 else 16
    required = chunk * left_chunks if (chunk_size > 0 and left_chunks > 0) else -1
    cache_t = max(required, 0)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(1, decoding_window(model, chunk_size), _feature_dim(model), generator=gen)
    att = torch.zeros(att_shape[0], att_shape[1], cache_t, att_shape[3])
    mask = torch.ones(1, 1, cache_t + chunk, dtype=torch.bool)
    mask[:, :, :cache_t] = False
    return (xs, torch.full(tuple(offset_shape), cache_t, dtype=torch.int64),
            torch.full(tuple(offset_shape), required, dtype=torch.int64),
            att, torch.zeros(cnn_shape), mask)


def _export(module: torch.nn.Module, example: Tuple[torch.Tensor, ...], path: str,
            input_names: List[str], output_names: List[str],
            dynamic_axes: Dict[str, Dict[int, str]], metadata: Dict[str, str],
            min_dims: Optional[Dict[str, Dict[int, int]]] = None) -> None:
    """Script `module`, export it to `path`, restore dropped inputs, apply the exact
    graph rewrites of `onnx_passes`, add metadata. `min_dims`: least sizes of the
    inputs' dynamic axes that the graph's contract guarantees (input -> {axis:
    size}), for `fold_static_ifs`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notice of torch.jit
        scripted = torch.jit.script(module.eval())
    # export into a scratch directory: beyond 2 GiB the exporter writes one external
    # file per tensor there; `save_onnx` then writes at most one `.data` file
    scratch = tempfile.mkdtemp(prefix=".graph-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        raw = os.path.join(scratch, "graph.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(scripted, example, raw, dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        proto = onnx.load(raw)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    restore_inputs(proto, input_names, example, dynamic_axes)
    fold_static_ifs(proto, min_dims)   # shape tests decided by the contract (exact)
    fuse_expert_split(proto)   # MoE dispatch: one Split per layer (exact)
    got = [o.name for o in proto.graph.output]
    if got != list(output_names):
        raise RuntimeError(f"{os.path.basename(path)}: outputs {got}, expected {output_names}")
    set_metadata(proto, metadata)
    save_onnx(proto, path)


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the initializers of `proto` (loaded in memory), subgraphs' included."""
    total = 0
    for t in (t for g in graphs(proto.graph) for t in g.initializer):
        total += len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) \
            + 8 * (len(t.int64_data) + len(t.double_data))
    return total


def save_onnx(proto: onnx.ModelProto, path: str, check: bool = True) -> None:
    """Write `proto` (after onnx.checker with `check`); weights above
    EXTERNAL_DATA_BYTES go to one `<name>.data` file beside it (protobuf cannot
    hold a model over 2 GiB)."""
    data = path + ".data"
    if os.path.exists(data):
        os.unlink(data)
    if weight_bytes(proto) > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(data), size_threshold=1024)
        if check:
            onnx.checker.check_model(path)
    else:
        if check:
            onnx.checker.check_model(proto)
        onnx.save(proto, path)


def restore_inputs(proto: onnx.ModelProto, input_names: Sequence[str],
                   example: Sequence[torch.Tensor], dynamic_axes: Dict[str, Dict[int, str]]
                   ) -> List[str]:
    """Put back (in their documented order) inputs the exporter dropped as unused.

    Returns the names that were restored. An input no node reads is valid ONNX.
    """
    present = {i.name: i for i in proto.graph.input}
    restored = [n for n in input_names if n not in present]
    if not restored and [i.name for i in proto.graph.input][:len(input_names)] == list(input_names):
        return []
    initializers = {t.name for t in proto.graph.initializer}
    extra = [i for i in proto.graph.input
             if i.name not in input_names and i.name not in initializers]
    if extra:
        raise RuntimeError(f"exported graph has unexpected inputs {[i.name for i in extra]}")
    ordered = []
    for name, value in zip(input_names, example):
        if name in present:
            ordered.append(present[name])
            continue
        axes = dynamic_axes.get(name, {})
        shape = [axes.get(i, int(d)) for i, d in enumerate(value.shape)]
        ordered.append(onnx.helper.make_tensor_value_info(name, _TORCH_TO_ONNX[value.dtype], shape))
    others = [i for i in proto.graph.input if i.name not in input_names]
    del proto.graph.input[:]
    proto.graph.input.extend(ordered + others)
    return restored


def set_metadata(proto: onnx.ModelProto, metadata: Dict[str, str]) -> None:
    """Replace the model's metadata_props by `metadata` (string values)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


# The streaming encoder's contract: a chunk window gives >= 1 output frame, and
# att_mask covers the cache and that chunk (`fold_static_ifs`)
ENCODER_MIN_DIMS = {"chunk": {1: 1}, "att_mask": {2: 1}}


def export_encoder(model: torch.nn.Module, path: str, chunk_size: int, left_chunks: int,
                   metadata: Dict[str, str], sherpa: bool = False) -> None:
    """encoder.onnx (WeNet names, scalar offsets) or, with `sherpa`,
    model_streaming.onnx (CTC log-probs out, (1,) offsets, sherpa-onnx names)."""
    if sherpa:
        names, outs = STREAMING_INPUTS, STREAMING_OUTPUTS
        module = StreamingCtc(model.encoder, model.ctc)
        example = encoder_example(model, chunk_size, left_chunks, offset_shape=(1,))
    else:
        names, outs = ENCODER_INPUTS, ENCODER_OUTPUTS
        module = EncoderChunk(model.encoder)
        example = encoder_example(model, chunk_size, left_chunks)
    axes = {names[0]: {1: "T"}, names[3]: {2: "T_cache"}, names[5]: {2: "T_keys"},
            outs[0]: {1: "T_out"}, outs[1]: {2: "T_next"}}
    _export(module, example, path, names, outs, axes, metadata,
            min_dims={names[0]: ENCODER_MIN_DIMS["chunk"], names[5]: ENCODER_MIN_DIMS["att_mask"]})


def export_ctc(model: torch.nn.Module, path: str, metadata: Dict[str, str]) -> None:
    d = model.encoder.output_size()
    example = (torch.randn(1, 7, d, generator=torch.Generator().manual_seed(0)),)
    _export(CtcActivation(model.ctc), example, path, CTC_INPUTS, CTC_OUTPUTS,
            {"hidden": {0: "B", 1: "T"}, "probs": {0: "B", 1: "T"}}, metadata)


def export_decoder(model: torch.nn.Module, path: str, reverse_weight: float,
                   metadata: Dict[str, str]) -> None:
    d = model.encoder.output_size()
    gen = torch.Generator().manual_seed(0)
    hyps = torch.randint(0, model.vocab_size, (3, 5), generator=gen)
    hyps[:, 0] = model.sos_symbol()
    example = (hyps, torch.tensor([5, 3, 1], dtype=torch.int64),
               torch.randn(1, 9, d, generator=gen),
               torch.tensor(float(reverse_weight), dtype=torch.float32))
    axes = {"hyps": {0: "NBEST", 1: "L"}, "hyps_lens": {0: "NBEST"},
            "encoder_out": {1: "T"}, "score": {0: "NBEST", 1: "L"},
            "r_score": {0: "NBEST", 1: "L"}}
    _export(AttentionDecoder(model), example, path, DECODER_INPUTS, DECODER_OUTPUTS, axes,
            metadata)


def export_offline(model: torch.nn.Module, path: str, metadata: Dict[str, str]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 67, _feature_dim(model), generator=gen)
    example = (x, torch.tensor([67, 40], dtype=torch.int64))
    axes = {"x": {0: "N", 1: "T"}, "x_lens": {0: "N"}, "log_probs": {0: "N", 1: "T_out"},
            "log_probs_lens": {0: "N"}}
    _export(OfflineCtc(model.encoder, model.ctc), example, path, OFFLINE_INPUTS,
            OFFLINE_OUTPUTS, axes, metadata)


def export_onnx(model: torch.nn.Module, out_dir: str, chunk_size: int, left_chunks: int,
                reverse_weight: float, metadata: Dict[str, str]) -> List[str]:
    """Write the five ONNX files into `out_dir`; returns their file names."""
    files = {
        "encoder.onnx": lambda p: export_encoder(model, p, chunk_size, left_chunks, metadata),
        "ctc.onnx": lambda p: export_ctc(model, p, metadata),
        "decoder.onnx": lambda p: export_decoder(model, p, reverse_weight, metadata),
        "model.onnx": lambda p: export_offline(model, p, metadata),
        "model_streaming.onnx": lambda p: export_encoder(model, p, chunk_size, left_chunks,
                                                         metadata, sherpa=True),
    }
    for name, write in files.items():
        write(os.path.join(out_dir, name))
    return list(files)


def encoder_batch_example(model: torch.nn.Module, chunk_size: int, left_chunks: int
                          ) -> Tuple[torch.Tensor, ...]:
    """Example inputs of `encoder_batch.onnx`: two streams, the second with a short
    window and a shorter (left-padded) history."""
    from wenet_moe.export.common import decoding_window

    att_shape, cnn_shape = cache_shapes(model)
    chunk = chunk_size if chunk_size > 0 else 16
    required = chunk * left_chunks if (chunk_size > 0 and left_chunks > 0) else -1
    cache_t = max(required, chunk)
    window = decoding_window(model, chunk_size)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(2, window, _feature_dim(model), generator=gen)
    short = window - model.subsampling_rate()
    att = torch.zeros(2, att_shape[0], att_shape[1], cache_t, att_shape[3])
    mask = torch.ones(2, 1, cache_t + chunk, dtype=torch.bool)
    mask[1, :, :cache_t - chunk] = False
    mask[1, :, cache_t + chunk - 1:] = False
    cnn = torch.zeros((2,) + tuple(cnn_shape[:1]) + tuple(cnn_shape[2:]))
    return (xs, torch.tensor([window, short], dtype=torch.int64),
            torch.tensor([cache_t, chunk], dtype=torch.int64),
            torch.tensor(required, dtype=torch.int64), att, cnn, mask)


def export_encoder_batch(model: torch.nn.Module, path: str, chunk_size: int, left_chunks: int,
                         metadata: Dict[str, str]) -> None:
    """encoder_batch.onnx: the streaming encoder over a batch of streams (per-stream
    offsets, left-padded caches, right-padded windows), beside the WeNet-interface
    encoder.onnx; same metadata (fp32 only: int8 exports keep per-stream graphs)."""
    axes = {"chunk": {0: "B", 1: "T"}, "chunk_lens": {0: "B"}, "offsets": {0: "B"},
            "att_cache": {0: "B", 3: "T_cache"}, "cnn_cache": {0: "B"},
            "att_mask": {0: "B", 2: "T_keys"}, "output": {0: "B", 1: "T_out"},
            "out_lens": {0: "B"}, "r_att_cache": {0: "B", 3: "T_next"}, "r_cnn_cache": {0: "B"}}
    # a call advances >= 1 stream; its windows and mask as `ENCODER_MIN_DIMS`
    least = {"chunk": {0: 1, 1: 1}, "chunk_lens": {0: 1}, "offsets": {0: 1},
             "att_cache": {0: 1}, "cnn_cache": {0: 1}, "att_mask": {0: 1, 2: 1}}
    _export(EncoderBatch(model.encoder), encoder_batch_example(model, chunk_size, left_chunks),
            path, BATCH_ENCODER_INPUTS, BATCH_ENCODER_OUTPUTS, axes, metadata, min_dims=least)


def decoder_tree_example(model: torch.nn.Module, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Example inputs of `decoder_tree.onnx`: the trees of two utterances' n-best lists
    (with shared prefixes and suffixes, an empty hypothesis, padded nodes)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.vocab_size
    hyps = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (4, 2, 0, 5)]
    hyps.append(hyps[0][:2] + hyps[3][2:])      # a prefix of one, a suffix of another
    encoder_out = torch.randn(2, 9, model.encoder.output_size(), generator=gen)
    feeds, _, _ = prefix_tree.decoder_tree_feeds(hyps, [0, 0, 1, 1, 0], model.sos_symbol(),
                                                 model.eos_symbol(), encoder_out.numpy())
    return tuple(torch.from_numpy(feeds[name]) for name in DECODER_TREE_INPUTS)


def export_decoder_tree(model: torch.nn.Module, path: str, metadata: Dict[str, str]) -> None:
    """decoder_tree.onnx: attention rescoring on the n-best lists' prefix trees (each
    distinct prefix decoded once; `AttentionDecoderTree`), beside the WeNet-interface
    decoder.onnx; same metadata."""
    axes = {"tokens": {0: "M", 1: "P"}, "depth": {0: "M", 1: "P"},
            "ancestors": {0: "M", 1: "P", 2: "P"}, "r_tokens": {0: "M", 1: "P_r"},
            "r_depth": {0: "M", 1: "P_r"}, "r_ancestors": {0: "M", 1: "P_r", 2: "P_r"},
            "encoder_out": {0: "M", 1: "T"}, "score": {0: "M", 1: "P"},
            "r_score": {0: "M", 1: "P_r"}}
    _export(AttentionDecoderTree(model), decoder_tree_example(model), path, DECODER_TREE_INPUTS,
            DECODER_OUTPUTS, axes, metadata)
