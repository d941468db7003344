"""Graph rewrites applied to exported ONNX graphs (exact: outputs are unchanged).

`fuse_expert_split`: the scripted MoE dispatch (`MoEFFN.dispatch`) splits the
expert-sorted rows by a list of per-expert counts. The TorchScript-based exporter
cannot emit a Split whose sizes are a tensor, so it writes, per MoE layer,
`SplitToSequence(rows, Concat(Unsqueeze(Gather(counts, 0)), ..., Unsqueeze(Gather(counts,
E-1))))` followed by one `SequenceAt(i)` per expert: 3E + 2 nodes whose kernels each
cost more than their work at streaming sizes. The rewrite replaces them by one
`Split(rows, counts)` with E outputs (opset >= 13; zero-size outputs are allowed).
The expert weights it feeds (the exporter's constant-folded `w1[e]`, `b1[e]`, `w2[e]`,
`b2[e]`, named `onnx::Gemm_123`) are renamed `moe<j>/expert<e>/w1` etc. (j: the MoE
layer's place in the graph), so that tools and tests find them, also in the int8
quantizer's `..._quantized` copies.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper


def graphs(graph: onnx.GraphProto) -> List[onnx.GraphProto]:
    """`graph` and every subgraph below it (If / Loop bodies), outermost first."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += graphs(attr.g)
            for sub in attr.graphs:
                found += graphs(sub)
    return found


def _scalar_ints(graphs: List[onnx.GraphProto]) -> Dict[str, int]:
    """name -> value of every scalar or one-element integer Constant / initializer."""
    return {name: int(value.reshape(-1)[0])
            for name, value in _small_constants(graphs, max_elements=1, bools=False).items()
            if value.size == 1}


def _read_counts(graphs: List[onnx.GraphProto]) -> Dict[str, int]:
    """name -> number of node inputs (in any graph) and graph outputs that read it."""
    counts: Dict[str, int] = {}
    for graph in graphs:
        for node in graph.node:
            for name in node.input:
                counts[name] = counts.get(name, 0) + 1
        for out in graph.output:
            counts[out.name] = counts.get(out.name, 0) + 1
    return counts


def _attr(node: onnx.NodeProto, name: str, default: Optional[object] = None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _inferred_types(proto: onnx.ModelProto) -> Dict[str, Tuple[int, List[int]]]:
    """name -> (elem_type, dims, -1 where unknown) of the main graph's tensors, by ONNX
    shape inference on a copy without the large initializers (shapes that depend on
    them come out unknown; the copy stays small whatever the model's size)."""
    light = onnx.ModelProto()
    graph = onnx.GraphProto()
    graph.node.extend(proto.graph.node)
    graph.input.extend(proto.graph.input)
    graph.output.extend(proto.graph.output)
    graph.initializer.extend(t for t in proto.graph.initializer
                             if t.data_location != onnx.TensorProto.EXTERNAL
                             and int(np.prod(t.dims)) <= 64)
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    light.graph.CopyFrom(graph)
    try:
        light = onnx.shape_inference.infer_shapes(light)
    except Exception:  # inference is an optimisation here, never a requirement
        return {}
    types: Dict[str, Tuple[int, List[int]]] = {}
    infos = [vi for g in graphs(light.graph) for vi in list(g.value_info) + list(g.input)
             + list(g.output)]
    for vi in infos:
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim] \
                if tt.HasField("shape") else [-2]
            types[vi.name] = (tt.elem_type, dims)
    return types


def fuse_expert_split(proto: onnx.ModelProto) -> int:
    """Rewrite every `SplitToSequence` of the pattern in the module docstring whose
    sequence is read only by constant-index `SequenceAt` nodes into one `Split`, in the
    main graph of `proto` and its subgraphs (in place; the decoder's MoE layers sit in
    an `If` branch). Returns the number of splits rewritten."""
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        return 0
    every = graphs(proto.graph)
    if not any(n.op_type == "SplitToSequence" for g in every for n in g.node):
        return 0
    ctx = {"ints": _scalar_ints(every), "reads": _read_counts(every), "types": None,
           "inits": {t.name: t for g in every for t in g.initializer}, "layer": 0,
           "dead": {}}   # id -> node (held, so that no other node's id reuses it)
    # layers named by an earlier run keep their numbers (the pass is idempotent)
    for name in ctx["inits"]:
        head = name.split("/")[0]
        if head.startswith("moe") and head[3:].isdigit() and "/expert" in name:
            ctx["layer"] = max(ctx["layer"], int(head[3:]) + 1)
    # innermost graphs first: rewriting a graph replaces its nodes by copies, so the
    # subgraphs held by its nodes must be final before (`every` is in pre-order)
    rewritten = sum(_fuse_in_graph(proto, g, ctx) for g in reversed(every))
    if rewritten:
        reads = _read_counts(graphs(proto.graph))
        for g in graphs(proto.graph):
            _prune_constants(g, reads)
    return rewritten


