"""Mixed precision switches, gradient accumulation and clipping."""
import pytest
import torch

from train_standins import ToyCTCModel, ToyDataset, base_configs, loader, make_utterances
from wenet_moe.config import ConfigError
from wenet_moe.train.launch import run_training


def _train(tmp_path, configs, batch_size=4, hook=None):
    """Train ToyCTCModel on 16 utterances; returns (initial state dict, model, trainer)."""
    torch.manual_seed(configs["seed"])
    model = ToyCTCModel(dropout=0.0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    utts = make_utterances(16)
    trainer = run_training(configs, model, loader(ToyDataset(utts, batch_size, seed=1)), None, str(tmp_path),
                           show_bar=False, step_hook=hook)
    return init, model, trainer


TRAINED = ("proj.weight", "proj.bias", "out.weight", "out.bias")   # `unused` gets no gradient


def _norms(a, b):
    """{name: ||a[name] - b[name]||_2} over the trained tensors."""
    return {k: float((a[k] - b[k]).norm()) for k in TRAINED}


def test_bf16_autocast_on_cpu_trains(tmp_path):
    """bf16 autocast follows the fp32 trajectory to within 1% of the distance travelled.

    Measured (1 epoch, 4 Adam steps): per tensor ||fp32 - init|| 0.049..0.163 and
    ||bf16 - fp32|| 5e-5..5.7e-4 (ratio >= 260); largest element change 0.025, largest
    element mismatch 1.9e-4 (ratio 132). The bounds below leave >= 2.5x margin each way.
    """
    init, model32, _ = _train(tmp_path / "fp32", base_configs(max_epoch=1))
    _, model16, trainer = _train(tmp_path / "bf16", base_configs(max_epoch=1, dtype="bf16"))
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    assert all(p.dtype == torch.float32 for p in model16.parameters())    # weights stay fp32
    s32, s16 = model32.state_dict(), model16.state_dict()
    moved, mismatch = _norms(s32, init), _norms(s16, s32)
    for k in TRAINED:
        assert moved[k] > 0.02, (k, moved[k])                     # the run changes every trained tensor
        assert mismatch[k] < moved[k] / 100, (k, mismatch[k], moved[k])
    change = max(float((s32[k] - init[k]).abs().max()) for k in TRAINED)
    worst = max(float((s16[k] - s32[k]).abs().max()) for k in TRAINED)
    assert change > 0.01 and worst < change / 50, (worst, change)
    # ... and bf16 really ran: fp32 reordering noise is ~3e-8 (accumulation test below)
    assert worst > 1e-5, worst


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ConfigError, match="'dtype: fp16' needs --device cuda"):
        _train(tmp_path, base_configs(dtype="fp16"))


def test_accum_grad_equals_larger_batch(tmp_path):
    """accum_grad 2 with batch 2 == accum_grad 1 with batch 4 (per-utterance mean loss).

    Measured: the run moves every trained tensor by > 0.04 (norm; largest element
    0.025) and the two runs differ by 3e-8 (fp32 summation order): the 1e-6 bound is
    1/10000 of the change and 30x the noise.
    """
    init, a, ta = _train(tmp_path / "a", base_configs(max_epoch=1, accum_grad=2, grad_clip=1e6), batch_size=2)
    _, b, tb = _train(tmp_path / "b", base_configs(max_epoch=1, accum_grad=1, grad_clip=1e6), batch_size=4)
    assert ta.step == tb.step == 4
    sa, sb = a.state_dict(), b.state_dict()
    for k, moved in _norms(sb, init).items():
        assert moved > 0.02, (k, moved)
    assert max(float((sb[k] - init[k]).abs().max()) for k in TRAINED) > 0.01
    # same data order: ToyDataset's batch-2 order is the batch-4 order split in halves
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6), (k, float((sa[k] - sb[k]).abs().max()))


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
