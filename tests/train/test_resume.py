"""Kill-and-resume ends with exactly the parameters of an uninterrupted run."""
import os

import pytest
import torch
import yaml

from train_standins import ToyCTCModel, ToyDataset, base_configs, loader, make_utterances
from wenet_moe.train.launch import run_training


class Crash(RuntimeError):
    pass


def _run(model_dir, configs, num_workers, checkpoint=None, crash_at=None):
    torch.manual_seed(configs["seed"])
    model = ToyCTCModel(dropout=0.2)
    utts = make_utterances(30)
    train = loader(ToyDataset(utts, batch_size=4, seed=5), num_workers)
    cv = loader(ToyDataset(utts[:6], batch_size=3, shuffle=False))

    def hook(trainer):
        if crash_at is not None and trainer.step == crash_at:
            raise Crash(f"simulated crash at step {trainer.step}")

    run_training(configs, model, train, cv, str(model_dir), checkpoint=checkpoint, show_bar=False,
                 step_hook=hook)
    return model


@pytest.mark.parametrize("num_workers,accum_grad,resume_step", [
    (0, 1, 4),    # mid epoch 0 (7 steps per epoch)
    (0, 1, 10),   # mid epoch 1
    (0, 2, 4),    # accum 2: 3 full steps + 1 flush per epoch; step 4 is epoch 0's flush
    (0, 2, 6),    # mid epoch 1 with accumulation
    (2, 2, 6),    # two DataLoader workers
])
def test_kill_and_resume_matches_uninterrupted(tmp_path, num_workers, accum_grad, resume_step):
    configs = base_configs(max_epoch=3, accum_grad=accum_grad, save_interval=2)
    full = _run(tmp_path / "full", configs, num_workers)

    with pytest.raises(Crash):
        _run(tmp_path / "crashed", configs, num_workers, crash_at=resume_step + 1)
    assert not (tmp_path / "crashed" / "2.pt").exists()
    resume_from = tmp_path / "crashed" / f"step_{resume_step}.pt"
    resumed = _run(tmp_path / "crashed", configs, num_workers, checkpoint=str(resume_from))

    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume: max diff {(a - b).abs().max():.3g}"
    # the epoch checkpoints agree too, including the recorded cv loss
    y_full = yaml.safe_load(open(tmp_path / "full" / "2.yaml"))
    y_res = yaml.safe_load(open(tmp_path / "crashed" / "2.yaml"))
    assert y_full["cv_loss"] == y_res["cv_loss"] and y_full["step"] == y_res["step"]
    assert y_full["train_loss"] == pytest.approx(y_res["train_loss"], rel=1e-12)


def test_resume_without_rng_restore_differs(tmp_path, monkeypatch):
    """Control: the comparison above is sensitive (dropout depends on the RNG state)."""
    configs = base_configs(max_epoch=2, save_interval=2)
    full = _run(tmp_path / "full", configs, 0)
    with pytest.raises(Crash):
        _run(tmp_path / "crashed", configs, 0, crash_at=5)
    import wenet_moe.train.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "restore_rng", lambda state: None)
    resumed = _run(tmp_path / "crashed", configs, 0, checkpoint=str(tmp_path / "crashed" / "step_4.pt"))
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


def test_resume_from_epoch_checkpoint(tmp_path):
    configs = base_configs(max_epoch=3)
    full = _run(tmp_path / "full", configs, 0)
    with pytest.raises(Crash):
        _run(tmp_path / "part", configs, 0, crash_at=9)      # epoch 1 (7 steps per epoch)
    resumed = _run(tmp_path / "part", configs, 0, checkpoint=str(tmp_path / "part" / "0.pt"))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_resume_mid_epoch_position_recorded(tmp_path):
    configs = base_configs(max_epoch=2, save_interval=3)
    _run(tmp_path, configs, 0)
    ck = torch.load(tmp_path / "step_3.pt", weights_only=False)
    assert (ck["epoch"], ck["step"], ck["batch_idx"], ck["epoch_done"]) == (0, 3, 3, False)
    for key in ("model", "optimizer", "scheduler", "rng", "rng_epoch_start"):
        assert ck[key] is not None
    assert set(ck["rng"]) >= {"python", "numpy", "torch"}
    ck9 = torch.load(tmp_path / "step_9.pt", weights_only=False)
    assert (ck9["epoch"], ck9["batch_idx"]) == (1, 2)
    ep = torch.load(tmp_path / "1.pt", weights_only=False)
    assert ep["epoch_done"] and ep["step"] == 14 and ep["batch_idx"] == 7
