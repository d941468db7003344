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
    names = ["encoder", "ctc", "decoder", "model", "model_streaming", "decoder_tree"]
    # encoder_batch.onnx (cross-stream batching) is fp32 only
    expected = sorted([f"{n}.onnx" for n in names] + [f"{n}.int8.onnx" for n in names]
                      + ["encoder_batch.onnx", "units.txt", "tokens.txt"])
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


def test_reexport_without_int8_removes_stale_int8(onnx_export_dir, tmp_path):
    """The new export replaces the directory as a whole: int8 graphs of an earlier
    export are gone (so `--int8` cannot serve them), the directory keeps its mode."""
    import shutil
    from wenet_moe_runtime.model import ModelError, OnnxAsrModel
    src, _, _ = onnx_export_dir
    d = os.path.join(os.path.dirname(src), "model")
    out = str(tmp_path / "onnx")
    shutil.copytree(src, out)
    os.chmod(out, 0o750)
    assert "encoder.int8.onnx" in os.listdir(out)
    assert run_export(d, out, "--format", "onnx") == 0
    names = ["encoder", "ctc", "decoder", "model", "model_streaming"]
    assert sorted(os.listdir(out)) == sorted([f"{n}.onnx" for n in names]
                                             + ["encoder_batch.onnx", "decoder_tree.onnx",
                                                "units.txt", "tokens.txt"])
    assert os.stat(out).st_mode & 0o777 == 0o750
    OnnxAsrModel(out)
    with pytest.raises(ModelError, match=r"encoder\.int8\.onnx: model file not found"):
        OnnxAsrModel(out, int8=True)
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith(".export")] == []


def test_failed_rename_keeps_previous_directory(tmp_path, capsys, monkeypatch):
    """A failure while putting the new directory in place (after the old one was
    moved aside) puts the old directory back unchanged."""
    from wenet_moe.export import common
    d, _, _ = write_model_dir(tmp_path, "topk")
    out = os.path.join(str(tmp_path), "ts")
    os.makedirs(out)
    with open(os.path.join(out, "final.zip"), "w") as f:
        f.write("previous export")
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".export-") and not \
                os.path.basename(src).startswith(".export-old-"):
            raise OSError(28, "No space left on device (injected)")
        return real_rename(src, dst)
    monkeypatch.setattr(common.os, "rename", rename)
    rc = run_export(d, out, "--format", "torchscript")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "injected" in err and len(err.splitlines()) == 1
    assert os.listdir(out) == ["final.zip"]
    with open(os.path.join(out, "final.zip")) as f:
        assert f.read() == "previous export"
    assert sorted(n for n in os.listdir(str(tmp_path)) if n.startswith(".export")) == []


def test_output_dir_with_other_files_is_refused(tmp_path, capsys):
    """Replacing a directory that holds more than an export (here: a model
    directory given as --output_dir) would delete it: refused before any work."""
    d, _, _ = write_model_dir(tmp_path, "topk")
    before = sorted(os.listdir(d))
    rc = run_export(d, d, "--format", "onnx")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert f"{d}: holds 0.pt, train.yaml, which an export does not write" in err
    assert sorted(os.listdir(d)) == before


def test_int8_options_bad_input_is_one_line_error(tmp_path, capsys):
    d, _, _ = write_model_dir(tmp_path, "topk")
    out = os.path.join(str(tmp_path), "out")
    bad = os.path.join(str(tmp_path), "data.list")
    with open(bad, "w") as f:
        f.write('{"key": "a", "wav": "%s/a.wav", "txt": "ab"}\n{"key": "b"}\n' % tmp_path)
    missing = os.path.join(str(tmp_path), "missing.scp")
    with open(missing, "w") as f:
        f.write(f"a {tmp_path}/a.wav\n")
    cases = [(["--quantize", "int8", "--int8_verify_data", bad],
              f"{bad}:2: field 'wav' missing or not a string"),
             (["--quantize", "int8", "--int8_verify_data", missing],
              f"{missing}:1: {tmp_path}/a.wav: no such file"),
             (["--quantize", "int8", "--int8_verify_data", bad + ".nope"],
              f"{bad}.nope: --int8_verify_data not found"),
             (["--int8_verify_data", bad], "only used with --quantize int8"),
             (["--quantize", "int8", "--int8_max_disagreement", "1.5"],
              "--int8_max_disagreement must be in [0, 1], got 1.5")]
    for extra, message in cases:
        rc = run_export(d, out, *extra)
        err = capsys.readouterr().err.strip()
        assert rc == 1 and message in err and len(err.splitlines()) == 1, (extra, err)
        assert not os.path.exists(out)


def set_meta(path, **kv):
    proto = onnx.load(path)
    for p in proto.metadata_props:
        if p.key in kv:
            p.value = str(kv[p.key])
    onnx.save(proto, path)


def test_runtime_refuses_mixed_exports_and_vocab_mismatch(onnx_export_dir, tmp_path):
    """Every graph of the export carries one config_hash; the runtime refuses a
    graph from another export and a vocab_size that is not units.txt's size."""
    import shutil
    from wenet_moe_runtime.model import ModelError, OnnxAsrModel
    src, _, conf = onnx_export_dir
    hashes = {n: meta(os.path.join(src, n))["config_hash"] for n in os.listdir(src)
              if n.endswith(".onnx")}
    assert len(hashes) == 13 and len(set(hashes.values())) == 1
    out = str(tmp_path / "onnx")
    shutil.copytree(src, out)
    set_meta(os.path.join(out, "ctc.int8.onnx"), config_hash="0123456789abcdef")
    OnnxAsrModel(out)  # the fp32 graphs still agree
    with pytest.raises(ModelError) as e:
        OnnxAsrModel(out, int8=True)
    msg = str(e.value)
    assert msg.startswith(os.path.join(out, "ctc.int8.onnx") + ": config_hash 0123456789abcdef "
                          "differs from " + hashes["encoder.onnx"])
    # the fp32 runtime rescores with decoder_tree.onnx, or decoder.onnx without it
    for name, kwargs in (("decoder.onnx", {"tree_decoder": False}), ("decoder_tree.onnx", {})):
        set_meta(os.path.join(out, name), vocab_size=conf["output_dim"] + 1)
        with pytest.raises(ModelError) as e:
            OnnxAsrModel(out, **kwargs)
        assert str(e.value) == (f"{os.path.join(out, name)}: metadata vocab_size "
                                f"{conf['output_dim'] + 1}, but {os.path.join(out, 'units.txt')} "
                                f"has {conf['output_dim']} symbols")