def _fuse_in_graph(proto: onnx.ModelProto, graph: onnx.GraphProto, ctx: dict) -> int:
    ints: Dict[str, int] = ctx["ints"]
    reads: Dict[str, int] = ctx["reads"]
    producer = {out: node for node in graph.node for out in node.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def local_only(name: str) -> bool:
        """Only nodes of this graph read `name` (no subgraph, no graph output)."""
        return reads.get(name, 0) == len(consumers.get(name, []))

    removed: Set[int] = set()
    replaced: Dict[int, List[onnx.NodeProto]] = {}
    alias: Dict[str, str] = {}     # SequenceAt output -> Split output
    rewritten = 0
    for split_seq in graph.node:
        if split_seq.op_type != "SplitToSequence" or len(split_seq.input) != 2:
            continue
        axis = int(_attr(split_seq, "axis", 0))
        concat = producer.get(split_seq.input[1])
        if concat is None or concat.op_type != "Concat" or int(_attr(concat, "axis", 0)) != 0:
            continue
        counts: Optional[str] = None
        chain: List[onnx.NodeProto] = [concat]
        for i, part in enumerate(concat.input):
            unsq = producer.get(part)
            if unsq is None or unsq.op_type != "Unsqueeze" or len(unsq.input) != 2 \
                    or ints.get(unsq.input[1]) != 0:
                break
            gather = producer.get(unsq.input[0])
            if gather is None or gather.op_type != "Gather" or int(_attr(gather, "axis", 0)) != 0 \
                    or ints.get(gather.input[1]) != i or (counts is not None and gather.input[0] != counts):
                break
            counts = gather.input[0]
            chain += [unsq, gather]
        else:
            n_out = len(concat.input)
            seq_reads = consumers.get(split_seq.output[0], [])
            if counts is None or not local_only(split_seq.output[0]) or not seq_reads or any(
                    r.op_type != "SequenceAt" or ints.get(r.input[1]) is None
                    or not 0 <= ints[r.input[1]] < n_out or not local_only(r.output[0])
                    for r in seq_reads):
                continue
            # the sizes tensor: `counts` itself when shape inference shows it is
            # (n_out,) int64, else its first n_out entries as int64
            new_nodes: List[onnx.NodeProto] = []
            sizes = counts
            tag = split_seq.output[0]
            if ctx["types"] is None:
                ctx["types"] = _inferred_types(proto)
            elem, dims = ctx["types"].get(counts, (0, [-2]))
            if dims != [n_out]:
                starts, ends = f"{tag}/sizes_start", f"{tag}/sizes_end"
                graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), starts),
                                          numpy_helper.from_array(np.array([n_out], np.int64), ends)])
                sizes = f"{tag}/sizes_sliced"
                new_nodes.append(helper.make_node("Slice", [counts, starts, ends], [sizes]))
            if elem != onnx.TensorProto.INT64:
                cast = f"{tag}/sizes_int64"
                new_nodes.append(helper.make_node("Cast", [sizes], [cast], to=onnx.TensorProto.INT64))
                sizes = cast
            outputs = [f"{tag}/part{i}" for i in range(n_out)]
            new_nodes.append(helper.make_node("Split", [split_seq.input[0], sizes], outputs,
                                              axis=axis, name=f"{split_seq.name or tag}/fused"))
            for r in seq_reads:
                alias[r.output[0]] = outputs[ints[r.input[1]]]
                removed.add(id(r))
            replaced[id(split_seq)] = new_nodes
            for e in range(n_out):
                _name_expert(ctx, graph, producer, consumers,
                             [r.output[0] for r in seq_reads if ints[r.input[1]] == e],
                             f"moe{ctx['layer']}/expert{e}")
            ctx["layer"] += 1
            # the count chain (Concat, then each Unsqueeze before its Gather), where
            # nothing but removed nodes reads it
            for node in chain:
                if all(id(c) in removed or c is split_seq
                       for out in node.output for c in consumers.get(out, [])) \
                        and all(local_only(out) for out in node.output):
                    removed.add(id(node))
            rewritten += 1
    if not rewritten:
        return 0
    nodes: List[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in removed and id(node) not in ctx["dead"]:
            nodes.append(node)
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


EXPERT_WEIGHTS = ("w1", "b1", "w2", "b2")


def _name_expert(ctx: dict, graph: onnx.GraphProto, producer: Dict[str, onnx.NodeProto],
                 consumers: Dict[str, List[onnx.NodeProto]], rows: List[str],
                 prefix: str) -> None:
    """Rename the initializers of one expert: the Gemm reading its rows (`rows`, the
    names its SequenceAt nodes had) gives w1/b1, the first Gemm reached from that one
    through single-reader elementwise nodes (the activation) gives w2/b2. Initializers
    read by more than one node keep their names. Inside subgraphs the exporter does
    not constant-fold: there the Gemm reads `Gather(stacked, e)` of the stacked
    (E, ...) parameter; such a slice becomes an initializer of the subgraph (as the
    exporter's folding makes it in the main graph), so the int8 quantizer sees it."""
    inits: Dict[str, onnx.TensorProto] = ctx["inits"]
    reads: Dict[str, int] = ctx["reads"]

    def only_reader(name: str) -> Optional[onnx.NodeProto]:
        readers = consumers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    first = [only_reader(r) for r in rows]
    if len(first) != 1 or first[0] is None or first[0].op_type != "Gemm":
        return
    gemms = [first[0]]
    node: Optional[onnx.NodeProto] = first[0]
    for _ in range(8):       # activation: a few elementwise nodes (x * sigmoid(x): 2)
        readers = consumers.get(node.output[0], [])
        nxt = [r for r in readers if r.op_type == "Gemm"]
        if nxt:
            if len(nxt) == 1 and nxt[0].input[0] == node.output[0]:
                gemms.append(nxt[0])
            break
        elementwise = [r for r in readers if len(r.output) == 1]
        if not elementwise:
            break
        node = elementwise[-1]
    for gemm, (w, b) in zip(gemms, (("w1", "b1"), ("w2", "b2"))):
        for i, label in ((1, w), (2, b)):
            old = gemm.input[i] if len(gemm.input) > i else ""
            sliced = producer.get(old)
            if old not in inits and sliced is not None and sliced.op_type == "Gather" \
                    and int(_attr(sliced, "axis", 0)) == 0 and sliced.input[0] in inits \
                    and ctx["ints"].get(sliced.input[1]) is not None and reads.get(old, 0) == 1:
                new = f"{prefix}/{label}"
                if new in inits or new in reads:
                    continue
                stacked = numpy_helper.to_array(inits[sliced.input[0]])
                tensor = numpy_helper.from_array(
                    np.ascontiguousarray(stacked[ctx["ints"][sliced.input[1]]]), new)
                graph.initializer.append(tensor)
                inits[new] = graph.initializer[-1]
                gemm.input[i] = new
                reads[new] = 1
                reads[old] = 0
                reads[sliced.input[0]] = reads.get(sliced.input[0], 1) - 1
                ctx["dead"][id(sliced)] = sliced
                continue
            if old not in inits or reads.get(old, 0) != 1:
                continue
            new = f"{prefix}/{label}"
            if new in inits or new in reads:
                continue
            inits[old].name = new
            inits[new] = inits.pop(old)
            gemm.input[i] = new
            reads[new] = reads.pop(old)


def _prune_constants(graph: onnx.GraphProto, reads: Dict[str, int]) -> None:
    """Drop Constant nodes and initializers of `graph` that nothing reads any more."""
    inputs = {i.name for i in graph.input}
    kept = [n for n in graph.node if n.op_type != "Constant" or reads.get(n.output[0], 0)]
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    unused = [t for t in graph.initializer if not reads.get(t.name, 0) and t.name not in inputs]
    for t in unused:
        graph.initializer.remove(t)


def conv_as_matmul(proto: onnx.ModelProto, min_inputs: int = 64, per_tap_channels: int = 64) -> int:
    """Rewrite each Conv (1-D or 2-D, group 1, no padding, dilation 1, constant weight)
    whose output sums at least `min_inputs` inputs (C_in x kernel taps) as im2col + one
    MatMul: per kernel tap a strided Slice of the input, their Concat over channels,
    a Transpose to channels-last, MatMul with the weight as (taps * C_in, C_out), the
    bias Add, and the Transpose back. Exact up to float summation order. The int8
    quantizer then quantizes the convolution like any projection (DynamicQuantizeMatMul
    on VNNI), where ONNX Runtime's CPU `ConvInteger` is slower than the fp32 Conv: the
    subsampling's second 3x3 convolution (256 x 9 inputs per output) is the largest
    single op of a streaming chunk. The conformer's depthwise convolutions (groups)
    and the first subsampling convolution (1 input channel: 9 inputs) stay Conv.
    With at least `per_tap_channels` input channels the columns are not built: the
    input goes channels-last once, each kernel tap is a strided Slice of it times
    that tap's (C_in, C_out) weight, and the taps' products are summed (`Sum`); a
    1x1 stride-1 convolution is one MatMul of the transposed input. That moves a
    third of the bytes of the im2col form (whose Slice / Concat / Transpose copies
    were a quarter of an int8 encoder's offline time), and each tap's activations get
    their own int8 scale. Returns the number of convolutions rewritten."""
    weights = {t.name: t for t in proto.graph.initializer}
    added: List[onnx.TensorProto] = []
    replaced: Set[str] = set()
    count = 0
    for graph in graphs(proto.graph):
        nodes: List[onnx.NodeProto] = []
        changed = False
        for node in graph.node:
            rewrite = _conv_im2col(node, weights, f"conv_im2col{count}", added, min_inputs,
                                   per_tap_channels)
            if rewrite is None:
                nodes.append(node)
                continue
            nodes.extend(rewrite)
            replaced.update(node.input[1:])
            count += 1
            changed = True
        if changed:
            del graph.node[:]
            graph.node.extend(nodes)
    if count:
        still_read = _read_counts(graphs(proto.graph))
        kept = [t for t in proto.graph.initializer if t.name not in replaced or t.name in still_read]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept + added)
    return count


