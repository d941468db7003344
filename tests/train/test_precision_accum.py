"""Mixed precision switches, gradient accumulation and clipping."""
import pytest
import torch

from train_standins import ToyCTCModel, ToyDataset, base_configs, loader, make_utterances
from wenet_moe.config import ConfigError
from wenet_moe.train.launch import run_training


def _train(tmp_path, configs, batch_size=4, hook=None):
    torch.manual_seed(configs["seed"])
    model = ToyCTCModel(dropout=0.0)
    utts = make_utterances(16)
    trainer = run_training(configs, model, loader(ToyDataset(utts, batch_size, seed=1)), None, str(tmp_path),
                           show_bar=False, step_hook=hook)
    return model, trainer


def test_bf16_autocast_on_cpu_trains(tmp_path):
    model32, _ = _train(tmp_path / "fp32", base_configs(max_epoch=1))
    model16, trainer = _train(tmp_path / "bf16", base_configs(max_epoch=1, dtype="bf16"))
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    # weights stay fp32 and move close to (but not exactly onto) the fp32 run
    for a, b in zip(model32.parameters(), model16.parameters()):
        assert b.dtype == torch.float32
        assert torch.allclose(a, b, atol=5e-2)
    assert any(not torch.equal(a, b) for a, b in zip(model32.parameters(), model16.parameters()))


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ConfigError, match="'dtype: fp16' needs --device cuda"):
        _train(tmp_path, base_configs(dtype="fp16"))


def test_accum_grad_equals_larger_batch(tmp_path):
    """accum_grad 2 with batch 2 == accum_grad 1 with batch 4 (per-utterance mean loss)."""
    a, ta = _train(tmp_path / "a", base_configs(max_epoch=1, accum_grad=2, grad_clip=1e6), batch_size=2)
    b, tb = _train(tmp_path / "b", base_configs(max_epoch=1, accum_grad=1, grad_clip=1e6), batch_size=4)
    assert ta.step == tb.step == 4
    # same data order: ToyDataset's batch-2 order is the batch-4 order split in halves
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-6)


def test_grad_clip_bounds_gradient_seen_by_optimizer(tmp_path, monkeypatch):
    applied, reported = [], []
    original = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        applied.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    _train(tmp_path, base_configs(max_epoch=1, grad_clip=0.01), hook=lambda t: reported.append(t.last_grad_norm))
    assert len(applied) == 4 and len(reported) == 4
    for before, after in zip(reported, applied):
        assert before > 0.01 and after == pytest.approx(0.01, rel=1e-4)   # clipped to grad_clip
