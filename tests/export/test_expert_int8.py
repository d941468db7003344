"""`wenet-moe export --expert_precision int8`: the experts of the fp32 ONNX graphs as
8-bit `com.microsoft::MatMulNBits` weights holding exactly the PyTorch kernel's int8
values (`cpu_kernel.quantize_int8`), everything else fp32, gated like int8 copies."""
import collections
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export_tiny import write_model_dir
from test_export_cli import meta, run_export
from wenet_moe.config import load_yaml, save_yaml
from wenet_moe.export.quantize import expert_int8_weights, int8_experts
from wenet_moe.export.verify import session
from wenet_moe.layers.cpu_kernel import expert_weight_values


def _dequantize(blob, scales, zero_points, k):
    n, blocks, block = blob.shape
    q = blob.astype(np.float32) - zero_points.reshape(n, blocks, 1).astype(np.float32)
    w = q * scales.reshape(n, blocks, 1)             # float32, as the kernel's values
    return w.reshape(n, blocks * block)[:, :k].T, q.reshape(n, blocks * block)[:, k:]


def test_weights_are_the_kernels_int8_values_padded_to_whole_blocks():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen) * 0.1
    w[:, 5] = 0.0                                    # an all-zero column: scale 1, q 0
    blob, scales, zero_points = expert_int8_weights(w.numpy(), block=32)
    assert blob.shape == (24, 2, 32) and blob.dtype == np.uint8
    assert scales.shape == (48,) and zero_points.tolist() == [128] * 48
    got, padding = _dequantize(blob, scales, zero_points, 40)
    want = expert_weight_values(w[None], "int8")[0].numpy()
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.all(padding == 0)                      # K padded with zero weights
    assert scales[10] == scales[11] == 1.0           # column 5, both blocks
    assert np.abs(got - w.double().numpy()).max() <= np.abs(w.numpy()).max() / 127 / 2 + 1e-7