def _conv_im2col(node: onnx.NodeProto, weights: Dict[str, onnx.TensorProto], prefix: str,
                 added: List[onnx.TensorProto], min_inputs: int, per_tap_channels: int = 64
                 ) -> Optional[List[onnx.NodeProto]]:
    """The nodes replacing one Conv (see `conv_as_matmul`), their constants appended
    to `added`; None when the Conv does not qualify."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
        return None
    weight = numpy_helper.to_array(weights[node.input[1]])
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if weight.ndim not in (3, 4) or weight.dtype != np.float32 or (bias_name and bias_name not in weights):
        return None
    kernel = list(weight.shape[2:])
    spatial = len(kernel)
    strides = list(_attr(node, "strides", [1] * spatial))
    if (_attr(node, "group", 1) != 1 or any(_attr(node, "pads", [0] * 2 * spatial))
            or any(d != 1 for d in _attr(node, "dilations", [1] * spatial))
            or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or int(np.prod(weight.shape[1:])) < min_inputs):
        return None
    c_out, c_in = weight.shape[:2]
    x, y = node.input[0], node.output[0]

    def const(name: str, value: np.ndarray) -> str:
        added.append(numpy_helper.from_array(value, f"{prefix}/{name}"))
        return f"{prefix}/{name}"

    if c_in >= per_tap_channels and all(k == 1 for k in kernel) and all(s == 1 for s in strides):
        return _conv_per_tap([], x, y, weight, bias_name, [(0,) * spatial], strides, [], prefix, const)
    out: List[onnx.NodeProto] = [helper.make_node("Shape", [x], [f"{prefix}/shape"])]
    last: List[str] = []            # per spatial axis: stride * (output size - 1), shape (1,)
    for a in range(spatial):
        k, s = kernel[a], strides[a]
        size = f"{prefix}/size{a}"
        out.append(helper.make_node("Gather", [f"{prefix}/shape", const(f"axis{a}", np.array([2 + a]))],
                                    [size], axis=0))
        out.append(helper.make_node("Sub", [size, const(f"k{a}", np.array([k]))], [f"{size}_k"]))
        out.append(helper.make_node("Div", [f"{size}_k", const(f"s{a}", np.array([s]))], [f"{size}_n"]))
        out.append(helper.make_node("Mul", [f"{size}_n", f"{prefix}/s{a}"], [f"{size}_last"]))
        last.append(f"{size}_last")
    taps = [()]
    for k in kernel:
        taps = [t + (i,) for t in taps for i in range(k)]
    if c_in >= per_tap_channels:
        return _conv_per_tap(out, x, y, weight, bias_name, taps, strides, last, prefix, const)
    axes = const("axes", np.arange(2, 2 + spatial))
    steps = const("steps", np.array(strides))
    slices = [_tap_slice(out, x, t, tap, last, axes, steps, prefix, const) for t, tap in enumerate(taps)]
    out.append(helper.make_node("Concat", slices, [f"{prefix}/columns"], axis=1))
    out.append(helper.make_node("Transpose", [f"{prefix}/columns"], [f"{prefix}/columns_last"],
                                perm=[0] + list(range(2, 2 + spatial)) + [1]))
    # columns are tap-major: (tap, c_in) -> W[o, c_in, tap]
    matrix = np.ascontiguousarray(np.moveaxis(weight.reshape(c_out, c_in, -1), 0, -1).transpose(1, 0, 2)
                                  .reshape(-1, c_out))
    product = f"{prefix}/product"
    out.append(helper.make_node("MatMul", [f"{prefix}/columns_last", const("weight", matrix)], [product],
                                name=f"{prefix}/MatMul"))
    return _bias_channels_first(out, product, bias_name, y, spatial, prefix)


def _tap_slice(out: List[onnx.NodeProto], src: str, t: int, tap: Tuple[int, ...], last: List[str],
               axes: str, steps: str, prefix: str, const) -> str:
    """Append the strided Slice of `src` (spatial axes `axes`) that kernel tap `tap`
    reads: per axis from the tap's offset i to `last[a]` + i + 1 (`last[a]`: stride x
    (output size - 1)); returns its name."""
    ends = []
    for a, i in enumerate(tap):
        end = f"{prefix}/tap{t}_end{a}"
        out.append(helper.make_node("Add", [last[a], const(f"tap{t}_off{a}", np.array([i + 1]))], [end]))
        ends.append(end)
    out.append(helper.make_node("Concat", ends, [f"{prefix}/tap{t}_ends"], axis=0))
    out.append(helper.make_node("Slice", [src, const(f"tap{t}_starts", np.array(tap)),
                                          f"{prefix}/tap{t}_ends", axes, steps], [f"{prefix}/tap{t}"]))
    return f"{prefix}/tap{t}"


def _bias_channels_first(out: List[onnx.NodeProto], product: str, bias_name: str, y: str,
                         spatial: int, prefix: str) -> List[onnx.NodeProto]:
    """`out` plus the bias Add (when there is one) and the Transpose of the
    channels-last `product` back to `y` (B, C_out, *S')."""
    if bias_name:
        out.append(helper.make_node("Add", [product, bias_name], [f"{prefix}/biased"]))
        product = f"{prefix}/biased"
    out.append(helper.make_node("Transpose", [product], [y],
                                perm=[0, 1 + spatial] + list(range(1, 1 + spatial))))
    return out


def _conv_per_tap(out: List[onnx.NodeProto], x: str, y: str, weight: np.ndarray, bias_name: str,
                  taps: List[Tuple[int, ...]], strides: List[int], last: List[str], prefix: str,
                  const) -> List[onnx.NodeProto]:
    """`conv_as_matmul`'s per-tap form of one Conv (x (B, C_in, *S) -> y (B, C_out, *S')):
    `out` (the nodes computing `last`, each spatial axis' stride * (S' - 1)) extended
    by: x channels-last, per tap a strided Slice times W[:, :, tap].T, Sum, bias,
    channels-first."""
    spatial = len(strides)
    last_axis = [0] + list(range(2, 2 + spatial)) + [1]
    out.append(helper.make_node("Transpose", [x], [f"{prefix}/x_last"], perm=last_axis))
    whole = len(taps) == 1 and all(s == 1 for s in strides)   # 1x1, stride 1: no slicing
    axes = None if whole else const("axes", np.arange(1, 1 + spatial))
    steps = None if whole else const("steps", np.array(strides))
    products = []
    for t, tap in enumerate(taps):
        rows = f"{prefix}/x_last"
        if not whole:
            rows = _tap_slice(out, rows, t, tap, last, axes, steps, prefix, const)
        matrix = np.ascontiguousarray(weight[(slice(None), slice(None)) + tap].T)   # (C_in, C_out)
        products.append(f"{prefix}/tap{t}_product")
        out.append(helper.make_node("MatMul", [rows, const(f"tap{t}_weight", matrix)], [products[-1]],
                                    name=f"{prefix}/tap{t}/MatMul"))
    total = products[0]
    if len(products) > 1:
        total = f"{prefix}/taps_sum"
        out.append(helper.make_node("Sum", products, [total]))
    return _bias_channels_first(out, total, bias_name, y, spatial, prefix)


# ------------------------------------------------------------------ static If folding
_UNBOUNDED = np.int64(1) << np.int64(61)


def fold_static_ifs(proto: onnx.ModelProto, min_dims: Optional[Dict[str, Dict[int, int]]] = None
                    ) -> int:
    """Replace each main-graph `If` whose condition follows from the graph's shapes
    by the nodes of the branch it always takes, then drop the nodes nothing reads.

    The TorchScript exporter keeps the shape tests of the scripted code (`if
    cache.size(0) > 0`, `if mask.size(2) > 0`) as `If` nodes. ONNX Runtime runs
    each as a subgraph call (~6 us each on this CPU, ~0.4 ms of a chunk call with
    61 of them) and does not fold them: the streaming encoder has five per block. A condition is decided by
    interval arithmetic over integer values: constants, `Shape` of tensors whose
    dims are static (graph inputs, ONNX shape inference, `ConstantOfShape` of a known
    shape vector), `Gather`, `Concat`, `(Un)Squeeze`, `Reshape`, `Cast`, `Add`,
    `Sub`, `Mul`, comparisons, `Not`, `And`, `Or`. `min_dims` gives lower bounds of
    the symbolic dims of graph inputs that the graph's contract guarantees (input
    name -> {axis: least size}); other symbolic dims are taken as >= 0. Exact:
    outputs are unchanged for every input the contract allows. Repeats until no
    condition is decided (a folded branch can decide the next one). Returns the
    number of `If` nodes replaced."""
    bounds = {name: dict(axes) for name, axes in (min_dims or {}).items()}
    total = 0
    while True:
        folded = _fold_ifs_once(proto, bounds)
        if not folded:
            break
        total += folded
    if total:
        _drop_dead_nodes(proto.graph)
    return total


def _small_constants(graphs: List[onnx.GraphProto], max_elements: int = 64, bools: bool = True
                     ) -> Dict[str, np.ndarray]:
    """name -> value (int64) of the integer (and with `bools`, bool) Constants and
    initializers of `graphs` with at most `max_elements` elements: shape arithmetic;
    weights are never read."""
    values: Dict[str, np.ndarray] = {}
    kinds = (onnx.TensorProto.INT64, onnx.TensorProto.INT32) + ((onnx.TensorProto.BOOL,) if bools else ())

    def keep(name: str, tensor: onnx.TensorProto) -> None:
        if tensor.data_type in kinds and tensor.data_location != onnx.TensorProto.EXTERNAL \
                and int(np.prod(tensor.dims)) <= max_elements:
            values[name] = numpy_helper.to_array(tensor).astype(np.int64)

    for graph in graphs:
        for t in graph.initializer:
            keep(t.name, t)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        keep(node.output[0], attr.t)
                    elif attr.name == "value_int":
                        values[node.output[0]] = np.array(attr.i, np.int64)
                    elif attr.name == "value_ints" and len(attr.ints) <= max_elements:
                        values[node.output[0]] = np.array(list(attr.ints), np.int64)
    return values


_BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "And", "Or", "Xor", "Not", "Where", "Equal", "Less",
                  "Greater", "LessOrEqual", "GreaterOrEqual", "Cast", "Neg", "Abs", "Identity"}


