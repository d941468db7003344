"""Schedulers follow their formulas; optimizer/scheduler config errors name the key."""
import math

import pytest
import torch

from wenet_moe.config import ConfigError
from wenet_moe.train.optim import build_optimizer
from wenet_moe.train.scheduler import build_scheduler


def _lrs(name, conf, steps, base=0.002):
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, "adam", {"lr": base})
    sched = build_scheduler(opt, name, conf)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])     # lr used by the next optimizer step
        opt.step()
        sched.step()
    return lrs


def test_warmuplr_formula():
    base, warm = 0.002, 25
    got = _lrs("warmuplr", {"warmup_steps": warm}, 100, base)
    for i, lr in enumerate(got):
        step = i + 1
        want = base * warm ** 0.5 * min(step ** -0.5, step * warm ** -1.5)
        assert lr == pytest.approx(want, rel=1e-12)
    assert max(got) == pytest.approx(base) and got.index(max(got)) == warm - 1


def test_warmuplr_zero_warmup_is_inverse_sqrt():
    got = _lrs("warmuplr", {"warmup_steps": 0}, 10, 1.0)
    assert got == pytest.approx([s ** -0.5 for s in range(1, 11)])


def test_cosine_formula():
    base, final, warm, total = 0.01, 0.001, 10, 50
    got = _lrs("cosine", {"warmup_steps": warm, "max_steps": total, "final_lr": final}, 70, base)
    for i, lr in enumerate(got):
        s = i + 1
        if s < warm:
            want = base * s / warm
        else:
            p = min((s - warm) / (total - warm), 1.0)
            want = final + (base - final) * (1 + math.cos(math.pi * p)) / 2
        assert lr == pytest.approx(want, rel=1e-12)
    assert got[-1] == pytest.approx(final)


def test_constant_with_warmup():
    got = _lrs("constant", {"warmup_steps": 4}, 8, 0.5)
    assert got == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_scheduler_state_roundtrip():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, "adamw", {"lr": 0.1})
    s1 = build_scheduler(opt, "warmuplr", {"warmup_steps": 5})
    for _ in range(7):
        opt.step()
        s1.step()
    opt2 = build_optimizer(model, "adamw", {"lr": 0.1})
    s2 = build_scheduler(opt2, "warmuplr", {"warmup_steps": 5})
    s2.load_state_dict(s1.state_dict())
    opt2.param_groups[0]["lr"] = s2.get_last_lr()[0]
    s1.step()
    s2.step()
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


@pytest.mark.parametrize("name,conf,msg", [
    ("warmuplr", {"warmup_step": 10}, "scheduler_conf.warmup_step' (did you mean 'warmup_steps'?)"),
    ("cosine", {"warmup_steps": 10}, "'scheduler_conf.max_steps' is required"),
    ("cosine", {"warmup_steps": 10, "max_steps": 5}, "must be >= warmup_steps"),
    ("noam", {}, "unknown scheduler 'noam'"),
    ("constant", {"warmup_steps": -1}, "'scheduler_conf.warmup_steps' must be a number >= 0"),
])
def test_scheduler_config_errors(name, conf, msg):
    opt = build_optimizer(torch.nn.Linear(1, 1), "adam", {})
    with pytest.raises(ConfigError) as e:
        build_scheduler(opt, name, conf)
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,conf,msg", [
    ("adam", {"learning_rate": 0.1}, "unknown key 'optim_conf.learning_rate'"),
    ("sgd", {}, "unknown optim 'sgd'"),
    ("adam", {"lr": -1}, "'optim_conf.lr' must be a positive number"),
    ("adamw", {"betas": [0.9]}, "'optim_conf.betas'"),
])
def test_optim_config_errors(name, conf, msg):
    with pytest.raises(ConfigError) as e:
        build_optimizer(torch.nn.Linear(1, 1), name, conf)
    assert msg in str(e.value)


def test_adamw_defaults():
    opt = build_optimizer(torch.nn.Linear(1, 1), "adamw", {"lr": 0.5})
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and g["lr"] == 0.5 and g["weight_decay"] == 0.01
    assert g["betas"] == (0.9, 0.98)


def test_schedule_advice_flags_long_warmup_and_mismatched_cosine():
    from wenet_moe.train.scheduler import schedule_advice
    opt = build_optimizer(torch.nn.Linear(1, 1), "adam", {})
    wenet = build_scheduler(opt, "warmuplr", {"warmup_steps": 25000})
    msg = schedule_advice(wenet, steps_per_epoch=50, max_epoch=40)     # 2000 steps in the run
    assert "warmup_steps 25000 is 1250% of this run" in msg and "2000 steps" in msg
    assert schedule_advice(build_scheduler(opt, "warmuplr", {"warmup_steps": 100}), 50, 40) == ""
    cos = build_scheduler(opt, "cosine", {"warmup_steps": 10, "max_steps": 20000})
    assert "max_steps 20000 vs 2000 steps" in schedule_advice(cos, 50, 40)
    assert schedule_advice(build_scheduler(opt, "cosine", {"warmup_steps": 10, "max_steps": 2000}), 50, 40) == ""


def test_optimizer_is_fused_and_matches_the_reference_update():
    """build_optimizer takes torch's fused kernel for plain CPU parameters, and its
    updates equal the per-tensor AdamW reference to float rounding over five steps."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    b.load_state_dict(a.state_dict())
    start = a.weight.detach().clone()
    opt_a = build_optimizer(a, "adamw", {"lr": 0.01})
    assert opt_a.defaults["fused"] is True
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.01, betas=(0.9, 0.98), weight_decay=0.01)
    for _ in range(5):
        x = torch.randn(8, 64)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    assert (a.weight - start).abs().max() > 1e-2          # the steps did move the weights
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
