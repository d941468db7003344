"""Encoder: configuration checks, padding invariance, TorchScript parity, the
routing-embedding hand-off to every FFN, training mode."""
import pytest
import torch
from torch import nn

import wenet_moe.model.encoder as encoder_mod
from test_encoder_common import FEAT, tiny_conformer, tiny_transformer
from wenet_moe.config import ConfigError
from wenet_moe.model.encoder import ConformerEncoder, TransformerEncoder


def test_attributes():
    enc = tiny_conformer(input_layer="conv2d6")
    assert enc.output_size() == 16 and enc.num_blocks == 2 and enc.attention_heads == 2
    assert enc.cnn_module_kernel == 4 and enc.static_chunk_size == 0 and enc.use_dynamic_chunk
    assert (enc.embed.subsampling_rate, enc.embed.right_context) == (6, 10)
    assert enc.max_chunk_size == 16
    assert tiny_transformer().cnn_module_kernel == 1
    # WeNet's U2++ conformer parameter names
    names = set(dict(enc.named_parameters()))
    for n in ["encoders.0.feed_forward_macaron.w_1.weight", "encoders.1.self_attn.pos_bias_u",
              "encoders.0.conv_module.depthwise_conv.weight", "encoders.0.norm_final.weight",
              "embed.conv.0.weight", "embed.out.0.weight", "after_norm.weight"]:
        assert n in names, n
    assert "global_cmvn.mean" in dict(enc.named_buffers())


@pytest.mark.parametrize("conf,match", [
    ({"output_sise": 16}, r"unknown key 'encoder_conf.output_sise' \(did you mean 'output_size'\?\)"),
    ({"input_layer": "conv3d"}, r"encoder_conf.input_layer: unknown value 'conv3d'"),
    ({"pos_enc_layer_type": "no_pos"}, "rel_selfattn needs"),
    ({"causal": False, "cnn_module_kernel": 8}, "must be odd"),
    ({"attention_heads": 3}, "not divisible"),
    ({"num_blocks": 0}, "encoder_conf.num_blocks must be a positive integer"),
    ({"activation_type": "mish"}, "encoder_conf.activation_type"),
    ({"cnn_module_norm": "group_norm"}, "encoder_conf.cnn_module_norm"),
])
def test_config_errors(conf, match):
    base = dict(output_size=16, attention_heads=2, linear_units=8, num_blocks=1)
    base.update(conf)
    with pytest.raises(ConfigError, match=match):
        ConformerEncoder(FEAT, **base)


def test_transformer_rejects_conformer_keys():
    with pytest.raises(ConfigError, match="encoder_conf.cnn_module_kernel"):
        TransformerEncoder(FEAT, output_size=16, attention_heads=2, cnn_module_kernel=15)


@pytest.mark.parametrize("chunk", [-1, 4])
def test_padding_invariance(chunk):
    enc = tiny_conformer()
    lens = [83, 60, 31]
    xs = torch.randn(3, 83, FEAT)
    xs[1, 60:] = 100.0  # padding garbage must not leak
    with torch.no_grad():
        out, masks = enc(xs, torch.tensor(lens), chunk, -1)
        assert masks.sum(-1).flatten().tolist() == [(n - 3) // 4 for n in lens]
        for i, n in enumerate(lens):
            alone, _ = enc(xs[i:i + 1, :n], torch.tensor([n]), chunk, -1)
            t = alone.size(1)
            assert (out[i:i + 1, :t] - alone).abs().max() <= 1e-5


def test_static_chunk_mask_is_used():
    enc = tiny_conformer(use_dynamic_chunk=False, static_chunk_size=4)
    xs = torch.randn(1, 79, FEAT)
    xs2 = xs.clone()
    xs2[0, -1] += 3.0
    with torch.no_grad():
        a, _ = enc(xs, torch.tensor([79]), -1)
        b, _ = enc(xs2, torch.tensor([79]), -1)
    assert torch.equal(a[0, :16], b[0, :16])


@pytest.mark.parametrize("make", [tiny_conformer, tiny_transformer])
def test_torchscript_matches_eager(make):
    enc = make()
    scripted = torch.jit.script(enc)
    xs = torch.randn(2, 67, FEAT)
    lens = torch.tensor([67, 50])
    with torch.no_grad():
        for chunk, left in [(-1, -1), (4, 2)]:
            a, ma = enc(xs, lens, chunk, left)
            b, mb = scripted(xs, lens, chunk, left)
            assert torch.allclose(a, b, atol=1e-6) and torch.equal(ma, mb)
        att, cnn = torch.zeros(0, 0, 0, 0), torch.zeros(0, 0, 0, 0)
        sat, scnn = att, cnn
        for k in range(3):
            chunk_xs = xs[:1, 16 * k:16 * k + 19]
            y, att, cnn = enc.forward_chunk(chunk_xs, 4 * k, 8, att, cnn)
            ys, sat, scnn = scripted.forward_chunk(chunk_xs, 4 * k, 8, sat, scnn)
            assert torch.allclose(y, ys, atol=1e-6)
            assert torch.allclose(att, sat, atol=1e-6) and torch.allclose(cnn, scnn, atol=1e-6)
    assert scripted.output_size() == 16


class _RecordingFFN(nn.Module):
    """Dense FFN that adds a projection of route_emb, so the hand-off shows."""

    def __init__(self, d, e):
        super().__init__()
        self.w = nn.Linear(d, d)
        self.r = nn.Linear(e, d)

    def forward(self, xs: torch.Tensor, route_emb: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool)) -> torch.Tensor:
        assert route_emb.shape[:2] == xs.shape[:2]
        # a real pad mask, or an empty one (forward_chunk: every frame valid)
        assert mask_pad.numel() == 0 or mask_pad.shape == (xs.size(0), 1, xs.size(1))
        return torch.tanh(self.w(xs)) + self.r(route_emb)


