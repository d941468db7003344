"""`wenet-moe upcycle`: dense checkpoint -> MoE checkpoint with copied experts.

The dense model is the WeNet reference bundle's dense model imported with
`import-wenet` (tests/data/wenet_reference), so this also covers "ours or imported".
"""
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
import yaml

from wenet_moe.cli import main as cli_main
from wenet_moe.interop.upcycle import upcycle, upcycle_config, upcycle_state_dict
from wenet_moe.interop.wenet_import import import_wenet
from wenet_moe.layers.moe import MoEFFN
from wenet_moe.model import build_model
from wenet_moe.model.loading import build_and_load, load_configs

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "data", "wenet_reference")
E, K = 4, 2


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    with tarfile.open(os.path.join(BUNDLE, "checkpoints.tar.xz")) as tar:
        tar.extractall(root, filter="data", members=[m for m in tar.getmembers()
                                                     if m.name.startswith("dense")])
    for name in ("train.yaml", "units.txt", "global_cmvn"):
        shutil.copyfile(os.path.join(BUNDLE, "dense", name), root / "dense" / name)
    import_wenet(str(root / "dense"), str(root / "imported"))
    return str(root / "imported")


@pytest.fixture(scope="module")
def dense(dense_dir):
    torch.set_num_threads(1)
    _, configs = load_configs(os.path.join(dense_dir, "train.yaml"))
    return build_and_load(configs, os.path.join(dense_dir, "final.pt"))


@pytest.fixture(scope="module")
def inputs():
    ref = np.load(os.path.join(BUNDLE, "dense", "reference.npz"))
    return torch.from_numpy(ref["feats_b"]), torch.from_numpy(ref["feats_lens_b"])


def _upcycled(dense_dir, tmp_path, router, **kw):
    out = str(tmp_path / f"up_{router}")
    upcycle(os.path.join(dense_dir, "train.yaml"), os.path.join(dense_dir, "final.pt"), out,
            E, K, router, **kw)
    _, configs = load_configs(os.path.join(out, "train.yaml"))
    return out, configs, build_and_load(configs, os.path.join(out, "final.pt"))


def _outputs(model, x, lens):
    """Encoder (full, chunk 8) on valid frames, CTC log-probs, both decoders."""
    with torch.no_grad():
        enc, mask = model.encoder(x, lens, -1, -1)
        enc8, _ = model.encoder(x, lens, 8, -1)
        valid = mask[:, 0]
        ctc = model.ctc.log_softmax(enc)
        hyps = torch.tensor([[39, 3, 17, 25, 8, 39], [39, 12, 5, 39, 39, 39]])
        lens_h = torch.tensor([5, 3])
        l2r, r2l = model.forward_attention_decoder(hyps, lens_h, enc[:1], 0.3)
    return {"enc": enc[valid], "enc_chunk8": enc8[valid], "ctc": ctc[valid], "l2r": l2r, "r2l": r2l}


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("router", ["topk", "omni"])
@pytest.mark.parametrize("router_init", ["random", "zero"])
def test_gates_summing_to_one_reproduce_dense(dense_dir, dense, inputs, tmp_path, router,
                                              router_init):
    out, configs, moe = _upcycled(dense_dir, tmp_path, router, router_init=router_init)
    assert configs["encoder_conf"]["mlp_type"] == "moe" and configs["moe_conf"]["router"] == router
    assert configs["decoder_conf"]["n_expert"] == E
    want, got = _outputs(dense, *inputs), _outputs(moe, *inputs)
    assert _max_diff(got, want) <= 1e-5
    # a random router really spreads frames over the experts (not only 0..k-1)
    load = moe.expert_load()
    assert load, "no MoE layer recorded a load"
    if router_init == "random":
        assert any(int((v > 0).sum()) > K for v in load.values())


