"""Atomic checkpoint writes, loading any checkpoint layout, and averaging."""
import os

import pytest
import torch
import yaml

from wenet_moe.checkpoint_io import load_model_weights
from wenet_moe.cli import main as cli_main
from wenet_moe.train import checkpoint as ckpt_mod
from wenet_moe.train.average import average_state_dicts, select_checkpoints
from wenet_moe.train.checkpoint import atomic_torch_save, make_checkpoint


def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "5.pt"
    atomic_torch_save({"a": torch.ones(2)}, str(path))

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({"a": torch.zeros(2)}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["5.pt"]            # no temporary left behind
    assert torch.equal(torch.load(path)["a"], torch.ones(2))


def test_atomic_save_no_file_when_first_write_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod.torch, "save", lambda obj, f: (f.write(b"x"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        atomic_torch_save({}, str(tmp_path / "1.pt"))
    assert os.listdir(tmp_path) == []


def test_load_model_weights_any_layout(tmp_path):
    src = _net()
    opt = torch.optim.Adam(src.parameters())
    layouts = {
        "train.pt": make_checkpoint(src, opt, None, None, 0, 3, 2, False),
        "plain.pt": src.state_dict(),
        "ddp.pt": {"module." + k: v for k, v in src.state_dict().items()},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        dst = _net()
        load_model_weights(dst, str(tmp_path / name))
        for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
            assert torch.equal(a, b), (name, k)


def test_load_model_weights_errors_name_file(tmp_path):
    torch.save(torch.nn.Linear(3, 5).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt: checkpoint does not match the model"):
        load_model_weights(_net(), str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pt: cannot read checkpoint"):
        load_model_weights(_net(), str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint not found"):
        load_model_weights(_net(), str(tmp_path / "missing.pt"))


def _write_epochs(d, cv_losses):
    nets = []
    for epoch, loss in enumerate(cv_losses):
        torch.manual_seed(100 + epoch)
        net = _net()
        net[1].running_mean.normal_()
        net[1].num_batches_tracked.fill_(10 * epoch + 1)
        torch.save(make_checkpoint(net, None, None, None, epoch, 10 * epoch, 5, True), d / f"{epoch}.pt")
        (d / f"{epoch}.yaml").write_text(yaml.safe_dump({"epoch": epoch, "cv_loss": loss, "step": 10 * epoch}))
        nets.append(net)
    torch.save({"model": nets[0].state_dict()}, d / "step_3.pt")   # not an epoch checkpoint
    return nets


def test_average_last_and_best(tmp_path):
    nets = _write_epochs(tmp_path, [5.0, 2.0, 3.0, 1.0, 4.0])
    last = select_checkpoints(str(tmp_path), 3)
    assert [os.path.basename(p) for p in last] == ["2.pt", "3.pt", "4.pt"]
    best = select_checkpoints(str(tmp_path), 2, val_best=True)
    assert sorted(os.path.basename(p) for p in best) == ["1.pt", "3.pt"]
    ranged = select_checkpoints(str(tmp_path), 2, min_epoch=1, max_epoch=2)
    assert [os.path.basename(p) for p in ranged] == ["1.pt", "2.pt"]

    avg = average_state_dicts(best)
    for k, v in avg.items():
        a, b = nets[1].state_dict()[k], nets[3].state_dict()[k]
        if v.is_floating_point():
            assert torch.allclose(v, (a + b) / 2, atol=1e-7), k
        else:
            assert int(v) == (int(a) + int(b)) // 2, k


def test_average_cli(tmp_path, capsys):
    nets = _write_epochs(tmp_path, [5.0, 2.0, 3.0])
    dst = tmp_path / "avg_2.pt"
    assert cli_main(["average", "--dst_model", str(dst), "--src_path", str(tmp_path), "--num", "2"]) == 0
    model = _net()
    load_model_weights(model, str(dst))      # plain state dict loads like any checkpoint
    w = model[0].weight
    assert torch.allclose(w, (nets[1][0].weight + nets[2][0].weight) / 2, atol=1e-7)

    rc = cli_main(["average", "--dst_model", str(dst), "--src_path", str(tmp_path / "nope"), "--num", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "nope: not a directory" in err[0]
    rc = cli_main(["average", "--dst_model", str(dst), "--src_path", str(tmp_path), "--num", "9"])
    assert rc == 1 and "asked for 9 checkpoints, found 3" in capsys.readouterr().err
    (tmp_path / "1.yaml").write_text("epoch: 1\n")
    rc = cli_main(["average", "--dst_model", str(dst), "--src_path", str(tmp_path), "--num", "1", "--val_best"])
    assert rc == 1 and "1.yaml: field 'cv_loss' missing" in capsys.readouterr().err


def test_ctc_diagnostics_helpers():
    from wenet_moe.train.diagnostics import edit_distance, greedy_collapse
    assert greedy_collapse([0, 3, 3, 0, 3, 5, 5, 0], blank_id=0) == [3, 3, 5]
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([1, 2, 3], [4, 5, 6, 7]) == 4
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2], [1, 2]) == 0
