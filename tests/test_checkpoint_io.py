"""Checkpoint reading (`wenet_moe.checkpoint_io`): tensors shared inside a model."""
import pytest
import torch
from torch import nn

from wenet_moe.checkpoint_io import load_model_weights


class SharedRouterNet(nn.Module):
    """Two blocks that use one router module, as the Omni-Router stacks do."""

    def __init__(self):
        super().__init__()
        router = nn.Linear(3, 2)
        self.blocks = nn.ModuleList([nn.ModuleDict({"router": router, "ffn": nn.Linear(3, 3)})
                                     for _ in range(2)])


def test_shared_tensor_loads_when_its_keys_agree(tmp_path):
    torch.manual_seed(0)
    src, dst = SharedRouterNet(), SharedRouterNet()
    state = src.state_dict()
    assert "blocks.0.router.weight" in state and "blocks.1.router.weight" in state
    torch.save(state, tmp_path / "ok.pt")
    load_model_weights(dst, str(tmp_path / "ok.pt"))
    assert torch.equal(dst.blocks[1].router.weight, src.blocks[0].router.weight)
    assert dst.blocks[0].router is dst.blocks[1].router


def test_shared_tensor_with_different_values_is_an_error(tmp_path):
    """A checkpoint of a model with one router per block must not load silently into a
    model where the blocks share one (the last key would win)."""
    torch.manual_seed(0)
    state = SharedRouterNet().state_dict()
    state["blocks.1.router.weight"] = state["blocks.1.router.weight"] + 1.0
    torch.save({"model": state}, tmp_path / "separate.pt")
    with pytest.raises(ValueError, match=r"separate.pt: checkpoint has different values for "
                                         r"blocks.0.router.weight and blocks.1.router.weight"):
        load_model_weights(SharedRouterNet(), str(tmp_path / "separate.pt"))


def test_new_model_dir_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    import os

    from wenet_moe.checkpoint_io import new_model_dir

    out = tmp_path / "model"
    with new_model_dir(str(out), ".t.") as stage:
        assert os.path.dirname(stage) == str(tmp_path) and stage != str(out)
        (tmp_path / os.path.basename(stage) / "final.pt").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert (out / "final.pt").read_text() == "x"

    with pytest.raises(FileExistsError, match="model: exists and is not empty"):
        with new_model_dir(str(out), ".t."):
            raise AssertionError("not reached")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with new_model_dir(str(empty), ".t.") as stage:
            open(os.path.join(stage, "half.pt"), "w").close()
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["empty", "model"] and not os.listdir(empty)