@pytest.mark.parametrize("router", ["switch", "speechmoe"])
def test_probability_gated_routers_scale_by_k_over_e(dense_dir, dense, inputs, tmp_path, router):
    """switch/speechmoe gate by the full-softmax probability: with zero routers p = 1/E,
    so each MoE FFN outputs (k/E) x the dense FFN; the model differs from the dense one,
    and --scale_experts (w2, b2 x E/k) restores it exactly."""
    _, _, moe = _upcycled(dense_dir, tmp_path, router, router_init="zero")
    x = torch.randn(2, 7, 64)
    layer = moe.encoder.encoders[0].feed_forward
    assert isinstance(layer, MoEFFN)
    with torch.no_grad():
        emb = torch.randn(2, 7, layer.router.gate.in_features - 64) if layer.use_route_emb \
            else torch.zeros(0)
        got = layer(x, emb)
        want = dense.encoder.encoders[0].feed_forward(x, torch.zeros(0))
        dec_got = moe.decoder.right_decoder.decoders[0].feed_forward(x, torch.zeros(0))
        dec_want = dense.decoder.right_decoder.decoders[0].feed_forward(x, torch.zeros(0))
    assert float((got - K / E * want).abs().max()) <= 1e-5
    assert float((dec_got - K / E * dec_want).abs().max()) <= 1e-5
    assert float(want.abs().max()) > 0.1       # so the scale is visible
    assert _max_diff(_outputs(moe, *inputs), _outputs(dense, *inputs)) > 1e-2

    scaled_dir = tmp_path / "scaled"
    scaled_dir.mkdir()
    _, _, scaled = _upcycled(dense_dir, scaled_dir, router, router_init="zero", scale_experts=True)
    assert _max_diff(_outputs(scaled, *inputs), _outputs(dense, *inputs)) <= 1e-5


def test_noise_is_relative_and_breaks_symmetry(dense_dir, dense, tmp_path):
    _, _, moe = _upcycled(dense_dir, tmp_path, "topk", noise=0.05, seed=3)
    layer = moe.encoder.encoders[1].feed_forward_macaron
    w = dense.encoder.encoders[1].feed_forward_macaron.w_1.weight.detach().t()
    dev = (layer.w1.detach() - w) / w.std()
    assert abs(float(dev.std()) - 0.05) < 0.005
    assert float((layer.w1[0] - layer.w1[1]).detach().abs().max()) > 1e-3


def test_state_dict_errors(dense, dense_dir):
    _, configs = load_configs(os.path.join(dense_dir, "train.yaml"))
    moe = build_model(upcycle_config(configs, E, K, "topk"))
    sd = dense.state_dict()
    sd["encoder.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"encoder\.extra\.weight"):
        upcycle_state_dict(sd, moe)
    sd = dict(dense.state_dict())
    sd["ctc.ctc_lo.weight"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=r"ctc\.ctc_lo\.weight"):
        upcycle_state_dict(sd, moe)
    with pytest.raises(ValueError, match="already moe"):
        upcycle_config(upcycle_config(configs, E, K, "topk"), E, K, "topk")
    with pytest.raises(ValueError, match="n_expert_activated"):
        upcycle_config(configs, 2, 3, "topk")


def test_cli(dense_dir, inputs, dense, tmp_path):
    from wenet_moe.bin.transcribe import load_model_dir
    out = tmp_path / "cli"
    assert cli_main(["upcycle", "--config", os.path.join(dense_dir, "train.yaml"),
                     "--checkpoint", os.path.join(dense_dir, "final.pt"), "--output_dir",
                     str(out), "--n_expert", "8", "--n_expert_activated", "2",
                     "--router", "topk", "--noise", "0.0"]) == 0
    conf = yaml.safe_load(open(out / "train.yaml"))
    assert conf["encoder_conf"]["n_expert"] == 8 and conf["moe_conf"]["router"] == "topk"
    model, _, _, ckpt = load_model_dir(str(out))
    assert _max_diff(_outputs(model, *inputs), _outputs(dense, *inputs)) <= 1e-5
    # an existing non-empty output directory is refused, nothing changes
    assert cli_main(["upcycle", "--config", os.path.join(dense_dir, "train.yaml"),
                     "--checkpoint", os.path.join(dense_dir, "final.pt"), "--output_dir",
                     str(out)]) == 1
