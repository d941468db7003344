"""The streaming encoders with their MoE FFNs in the C kernel (`<graph>.kernel/`).

At a streaming chunk the fp32 MoE encoder in ONNX Runtime spends most of its extra
time in the experts (MLAS GEMMs of a few rows each, plus the exported dispatch's
sort / gather / scatter nodes). The C kernel of the PyTorch path routes and runs a
whole MoE FFN in one call at the memory's speed. The graph is cut for it: each MoE
FFN becomes a `wenet_moe::RoutedExperts` node (router + top-k + gated experts, its
weights as inputs), the graph is split at those nodes into pieces that ONNX Runtime
runs, and the pieces are joined again into one graph whose calls are nodes of the
kernel's own ONNX Runtime custom op (`whole.onnx`; `moe_cpu.c` registers the op). The
runtime (`wenet_moe_runtime.expert_encoder`) runs the whole graph as one session, or
(an older export) the pieces in order with one kernel call between two of them.

Directory `<graph>.kernel/` beside `<graph>.onnx` (encoder, encoder_batch; with
`--quantize int8` also `encoder.int8.kernel/`: int8 pieces, w8a8 experts):
    manifest.json   format, expert_weights ("fp32" | "bf16": how the runtime holds the
                    experts), the graph's inputs / outputs and metadata, and `steps`:
                    {"piece": file, "inputs": [...], "outputs": [...]} or
                    {"experts": j, "x": name, "route_emb": name | "", "output": name,
                     "k", "renormalize", "activation"}
    piece_NN.onnx   ONNX Runtime graphs (a piece reads graph inputs and earlier
                    steps' outputs by name)
    experts.npz     per call j: `j.router_weight` (E, E_emb + D), `j.router_bias` (E,),
                    `j.w1` (E, D, H), `j.b1`, `j.w2` (E, H, D), `j.b2` (fp32)
    whole.onnx      (manifest "whole") the pieces joined again, each call a node of the
                    kernel's ONNX Runtime custom op `wenet_moe.kernel::RoutedExperts`
                    (`write_whole_graph`); the runtime runs it as one session and
                    supplies the packed experts
Each node is placed in the last piece before its first reader, so a piece hands on
only what later steps read (the layer's output, the FFN's input rows, and the
tensors every layer reads: positions, masks, caches). Constants and initializers are
copied into each piece that reads them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from wenet_moe.layers.moe import MoEFFN
from wenet_moe.layers.moe_router import Router
# the artefact's names and layout, as the runtime reads them
from wenet_moe_runtime.expert_encoder import (FORMAT, MANIFEST, OP_DOMAIN, OP_TYPE, OP_WEIGHT_NAMES,
                                              THREADS_INPUT, WEIGHT_NAMES, WEIGHTS, WHOLE, kernel_dir)
from wenet_moe_runtime.native import ACTIVATIONS, WEIGHT_TYPES

DOMAIN = "wenet_moe"
OP = "RoutedExperts"
EXPERT_WEIGHTS = ("fp32", "bf16")     # how the runtime holds w1 / w2 (manifest "expert_weights";
                                      # "w8a8" in the int8 copies, `write_int8_kernel_graph`)


def _routed_experts(x: torch.Tensor, route_emb: torch.Tensor, router_weight: torch.Tensor,
                    router_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor, k: int, renormalize: bool, activation: str) -> torch.Tensor:
    """Eager meaning of the op (what the kernel computes): x (N, D), route_emb (N, E_emb)
    -> (N, D)."""
    router_in = torch.cat([route_emb, x], dim=-1) if route_emb.size(-1) > 0 else x
    logits = router_in @ router_weight.t() + router_bias
    top_logits, top_idx = torch.topk(logits, k, dim=-1)
    gates = (torch.softmax(top_logits, -1) if renormalize
             else torch.softmax(logits, -1).gather(1, top_idx))
    act = torch.relu if activation == "relu" else nn.functional.silu
    out = torch.zeros_like(x)
    for e in range(w1.size(0)):
        rows, slot = (top_idx == e).nonzero(as_tuple=True)
        if rows.numel():
            y = act(x[rows] @ w1[e] + b1[e]) @ w2[e] + b2[e]
            out.index_add_(0, rows, y * gates[rows, slot].unsqueeze(1))
    return out


def _symbolic(g, x, route_emb, router_weight, router_bias, w1, b1, w2, b2, k, renormalize, activation):
    from torch.onnx import symbolic_helper as sh
    out = g.op(f"{DOMAIN}::{OP}", x, route_emb, router_weight, router_bias, w1, b1, w2, b2,
               k_i=int(sh._maybe_get_const(k, "i")),
               renormalize_i=int(bool(sh._maybe_get_const(renormalize, "b"))),
               activation_s=str(sh._maybe_get_const(activation, "s")))
    out.setType(x.type())
    return out


def _register() -> None:
    if hasattr(torch.ops.wenet_moe, "routed_experts"):
        return
    lib = torch.library.Library(DOMAIN, "DEF")
    lib.define("routed_experts(Tensor x, Tensor route_emb, Tensor router_weight, Tensor router_bias, "
               "Tensor w1, Tensor b1, Tensor w2, Tensor b2, int k, bool renormalize, str activation) "
               "-> Tensor")
    lib.impl("routed_experts", _routed_experts, "CompositeExplicitAutograd")
    _register.lib = lib     # the registration lives as long as this object
    torch.onnx.register_custom_op_symbolic(f"{DOMAIN}::routed_experts", _symbolic, 9)


class RoutedExpertsFFN(nn.Module):
    """An MoE FFN as one `wenet_moe::routed_experts` call (export only; shares the
    layer's parameters). Same signature as `MoEFFN.forward`."""

    def __init__(self, moe: MoEFFN):
        super().__init__()
        _register()
        gate = moe.router.gate
        self.idim = moe.idim
        self.k = moe.n_expert_activated
        self.renormalize = moe.renormalize
        self.use_route_emb = moe.use_route_emb
        self.activation = moe._kernel_activation
        self.router_weight = gate.weight
        self.router_bias = (gate.bias if gate.bias is not None
                            else nn.Parameter(torch.zeros(moe.n_expert), requires_grad=False))
        self.w1, self.b1, self.w2, self.b2 = moe.w1, moe.b1, moe.w2, moe.b2

    def forward(self, xs: torch.Tensor, route_emb: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool)) -> torch.Tensor:
        x = xs.reshape(-1, self.idim)
        if self.use_route_emb:
            emb = route_emb.reshape(x.size(0), -1)
        else:
            emb = x[:, :0]
        return torch.ops.wenet_moe.routed_experts(
            x, emb, self.router_weight, self.router_bias, self.w1, self.b1, self.w2, self.b2,
            self.k, self.renormalize, self.activation).view_as(xs)


