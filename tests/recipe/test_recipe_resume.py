"""Exact resume of the recipe's training stage after SIGKILL.

`run.sh --stage 4 --stop_stage 4` is started as a subprocess in a session of its
own, killed with SIGKILL (its whole process group; torchrun's workers, which
torchrun starts in sessions of their own, must die with it) in the middle of an
epoch, and rerun with the same command. run.sh resumes from the last epoch
checkpoint, so the interrupted epoch is repeated; the end point must be
bit-identical to an uninterrupted run's: same data order, dropout masks,
SpecAugment, LR schedule and Adam moments. Tensor equality (no tolerance) is
expected because both runs execute the same kernels on the same inputs in the
same order on the same machine.
"""
import os
import signal
import subprocess
import time

import pytest
import torch
import yaml

from test_recipe_e2e import RECIPE, corpus, env, workspace  # noqa: F401  (corpus: fixture)

pytestmark = pytest.mark.timeout(600)


def tiny_config(ws, batch_size):
    """conf/train_demo_tiny.yaml with 3 epochs of 7 steps (14 utterances over `batch_size` x
    processes) and a log line per step, so that a kill can land in the middle of an epoch."""
    conf = yaml.safe_load(open(os.path.join(RECIPE, "conf", "train_demo_tiny.yaml"), encoding="utf-8"))
    conf["dataset_conf"]["batch_conf"]["batch_size"] = batch_size
    conf["log_interval"] = 1
    conf["max_epoch"] = 3
    path = ws / "resume.yaml"
    path.write_text(yaml.safe_dump(conf, allow_unicode=True), encoding="utf-8")
    return path.name


def stage4_args(corpus, config, exp, *extra):   # noqa: F811
    return ["bash", "run.sh", "--trn_set", str(corpus / "data"), "--dev_set", str(corpus / "dev"),
            "--tst_set", str(corpus / "test"), "--train_config", config, "--dir", exp, "--nj", "2",
            "--num_workers", "0", "--stage", "4", "--stop_stage", "4", *extra]


def descendants(pid):
    """Pids of every process below `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_and_kill(ws, args, log_path, marker, min_procs):
    """Start `args`, SIGKILL its process group as soon as `marker` appears in its
    stderr; returns the pids that were running below it at that moment."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=ws, stdout=log, stderr=log, env=env(), start_new_session=True)
    deadline = time.time() + 300
    try:
        while marker not in open(log_path, encoding="utf-8", errors="replace").read():
            assert proc.poll() is None, f"run.sh ended before '{marker}':\n{open(log_path).read()[-3000:]}"
            assert time.time() < deadline, f"no '{marker}' after 300 s"
            time.sleep(0.02)
        procs = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(procs) >= min_procs, procs
    return procs


def check_same_end_point(a, b, steps_per_epoch):
    """Epoch checkpoints of two runs: identical weights, optimizer, scheduler, metadata."""
    epochs = sorted(int(n[:-3]) for n in os.listdir(a) if n[:-3].isdigit() and n.endswith(".pt"))
    assert epochs == [0, 1, 2] and sorted(os.listdir(a)) == sorted(os.listdir(b))
    for e in epochs:
        ca = torch.load(a / f"{e}.pt", weights_only=False)
        cb = torch.load(b / f"{e}.pt", weights_only=False)
        assert ca["step"] == cb["step"] == steps_per_epoch * (e + 1)
        for k, v in ca["model"].items():
            assert torch.equal(v, cb["model"][k]), f"epoch {e} {k}: max diff {(v - cb['model'][k]).abs().max():.3g}"
        assert ca["scheduler"] == cb["scheduler"]
        for i, st in ca["optimizer"]["state"].items():
            for name, v in st.items():
                assert torch.equal(v, cb["optimizer"]["state"][i][name]), (e, i, name)
        ya = yaml.safe_load((a / f"{e}.yaml").read_text())
        yb = yaml.safe_load((b / f"{e}.yaml").read_text())
        assert ya == yb, (e, ya, yb)
    assert os.path.realpath(a / "final.pt").endswith("2.pt") and os.path.realpath(b / "final.pt").endswith("2.pt")


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted(corpus, tmp_path, procs):  # noqa: F811
    ws = workspace(tmp_path / "ws")
    r = subprocess.run(["bash", "run.sh", "--trn_set", str(corpus / "data"), "--dev_set", str(corpus / "dev"),
                        "--tst_set", str(corpus / "test"), "--train_config", "conf/train_demo_tiny.yaml", "--nj", "1",
                        "--stage", "0", "--stop_stage", "3"],
                       cwd=ws, capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert len((ws / "data" / "train" / "text").read_text(encoding="utf-8").splitlines()) == 14
    config = tiny_config(ws, batch_size=2 // procs)     # 7 steps per epoch either way
    extra = ["--cpu_procs", str(procs)]
    steps_per_epoch = 7
    r = subprocess.run(stage4_args(corpus, config, "exp/full", *extra), cwd=ws, capture_output=True, text=True,
                       env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    full = ws / "exp" / "full"

    killed = ws / "exp" / "killed"
    args = stage4_args(corpus, config, "exp/killed", *extra)
    # bash run.sh, python (one process) or bash run.sh, torchrun, 2 workers
    marker = f"epoch 1 step {steps_per_epoch + 2} "      # 2nd step of epoch 1: epoch 0 is saved
    pids = run_and_kill(ws, args, tmp_path / "kill.log", marker, 1 if procs == 1 else 3)
    deadline = time.time() + 5      # the kernel kills them at once; an orphan would train on for 10+ s
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a training process outlived the SIGKILL of its recipe"
    assert (killed / "0.pt").is_file() and not (killed / "1.pt").exists()      # killed mid epoch 1
    # what a kill inside a checkpoint write leaves: temporary files, never read as checkpoints
    (killed / ".tmp.half1.pt").write_bytes((killed / "0.pt").read_bytes()[:1000])
    (killed / ".tmp.half2.yaml").write_text("epoch: 1\nste")

    r = subprocess.run(args, cwd=ws, capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming exp/killed from epoch checkpoint exp/killed/0.pt" in r.stderr
    assert f"resuming at epoch 1, batch 0, step {steps_per_epoch}" in r.stderr
    check_same_end_point(full, killed, steps_per_epoch)          # also: the .tmp files are gone
