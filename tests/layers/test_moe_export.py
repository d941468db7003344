"""MoE FFN under TorchScript and the TorchScript-based ONNX exporter, every router.

The exported graph must equal PyTorch at every length 1..300, including lengths where
some experts receive 0 or 1 frames (forced with a crafted router), both as the exporter
writes it and after the export's `fuse_expert_split` rewrite (one Split per layer).
"""
import io
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from wenet_moe.export.onnx_passes import fuse_expert_split
from wenet_moe.layers.moe import MoEFactory

DIM, HIDDEN, EMB = 8, 12, 4
LENGTHS = list(range(1, 301))   # every length (each run is ~1 ms on this tiny layer)


def build(router):
    torch.manual_seed(0)
    k = 1 if router == "switch" else 2
    factory = MoEFactory(DIM, HIDDEN, 0.0, "swish", 4, k,
                         {"router": router, "embed_dim": EMB}, frame_embedding=True)
    layer = factory().eval()
    emb_net = factory.route_embedding()
    return layer, (emb_net.eval() if emb_net is not None else None)


def inputs(layer, emb_net, length, seed=1):
    gen = torch.Generator().manual_seed(seed + length)
    x = torch.randn(1, length, DIM, generator=gen)
    emb = emb_net(x).detach() if emb_net is not None else torch.zeros(0)
    return x, emb


def crafted(layer):
    """Router where expert 0 and 1 take every frame, except that a frame whose feature 0
    exceeds 5 goes to expert 3 (then 0): expert 2 gets 0 frames, expert 3 gets 1."""
    with torch.no_grad():
        gate = layer.router.gate
        gate.weight.zero_()
        gate.weight[3, -DIM] = 2.0            # feature 0 of the layer input
        gate.bias.copy_(torch.tensor([5.0, 4.0, -5.0, -5.0]))


def crafted_input(length):
    x = torch.randn(1, length, DIM, generator=torch.Generator().manual_seed(length))
    x[..., 0] = x[..., 0].clamp(-1, 1)
    x[0, length // 2, 0] = 10.0               # the single frame for expert 3
    return x


def export(scripted, x, emb):
    """(session of the exported graph, session of the graph after fuse_expert_split)."""
    buf = io.BytesIO()
    axes = {"xs": {1: "T"}, "route_emb": {1: "T"}} if emb.numel() else {"xs": {1: "T"}}
    torch.onnx.export(scripted, (x, emb), buf, dynamo=False, opset_version=17,
                      input_names=["xs", "route_emb"], output_names=["ys"], dynamic_axes=axes)
    raw = onnx.load_from_string(buf.getvalue())
    fused = onnx.load_from_string(buf.getvalue())
    assert fuse_expert_split(fused) == 1
    onnx.checker.check_model(fused)
    ops, ops_raw = (Counter(n.op_type for n in m.graph.node) for m in (fused, raw))
    # the dispatch: no If, no sequence ops, one Split instead of the per-expert chain
    assert ops_raw["If"] == 0 and ops_raw["SplitToSequence"] == 1 and ops_raw["SequenceAt"] == 4
    assert ops["Split"] == 1 and ops["SplitToSequence"] == ops["SequenceAt"] == ops["If"] == 0
    assert sum(ops.values()) <= sum(ops_raw.values()) - 3 * 4, (ops, ops_raw)
    return tuple(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                 for m in (raw, fused))


def run(session, x, emb):
    names = {i.name for i in session.get_inputs()}
    feed = {"xs": x.numpy()}
    if "route_emb" in names:
        feed["route_emb"] = emb.numpy()
    return session.run(None, feed)[0]


@pytest.mark.parametrize("router", ["topk", "switch", "speechmoe", "omni"])
def test_script_and_onnx_parity_all_lengths(router):
    layer, emb_net = build(router)
    scripted = torch.jit.script(layer)
    x0, e0 = inputs(layer, emb_net, 2)   # a short example: dispatch must not be baked in
    sessions = export(scripted, x0, e0)
    for length in LENGTHS:
        x, emb = inputs(layer, emb_net, length)
        with torch.no_grad():
            want = layer(x, emb)
            got_script = scripted(x, emb)
        assert torch.allclose(got_script, want, atol=1e-5), f"script T={length}"
        for kind, session in zip(("raw", "fused"), sessions):
            got = run(session, x, emb)
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5,
                                       err_msg=f"onnx ({kind}) T={length}")


@pytest.mark.parametrize("router", ["topk", "speechmoe"])
def test_onnx_parity_with_empty_and_single_frame_experts(router):
    layer, emb_net = build(router)
    crafted(layer)
    scripted = torch.jit.script(layer)
    x0 = crafted_input(9)
    e0 = emb_net(x0).detach() if emb_net is not None else torch.zeros(0)
    sessions = export(scripted, x0, e0)
    for length in [1, 2, 3, 16, 77, 300]:
        x = crafted_input(length)
        emb = emb_net(x).detach() if emb_net is not None else torch.zeros(0)
        with torch.no_grad():
            _, top_idx, _ = layer.route(x.reshape(-1, DIM), emb.reshape(-1, EMB) if emb.numel() else emb)
            want = layer(x, emb)
        counts = torch.bincount(top_idx.reshape(-1), minlength=4).tolist()
        assert counts[2] == 0 and counts[3] == 1, counts
        np.testing.assert_allclose(scripted(x, emb).detach().numpy(), want.numpy(), atol=1e-5)
        for kind, session in zip(("raw", "fused"), sessions):
            np.testing.assert_allclose(run(session, x, emb), want.numpy(), atol=1e-5,
                                       err_msg=f"onnx ({kind}) T={length}")


def test_scripted_module_with_batch_and_train_mode():
    layer, _ = build("omni")
    scripted = torch.jit.script(layer)
    x = torch.randn(3, 11, DIM)
    with torch.no_grad():
        assert torch.allclose(scripted(x, torch.zeros(0)), layer(x, torch.zeros(0)), atol=1e-5)
