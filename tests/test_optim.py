"""LARS bias/norm exclusion, lr recipe, warmup-cosine schedule (min_lr), weight-decay schedule
(weight_decay_end), k-NN / linear probe metrics."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.methods.optim import (
    FINAL_LR_FACTOR,
    apply_weight_decay,
    build_optimizer,
    configure_optimizers,
    cosine_schedule,
    recipe_lrs,
    warmup_cosine,
)
from core.metrics.knn import knn_accuracy, linear_probe_accuracy


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3), nn.BatchNorm1d(3))


def test_lars_groups_exclude_bias_and_norm():
    m = _model()
    opt = build_optimizer(m, "lars", None, 1e-3, batch_size=512)
    from timm.optim import Lars

    assert isinstance(opt, Lars)
    weights, others = opt.param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and len(weights["params"]) == 2
    assert all(p.ndim <= 1 for p in others["params"]) and len(others["params"]) == 6
    assert weights["weight_decay"] == 1e-3 and others["weight_decay"] == 0.0
    assert others["always_adapt"] is False  # timm: no trust ratio when wd == 0 and not always_adapt
    assert weights["lr"] == pytest.approx(0.2 * 2) and others["lr"] == pytest.approx(0.0048 * 2)


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_update_adapts_weights_only(foreach):
    m = _model()
    wd = 0.01
    opt = build_optimizer(m, "lars", None, wd, batch_size=256)
    for g in opt.param_groups:
        g["foreach"] = foreach
    x = torch.randn(8, 6)
    m(x).pow(2).sum().backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    opt.step()  # first step: momentum buffer = update
    for n, p in m.named_parameters():
        w, g = before[n], grads[n]
        if p.ndim > 1:
            trust = 0.001 * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
            want = w - 0.2 * trust * (g + wd * w)
        else:  # plain SGD: no decay, no trust ratio
            want = w - 0.0048 * g
        assert torch.allclose(p.detach(), want, atol=1e-7, rtol=1e-5), n


def test_adamw_no_decay_on_bias_and_norm():
    m = _model()
    opt = build_optimizer(m, "adamw", None, 0.05, batch_size=128)
    assert isinstance(opt, torch.optim.AdamW)
    w, o = opt.param_groups
    assert w["weight_decay"] == 0.05 and o["weight_decay"] == 0.0
    assert w["lr"] == pytest.approx(5e-4 * 0.5) and o["lr"] == pytest.approx(5e-4 * 0.5)
    assert recipe_lrs("adamw", 1e-3, 64) == (1e-3, 1e-3)
    assert recipe_lrs("lars", 0.4, 64) == pytest.approx((0.4, 0.4 * 0.0048 / 0.2))


def test_frozen_params_are_not_optimised():
    m = _model()
    m[0].weight.requires_grad_(False)
    opt = build_optimizer(m, "lars", None, 0.0, 32)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(m[0].weight) not in ids


def test_warmup_cosine_shape():
    total, warm = 100, 10
    v = [warmup_cosine(s, total, warm) for s in range(total + 1)]
    assert v[0] == 0.0 and v[5] == pytest.approx(0.5) and v[warm] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(v[:warm], v[1:warm + 1]))  # rising during warmup
    assert all(a >= b for a, b in zip(v[warm:], v[warm + 1:]))  # falling afterwards
    mid = warm + (total - warm) // 2
    assert v[mid] == pytest.approx(0.5 + FINAL_LR_FACTOR * 0.5)
    assert v[total] == pytest.approx(FINAL_LR_FACTOR)
    assert warmup_cosine(500, total, warm) == pytest.approx(FINAL_LR_FACTOR)  # clamped past the end
    assert warmup_cosine(0, total, 0) == pytest.approx(1.0)  # no warmup
    assert cosine_schedule(0, 10, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(10, 10, 0.996, 1.0) == pytest.approx(1.0)


def test_configure_optimizers_steps_per_step():
    m = _model()
    d = configure_optimizers(m, "lars", 0.1, 0.0, 32, total_steps=20, warmup_steps=4)
    assert d["lr_scheduler"]["interval"] == "step"
    opt, sched = d["optimizer"], d["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.1)
    assert lrs[-1] < 0.01


def _run_schedule(d, steps):
    """lr of every group before each of `steps` optimiser steps, and after the last."""
    opt, sched = d["optimizer"], d["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    seen.append([g["lr"] for g in opt.param_groups])
    return seen


@pytest.mark.parametrize("name", ["lars", "adamw"])
def test_min_lr_is_reached_by_every_group(name):
    """min_lr (official DINO 1e-6): every group ends at that absolute lr, whatever its base lr (LARS:
    0.2 weights / 0.0048 biases); the warmup and the cosine shape are unchanged."""
    total, warm, min_lr = 20, 4, 1e-6
    d = configure_optimizers(_model(), name, None, 0.0, 256, total, warm, min_lr=min_lr)
    bases = [g["initial_lr"] for g in d["optimizer"].param_groups]
    seen = _run_schedule(d, total)
    assert seen[0] == [0.0, 0.0]
    assert seen[warm] == pytest.approx(bases)  # peak after the warmup
    assert seen[total] == pytest.approx([min_lr, min_lr], rel=1e-9)  # the end of the cosine
    mid = warm + (total - warm) // 2
    assert seen[mid] == pytest.approx([min_lr + 0.5 * (b - min_lr) for b in bases])
    # none (the default): unchanged, 0.001 x each group's base
    seen0 = _run_schedule(configure_optimizers(_model(), name, None, 0.0, 256, total, warm), total)
    assert seen0[total] == pytest.approx([FINAL_LR_FACTOR * b for b in bases])
    for a, b in zip(seen0[:warm + 1], seen[:warm + 1]):  # the same warmup
        assert a == pytest.approx(b)


def test_min_lr_above_a_group_base_lr_is_refused():
    with pytest.raises(ConfigError, match=r"^min_lr=0.01 must be <= the base learning rate 0.0048 of group 'biases_norms'"):
        configure_optimizers(_model(), "lars", None, 0.0, 256, 10, 0, min_lr=0.01)


def test_weight_decay_schedule_values_and_groups():
    """Official DINO: cosine 0.04 -> 0.4 over all steps, on the regularised group only."""
    total = 100
    assert cosine_schedule(0, total, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(total // 2, total, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_schedule(total, total, 0.04, 0.4) == pytest.approx(0.4)
    v = [cosine_schedule(s, total, 0.04, 0.4) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(v, v[1:]))  # rising
    for name in ("lars", "adamw"):
        opt = build_optimizer(_model(), name, None, 0.04, 256)
        apply_weight_decay(opt, 0.3)
        wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
        assert wd == {"weights": 0.3, "biases_norms": 0.0}, name


def test_lars_uses_the_scheduled_weight_decay():
    """timm Lars reads the group's weight_decay at every step: a changed value changes the update."""
    x = torch.randn(8, 6)
    out = []
    for wd in (0.0, 0.5):
        m = _model()
        opt = build_optimizer(m, "lars", None, 0.01, 256)
        apply_weight_decay(opt, wd)
        m(x).pow(2).sum().backward()
        opt.step()
        out.append(m[0].weight.detach().clone())
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("field,value,needle", [
    ("min_lr", -1e-6, "min_lr=-1e-06 must be >= 0"),
    ("min_lr", 0.5, "min_lr=0.5 must be <= the smallest base learning rate 0.002"),
    ("weight_decay_end", -0.4, "weight_decay_end=-0.4 is out of range: it must be >= 0 and <= 100"),
    ("weight_decay_end", "x", "weight_decay_end='x' must be a number"),
    ("min_lr", "x", "min_lr='x' must be a number"),
])
def test_schedule_fields_refuse_bad_values_in_one_line(field, value, needle):
    from core.config import PretrainConfig

    with pytest.raises(ConfigError) as e:
        PretrainConfig.from_dict({field: value})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_schedule_fields_default_to_todays_behaviour():
    from core.config import PretrainConfig

    c = PretrainConfig()
    assert (c.min_lr, c.weight_decay_end, c.drop_path) == (None, None, 0.0)
    c = PretrainConfig.from_dict({"optimizer": "lars", "lr": None, "batch_size": 256, "min_lr": 1e-6,
                                  "weight_decay_end": 0.4})
    assert (c.min_lr, c.weight_decay_end) == (1e-6, 0.4)
    with pytest.raises(ConfigError, match=r"min_lr=0.01 must be <= the smallest base learning rate 0.0048"):
        PretrainConfig.from_dict({"optimizer": "lars", "lr": None, "batch_size": 256, "min_lr": 0.01})


