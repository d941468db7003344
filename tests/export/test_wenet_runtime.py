"""`wenet-moe export --wenet_runtime`: the interface WeNet's C++ runtime
(runtime/core/decoder/onnx_asr_model.cc) expects, driven the way that file drives it.

The models are the WeNet reference bundle's (tests/data/wenet_reference), imported,
so the runtime-driven outputs are checked against WeNet's own numbers.
"""
import os
import shutil
import tarfile

import numpy as np
import onnx
import pytest
import torch

from wenet_moe.cli import main as cli_main
from wenet_moe.export.wenet_runtime import RUNTIME_METADATA, WenetRuntimeDriver, onnx_backend
from wenet_moe.interop.wenet_import import import_wenet

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "data", "wenet_reference")
INT64, FLOAT, BOOL = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: export dir}: MoE with left_chunks -1, dense with left_chunks 4 (chunk 16)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("wenet_runtime")
    with tarfile.open(os.path.join(BUNDLE, "checkpoints.tar.xz")) as tar:
        tar.extractall(root, filter="data")
    out = {}
    for variant, left in (("moe", -1), ("dense", 4)):
        for name in ("train.yaml", "units.txt", "global_cmvn"):
            shutil.copyfile(os.path.join(BUNDLE, variant, name), root / variant / name)
        imported = root / f"imported_{variant}"
        import_wenet(str(root / variant), str(imported))
        dst = root / f"onnx_{variant}"
        assert cli_main(["export", "--config", str(imported / "train.yaml"), "--checkpoint",
                         str(imported / "final.pt"), "--output_dir", str(dst), "--wenet_runtime",
                         "--chunk_size", "16", "--num_decoding_left_chunks", str(left)]) == 0
        out[variant] = str(dst)
    return out


def _io(path):
    proto = onnx.load(path)
    inits = {i.name for i in proto.graph.initializer}
    ins = [(i.name, i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim))
           for i in proto.graph.input if i.name not in inits]
    outs = [o.name for o in proto.graph.output]
    return ins, outs, {p.key: p.value for p in proto.metadata_props}


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_graph_interface(exported, variant):
    d = exported[variant]
    assert sorted(os.listdir(d)) == ["ctc.onnx", "decoder.onnx", "encoder.onnx", "units.txt"]
    ins, outs, meta = _io(os.path.join(d, "encoder.onnx"))
    want = [("chunk", FLOAT, 3), ("offset", INT64, 0), ("required_cache_size", INT64, 0),
            ("att_cache", FLOAT, 4), ("cnn_cache", FLOAT, 4)]
    if variant == "dense":   # left_chunks 4: the runtime feeds a mask
        want.append(("att_mask", BOOL, 3))
    assert ins == want
    assert outs == ["output", "r_att_cache", "r_cnn_cache"]
    for key in RUNTIME_METADATA:          # read with atoi by the runtime
        assert meta[key].lstrip("-").isdigit(), (key, meta[key])
    assert meta["cnn_module_kernel"] == "15" and meta["head"] == "4" and meta["output_size"] == "64"
    assert meta["left_chunks"] == ("-1" if variant == "moe" else "4")
    ins, outs, _ = _io(os.path.join(d, "decoder.onnx"))
    assert ins == [("hyps", INT64, 2), ("hyps_lens", INT64, 1), ("encoder_out", FLOAT, 3)]
    assert outs == ["score", "r_score"]
    ins, outs, _ = _io(os.path.join(d, "ctc.onnx"))
    assert [i[1:] for i in ins] == [(FLOAT, 3)] and len(outs) == 1


