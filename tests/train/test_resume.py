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


KILL_DURING_SAVE = """
import os, signal, sys, torch
from wenet_moe.train import checkpoint
stage, path = sys.argv[1], sys.argv[2]
if stage == "write":          # die with half of the new checkpoint on disk
    real = torch.save
    def half(obj, f):
        real(obj, f)
        f.flush()
        f.truncate(f.tell() // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = half
else:                         # die with the whole file written, before the rename
    os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)
checkpoint.atomic_torch_save({"model": {"w": torch.full((1000,), 2.0)}, "epoch": 1}, path)
"""


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_sigkill_during_checkpoint_write_leaves_previous_file(tmp_path, stage):
    """A SIGKILL inside `atomic_torch_save` leaves the previous `1.pt` intact and only a
    `.tmp.*` file, which neither run.sh's resume lookup, averaging nor the trainer read,
    and which the next training start deletes."""
    import subprocess
    import sys

    from wenet_moe.train.average import list_epoch_checkpoints
    from wenet_moe.train.checkpoint import atomic_torch_save, remove_stale_temp_files
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    atomic_torch_save({"model": {"w": torch.ones(1000)}, "epoch": 0}, str(tmp_path / "0.pt"))
    target = tmp_path / "1.pt"
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, stage, str(target)], capture_output=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == -9, r.stderr
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp.")]
    assert not target.exists() and len(leftovers) == 1 and leftovers[0].endswith(".pt")
    if stage == "write":
        with pytest.raises(Exception):
            torch.load(tmp_path / leftovers[0], weights_only=False)
    assert list_epoch_checkpoints(str(tmp_path)) == [(0, str(tmp_path / "0.pt"))]
    recipe = os.path.join(root, "examples", "aishell2", "s0", "run.sh")
    lookup = next(line for line in open(recipe) if line.startswith("last_epoch_ckpt()"))
    last = subprocess.run(["bash", "-c", f"{lookup}\nlast_epoch_ckpt {tmp_path}"], capture_output=True, text=True)
    assert last.stdout.strip() == "0"
    assert remove_stale_temp_files(str(tmp_path)) == [str(tmp_path / leftovers[0])]
    assert sorted(os.listdir(tmp_path)) == ["0.pt"]