class _FakeFactory:
    made = 0

    def __init__(self, idim, hidden_units, dropout_rate, activation, mlp_type, n_expert,
                 n_expert_activated, moe_conf, frame_embedding):
        assert frame_embedding is True and mlp_type == "moe" and moe_conf == {"router": "x"}
        self.idim = idim
        self.embed = nn.Sequential(nn.Linear(idim, 3), nn.Tanh())

    def __call__(self):
        _FakeFactory.made += 1
        return _RecordingFFN(self.idim, 3)

    def route_embedding(self):
        return self.embed


def test_route_embedding_runs_once_and_reaches_every_ffn(monkeypatch):
    monkeypatch.setattr(encoder_mod, "FFNFactory", _FakeFactory)
    _FakeFactory.made = 0
    enc = ConformerEncoder(FEAT, moe_conf={"router": "x"}, output_size=16, attention_heads=2,
                           linear_units=8, num_blocks=2, causal=True, cnn_module_kernel=4,
                           use_dynamic_chunk=True, mlp_type="moe").eval()
    assert _FakeFactory.made == 4  # macaron pair in each of 2 blocks
    calls = []
    handle = enc.route_embed.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    xs = torch.randn(1, 67, FEAT)
    with torch.no_grad():
        full, _ = enc(xs, torch.tensor([67]), 4, -1)
        assert calls == [torch.Size([1, 16, 16])]  # once, on the embedded input
        stream, _ = enc.forward_chunk_by_chunk(xs, 4, -1)
    handle.remove()
    assert (full - stream).abs().max() <= 1e-5
    # route_emb matters: zeroing the embedding network changes the output
    with torch.no_grad():
        enc.route_embed[0].weight.zero_()
        enc.route_embed[0].bias.fill_(1.0)
        changed, _ = enc(xs, torch.tensor([67]), 4, -1)
    assert (changed - full).abs().max() > 1e-3
    scripted = torch.jit.script(enc)
    with torch.no_grad():
        assert torch.allclose(scripted(xs, torch.tensor([67]), 4, -1)[0], changed, atol=1e-6)


def test_training_mode_dynamic_chunks_backward():
    torch.manual_seed(3)
    enc = tiny_conformer(use_dynamic_left_chunk=True, cnn_module_norm="batch_norm").train()
    xs = torch.randn(3, 90, FEAT)
    lens = torch.tensor([90, 70, 40])
    for _ in range(3):
        out, masks = enc(xs, lens)
        loss = (out * masks.transpose(1, 2)).pow(2).mean()
        loss.backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bad_shapes_give_clear_errors():
    enc = tiny_conformer()
    with pytest.raises(ValueError, match=r"xs \(B, T, F\) with xs_lens \(B,\)"):
        enc(torch.randn(2, 30, FEAT), torch.tensor([30]))
    with pytest.raises(ValueError, match=r"one chunk xs \(1, T, F\)"):
        enc.forward_chunk(torch.randn(2, 19, FEAT), 0, -1)
    with pytest.raises(ValueError, match="caches must have 2 blocks"):
        enc.forward_chunk(torch.randn(1, 19, FEAT), 0, -1, torch.zeros(3, 2, 4, 16))
    with pytest.raises(Exception, match="caches must have 2 blocks"):
        torch.jit.script(enc).forward_chunk(torch.randn(1, 19, FEAT), 0, -1,
                                            torch.zeros(3, 2, 4, 16))


@pytest.mark.parametrize("make,over,cnn_cache_len", [
    (tiny_conformer, dict(normalize_before=False, macaron_style=False), 3),
    (tiny_conformer, dict(use_cnn_module=False, input_layer="linear"), 0),
    (tiny_conformer, dict(causal=False, cnn_module_kernel=5, input_layer="conv2d8"), 0),
    (tiny_transformer, dict(pos_enc_layer_type="no_pos", normalize_before=False), 0),
    (tiny_transformer, dict(pos_enc_layer_type="rel_pos", selfattention_layer_type="rel_selfattn"), 0),
])
def test_variants_script_and_shapes(make, over, cnn_cache_len):
    enc = make(**over)
    scripted = torch.jit.script(enc)
    xs = torch.randn(2, 71, FEAT)
    lens = torch.tensor([71, 40])
    with torch.no_grad():
        a, ma = enc(xs, lens, -1)
        b, _ = scripted(xs, lens, -1)
        y, att, cnn = scripted.forward_chunk(xs[:1], 0, -1)
    assert torch.allclose(a, b, atol=1e-5)
    assert a.shape == (2, ma.size(-1), 16) and y.shape == (1, ma.size(-1), 16)
    assert att.shape == (2, 2, ma.size(-1), 16)
    assert cnn.shape == (2, 1, 16, cnn_cache_len)