def test_knn_on_separable_features_is_100():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4) * 10
    ytr = torch.arange(4).repeat(10)
    yte = torch.arange(4).repeat(5)
    xtr = centers[ytr] + 0.1 * torch.randn(40, 4, generator=g)
    xte = centers[yte] + 0.1 * torch.randn(20, 4, generator=g)
    assert knn_accuracy(xtr, ytr, xte, yte, k=5) == 100.0
    assert knn_accuracy(xtr, ytr, xte, yte, k=200) == 100.0  # k clamped to the bank size
    assert linear_probe_accuracy(xtr, ytr, xte, yte, epochs=50) == 100.0
    # shuffled labels -> around chance
    perm = torch.randperm(40, generator=g)
    acc = knn_accuracy(xtr, ytr[perm], xte, yte, k=20)
    assert 0.0 <= acc < 100.0


def test_knn_weighted_vote():
    # two neighbours of class 1 far away vs one of class 0 very close: temperature decides
    xtr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    ytr = torch.tensor([0, 1, 1])
    xte = torch.tensor([[1.0, 0.05]])
    assert knn_accuracy(xtr, ytr, xte, torch.tensor([0]), k=3, T=0.07) == 100.0
    assert knn_accuracy(xtr, ytr, xte, torch.tensor([1]), k=3, T=100.0) == 100.0
