"""The exporter drops inputs a graph does not read; ours puts them back (sherpa-onnx
and WeNet's runtime feed inputs by position/name). A unidirectional Transformer
model (no convolution, decoder ignores reverse_weight) exports and verifies."""
import copy
import os

import numpy as np
import pytest
import torch

from export_tiny import tiny_config, write_units
from wenet_moe.export import export_loaded, onnx_export, onnx_passes
from wenet_moe.export.verify import session
from wenet_moe.model import build_model


class _IgnoresSecond(torch.nn.Module):
    def forward(self, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        return x * 2.0


def test_dropped_input_is_restored_in_order(tmp_path):
    path = os.path.join(str(tmp_path), "m.onnx")
    onnx_export._export(_IgnoresSecond(), (torch.ones(1, 3), torch.zeros((), dtype=torch.int64)),
                        path, ["x", "unused"], ["y"], {"x": {1: "T"}}, {"k": "v"})
    sess = session(path)
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("x", "tensor(float)"),
                                                             ("unused", "tensor(int64)")]
    y = sess.run(None, {"x": np.ones((1, 5), np.float32), "unused": np.array(3, np.int64)})[0]
    assert np.array_equal(y, np.full((1, 5), 2.0, np.float32))
    assert sess.get_modelmeta().custom_metadata_map["k"] == "v"


def test_unidirectional_transformer_exports_with_all_inputs(tmp_path):
    units = write_units(os.path.join(str(tmp_path), "units.txt"))
    conf = tiny_config("switch", units_path=units)
    conf.update(encoder="transformer", decoder="transformer")
    for key in ("cnn_module_kernel", "causal", "cnn_module_norm"):
        conf["encoder_conf"].pop(key)
    conf["decoder_conf"].pop("r_num_blocks")
    conf["model_conf"]["reverse_weight"] = 0.0
    torch.manual_seed(4)
    model = build_model(copy.deepcopy(conf)).eval()
    out = os.path.join(str(tmp_path), "out")
    report = export_loaded(model, conf, conf, out, "onnx", chunk_size=4, left_chunks=-1,
                           reverse_weight=0.5)
    assert report and max(report.values()) <= 1e-4
    dec = session(os.path.join(out, "decoder.onnx"))
    assert [i.name for i in dec.get_inputs()] == ["hyps", "hyps_lens", "encoder_out",
                                                  "reverse_weight"]
    meta = dec.get_modelmeta().custom_metadata_map
    # no bidirectional decoder: the recorded weight is 0, the cnn cache is empty
    assert meta["is_bidirectional_decoder"] == "0" and float(meta["reverse_weight"]) == 0.0
    assert meta["cnn_module_kernel"] == "1" and meta["left_chunks"] == "-1"
    enc = session(os.path.join(out, "encoder.onnx"))
    cnn = [i.shape for i in enc.get_inputs() if i.name == "cnn_cache"][0]
    assert cnn[-1] == 0


@pytest.mark.slow
def test_large_weights_go_to_one_external_data_file(tmp_path, monkeypatch):
    """Models over protobuf's 2 GiB limit: simulated with a tiny threshold."""
    from export_tiny import tiny_model
    model, conf = tiny_model("topk", seed=5)
    conf = dict(conf, tokenizer_conf=dict(conf["tokenizer_conf"], symbol_table_path=write_units(
        os.path.join(str(tmp_path), "units.txt"))))
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)
    out = os.path.join(str(tmp_path), "out")
    report = export_loaded(model, conf, conf, out, "onnx", chunk_size=4, left_chunks=2,
                           quantize="int8")
    assert max(v for k, v in report.items() if "int8" not in k) <= 1e-4
    names = sorted(os.listdir(out))
    graphs = [n for n in names if n.endswith(".onnx")]
    # every graph but the CTC head (704 bytes of weights) is over the threshold; save_onnx
    # moves tensors of >= 1024 bytes out, and in decoder.int8.onnx and
    # decoder_tree.int8.onnx every tensor of this tiny model is int8 and smaller (the
    # former's right-to-left branch, in an If, is quantized too), so they stay one file
    big = [n for n in graphs if not n.startswith("ctc.")
           and n not in ("decoder.int8.onnx", "decoder_tree.int8.onnx")]
    assert len(graphs) == 13 and sorted(n + ".data" for n in big) == \
        sorted(n for n in names if n.endswith(".data"))
    import onnx as onnx_lib
    small = onnx_lib.load(os.path.join(out, "decoder.int8.onnx"))
    sizes = [len(t.raw_data) for g in onnx_passes.graphs(small.graph) for t in g.initializer]
    assert onnx_export.weight_bytes(small) > 1000 and max(sizes) < 1024
    assert os.path.getsize(os.path.join(out, "model.onnx.data")) > 10_000


def test_verification_catches_a_traced_moe_graph(tmp_path):
    """The known failure mode: the tracing exporter bakes the MoE dispatch of its
    example input into the graph. The verification must refuse such a graph."""
    import warnings
    from export_tiny import tiny_model
    from wenet_moe.export import ParityError
    from wenet_moe.export.verify import verify_offline
    from wenet_moe.export.wrappers import OfflineCtc
    model, conf = tiny_model("topk", seed=3)
    onnx_export.set_feature_dim(model, conf["input_dim"])
    path = os.path.join(str(tmp_path), "traced.onnx")
    x = torch.randn(1, 7, conf["input_dim"], generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(OfflineCtc(model.encoder, model.ctc).eval(), (x, torch.tensor([7])),
                          path, dynamo=False, opset_version=17, input_names=["x", "x_lens"],
                          output_names=["log_probs", "log_probs_lens"],
                          dynamic_axes={"x": {0: "N", 1: "T"}, "x_lens": {0: "N"},
                                        "log_probs": {0: "N", 1: "T"}})
    with pytest.raises(ParityError, match=r"model.onnx log_probs \(T=\d+\): max \|diff\|"):
        verify_offline(model, path, [7, 8, 30, 100])
    # the scripted export of the same model passes the same check
    scripted = os.path.join(str(tmp_path), "model.onnx")
    onnx_export.export_offline(model, scripted, {})
    assert max(verify_offline(model, scripted, [7, 8, 30, 100]).values()) <= 1e-4
