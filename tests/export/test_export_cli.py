"""`wenet-moe export` end to end on a tiny MoE model: files, metadata and inputs
that runtimes rely on, TorchScript parity, one-line errors, nothing half-written."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from export_tiny import write_model_dir
from wenet_moe.cli import main
from wenet_moe.export.verify import session

WENET_KEYS = ["chunk_size", "left_chunks", "reverse_weight", "output_size", "num_blocks",
              "cnn_module_kernel", "head", "feature_size", "vocab_size", "decoding_window",
              "subsampling_rate", "right_context", "sos_symbol", "eos_symbol",
              "is_bidirectional_decoder", "fbank_conf", "config_hash"]
SHERPA_STREAMING_KEYS = ["head", "num_blocks", "output_size", "cnn_module_kernel",
                         "right_context", "subsampling_factor", "vocab_size"]


def run_export(d, out, *extra):
    return main(["export", "--config", os.path.join(d, "train.yaml"), "--checkpoint",
                 os.path.join(d, "0.pt"), "--output_dir", out, "--chunk_size", "4",
                 "--num_decoding_left_chunks", "2", *extra])


def meta(path):
    return {p.key: p.value for p in onnx.load(path).metadata_props}


@pytest.fixture(scope="module")
def onnx_export_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    d, model, conf = write_model_dir(tmp, "speechmoe", seed=1)
    out = os.path.join(str(tmp), "onnx")
    assert run_export(d, out, "--format", "onnx", "--quantize", "int8") == 0
    return out, model, conf


def test_onnx_files_metadata_and_inputs(onnx_export_dir):
    out, model, conf = onnx_export_dir
    names = ["encoder", "ctc", "decoder", "model", "model_streaming"]
    expected = sorted([f"{n}.onnx" for n in names] + [f"{n}.int8.onnx" for n in names]
                      + ["units.txt", "tokens.txt"])
    assert sorted(os.listdir(out)) == expected
    for name in expected:
        if name.endswith(".onnx"):
            m = meta(os.path.join(out, name))
            missing = [k for k in WENET_KEYS + SHERPA_STREAMING_KEYS if k not in m]
            assert not missing, (name, missing)
    m = meta(os.path.join(out, "encoder.onnx"))
    assert (m["chunk_size"], m["left_chunks"], m["decoding_window"]) == ("4", "2", "19")
    assert (m["subsampling_rate"], m["right_context"], m["sos_symbol"]) == ("4", "6", "2")
    assert (m["vocab_size"], m["head"], m["cnn_module_kernel"]) == (str(conf["output_dim"]), "2", "4")
    assert m["is_bidirectional_decoder"] == "1" and float(m["reverse_weight"]) == 0.3
    from wenet_moe_runtime.features import FbankOptions
    fb = FbankOptions.from_dict(json.loads(m["fbank_conf"]))
    assert fb.num_mel_bins == conf["input_dim"] and fb.dither == 0.0 and not fb.snip_edges
    inputs = {n: [i.name for i in session(os.path.join(out, f"{n}.onnx")).get_inputs()]
              for n in names}
    assert inputs["encoder"] == ["chunk", "offset", "required_cache_size", "att_cache",
                                 "cnn_cache", "att_mask"]
    assert inputs["model_streaming"] == ["x", "offset", "required_cache_size", "attn_cache",
                                         "conv_cache", "attn_mask"]
    assert inputs["model"] == ["x", "x_lens"]
    assert inputs["decoder"] == ["hyps", "hyps_lens", "encoder_out", "reverse_weight"]
    outs = [o.name for o in session(os.path.join(out, "model.onnx")).get_outputs()]
    assert outs == ["log_probs", "log_probs_lens"]
    with open(os.path.join(out, "tokens.txt")) as a, open(os.path.join(out, "units.txt")) as b:
        assert a.read() == b.read()


def test_runtime_engine_loads_the_export(onnx_export_dir):
    """The torch-free runtime reads our metadata and runs a chunk."""
    from wenet_moe_runtime.model import OnnxAsrModel
    out, model, conf = onnx_export_dir
    rt = OnnxAsrModel(out)
    assert rt.info.chunk_size == 4 and rt.info.left_chunks == 2
    state = rt.new_state(4)
    feats = np.random.default_rng(0).standard_normal((19, conf["input_dim"])).astype(np.float32)
    got = rt.forward_encoder_chunk(feats, state)
    att = torch.zeros(model.encoder.num_blocks, 2, 8, 16)
    cnn = torch.zeros(model.encoder.num_blocks, 1, 16, 3)
    mask = torch.ones(1, 1, 12, dtype=torch.bool)
    mask[..., :8] = False
    with torch.no_grad():
        want, _, _ = model.encoder.forward_chunk(torch.from_numpy(feats)[None], 8, 8, att, cnn, mask)
    assert np.abs(got - want[0].numpy()).max() <= 1e-4


def test_torchscript_export_equals_eager(tmp_path):
    d, model, conf = write_model_dir(tmp_path, "omni", seed=2)
    out = os.path.join(str(tmp_path), "ts")
    assert run_export(d, out, "--format", "torchscript") == 0
    assert sorted(os.listdir(out)) == ["final.zip", "tokens.txt", "units.txt"]
    extra = {"metadata.json": ""}
    ts = torch.jit.load(os.path.join(out, "final.zip"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["chunk_size"] == "4"
    assert (ts.subsampling_rate(), ts.right_context(), ts.sos_symbol(), ts.eos_symbol()) == (4, 6, 2, 2)
    assert ts.is_bidirectional_decoder()
    x = torch.randn(1, 83, conf["input_dim"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = model.encoder.forward_chunk_by_chunk(x, 4, 2)
        att = cnn = torch.zeros(0, 0, 0, 0)
        outs, offset = [], 0
        for start in range(0, 83 - 6, 16):
            y, att, cnn = ts.forward_encoder_chunk(x[:, start:start + 19], offset, 8, att, cnn)
            outs.append(y)
            offset += y.size(1)
        got = torch.cat(outs, 1)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(ts.ctc_activation(got), model.ctc_activation(want), atol=1e-5)
        hyps = torch.tensor([[2, 3, 4, 5], [2, 6, 2, 2]])
        lens = torch.tensor([4, 2])
        for a, b in zip(ts.forward_attention_decoder(hyps, lens, want, 0.3),
                        model.forward_attention_decoder(hyps, lens, want, 0.3)):
            assert torch.allclose(a, b, atol=1e-5)


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    d, _, _ = write_model_dir(tmp_path, "topk")
    out = os.path.join(str(tmp_path), "out")
    rc = main(["export", "--config", os.path.join(d, "train.yaml"), "--checkpoint",
               os.path.join(d, "nope.pt"), "--output_dir", out])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "nope.pt" in err and "not found" in err and len(err.splitlines()) == 1
    assert not os.path.exists(out)
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith(".export-")] == []


def test_bad_config_names_the_key(tmp_path, capsys):
    d, _, conf = write_model_dir(tmp_path, "topk")
    with open(os.path.join(d, "train.yaml"), "a") as f:
        f.write("encoder_confs: {}\n")
    out = os.path.join(str(tmp_path), "out")
    rc = run_export(d, out)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "encoder_confs" in err and len(err.splitlines()) == 1
    assert not os.path.exists(out)
    rc = main(["export", "--config", os.path.join(d, "missing.yaml"), "--checkpoint",
               os.path.join(d, "0.pt"), "--output_dir", out])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "missing.yaml" in err and len(err.splitlines()) == 1


def test_failed_verification_leaves_output_untouched(tmp_path, capsys, monkeypatch):
    from wenet_moe.export import ParityError, verify
    d, _, _ = write_model_dir(tmp_path, "topk")
    out = os.path.join(str(tmp_path), "out")
    os.makedirs(out)
    with open(os.path.join(out, "encoder.onnx"), "w") as f:
        f.write("previous export")

    def broken(*args, **kwargs):
        raise ParityError("decoder.onnx score: max |diff| 0.5 at (0, 1, 2)")
    monkeypatch.setattr(verify, "verify_decoder", broken)
    rc = run_export(d, out, "--format", "onnx")
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "max |diff| 0.5" in err and len(err.splitlines()) == 1
    assert os.listdir(out) == ["encoder.onnx"]
    with open(os.path.join(out, "encoder.onnx")) as f:
        assert f.read() == "previous export"
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith(".export-")] == []