def unsupported(model: nn.Module) -> str:
    """Why the encoder's MoE FFNs cannot run in the kernel ("" when they can; also ""
    for a dense model, which has nothing to split: see `has_moe`)."""
    for name, module in model.encoder.named_modules():
        if not isinstance(module, MoEFFN):
            continue
        if not isinstance(module.router, Router):
            return f"{name}: router {type(module.router).__name__} is not a linear Router"
        if module._kernel_activation not in ("relu", "swish"):
            return f"{name}: activation {type(module.activation).__name__} (the kernel fuses relu / swish)"
        if module.idim % 16 or module.hidden_units % 16:
            return f"{name}: D={module.idim}, H={module.hidden_units} are not multiples of 16"
        if module.n_expert > 256:
            return f"{name}: {module.n_expert} experts (the kernel routes at most 256)"
    return ""


def has_moe(model: nn.Module) -> bool:
    return any(isinstance(m, MoEFFN) for m in model.encoder.modules())


@contextmanager
def experts_as_calls(model: nn.Module) -> Iterator[None]:
    """Within: every MoE FFN of the encoder is a `RoutedExpertsFFN` (restored after)."""
    swapped: List[Tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.encoder.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, MoEFFN):
                    setattr(parent, name, RoutedExpertsFFN(child))
                    swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


# ---------------------------------------------------------------------------- partition
def _outer_reads(node: onnx.NodeProto) -> List[str]:
    """Names a node's subgraphs (If / Loop bodies) read from the enclosing graph."""
    found: List[str] = []
    for attr in node.attribute:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for body in bodies:
            inner = {t.name for t in body.initializer} | {i.name for i in body.input}
            for n in body.node:
                inner.update(n.output)
            for n in body.node:
                found += [x for x in list(n.input) + _outer_reads(n) if x and x not in inner]
            found += [o.name for o in body.output if o.name not in inner]
    return found


