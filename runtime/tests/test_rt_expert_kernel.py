"""The streaming encoders with their MoE FFNs in the C kernel (`encoder.kernel/`,
`encoder_batch.kernel/`): an MoE export writes them, the runtime runs them where the
kernel builds, and they give what `encoder.onnx` / `encoder_batch.onnx` give (within
float rounding: the kernel sums in another order) for every router, single streams
and batches, fresh and long caches; without the kernel the runtime falls back to the
`.onnx` graphs and says why."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

import rt_tiny_model as T
from rt_fixtures import tiny_moe_conf
from wenet_moe.config import ConfigError
from wenet_moe.export import export_loaded
from wenet_moe.export.common import check_replaceable
from wenet_moe.model import build_model
from wenet_moe_runtime import native
from wenet_moe_runtime.expert_encoder import ExpertSplitEncoder
from wenet_moe_runtime.model import ModelError, OnnxAsrModel

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.skipif(native.library() is None,
                                 reason=f"no MoE CPU kernel: {native.disabled_reason()}")]
CHUNK = 4
ATOL = 1e-4
ROUTERS = {"topk": {"router": "topk"}, "switch": {"router": "switch"},
           "speechmoe": {"router": "speechmoe", "embed_dim": 16, "embed_layers": 2},
           "omni": {"router": "omni"}}


def _export(root, router: str, left_chunks: int = -1, verify: bool = True) -> str:
    (root / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    conf = tiny_moe_conf(str(root / "units.txt"), len(T.units()))
    conf["moe_conf"] = dict(ROUTERS[router])
    if router == "switch":
        conf["encoder_conf"]["n_expert_activated"] = 1
    torch.manual_seed(1)
    model = build_model(copy.deepcopy(conf)).eval()
    out = str(root / f"{router}{left_chunks}")
    export_loaded(model, conf, conf, out, chunk_size=CHUNK, left_chunks=left_chunks, verify=verify)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """router -> export directory (chunk 4; topk also with 2 left chunks)."""
    root = tmp_path_factory.mktemp("kernel")
    # the export's own parity check (PyTorch vs the kernel graphs) on two routers; the
    # tests below compare every export with its .onnx graphs
    dirs = {r: _export(root, r, verify=r in ("topk", "speechmoe")) for r in ROUTERS}
    dirs["topk-left2"] = _export(root, "topk", left_chunks=2, verify=False)
    return dirs


def _one_thread():
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def _windows(model: OnnxAsrModel, seed: int, chunks: int):
    """`chunks` chunk windows of random features, the last one short."""
    rc, sub = model.info.right_context, model.info.subsampling_rate
    window = (CHUNK - 1) * sub + rc + 1
    rng = np.random.default_rng(seed)
    sizes = [window] * (chunks - 1) + [rc + 1 + sub]
    return [rng.standard_normal((n, 80)).astype(np.float32) for n in sizes]


def _stream(model: OnnxAsrModel, windows):
    state = model.new_state(CHUNK)
    outs = [model.forward_encoder_chunk(w, state) for w in windows]
    return outs, state


@pytest.mark.parametrize("name", list(ROUTERS) + ["topk-left2"])
def test_kernel_encoder_equals_the_onnx_graph(exports, name):
    kernel = OnnxAsrModel(exports[name])
    plain = OnnxAsrModel(exports[name], kernel_experts=False)
    assert kernel.kernel_experts == "on" and isinstance(kernel.sessions["encoder"], ExpertSplitEncoder)
    assert plain.kernel_experts.startswith("off") and not isinstance(plain.sessions["encoder"],
                                                                     ExpertSplitEncoder)
    windows = _windows(kernel, 0, 9)        # more chunks than 2 left chunks hold
    got, got_state = _stream(kernel, windows)
    want, want_state = _stream(plain, windows)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(got_state.att_cache, want_state.att_cache, atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(got_state.cnn_cache, want_state.cnn_cache, atol=ATOL, rtol=ATOL)
    assert np.abs(got[3]).max() > 0.1       # not a trivially small output


@pytest.mark.parametrize("name", ["topk", "speechmoe", "topk-left2"])
def test_batched_kernel_encoder_equals_streams_alone(exports, name):
    batched = OnnxAsrModel(exports[name], batch_encoder=True)
    alone = OnnxAsrModel(exports[name], kernel_experts=False)
    assert batched.batched and isinstance(batched.sessions["encoder_batch"], ExpertSplitEncoder)
    streams = [_windows(batched, seed, n) for seed, n in ((1, 5), (2, 2), (3, 7))]
    states = [batched.new_state(CHUNK) for _ in streams]
    got = [[] for _ in streams]
    for step in range(max(len(s) for s in streams)):
        live = [i for i, s in enumerate(streams) if step < len(s)]
        outs = batched.forward_encoder_chunks([streams[i][step] for i in live], [states[i] for i in live])
        for i, out in zip(live, outs):
            got[i].append(out)
    assert batched.batched_calls >= 3
    for i, windows in enumerate(streams):
        want, _ = _stream(alone, windows)
        for g, w in zip(got[i], want):
            np.testing.assert_allclose(g, w, atol=ATOL, rtol=ATOL)


def test_kernel_graph_layout(exports):
    path = os.path.join(exports["topk"], "encoder.kernel")
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    pieces = [s for s in manifest["steps"] if "piece" in s]
    calls = [s for s in manifest["steps"] if "experts" in s]
    assert len(calls) == 4 and len(pieces) == 5           # 2 blocks x 2 MoE FFNs (macaron)
    assert [s.get("experts") for s in manifest["steps"][1::2]] == [0, 1, 2, 3]
    assert manifest["inputs"] == ["chunk", "offset", "required_cache_size", "att_cache",
                                  "cnn_cache", "att_mask"]
    assert manifest["metadata"]["chunk_size"] == str(CHUNK)
    # a piece hands on only what later steps read: the residual stream, the FFN's input
    # rows, its layer's new caches (for the last piece's concatenation) and what every
    # layer reads (positions, masks); never a weight or a constant
    for piece in pieces[1:-1]:
        assert 2 <= len(piece["outputs"]) <= 12, piece["outputs"]
        assert not any(name.startswith("encoder.") or "Constant" in name for name in piece["outputs"])
    with np.load(os.path.join(path, "experts.npz")) as weights:
        assert weights["0.w1"].shape == (4, 32, 48) and weights["0.w2"].shape == (4, 48, 32)
        assert weights["3.router_weight"].shape == (4, 32)
    # one copy of the experts on disk: encoder_batch.kernel/ links encoder.kernel/'s
    assert os.path.samefile(os.path.join(path, "experts.npz"),
                            os.path.join(exports["topk"], "encoder_batch.kernel", "experts.npz"))
    # the whole graph: the pieces joined, each call a node of the kernel's custom op
    # whose weights the runtime supplies (empty in the file)
    import onnx
    assert manifest["whole"] == "whole.onnx"
    whole = onnx.load(os.path.join(path, "whole.onnx"))
    ops = [n for n in whole.graph.node if n.domain == "wenet_moe.kernel"]
    assert [n.op_type for n in ops] == ["RoutedExperts"] * 4
    assert [n.output[0] for n in ops] == [c["output"] for c in calls]
    supplied = {t.name: t for t in whole.graph.initializer if t.name.split(".")[0] in "0123"
                or t.name == "kernel_threads"}
    assert len(supplied) == 4 * 8 + 1 and all(list(t.dims) == [0] for t in supplied.values())
    assert [i.name for i in whole.graph.input] == manifest["inputs"]
    assert {p.key: p.value for p in whole.metadata_props} == manifest["metadata"]
    # the export directory, .kernel directories included, may be exported over again
    check_replaceable(exports["topk"])


def test_foreign_file_in_a_kernel_directory_blocks_reexport(exports, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(exports["topk"], copy_dir)
    (copy_dir / "encoder.kernel" / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match="encoder.kernel"):
        check_replaceable(str(copy_dir))


def test_without_the_kernel_the_runtime_runs_the_onnx_graph(exports, monkeypatch, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("WENET_MOE_CPU_KERNEL", "0")
    with caplog.at_level(logging.WARNING):
        model = OnnxAsrModel(exports["topk"])
    assert model.kernel_experts == "off (disabled by WENET_MOE_CPU_KERNEL=0)"
    assert not isinstance(model.sessions["encoder"], ExpertSplitEncoder)
    assert "encoder.kernel" in caplog.text and "WENET_MOE_CPU_KERNEL=0" in caplog.text
    assert OnnxAsrModel(exports["topk"], int8=False).forward_encoder_chunk(
        _windows(model, 0, 2)[0], model.new_state(CHUNK)).shape == (CHUNK, 32)


def test_whole_graph_runs_at_two_threads(exports):
    """The joined graph is one session whose op shares the experts out on its thread
    pool: 2 threads run it too, and give what encoder.onnx gives."""
    two = OnnxAsrModel(exports["speechmoe"], num_threads=2)
    assert two.kernel_experts == "on" and two.sessions["encoder"].mode == "whole"
    plain = OnnxAsrModel(exports["speechmoe"], num_threads=2, kernel_experts=False)
    windows = _windows(two, 4, 6)
    for g, w in zip(_stream(two, windows)[0], _stream(plain, windows)[0]):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=ATOL)


def _without_whole_graphs(src: str, dst) -> str:
    """A copy of export `src` as exports were before `whole.onnx` (pieces only)."""
    shutil.copytree(src, dst)
    for kernel in ("encoder.kernel", "encoder_batch.kernel"):
        path = os.path.join(dst, kernel, "manifest.json")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        os.unlink(os.path.join(dst, kernel, manifest.pop("whole")))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
    return str(dst)


def test_pieces_without_a_whole_graph(exports, tmp_path):
    """An export without `whole.onnx` runs its pieces at one thread (the same numbers as
    the whole graph) and its `.onnx` graph at two (each piece would have its own pool)."""
    old = _without_whole_graphs(exports["topk"], tmp_path / "old")
    pieces, whole = OnnxAsrModel(old), OnnxAsrModel(exports["topk"])
    assert pieces.kernel_experts == "on" and pieces.sessions["encoder"].mode == "pieces"
    assert whole.sessions["encoder"].mode == "whole"
    assert (pieces.kernel_graph, whole.kernel_graph) == ("pieces", "whole")     # also in /health
    windows = _windows(whole, 6, 5)
    for g, w in zip(_stream(pieces, windows)[0], _stream(whole, windows)[0]):
        # the same kernel and graph nodes (equal on the machines measured; ONNX Runtime
        # may fuse differently within a piece than across the whole graph)
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=ATOL)
    two = OnnxAsrModel(old, num_threads=2)
    assert two.kernel_experts.startswith("off (num_threads 2") and two.kernel_graph == ""
    assert not isinstance(two.sessions["encoder"], ExpertSplitEncoder)


def test_a_whole_graph_that_does_not_load_falls_back(exports, tmp_path, caplog):
    """A whole graph ONNX Runtime refuses (here: not a model; an ONNX Runtime without the
    op's C API would refuse its nodes): the pieces at one thread, the .onnx graph at two,
    and the log says which file and why."""
    broken = tmp_path / "broken"
    shutil.copytree(exports["topk"], broken)
    (broken / "encoder.kernel" / "whole.onnx").write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING):
        one = OnnxAsrModel(str(broken))
    assert one.kernel_experts == "on" and one.sessions["encoder"].mode == "pieces"
    assert "encoder.kernel/whole.onnx: cannot load" in caplog.text
    two = OnnxAsrModel(str(broken), num_threads=2)
    assert two.kernel_experts.startswith("off (") and "whole.onnx: cannot load" in two.kernel_experts
    assert not isinstance(two.sessions["encoder"], ExpertSplitEncoder)
    windows = _windows(one, 2, 3)
    for g, w in zip(_stream(one, windows)[0], _stream(two, windows)[0]):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=ATOL)


def test_bad_kernel_directory_names_the_file(exports, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exports["topk"], broken)
    (broken / "encoder.kernel" / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"encoder\.kernel/manifest\.json: cannot read"):
        OnnxAsrModel(str(broken))
    shutil.copy(os.path.join(exports["topk"], "encoder.kernel", "manifest.json"),
                broken / "encoder.kernel" / "manifest.json")
    os.unlink(broken / "encoder.kernel" / "experts.npz")
    with pytest.raises(ModelError, match=r"experts\.npz: cannot read"):
        OnnxAsrModel(str(broken))


def test_dense_and_int8_expert_exports_have_no_kernel_graphs(tmp_path):
    (tmp_path / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    conf = tiny_moe_conf(str(tmp_path / "units.txt"), len(T.units()))
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(conf)).eval()
    export_loaded(model, conf, conf, str(tmp_path / "int8x"), chunk_size=CHUNK,
                  expert_precision="int8", verify=False)
    assert not os.path.exists(tmp_path / "int8x" / "encoder.kernel")
    dense = copy.deepcopy(conf)
    for key in ("mlp_type", "n_expert", "n_expert_activated"):
        dense["encoder_conf"].pop(key)
    model = build_model(dense).eval()
    export_loaded(model, dense, dense, str(tmp_path / "dense"), chunk_size=CHUNK, verify=False)
    assert not os.path.exists(tmp_path / "dense" / "encoder.kernel")


def test_to_bf16_rounds_as_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 3,
                        np.array([0.0, -0.0, 1e-40, 3.4e38, -3.4e38, np.inf, -np.inf], np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(native.to_bf16(x), want)
    assert native.to_bf16(np.array([np.nan], np.float32))[0] & 0x7FFF > 0x7F80      # still NaN


def test_bf16_expert_weights(tmp_path):
    """--expert_precision bf16: the graphs hold the bf16 values in fp32, the kernel
    graphs hold them in bf16; both compute the same numbers."""
    (tmp_path / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    conf = tiny_moe_conf(str(tmp_path / "units.txt"), len(T.units()))
    torch.manual_seed(2)
    model = build_model(copy.deepcopy(conf)).eval()
    out = str(tmp_path / "bf16")
    export_loaded(model, conf, conf, out, chunk_size=CHUNK, expert_precision="bf16")
    with open(os.path.join(out, "encoder.kernel", "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["expert_weights"] == "bf16"
    with np.load(os.path.join(out, "encoder.kernel", "experts.npz")) as weights:
        w1 = weights["0.w1"]
    assert not (w1.view(np.uint32) & 0xFFFF).any()          # bf16 values
    kernel, plain = OnnxAsrModel(out), OnnxAsrModel(out, kernel_experts=False)
    assert kernel.sessions["encoder"].expert_weights == "bf16"
    windows = _windows(kernel, 5, 6)
    for g, w in zip(_stream(kernel, windows)[0], _stream(plain, windows)[0]):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=ATOL)
    # and they are not the fp32 model's weights
    with np.load(os.path.join(_export(tmp_path, "topk", verify=False), "encoder.kernel",
                              "experts.npz")) as weights:
        assert (weights["0.w1"].view(np.uint32) & 0xFFFF).any()


def test_int8_export_has_a_gated_int8_kernel_encoder(tmp_path, monkeypatch):
    """--quantize int8: `encoder.int8.kernel/` (int8 pieces, w8a8 experts) is gated with
    the other int8 graphs and serves the int8 runtime; its outputs stay near fp32's."""
    (tmp_path / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    conf = tiny_moe_conf(str(tmp_path / "units.txt"), len(T.units()))
    torch.manual_seed(3)
    model = build_model(copy.deepcopy(conf)).eval()
    out = str(tmp_path / "q")
    report = export_loaded(model, conf, conf, out, chunk_size=CHUNK, quantize="int8")
    assert any("encoder.int8.kernel" in key for key in report), sorted(report)
    with open(os.path.join(out, "encoder.int8.kernel", "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["expert_weights"] == "w8a8"
    assert not os.path.exists(os.path.join(out, "encoder_batch.int8.kernel"))
    assert os.path.samefile(os.path.join(out, "encoder.int8.kernel", "experts.npz"),
                            os.path.join(out, "encoder.kernel", "experts.npz"))
    if native.int8_dot_native(native.library()) < 2:        # a CPU without VNNI
        int8 = OnnxAsrModel(out, int8=True)
        assert int8.kernel_experts == "off (int8 experts: the kernel's build has no VNNI)"
        monkeypatch.setattr(native, "int8_dot_native", lambda lib: 2)
    int8 = OnnxAsrModel(out, int8=True)
    assert int8.kernel_experts == "on" and int8.sessions["encoder"].mode == "whole"
    pieces = OnnxAsrModel(out, int8=True)
    pieces.sessions["encoder"] = ExpertSplitEncoder(os.path.join(out, "encoder.int8.kernel"),
                                                    _one_thread(), whole_graph=False)
    windows = _windows(int8, 8, 4)
    for g, w in zip(_stream(int8, windows)[0], _stream(pieces, windows)[0]):
        # equal on the machines measured; a fusion that moved one activation by an ulp
        # could move its int8 rounding by one step, not more
        assert np.abs(g - w).max() <= 0.02 * np.abs(w).max()
    fp32 = OnnxAsrModel(out, kernel_experts=False)
    windows = _windows(int8, 7, 6)
    got, want = _stream(int8, windows)[0], _stream(fp32, windows)[0]
    for g, w in zip(got, want):
        scale = np.abs(w).max()
        assert np.abs(g - w).max() < 0.1 * scale             # int8 rounding, not a wrong graph
    # the pieces are int8 graphs
    import onnx
    piece = onnx.load(os.path.join(out, "encoder.int8.kernel", "piece_01.onnx"))
    assert any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear")
               for n in piece.graph.node)


def test_int8_kernel_graphs_need_vnni(exports, tmp_path, monkeypatch):
    """Without VNNI the kernel's w8a8 runs at about the fp32 rate, so the int8 runtime
    keeps ONNX Runtime's int8 experts (`encoder.int8.onnx`)."""
    out = str(tmp_path / "q")
    (tmp_path / "units.txt").write_text("\n".join(T.units()) + "\n", encoding="utf-8")
    conf = tiny_moe_conf(str(tmp_path / "units.txt"), len(T.units()))
    torch.manual_seed(3)
    export_loaded(build_model(copy.deepcopy(conf)).eval(), conf, conf, out, chunk_size=CHUNK,
                  quantize="int8", verify=False)
    monkeypatch.setattr(native, "int8_dot_native", lambda lib: 1)
    int8 = OnnxAsrModel(out, int8=True)
    assert int8.kernel_experts == "off (int8 experts: the kernel's build has no VNNI)"
    assert not isinstance(int8.sessions["encoder"], ExpertSplitEncoder)
    assert int8.paths["encoder"].endswith("encoder.int8.onnx")
    assert OnnxAsrModel(out).kernel_experts == "on"        # fp32 experts: the kernel either way


def test_profile_of_the_encoder_as_served(exports):
    """`bench/ort_profile.py --as_served` profiles the whole graph the runtime serves (its
    MoE FFNs as the op's nodes); without it, `encoder.onnx` (the exported dispatch)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
    import ort_profile
    feats = np.random.default_rng(0).standard_normal((60, 80)).astype(np.float32)
    served, nodes, calls = ort_profile.profile(exports["topk"], False, CHUNK, feats, 1, as_served=True)
    assert nodes["RoutedExperts"] == 4 and served["RoutedExperts"] > 0 and calls >= 2
    plain, nodes, _ = ort_profile.profile(exports["topk"], False, CHUNK, feats, 1)
    assert "RoutedExperts" not in plain and nodes["MatMul"] > 0