def _slice_length(size: int, start: int, end: int, step: int) -> int:
    """len(range(size)[start:end:step]) for sizes up to `_UNBOUNDED` (kept there)."""
    if size >= _UNBOUNDED:
        return int(_UNBOUNDED) if end >= _UNBOUNDED else _slice_length(max(end, start), start, end, step)
    return len(range(size)[slice(start, end, step)])


def _broadcast(shapes: List[List[Tuple[int, int]]]) -> List[Tuple[int, int]]:
    """Dim intervals of the numpy-style broadcast of `shapes` (a valid run's: on each
    axis the dims that are not 1 are equal, and the result is that value, or 1)."""
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        fixed = [d for d in dims if not d[0] <= 1 <= d[1]]     # cannot be 1: the result
        if fixed:
            out.append((max(d[0] for d in fixed), min(d[1] for d in fixed)))
        else:   # each may be 1: the result is one of them
            out.append((min(d[0] for d in dims), max(d[1] for d in dims)))
    return out


class _Bounds:
    """Integer intervals [lo, hi] of the values of the main graph (None: not known)."""

    def __init__(self, proto: onnx.ModelProto, min_dims: Dict[str, Dict[int, int]]):
        graph = proto.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.constants = _small_constants([graph])
        self.dims: Dict[str, List[Tuple[int, int]]] = {}
        for name, (_, dims) in _inferred_types(proto).items():
            if dims != [-2]:
                self.dims[name] = [(d, d) if d >= 0 else (0, int(_UNBOUNDED)) for d in dims]
        for vi in graph.input:
            if not vi.type.tensor_type.HasField("shape"):
                continue
            least = min_dims.get(vi.name, {})
            self.dims[vi.name] = [
                (d.dim_value, d.dim_value) if d.HasField("dim_value")
                else (int(least.get(axis, 0)), int(_UNBOUNDED))
                for axis, d in enumerate(vi.type.tensor_type.shape.dim)]
        self.memo: Dict[str, Optional[Tuple[np.ndarray, np.ndarray]]] = {}

    def decided(self, name: str) -> Optional[bool]:
        """The value of the one-element condition `name`, if the bounds decide it."""
        got = self.value(name)
        if got is None or got[0].size != 1 or got[0].reshape(-1)[0] != got[1].reshape(-1)[0]:
            return None
        return bool(got[0].reshape(-1)[0])

    def value(self, name: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        if name not in self.memo:
            self.memo[name] = None          # cycles (none in a valid graph) stay unknown
            self.memo[name] = self._compute(name)
        return self.memo[name]

    def _shape(self, name: str) -> Optional[List[Tuple[int, int]]]:
        node = self.producer.get(name)
        if node is not None and node.op_type == "ConstantOfShape":
            vec = self.value(node.input[0])
            if vec is not None and vec[0].ndim == 1:
                return list(zip(vec[0].tolist(), vec[1].tolist()))
        known = self.dims.get(name)
        if node is None or (known is not None and all(lo == hi for lo, hi in known)):
            return known
        derived = None
        if node.op_type == "Slice":
            derived = self._slice_shape(node)
        elif node.op_type == "Gather":
            data, index = self._shape(node.input[0]), self._shape(node.input[1])
            if data is not None and index is not None:
                axis = int(_attr(node, "axis", 0))
                axis = axis + len(data) if axis < 0 else axis
                derived = data[:axis] + index + data[axis + 1:]
        elif node.op_type in _BROADCAST_OPS:
            shapes = [self._shape(i) for i in node.input]
            if all(s is not None for s in shapes):
                derived = _broadcast(shapes)
        return derived if derived is not None else known

    def _slice_shape(self, node: onnx.NodeProto) -> Optional[List[Tuple[int, int]]]:
        """Dims of a Slice's output: sliced axes need static input dims and constant
        starts / ends / axes / steps."""
        dims = self._shape(node.input[0])
        params = [self.value(i) if i else None for i in node.input[1:5]]
        if dims is None or len(params) < 2 or any(
                p is not None and not np.array_equal(*p) for p in params) \
                or params[0] is None or params[1] is None:
            return None
        starts, ends = params[0][0].reshape(-1), params[1][0].reshape(-1)
        rank = len(dims)
        axes = params[2][0].reshape(-1) if len(params) > 2 and params[2] is not None \
            else np.arange(len(starts))
        steps = params[3][0].reshape(-1) if len(params) > 3 and params[3] is not None \
            else np.ones(len(starts), np.int64)
        out = list(dims)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = int(axis) + rank if axis < 0 else int(axis)
            lo, hi = dims[axis]
            if step == 0 or (lo != hi and (start < 0 or end < 0 or step < 0)):
                return None
            # with start, end >= 0 and step > 0 the length grows with the dim
            out[axis] = tuple(_slice_length(d, int(start), int(end), int(step)) for d in (lo, hi))
        return out

    def _compute(self, name: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        if name in self.constants:
            return self.constants[name], self.constants[name]
        node = self.producer.get(name)
        if node is None or len(node.output) != 1:
            return None
        op = node.op_type
        if op == "Shape":
            dims = self._shape(node.input[0])
            if dims is None:
                return None
            rank = len(dims)
            start, end = int(_attr(node, "start", 0)), _attr(node, "end", None)
            end = rank if end is None else int(end)
            start, end = (s + rank if s < 0 else s for s in (start, end))
            dims = dims[max(start, 0):min(end, rank)]
            return (np.array([d[0] for d in dims], np.int64), np.array([d[1] for d in dims], np.int64))
        if op == "Size":
            dims = self._shape(node.input[0])
            if dims is None or any(lo != hi for lo, hi in dims):
                return None
            size = np.array(int(np.prod([lo for lo, _ in dims])), np.int64)
            return size, size
        args = [self.value(i) if i else None for i in node.input]
        if op in ("Identity", "Cast"):
            if args[0] is None:
                return None
            lo, hi = args[0]
            if op == "Cast" and _attr(node, "to") == onnx.TensorProto.BOOL:
                known_true = (lo > 0) | (hi < 0)
                known_false = (lo == 0) & (hi == 0)
                return known_true.astype(np.int64), (~known_false).astype(np.int64)
            if op == "Cast" and _attr(node, "to") not in (onnx.TensorProto.INT64,
                                                           onnx.TensorProto.INT32):
                return None
            return lo, hi
        if op == "Gather":
            if args[0] is None or args[1] is None or not np.array_equal(*args[1]):
                return None
            axis = int(_attr(node, "axis", 0))
            return (np.take(args[0][0], args[1][0], axis=axis), np.take(args[0][1], args[1][0], axis=axis))
        if op in ("Unsqueeze", "Squeeze", "Reshape"):
            if args[0] is None:
                return None
            axes = _attr(node, "axes", None)
            if len(node.input) > 1 and node.input[1]:
                if args[1] is None or not np.array_equal(*args[1]):
                    return None
                axes = args[1][0].reshape(-1).tolist()
            lo, hi = args[0]
            if op == "Unsqueeze":
                rank = lo.ndim + len(axes)
                for a in sorted(a + rank if a < 0 else a for a in axes):
                    lo, hi = np.expand_dims(lo, a), np.expand_dims(hi, a)
                return lo, hi
            if op == "Squeeze":
                axes = tuple(a + lo.ndim if a < 0 else a for a in axes) if axes else None
                return np.squeeze(lo, axis=axes), np.squeeze(hi, axis=axes)
            target = [lo.shape[i] if s == 0 else s for i, s in enumerate(axes)]
            return lo.reshape(target), hi.reshape(target)
        if op == "Concat":
            if any(a is None for a in args):
                return None
            axis = int(_attr(node, "axis", 0))
            return (np.concatenate([a[0] for a in args], axis=axis),
                    np.concatenate([a[1] for a in args], axis=axis))
        if any(a is None for a in args):
            return None
        if op == "Not" and len(args) == 1:
            return 1 - args[0][1], 1 - args[0][0]
        if len(args) != 2:
            return None
        (alo, ahi), (blo, bhi) = args
        cap = lambda v: np.minimum(v, _UNBOUNDED)  # noqa: E731
        if op == "Add":
            return cap(alo + blo), cap(ahi + bhi)
        if op == "Sub":
            return alo - np.minimum(bhi, _UNBOUNDED), cap(ahi) - blo
        if op == "Mul" and (alo >= 0).all() and (blo >= 0).all():
            huge = (ahi >= _UNBOUNDED) | (bhi >= _UNBOUNDED)
            return cap(alo * blo), np.where(huge, _UNBOUNDED, cap(ahi * np.where(huge, 1, bhi)))
        if op in ("And", "Or"):
            both = (alo & blo, ahi & bhi) if op == "And" else (alo | blo, ahi | bhi)
            return both[0].astype(np.int64), both[1].astype(np.int64)
        tests = {"Greater": (alo > bhi, ahi <= blo), "Less": (ahi < blo, alo >= bhi),
                 "GreaterOrEqual": (alo >= bhi, ahi < blo), "LessOrEqual": (ahi <= blo, alo > bhi),
                 "Equal": ((alo == ahi) & (blo == bhi) & (alo == blo), (ahi < blo) | (alo > bhi))}
        if op not in tests:
            return None
        true, false = tests[op]
        return true.astype(np.int64), (~false).astype(np.int64)


def _rename(graph: onnx.GraphProto, names: Dict[str, str]) -> None:
    """Rename values read or written in `graph` and its subgraphs (in place)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]
        for i, name in enumerate(node.output):
            if name in names:
                node.output[i] = names[name]
        for attr in node.attribute:
            subs = ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs)
            for sub in subs:
                _rename(sub, names)
    for out in graph.output:
        if out.name in names:
            out.name = names[out.name]


def _inline_branch(node: onnx.NodeProto, branch: onnx.GraphProto, taken: Set[str]
                   ) -> Tuple[List[onnx.NodeProto], List[onnx.TensorProto]]:
    """The nodes and the initializers computing `node`'s (an If's) outputs by its
    `branch`. Names the branch defines that are in `taken` (every name some node of
    the model writes, so the branch's own node outputs, and the enclosing graph's
    inputs and initializers) get the If's name as a prefix; `taken` gains the
    initializers' names. The branch's initializers stay initializers (weights are
    found, quantized and named as initializers)."""
    branch = onnx.GraphProto.FromString(branch.SerializeToString())
    produced = {o for n in branch.node for o in n.output} | {t.name for t in branch.initializer}
    names: Dict[str, str] = {}
    extra: List[onnx.NodeProto] = []
    for out, result in zip(branch.output, node.output):
        if out.name in produced and out.name not in names and \
                all(out.name != t.name for t in branch.initializer):
            names[out.name] = result
        else:   # an outer value, an initializer or an output repeated: copied
            extra.append(helper.make_node("Identity", [out.name], [result]))
    for name in produced:
        if name not in names and name in taken:
            names[name] = f"{node.name or node.output[0]}/{name}"
    inlined = onnx.GraphProto()
    inlined.node.extend(list(branch.node) + extra)
    _rename(inlined, names)     # the If's output names are outer names: never renamed
    for t in branch.initializer:
        t.name = names.get(t.name, t.name)
        taken.add(t.name)
    return list(inlined.node), list(branch.initializer)


def _fold_ifs_once(proto: onnx.ModelProto, min_dims: Dict[str, Dict[int, int]]) -> int:
    graph = proto.graph
    if not any(n.op_type == "If" for n in graph.node):
        return 0
    bounds = _Bounds(proto, min_dims)
    taken = {o for g in graphs(graph) for n in g.node for o in n.output} \
        | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    nodes: List[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        cond = bounds.decided(node.input[0]) if node.op_type == "If" else None
        branch = _attr(node, "then_branch" if cond else "else_branch") if cond is not None else None
        if branch is None or len(branch.output) != len(node.output):
            nodes.append(node)
            continue
        body, initializers = _inline_branch(node, branch, taken)
        nodes.extend(body)
        graph.initializer.extend(initializers)
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(nodes)
        outs = {o for n in nodes for o in n.output}
        keep = [vi for vi in graph.value_info if vi.name in outs]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return folded


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove the nodes of `graph` whose outputs nothing reads (subgraphs' outer reads
    count), then the initializers nothing reads."""
    def reads(node: onnx.NodeProto) -> List[str]:
        found = list(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                found += [i for g in graphs(sub) for n in g.node for i in n.input]
                found += [o.name for g in graphs(sub) for o in g.output]
        return found

    live = {o.name for o in graph.output}
    kept: List[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(reads(node))
    kept.reverse()
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    inputs = {i.name for i in graph.input}
    unused = [t for t in graph.initializer if t.name not in live and t.name not in inputs]
    for t in unused:
        graph.initializer.remove(t)