def _reads(node: onnx.NodeProto) -> List[str]:
    return list(dict.fromkeys([x for x in node.input if x] + _outer_reads(node)))


def partition(proto: onnx.ModelProto) -> Tuple[List[Tuple[onnx.ModelProto, List[str], List[str]]],
                                               List[Dict], List[Dict[str, np.ndarray]]]:
    """Cut a graph with `RoutedExperts` nodes into ONNX Runtime pieces.

    Returns:
        pieces: [(model, input names, output names)], one more than the calls;
        calls: [{"x", "route_emb", "output", "k", "renormalize", "activation"}] in order
            (call j runs after piece j);
        weights: [{WEIGHT_NAMES[i]: array}] per call.
    """
    proto = onnx.shape_inference.infer_shapes(proto)
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    types: Dict[str, onnx.TypeProto] = {v.name: v.type for v in list(g.input) + list(g.output)
                                        + list(g.value_info)}
    producer = {o: n for n in g.node for o in n.output}
    # constants: Constant nodes and Identity chains over initializers (the exporter's
    # de-duplicated weights); copied into each piece that reads them
    constant: Dict[str, onnx.NodeProto] = {}
    for n in g.node:
        if n.domain == "" and (n.op_type == "Constant"
                               or (n.op_type == "Identity" and (n.input[0] in inits or n.input[0] in constant))):
            constant[n.output[0]] = n

    def initializer(name: str) -> onnx.TensorProto:
        while name not in inits and name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        if name not in inits:
            raise ValueError(f"expert weight {name} is not an initializer of the exported graph")
        return inits[name]

    nodes = [n for n in g.node if not (n.output and n.output[0] in constant)]
    calls = [n for n in nodes if n.domain == DOMAIN]
    if any(n.op_type != OP for n in calls):
        raise ValueError(f"unknown {DOMAIN} node in the exported graph")
    last = len(calls)
    call_of = {id(c): j for j, c in enumerate(calls)}
    # place each node in the earliest piece any reader needs it by (reverse order)
    need: Dict[str, int] = {o.name: last for o in g.output}
    place: Dict[int, int] = {}
    for n in reversed(nodes):
        if n.domain == DOMAIN:
            j = call_of[id(n)]
            for x in n.input[:2]:
                need[x] = min(need.get(x, last), j)
            continue
        wanted = [need[o] for o in n.output if o in need]
        if not wanted:
            continue        # nothing reads it
        place[id(n)] = min(wanted)
        for x in _reads(n):
            need[x] = min(need.get(x, last), place[id(n)])
    readers: Dict[str, int] = {o.name: last + 1 for o in g.output}   # last piece reading a name
    for n in nodes:
        if id(n) in place:
            for x in _reads(n):
                readers[x] = max(readers.get(x, -1), place[id(n)])
    for j, c in enumerate(calls):
        for x in c.input[:2]:
            readers[x] = max(readers.get(x, -1), j)

    def value_info(name: str) -> onnx.ValueInfoProto:
        if name not in types:
            raise ValueError(f"no type for {name} in the exported graph")
        info = onnx.ValueInfoProto(name=name)
        info.type.CopyFrom(types[name])
        # rank only: a size the shape inference took from the export's example would
        # make ONNX Runtime refuse other chunk lengths and batch sizes at the input
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            rank = len(tensor.shape.dim)
            tensor.ClearField("shape")
            tensor.shape.dim.extend(onnx.TensorShapeProto.Dimension() for _ in range(rank))
        return info

    def with_constants(names: Sequence[str]) -> List[onnx.NodeProto]:
        out: List[onnx.NodeProto] = []

        def add(name: str) -> None:
            n = constant.get(name)
            if n is not None and n not in out:
                for x in n.input:
                    add(x)
                out.append(n)
        for name in names:
            add(name)
        return out

    pieces = []
    opsets = [o for o in proto.opset_import if o.domain != DOMAIN]
    for i in range(last + 1):
        members = [n for n in nodes if place.get(id(n)) == i]
        made = {o for n in members for o in n.output}
        reads = list(dict.fromkeys(x for n in members for x in _reads(n)))
        consts = with_constants(reads)
        made_const = {o for n in consts for o in n.output}
        const_reads = [x for n in consts for x in n.input]
        weights = [inits[x] for x in dict.fromkeys(reads + const_reads) if x in inits]
        inputs = [x for x in reads if x not in made and x not in inits and x not in made_const]
        outputs = [o for n in members for o in n.output if readers.get(o, -1) > i
                   or (i < last and o in calls[i].input[:2])]
        graph = helper.make_graph(consts + members, f"piece_{i:02d}", [value_info(x) for x in inputs],
                                  [value_info(x) for x in outputs], weights)
        model = helper.make_model(graph, opset_imports=opsets, ir_version=proto.ir_version)
        pieces.append((model, inputs, outputs))
    specs, arrays = [], []
    for c in calls:
        attrs = {a.name: helper.get_attribute_value(a) for a in c.attribute}
        specs.append({"x": c.input[0], "route_emb": c.input[1], "output": c.output[0],
                      "k": int(attrs["k"]), "renormalize": bool(attrs["renormalize"]),
                      "activation": attrs["activation"].decode()})
        arrays.append({key: numpy_helper.to_array(initializer(name)).astype(np.float32)
                       for key, name in zip(WEIGHT_NAMES, c.input[2:])})
    return pieces, specs, arrays


