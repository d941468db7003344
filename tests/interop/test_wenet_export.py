"""`wenet-moe export-wenet`: round trip against the WeNet reference bundle.

import-wenet then export-wenet must give back WeNet's checkpoint: the same keys,
shapes and dtypes as the bundle's state_dict_keys.txt (WeNet's own list), the same
tensors, and the same model configuration.
"""
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
import yaml

from wenet_moe.cli import main as cli_main
from wenet_moe.interop.wenet_export import export_wenet
from wenet_moe.interop.wenet_import import import_wenet, translate_config
from wenet_moe.model.loading import build_and_load, load_configs

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "data", "wenet_reference")
MODEL_KEYS = ("encoder", "encoder_conf", "decoder", "decoder_conf", "ctc", "ctc_conf", "cmvn",
              "model", "model_conf", "tokenizer", "input_dim", "output_dim", "vocab_size")


def read_key_list(path):
    """state_dict_keys.txt: key -> ((shape), dtype)."""
    out = {}
    for line in open(path, encoding="utf-8"):
        key, shape, dtype = line.rstrip("\n").split("\t")
        out[key] = (tuple(int(v) for v in shape.strip("()").replace(" ", "").split(",") if v), dtype)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    with tarfile.open(os.path.join(BUNDLE, "checkpoints.tar.xz")) as tar:
        tar.extractall(root, filter="data")
    for v in ("dense", "moe"):
        for name in ("train.yaml", "units.txt", "global_cmvn"):
            shutil.copyfile(os.path.join(BUNDLE, v, name), root / v / name)
        import_wenet(str(root / v), str(root / f"imported_{v}"))
    return root


def test_round_trip_keys_values_config(dirs):
    out = dirs / "wenet_again"
    report = export_wenet(str(dirs / "imported_dense" / "train.yaml"),
                          str(dirs / "imported_dense" / "final.pt"), str(out))
    assert report["mismatches"] == []
    assert sorted(os.listdir(out)) == ["final.pt", "global_cmvn", "train.yaml", "units.txt"]
    sd = torch.load(out / "final.pt", map_location="cpu")
    want = read_key_list(os.path.join(BUNDLE, "dense", "state_dict_keys.txt"))
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()}
    assert got == want
    original = torch.load(dirs / "dense" / "final.pt", map_location="cpu")
    for key, value in original.items():
        if key.endswith(".pe"):
            # our sinusoids; WeNet's table (made on another CPU) differs only by the
            # float32 rounding of the angle: 4e-6 up to position 100, 2.4e-4 at 4999
            assert float((sd[key][:, :100] - value[:, :100]).abs().max()) < 1e-5
            assert float((sd[key] - value).abs().max()) < 5e-4
        else:
            assert torch.equal(sd[key], value), key
    conf = yaml.safe_load(open(out / "train.yaml"))
    orig_conf = yaml.safe_load(open(dirs / "dense" / "train.yaml"))
    for key in MODEL_KEYS:
        assert conf[key] == orig_conf[key], key
    assert conf["tokenizer_conf"] == orig_conf["tokenizer_conf"]
    assert conf["cmvn_conf"] == orig_conf["cmvn_conf"]
    assert conf["dataset_conf"]["fbank_conf"] == orig_conf["dataset_conf"]["fbank_conf"]
    assert translate_config(conf) == translate_config(orig_conf)


def test_round_trip_reimport_reproduces_wenet(dirs):
    out = dirs / "wenet_again2"
    assert cli_main(["export-wenet", "--config", str(dirs / "imported_dense" / "train.yaml"),
                     "--checkpoint", str(dirs / "imported_dense" / "final.pt"),
                     "--output_dir", str(out)]) == 0
    import_wenet(str(out), str(dirs / "reimported"))
    _, configs = load_configs(str(dirs / "reimported" / "train.yaml"))
    model = build_and_load(configs, str(dirs / "reimported" / "final.pt"))
    ref = np.load(os.path.join(BUNDLE, "dense", "reference.npz"))
    torch.set_num_threads(1)
    with torch.no_grad():
        enc, _ = model.encoder(torch.from_numpy(ref["feats_s"]), torch.from_numpy(ref["feats_lens_s"]),
                               -1, -1)
    assert float(np.abs(enc.numpy() - ref["enc_full_s"]).max()) <= 1e-5


def test_moe_is_refused(dirs, tmp_path):
    with pytest.raises(ValueError, match=r"mlp_type 'moe'.*dense models only"):
        export_wenet(str(dirs / "imported_moe" / "train.yaml"),
                     str(dirs / "imported_moe" / "final.pt"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_toolkit_defaults_are_named_mismatches(dirs, tmp_path):
    """A model with this toolkit's conv padding and fbank defaults: WeNet would compute
    something else, so export fails naming the option; --allow_mismatch lists them,
    with the measured encoder change."""
    native = tmp_path / "native"
    shutil.copytree(dirs / "imported_dense", native)
    conf = yaml.safe_load(open(native / "train.yaml"))
    conf["encoder_conf"]["cnn_module_pad"] = "glu"
    conf["dataset_conf"]["fbank_conf"] = {"num_mel_bins": 80}
    yaml.safe_dump(conf, open(native / "train.yaml", "w"))
    with pytest.raises(ValueError, match=r"encoder_conf\.cnn_module_pad"):
        export_wenet(str(native / "train.yaml"), str(native / "final.pt"), str(tmp_path / "w"))
    report = export_wenet(str(native / "train.yaml"), str(native / "final.pt"), str(tmp_path / "w"),
                          allow_mismatch=True)
    text = "\n".join(report["mismatches"])
    assert "cnn_module_pad" in text and "fbank_conf.snip_edges" in text and "fbank_conf.high_freq" in text
    change = float(text.split("changes by up to ")[1].split()[0].rstrip(";"))
    assert change > 1e-2
