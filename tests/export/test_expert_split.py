"""`wenet_moe::routed_experts`, the op each MoE FFN becomes in the kernel graphs'
export: its eager meaning (the registered CPU implementation, used when the swapped
module runs outside the export) is the layer's own output, for every router; and the
one-copy-on-disk sharing of `experts.npz` between kernel directories."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from export_tiny import tiny_model
from wenet_moe.export import expert_split
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


def test_link_or_copy_never_writes_through_an_old_link(tmp_path, monkeypatch):
    a, b, dst = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "d" / "experts.npz"
    dst.parent.mkdir()
    np.savez(a, x=np.arange(3.0))
    np.savez(b, x=np.arange(4.0))
    expert_split.link_or_copy(str(a), str(dst))
    assert os.path.samefile(a, dst)
    # relinking dst to another file leaves the first one as it was
    expert_split.link_or_copy(str(b), str(dst))
    assert os.path.samefile(b, dst)
    with np.load(a) as z:
        assert z["x"].tolist() == [0.0, 1.0, 2.0]
    # without hard links: a copy
    def no_links(src, dst):
        raise OSError("hard links not supported")
    monkeypatch.setattr(expert_split.os, "link", no_links)
    expert_split.link_or_copy(str(a), str(dst))
    assert not os.path.samefile(a, dst) and dst.read_bytes() == a.read_bytes()


def test_same_arrays_compares_names_dtypes_and_values(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, **{"0.w1": np.ones((2, 3), np.float32), "0.b1": np.zeros(3, np.float32)})
    same = {"0.w1": np.ones((2, 3), np.float32), "0.b1": np.zeros(3, np.float32)}
    assert expert_split._same_arrays(str(path), same)
    assert not expert_split._same_arrays(str(path), {**same, "0.b1": np.full(3, 1e-7, np.float32)})
    assert not expert_split._same_arrays(str(path), {**same, "0.b1": np.zeros(3, np.float64)})
    assert not expert_split._same_arrays(str(path), {"0.w1": same["0.w1"]})