def _expert_graph(k, n, rows_dim="M"):
    """y = x W + b as the exporter writes an expert (Gemm on `moe0/expert0/w1`) and a
    router-like Gemm that must stay fp32."""
    gen = np.random.RandomState(1)
    w = (gen.randn(k, n) * 0.1).astype(np.float32)
    b = gen.randn(n).astype(np.float32)
    r = gen.randn(k, 3).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "moe0/expert0/w1", "moe0/expert0/b1"], ["y"],
                              name="expert"),
             helper.make_node("Gemm", ["x", "router_w"], ["logits"], name="router")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows_dim, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "moe0/expert0/w1"), numpy_helper.from_array(b, "moe0/expert0/b1"),
         numpy_helper.from_array(r, "router_w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, w, b, r


def _run(proto, x):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_rewritten_expert_computes_int8_weights_rows_apart():
    k, n = 300, 64                                   # 2 blocks of 256, the second padded
    proto, w, b, r = _expert_graph(k, n)
    assert int8_experts(proto) == 1
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops == {"MatMulNBits": 1, "Gemm": 1}      # the router is untouched
    names = {t.name for t in proto.graph.initializer}
    assert "moe0/expert0/w1" not in names and "router_w" in names
    assert any(op.domain == "com.microsoft" for op in proto.opset_import)
    x = np.random.RandomState(2).randn(6, k).astype(np.float32)
    y, logits = _run(proto, x)
    w8 = expert_weight_values(torch.from_numpy(w)[None], "int8")[0].double().numpy()
    want = x.astype(np.float64) @ w8 + b
    # the activations are int8 per row and block inside ONNX Runtime: ~1 % error at most
    assert np.abs(y - want).max() <= 0.01 * np.abs(want).max(), np.abs(y - want).max()
    assert np.abs(logits - x.astype(np.float64) @ r).max() <= 1e-4
    # rows are quantized apart: a row alone, or next to rows 100x larger, is the same
    loud = x.copy()
    loud[1:] *= 100.0
    for batch in (x[:1], loud):
        assert np.abs(_run(proto, batch)[0][0] - y[0]).max() <= 1e-5


def test_only_expert_weights_are_rewritten():
    proto, _, _, _ = _expert_graph(32, 8)
    proto.graph.initializer[0].name = "moe0/expert0/w1_other"
    proto.graph.node[0].input[1] = "moe0/expert0/w1_other"
    assert int8_experts(proto) == 0
    assert [node.op_type for node in proto.graph.node] == ["Gemm", "Gemm"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny top-k MoE (encoder and decoders MoE) exported fp32 and with int8 experts."""
    tmp = tmp_path_factory.mktemp("xint8")
    d, model, conf = write_model_dir(tmp, "topk", seed=3)
    outs = {}
    for precision in ("fp32", "int8"):
        outs[precision] = os.path.join(str(tmp), precision)
        assert run_export(d, outs[precision], "--expert_precision", precision) == 0
    return d, outs, conf


def _expert_nodes(path):
    proto = onnx.load(path)
    from wenet_moe.export.onnx_passes import graphs
    nodes = [node for g in graphs(proto.graph) for node in g.node]
    return (sum(node.op_type == "MatMulNBits" for node in nodes),
            sum(node.op_type in ("Gemm", "MatMul") and "/expert" in node.input[1]
                for node in nodes if len(node.input) > 1))


def _expert_tensor_bytes(path):
    """Serialized bytes of the initializers that the expert projections (Gemm / MatMul on
    `moe<j>/expert<e>/...`, or MatMulNBits) read: weights, biases, scales, zero points."""
    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}
    read = {name for node in graph.node
            if node.op_type in ("Gemm", "MatMul", "MatMulNBits") and len(node.input) > 1
            and "/expert" in node.input[1]
            for name in node.input[1:] if name in inits}
    return sum(inits[name].ByteSize() for name in read)


def test_export_writes_int8_experts_into_every_moe_graph(exported):
    _, outs, conf = exported
    n_expert = conf["encoder_conf"]["n_expert"]
    for name in ("encoder.onnx", "encoder_batch.onnx", "model.onnx", "model_streaming.onnx",
                 "decoder.onnx", "decoder_tree.onnx"):
        fp32_nbits, fp32_experts = _expert_nodes(os.path.join(outs["fp32"], name))
        nbits, experts = _expert_nodes(os.path.join(outs["int8"], name))
        assert fp32_nbits == 0 and experts == 0, name
        assert nbits == fp32_experts and nbits % (2 * n_expert) == 0 and nbits > 0, name
        assert meta(os.path.join(outs["int8"], name))["expert_precision"] == "int8"
        assert "expert_precision" not in meta(os.path.join(outs["fp32"], name))
    assert _expert_nodes(os.path.join(outs["int8"], "ctc.onnx")) == (0, 0)
    # 8-bit experts: the encoder's expert tensors shrink (measured on the tensors, not the
    # file: the file's node names vary with what TorchScript compiled before in the process)
    size = {p: _expert_tensor_bytes(os.path.join(outs[p], "encoder.onnx")) for p in outs}
    assert size["int8"] < 0.5 * size["fp32"], size
    assert sorted(os.listdir(outs["int8"])) == sorted(os.listdir(outs["fp32"]))


def test_int8_expert_graphs_stay_close_to_fp32(exported):
    _, outs, conf = exported
    x = np.random.RandomState(0).randn(1, 60, conf["input_dim"]).astype(np.float32)
    feeds = {"x": x, "x_lens": np.array([60], dtype=np.int64)}
    want, got = (session(os.path.join(outs[p], "model.onnx")).run(None, feeds)[0]
                 for p in ("fp32", "int8"))
    diff = np.abs(np.exp(want) - np.exp(got)).max()        # posteriors
    assert 0 < diff <= 0.05, diff


def test_default_follows_moe_conf_and_errors_are_one_line(exported, tmp_path, capsys):
    d, outs, conf = exported
    conf8 = load_yaml(os.path.join(d, "train.yaml"))
    conf8["moe_conf"]["expert_precision"] = "int8"
    cfg = os.path.join(d, "train_int8.yaml")
    save_yaml(conf8, cfg)
    from wenet_moe.cli import main
    out = str(tmp_path / "auto")
    assert main(["export", "--config", cfg, "--checkpoint", os.path.join(d, "0.pt"),
                 "--output_dir", out, "--chunk_size", "4"]) == 0
    assert _expert_nodes(os.path.join(out, "encoder.onnx"))[0] > 0
    capsys.readouterr()
    assert run_export(d, str(tmp_path / "ts"), "--format", "torchscript",
                      "--expert_precision", "int8") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--expert_precision int8 applies to --format onnx" in err[0]
    dense, _, _ = write_model_dir(tmp_path / "dense", "dense")
    assert run_export(dense, str(tmp_path / "dense_out"), "--expert_precision", "int8") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the model has no MoE experts" in err[0]
    assert not os.path.exists(str(tmp_path / "dense_out"))


def test_exports_take_the_expert_values_the_model_computes_with():
    from export_tiny import tiny_model
    from wenet_moe.export import experts_as_computed
    from wenet_moe.layers.moe import MoEFFN
    model, _ = tiny_model("topk")
    assert experts_as_computed(model) is model                  # all fp32: no copy
    moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
    moes[0].expert_precision = "bf16"
    before = moes[0].w1.detach().clone()
    twin = experts_as_computed(model)
    assert twin is not model and torch.equal(moes[0].w1, before)    # the model untouched
    twin_moes = [m for m in twin.modules() if isinstance(m, MoEFFN)]
    assert all(m.expert_precision == "fp32" for m in twin_moes)
    assert torch.equal(twin_moes[0].w1, expert_weight_values(before, "bf16"))
    assert not torch.equal(twin_moes[0].w1, before)
    assert torch.equal(twin_moes[1].w1, moes[1].w1)                 # fp32 layers as they were


def test_w8a8_models_export_their_int8_weights():
    """moe_conf.expert_precision w8a8: ONNX exports default to int8 experts (MatMulNBits
    rounds the activations itself), other formats to fp32, bf16 / bf16a models to bf16
    experts (the kernel graphs hold bf16); the exported weights are the int8 values the
    eager kernel multiplies with."""
    from export_tiny import tiny_model
    from wenet_moe.export import experts_as_computed, resolve_expert_precision
    from wenet_moe.layers.moe import MoEFFN
    conf = {"encoder_conf": {"mlp_type": "moe"}, "moe_conf": {"expert_precision": "w8a8"}}
    assert resolve_expert_precision(None, conf, "onnx") == "int8"
    assert resolve_expert_precision(None, conf, "torchscript") == "fp32"
    for precision in ("bf16", "bf16a"):
        conf["moe_conf"]["expert_precision"] = precision
        assert resolve_expert_precision(None, conf, "onnx") == "bf16"
        assert resolve_expert_precision(None, conf, "torchscript") == "fp32"
    with pytest.raises(ValueError, match="applies to --format onnx"):
        resolve_expert_precision("bf16", conf, "torchscript")
    model, _ = tiny_model("topk")
    moe = next(m for m in model.modules() if isinstance(m, MoEFFN))
    moe.expert_precision = "w8a8"
    twin = next(m for m in experts_as_computed(model).modules() if isinstance(m, MoEFFN))
    assert twin.expert_precision == "fp32"
    assert torch.equal(twin.w2, expert_weight_values(moe.w2, "int8"))
    assert not torch.equal(twin.w2, moe.w2)
