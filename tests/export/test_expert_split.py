"""`wenet_moe::routed_experts`, the op each MoE FFN becomes in the kernel graphs'
export: its eager meaning (the registered CPU implementation, used when the swapped
module runs outside the export) is the layer's own output, for every router."""
from __future__ import annotations

import pytest
import torch

from export_tiny import tiny_model
from wenet_moe.export.expert_split import RoutedExpertsFFN, experts_as_calls
from wenet_moe.layers.moe import MoEFFN


@pytest.mark.parametrize("router", ["topk", "switch", "speechmoe", "omni"])
def test_routed_experts_op_is_the_layer(router):
    model, _ = tiny_model(router)
    layers = [m for m in model.encoder.modules() if isinstance(m, MoEFFN)]
    assert layers
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for moe in layers:
            xs = torch.randn(2, 7, moe.idim, generator=gen)
            emb = torch.randn(2, 7, moe.router.gate.in_features - moe.idim, generator=gen) \
                if moe.use_route_emb else torch.zeros(0)
            want = moe(xs, emb)
            got = RoutedExpertsFFN(moe)(xs, emb)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert want.abs().max() > 1e-2


def test_experts_as_calls_swaps_and_restores():
    model, _ = tiny_model("topk")
    before = [m for m in model.encoder.modules() if isinstance(m, MoEFFN)]
    with experts_as_calls(model):
        assert not any(isinstance(m, MoEFFN) for m in model.encoder.modules())
        assert sum(isinstance(m, RoutedExpertsFFN) for m in model.encoder.modules()) == len(before)
    assert [m for m in model.encoder.modules() if isinstance(m, MoEFFN)] == before