def test_runtime_loop_reproduces_wenet_streaming(exported):
    """Chunk 16, all left context: the runtime's chunking (first window
    (16-1)*4+7 frames, then 64 new frames after 3 cached ones) through the graphs gives
    WeNet's forward_chunk_by_chunk output (cbc16_s) and its CTC log-probs."""
    ref = np.load(os.path.join(BUNDLE, "moe", "reference.npz"))
    meta, backend, enc_in = onnx_backend(exported["moe"])
    driver = WenetRuntimeDriver(meta, backend, enc_in)
    logp = driver.stream(ref["feats_s"][0])
    enc = np.concatenate(driver.encoder_outs, 1)
    assert enc.shape == ref["cbc16_s"].shape
    assert float(np.abs(enc - ref["cbc16_s"]).max()) <= 1e-5
    sd = torch.load(os.path.join(os.path.dirname(exported["moe"]), "imported_moe", "final.pt"))
    hidden = torch.from_numpy(ref["cbc16_s"][0])
    want = torch.log_softmax(hidden @ sd["ctc.ctc_lo.weight"].T + sd["ctc.ctc_lo.bias"], -1)
    assert logp.shape == (77, 40)
    assert float(np.abs(logp - want.numpy()).max()) <= 1e-5


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_runtime_rescoring_reproduces_wenet(exported, variant):
    """AttentionRescoring's input packing (hyps padded with 0) and score sums on WeNet's
    full-context encoder output give WeNet's combined rescoring scores."""
    ref = np.load(os.path.join(BUNDLE, variant, "reference.npz"))
    meta, backend, enc_in = onnx_backend(exported[variant])
    driver = WenetRuntimeDriver(meta, backend, enc_in)
    driver.encoder_outs = [ref["enc_full_s"]]
    hyps = [list(map(int, h[:n])) for h, n in zip(ref["rescore_hyps"], ref["rescore_hyps_lens"])]
    got = driver.attention_rescoring(hyps, 0.3)
    assert float(np.abs(np.array(got) - ref["rescore_combined"]).max()) <= 1e-4
    l2r_only = driver.attention_rescoring(hyps, 0.0)
    assert float(np.abs(np.array(l2r_only) - ref["rescore_l2r_score"]).max()) <= 1e-4


def test_left_chunks_loop_matches_pytorch(exported):
    """left_chunks 4: offsets start at 64 with zero caches and masked cache slots, as
    the runtime does; the graphs agree with PyTorch driven the same way."""
    from wenet_moe.export.wenet_runtime import torch_backend
    from wenet_moe.model.loading import build_and_load, load_configs

    root = os.path.dirname(exported["dense"])
    _, configs = load_configs(os.path.join(root, "imported_dense", "train.yaml"))
    model = build_and_load(configs, os.path.join(root, "imported_dense", "final.pt"))
    meta, backend, enc_in = onnx_backend(exported["dense"])
    feats = np.load(os.path.join(BUNDLE, "dense", "reference.npz"))["feats_s"][0]
    got = WenetRuntimeDriver(meta, backend, enc_in)
    want = WenetRuntimeDriver(meta, torch_backend(model), enc_in)
    a, b = got.stream(feats), want.stream(feats)
    assert a.shape == (77, 40) and got.offset == 64 + 77
    assert float(np.abs(a - b).max()) <= 1e-5
    assert got.att_cache.shape == (2, 4, 64, 32)


def test_driver_refuses_a_mask_input_without_left_chunks():
    meta = {k: "1" for k in RUNTIME_METADATA}
    meta.update({"output_size": "4", "head": "2", "cnn_module_kernel": "3", "subsampling_rate": "4",
                 "right_context": "6", "chunk_size": "4", "left_chunks": "-1"})
    driver = WenetRuntimeDriver(meta, (None, None, None),
                                ["chunk", "offset", "required_cache_size", "att_cache", "cnn_cache",
                                 "att_mask"])
    with pytest.raises(ValueError, match="att_mask"):
        driver.forward_encoder(np.zeros((19, 80), np.float32))
    with pytest.raises(ValueError, match="'head'"):
        WenetRuntimeDriver({k: v for k, v in meta.items() if k != "head"}, (None, None, None), [])