def link_or_copy(src: str, dst: str) -> None:
    """`dst` as a hard link to `src` (one copy on disk; the export directory is written
    once and then only read), a copy where the file system has no hard links."""
    if os.path.lexists(dst):
        os.unlink(dst)      # never write through a link into the other directory's file
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _same_arrays(path: str, arrays: Dict[str, np.ndarray]) -> bool:
    """Whether the `.npz` at `path` holds exactly `arrays` (names, dtypes, values)."""
    with np.load(path) as saved:
        return (set(saved.files) == set(arrays)
                and all(saved[k].dtype == v.dtype and np.array_equal(saved[k], v)
                        for k, v in arrays.items()))


def write_kernel_graph(model: nn.Module, graph_path: str,
                       export: Callable[[nn.Module, str], None], expert_weights: str = "fp32",
                       weights_from: str = "") -> str:
    """Export `model` with `export(model, path)` (the function that wrote `graph_path`)
    with its MoE FFNs as calls, split it, and write `kernel_dir(graph_path)`; returns
    that directory. `expert_weights` "bf16": the runtime keeps the experts in bfloat16
    (half the bytes; the weights must hold bf16 values, `experts_as_computed`).
    `weights_from`: another kernel directory's `experts.npz` (the same model's other
    graph), hard-linked instead of a second copy when it holds the same arrays."""
    if expert_weights not in EXPERT_WEIGHTS:
        raise ValueError(f"expert weights: one of {', '.join(EXPERT_WEIGHTS)}, got {expert_weights!r}")
    out_dir = kernel_dir(graph_path)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, WHOLE)):
        os.unlink(os.path.join(out_dir, WHOLE))     # rewritten from the new pieces below
    raw = os.path.join(out_dir, ".graph.onnx")
    try:
        with experts_as_calls(model):
            export(model, raw)
        proto = onnx.load(raw)
    finally:
        for leftover in (raw, raw + ".data"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    pieces, calls, weights = partition(proto)
    from wenet_moe.export.onnx_export import save_onnx
    steps: List[Dict] = []
    for i, (piece, inputs, outputs) in enumerate(pieces):
        name = f"piece_{i:02d}.onnx"
        save_onnx(piece, os.path.join(out_dir, name))
        steps.append({"piece": name, "inputs": inputs, "outputs": outputs})
        if i < len(calls):
            steps.append(dict(calls[i], experts=i))
    flat = {f"{j}.{key}": value for j, arrays in enumerate(weights) for key, value in arrays.items()}
    weights_path = os.path.join(out_dir, WEIGHTS)
    if weights_from and _same_arrays(weights_from, flat):
        link_or_copy(weights_from, weights_path)
    else:
        if os.path.lexists(weights_path):
            os.unlink(weights_path)     # it may be a link to another directory's experts
        np.savez(weights_path, **flat)
    manifest = {"format": FORMAT, "expert_weights": expert_weights,
                "inputs": [i.name for i in proto.graph.input
                           if i.name not in {t.name for t in proto.graph.initializer}],
                "outputs": [o.name for o in proto.graph.output],
                "metadata": {p.key: p.value for p in proto.metadata_props},
                "steps": steps}
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    _whole_or_pieces(out_dir)
    return out_dir


def _whole_or_pieces(kernel_path: str) -> None:
    """`write_whole_graph` for `kernel_path`; where its pieces cannot be joined, the
    runtime runs them as they are (logged)."""
    try:
        write_whole_graph(kernel_path)
    except ValueError as exc:
        logging.warning("%s: pieces only: %s", kernel_path, exc)


def write_int8_kernel_graph(kernel_path: str, quantize: Callable[[str, str], None]) -> str:
    """`<graph>.int8.kernel/` beside the fp32 `kernel_path` (`<graph>.kernel`): its pieces
    int8-quantized by `quantize(src, dst)` (as `--quantize int8` quantizes the graphs)
    and its experts run as w8a8 (int8 weights per output column, each row quantized to
    int8: the runtime quantizes `experts.npz`, hard-linked to the fp32 one, when it loads
    them); returns that directory."""
    with open(os.path.join(kernel_path, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    out_dir = kernel_path[:-len(".kernel")] + ".int8.kernel"
    os.makedirs(out_dir, exist_ok=True)
    for step in manifest["steps"]:
        if "piece" in step:
            quantize(os.path.join(kernel_path, step["piece"]), os.path.join(out_dir, step["piece"]))
    link_or_copy(os.path.join(kernel_path, WEIGHTS), os.path.join(out_dir, WEIGHTS))
    manifest["expert_weights"] = "w8a8"
    manifest.pop("whole", None)     # written below from these pieces
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    _whole_or_pieces(out_dir)
    return out_dir


def supplied_initializer(name: str, dtype: int) -> onnx.TensorProto:
    """An empty initializer of `dtype` that the runtime replaces by its own array
    (`SessionOptions.add_initializer`, which ONNX Runtime reads in place)."""
    return onnx.TensorProto(name=name, data_type=dtype, dims=[0])


def kernel_op(j: int, x: str, route_emb: str, output: str, k: int, renormalize: bool, activation: str,
              expert_weights: str) -> Tuple[onnx.NodeProto, List[onnx.TensorProto]]:
    """Call j as a `wenet_moe.kernel::RoutedExperts` node (the kernel's ONNX Runtime
    custom op, `moe_cpu.c`) reading x, route_emb, the call's weights f"{j}.{name}" and
    THREADS_INPUT, and the empty initializers of its weights (the runtime supplies them
    packed as `expert_weights` says: "fp32" | "bf16" | "w8a8")."""
    weights = [f"{j}.{name}" for name in OP_WEIGHT_NAMES]
    node = helper.make_node(OP_TYPE, [x, route_emb] + weights + [THREADS_INPUT], [output], name=f"experts_{j}",
                            domain=OP_DOMAIN, k=int(k), renormalize=int(bool(renormalize)),
                            activation=ACTIVATIONS[activation], weights=WEIGHT_TYPES[expert_weights])
    stubs = [supplied_initializer(w, onnx.TensorProto.UINT8 if name in ("w1", "w2") else onnx.TensorProto.FLOAT)
             for w, name in zip(weights, OP_WEIGHT_NAMES)]
    return node, stubs


def _rename(graph: onnx.GraphProto, mapping: Dict[str, str]) -> None:
    """Rename values of `graph` and its subgraphs (If / Loop bodies) by `mapping`, in place."""
    if not mapping:
        return
    for n in graph.node:
        n.input[:] = [mapping.get(x, x) for x in n.input]
        n.output[:] = [mapping.get(x, x) for x in n.output]
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename(sub, mapping)
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = mapping.get(v.name, v.name)
    for t in graph.initializer:
        t.name = mapping.get(t.name, t.name)


def _join_piece(g: onnx.GraphProto, tag: str, inits: Dict[str, onnx.TensorProto],
                nodes: Dict[str, onnx.NodeProto], order: List[onnx.NodeProto]) -> None:
    """Add piece graph `g`'s initializers and nodes to the joined graph (`inits`, `nodes`
    by output, `order`): what an earlier piece defined alike is skipped, a name it
    defined differently is renamed in `g` (`<name>@<tag>`)."""
    interface = {v.name for v in list(g.input) + list(g.output)}
    mapping: Dict[str, str] = {}
    taken = set(inits) | set(nodes)

    def fresh(name: str) -> str:
        if name in interface:
            raise ValueError(f"{tag}: {name} is defined differently by two pieces")
        new, i = f"{name}@{tag}", 1
        while new in taken:
            new, i = f"{name}@{tag}.{i}", i + 1
        taken.add(new)
        return new

    keep_inits = []
    for t in g.initializer:
        if t.name in inits:
            if inits[t.name].SerializeToString() == t.SerializeToString():
                continue
            mapping[t.name] = fresh(t.name)
        keep_inits.append(t)
    keep_nodes = []
    for n in g.node:
        renamed = onnx.NodeProto()
        renamed.CopyFrom(n)
        holder = helper.make_graph([renamed], "n", [], [])
        _rename(holder, mapping)
        renamed = holder.node[0]
        known = [o for o in renamed.output if o in nodes]
        if known and all(nodes[o].SerializeToString() == renamed.SerializeToString() for o in known):
            continue        # an earlier piece's copy of this node
        for o in known:
            mapping[o] = fresh(o)
        keep_nodes.append(n)
    _rename(g, mapping)
    for t in keep_inits:
        inits[t.name] = t
    named = {n.name for n in order}
    for n in keep_nodes:
        if n.name and n.name in named:     # node names are unique in a graph (or empty)
            base, i = f"{n.name}@{tag}", 1
            n.name = base
            while n.name in named:
                n.name, i = f"{base}.{i}", i + 1
        named.add(n.name)
        for o in n.output:
            nodes[o] = n
        order.append(n)


def write_whole_graph(kernel_path: str) -> str:
    """Join the pieces of `kernel_path` (a `<graph>.kernel` or `.int8.kernel` directory)
    and its calls into one graph, `WHOLE` in it (and "whole" in its manifest): each
    call a `wenet_moe.kernel::RoutedExperts` node (the kernel's ONNX Runtime custom
    op), its weights stub initializers the runtime supplies packed. One session then
    runs the encoder: no piece boundaries, and one thread pool for the experts and the
    rest. What several pieces copied (constants) is kept once; a name two pieces define
    differently (the int8 quantizer names its scales per piece) is renamed in the later
    one. Returns the file's path. Raises ValueError when a piece's input or output is
    defined differently by two pieces (the pieces are then used as they are)."""
    manifest_path = os.path.join(kernel_path, MANIFEST)
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    held = manifest.get("expert_weights", "fp32")
    nodes: Dict[str, onnx.NodeProto] = {}      # by output: pieces share copied constants
    order: List[onnx.NodeProto] = []
    inits: Dict[str, onnx.TensorProto] = {}
    typed: Dict[str, onnx.ValueInfoProto] = {}
    opsets: Dict[str, int] = {}
    ir_version = 0
    for step in manifest["steps"]:
        if "piece" in step:
            piece = onnx.load(os.path.join(kernel_path, step["piece"]))
            ir_version = max(ir_version, piece.ir_version)
            for o in piece.opset_import:
                opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
            g = piece.graph
            for v in list(g.input) + list(g.output):
                typed.setdefault(v.name, v)
            _join_piece(g, f"{step['piece']}", inits, nodes, order)
            continue
        j = step["experts"]
        emb = step["route_emb"]
        if not emb:
            emb = f"{j}.no_route_emb"
            inits[emb] = numpy_helper.from_array(np.zeros(0, np.float32), emb)
        node, stubs = kernel_op(j, step["x"], emb, step["output"], step["k"], step["renormalize"],
                                step["activation"], held)
        inits.update((t.name, t) for t in stubs)
        order.append(node)
    inits[THREADS_INPUT] = supplied_initializer(THREADS_INPUT, onnx.TensorProto.INT64)
    graph = helper.make_graph(order, "whole", [typed[n] for n in manifest["inputs"]],
                              [typed[n] for n in manifest["outputs"]], list(inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()]
                              + [helper.make_opsetid(OP_DOMAIN, 1)], ir_version=ir_version)
    for key, value in manifest.get("metadata", {}).items():
        model.metadata_props.add(key=key, value=value)
    from wenet_moe.export.onnx_export import save_onnx
    path = os.path.join(kernel_path, WHOLE)
    save_onnx(model, path, check=False)
    manifest["whole"] = WHOLE
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)      # the graph first, then its name
    return path
