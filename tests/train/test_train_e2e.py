"""`wenet-moe train` / `average` end to end with the real data pipeline and model on a
few synthetic wavs; exact resume through the real pipeline (workers 0 and 2)."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from wenet_moe.cli import main as cli_main

pytestmark = pytest.mark.slow

CHARS = "你好世界大家"


def _corpus(root, n):
    rng = np.random.default_rng(0)
    wavdir = root / "wav"
    wavdir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        text = "".join(rng.choice(list(CHARS), size=int(rng.integers(1, 4))))
        t = np.arange(int(16000 * rng.uniform(0.3, 0.6))) / 16000
        wav = 0.1 * np.sin(2 * np.pi * (200 + 100 * CHARS.index(text[0])) * t) + 0.01 * rng.standard_normal(t.size)
        path = wavdir / f"u{i}.wav"
        sf.write(path, wav.astype(np.float32), 16000, subtype="PCM_16")
        lines.append(json.dumps({"key": f"u{i}", "wav": str(path), "txt": text}, ensure_ascii=False))
    return lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    lines = _corpus(root, 12)
    (root / "train.list").write_text("\n".join(lines[:10] + ["{bad json"]) + "\n", encoding="utf-8")
    (root / "cv.list").write_text("\n".join(lines[10:]) + "\n", encoding="utf-8")
    units = ["<blank> 0", "<unk> 1"] + [f"{c} {i + 2}" for i, c in enumerate(CHARS)] + [f"<sos/eos> {len(CHARS) + 2}"]
    (root / "units.txt").write_text("\n".join(units) + "\n", encoding="utf-8")
    moe = {"mlp_type": "moe", "n_expert": 2, "n_expert_activated": 1}
    conf = {
        "encoder": "conformer",
        "encoder_conf": {"output_size": 16, "attention_heads": 2, "linear_units": 16, "num_blocks": 1,
                         "cnn_module_kernel": 3, "input_layer": "conv2d", "dropout_rate": 0.1, **moe},
        "decoder": "bitransformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 16, "num_blocks": 1, "r_num_blocks": 1},
        "moe_conf": {"router": "topk"},
        "tokenizer": "char", "tokenizer_conf": {"symbol_table_path": str(root / "units.txt")},
        "model_conf": {"ctc_weight": 0.5, "reverse_weight": 0.3},
        "dataset_conf": {"fbank_conf": {"num_mel_bins": 23, "dither": 0.1}, "spec_aug": True,
                         "filter_conf": {"min_length": 0},
                         "batch_conf": {"batch_type": "static", "batch_size": 3}},
        "optim": "adam", "optim_conf": {"lr": 0.005},
        "scheduler": "warmuplr", "scheduler_conf": {"warmup_steps": 5},
        "max_epoch": 3, "save_interval": 2, "log_interval": 1, "seed": 3,
    }
    (root / "conf.yaml").write_text(yaml.safe_dump(conf, allow_unicode=True))
    return root


def _train(root, exp, *extra):
    return cli_main(["train", "--config", str(root / "conf.yaml"), "--train_data", str(root / "train.list"),
                     "--cv_data", str(root / "cv.list"), "--model_dir", str(exp), "--no_progress", *extra])


def test_train_writes_config_checkpoints_and_average(setup, caplog):
    root = setup
    exp = root / "exp"
    with caplog.at_level("INFO"):
        assert _train(root, exp, "--tensorboard_dir", str(exp / "tb"), "--seed", "11") == 0
    resolved = yaml.safe_load(open(exp / "train.yaml"))
    assert resolved["input_dim"] == 23 and resolved["output_dim"] == len(CHARS) + 3 and resolved["seed"] == 11
    for e in range(3):
        info = yaml.safe_load(open(exp / f"{e}.yaml"))
        assert info["epoch"] == e and np.isfinite(info["cv_loss"]) and info["lr"] > 0
        assert info["step"] == 4 * (e + 1)                  # 10 utts / 3 = 4 batches per epoch
        assert info["skipped"]["bad_json"] == 1             # the bad line, counted every epoch
        assert 0.0 <= info["cv"]["ctc_blank_rate"] <= 1.0 and info["cv"]["ctc_greedy_ter"] >= 0.0
        ck = torch.load(exp / f"{e}.pt", weights_only=False)
        assert ck["epoch_done"] and ck["scaler"] is None and "optimizer" in ck
    assert os.path.realpath(exp / "final.pt") == os.path.realpath(exp / "2.pt")
    assert (exp / "step_2.pt").exists() and (exp / "step_2.yaml").exists()
    assert not [f for f in os.listdir(exp) if f.startswith(".tmp")]
    assert any("skipped data: bad_json=1" in r.getMessage() for r in caplog.records)

    # TensorBoard: loss parts, lr, grad norm, cv loss and per-layer expert-load entropy
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(exp / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_ctc", "train/loss_att", "train/lr", "train/grad_norm", "cv/loss"} <= tags
    assert any(t.startswith("moe_entropy/") for t in tags)

    assert cli_main(["average", "--dst_model", str(exp / "avg_2.pt"), "--src_path", str(exp), "--num", "2",
                     "--val_best"]) == 0
    from wenet_moe.model import build_model
    from wenet_moe.checkpoint_io import load_model_weights
    model = build_model(resolved)
    load_model_weights(model, str(exp / "avg_2.pt"))
    picked = sorted(range(3), key=lambda e: yaml.safe_load(open(exp / f"{e}.yaml"))["cv_loss"])[:2]
    sds = [torch.load(exp / f"{e}.pt", weights_only=False)["model"] for e in picked]
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, (sds[0][k] + sds[1][k]) / 2, atol=1e-6), k


@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_cli_kill_and_resume_matches(setup, monkeypatch, num_workers):
    """Crash after step 6 (mid epoch 1), resume from step_6.pt: same final weights."""
    root = setup
    full, part = root / f"full{num_workers}", root / f"part{num_workers}"
    assert _train(root, full, "--num_workers", num_workers) == 0

    import wenet_moe.train.trainer as trainer_mod
    original = trainer_mod.Trainer._after_step

    def crashing(self, parts, micro):
        original(self, parts, micro)
        if self.step == 6:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer_mod.Trainer, "_after_step", crashing)
    assert _train(root, part, "--num_workers", num_workers) == 1
    monkeypatch.undo()
    assert not (part / "2.pt").exists()
    assert _train(root, part, "--num_workers", num_workers, "--checkpoint", str(part / "step_6.pt")) == 0
    a = torch.load(full / "2.pt", weights_only=False)["model"]
    b = torch.load(part / "2.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["torch_ddp", "fsdp"])
def test_torchrun_two_processes(setup, engine):
    """`torchrun --nproc_per_node 2 -m wenet_moe train` (gloo, env-var init) finishes
    and rank 0 writes the checkpoints; 11 list lines split unevenly over the ranks."""
    import subprocess
    import sys
    root = setup
    exp = root / f"torchrun_{engine}"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "wenet_moe", "train",
           "--config", str(root / "conf.yaml"), "--train_data", str(root / "train.list"),
           "--cv_data", str(root / "cv.list"), "--model_dir", str(exp), "--train_engine", engine, "--no_progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for e in range(3):
        info = yaml.safe_load(open(exp / f"{e}.yaml"))
        assert np.isfinite(info["cv_loss"]) and info["skipped"]["bad_json"] == 1
    from wenet_moe.model import build_model
    from wenet_moe.checkpoint_io import load_model_weights
    load_model_weights(build_model(yaml.safe_load(open(exp / "train.yaml"))), str(exp / "final.pt"))
