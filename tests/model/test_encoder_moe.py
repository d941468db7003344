"""Encoder with the real MoE FFNs (mlp_type: moe): streaming equals the full forward
(the routing embedding is frame-wise, so no extra cache), and TorchScript parity."""
import pytest
import torch

from test_encoder_common import FEAT
from wenet_moe.model.encoder import ConformerEncoder


@pytest.mark.parametrize("router", ["speechmoe", "omni"])
def test_moe_conformer_streaming_and_script(router):
    enc = ConformerEncoder(FEAT, moe_conf={"router": router}, output_size=16,
                           attention_heads=2, linear_units=8, num_blocks=2, causal=True,
                           cnn_module_kernel=4, use_dynamic_chunk=True, mlp_type="moe",
                           n_expert=4, n_expert_activated=2).eval()
    assert (enc.route_embed is not None) == (router == "speechmoe")
    xs = torch.randn(1, 131, FEAT)
    lens = torch.tensor([131])
    with torch.no_grad():
        full, _ = enc(xs, lens, 4, 2)
        stream, _ = enc.forward_chunk_by_chunk(xs, 4, 2)
        assert (full - stream).abs().max().item() <= 1e-5
        scripted = torch.jit.script(enc)
        assert torch.allclose(scripted(xs, lens, 4, 2)[0], full, atol=1e-5)
        y, att, cnn = enc.forward_chunk(xs[:, :19], 0, -1)
        ys, satt, scnn = scripted.forward_chunk(xs[:, :19], 0, -1)
        assert torch.allclose(y, ys, atol=1e-5) and torch.allclose(att, satt, atol=1e-6)


def _record_masks(model):
    """Forward pre-hooks on every MoE FFN keeping the `mask_pad` it was called with."""
    from wenet_moe.layers.moe import MoEFFN
    seen = []
    for module in model.modules():
        if isinstance(module, MoEFFN):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))
    return seen


def test_encoder_hands_valid_frames_to_every_moe_ffn():
    """The capacity limit counts valid frames only: every MoE FFN gets the encoder's
    padding mask of the subsampled frames (macaron and second FFN of each block)."""
    torch.manual_seed(0)
    enc = ConformerEncoder(FEAT, moe_conf={"router": "topk", "capacity_factor": 1.0}, output_size=16,
                           attention_heads=2, linear_units=8, num_blocks=2, causal=True,
                           cnn_module_kernel=4, use_dynamic_chunk=True, mlp_type="moe",
                           n_expert=4, n_expert_activated=2).train()
    seen = _record_masks(enc)
    xs = torch.randn(3, 60, FEAT)
    lens = torch.tensor([60, 41, 17])
    _, masks = enc(xs, lens)
    assert len(seen) == 4
    valid = masks.sum(-1).view(-1)
    assert valid.tolist() == [14, 9, 3]          # subsampled lengths differ: a real padding mask
    for mask in seen:
        assert torch.equal(mask, masks)
