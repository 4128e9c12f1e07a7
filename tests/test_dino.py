"""DINO loss against a direct computation; teacher: no gradient, EMA formula, momentum schedule."""

from __future__ import annotations


import pytest
import torch

from core.losses.dino import DINOLoss


def _direct_dino(student, teacher, center, t_temp, s_temp, ncrops, b):
    total, n = 0.0, 0
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            per_sample = []
            for i in range(b):
                t = teacher[iq * b + i].double()
                s = student[v * b + i].double()
                q = torch.exp((t - center) / t_temp)
                q = q / q.sum()
                logp = s / s_temp - torch.logsumexp(s / s_temp, dim=0)
                per_sample.append(-(q * logp).sum())
            total += sum(per_sample) / b
            n += 1
    return total / n


def test_dino_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    b, k, ncrops = 3, 7, 4
    student = torch.randn(ncrops * b, k, generator=g)
    teacher = torch.randn(2 * b, k, generator=g)
    loss_fn = DINOLoss(k, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3,
                       n_epochs=10, student_temp=0.1, center_momentum=0.9)
    center0 = torch.randn(1, k, generator=g)
    loss_fn.center.copy_(center0)
    for epoch, temp in ((0, 0.04), (1, 0.055), (2, 0.07), (9, 0.07)):
        assert loss_fn.teacher_temp_at(epoch) == pytest.approx(temp)
    got = loss_fn(student, teacher, epoch=1)
    want = _direct_dino(student, teacher, center0[0].double(), 0.055, 0.1, ncrops, b)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # center EMA: c <- 0.9 c + 0.1 mean(teacher)
    assert torch.allclose(loss_fn.center, 0.9 * center0 + 0.1 * teacher.mean(0, keepdim=True), atol=1e-6)
    # list inputs give the same value (center restored first)
    loss_fn.center.copy_(center0)
    got2 = loss_fn(list(student.chunk(ncrops)), list(teacher.chunk(2)), epoch=1)
    assert got2.item() == pytest.approx(got.item(), rel=1e-6)
    # eval mode leaves the center alone
    loss_fn.eval()
    c = loss_fn.center.clone()
    loss_fn(student, teacher, epoch=1)
    assert torch.equal(c, loss_fn.center)


def test_dino_loss_gradient_only_to_student():
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    DINOLoss(5, n_epochs=1)(s, t, 0).backward()
    assert s.grad is not None and t.grad is None


def _tiny_cfg(**kw):
    from core.config import PretrainConfig

    base = dict(method="dino", backbone="resnet_tiny", projector=(32, 32), dino={"out_dim": 16}, epochs=2,
                batch_size=4, optimizer="adamw", gpu_augment=False, data={"image_size": 64})
    base.update(kw)
    return PretrainConfig.from_dict(base)


def test_teacher_has_no_gradient_and_follows_ema():
    from core.methods.dino import DINOMethod

    torch.manual_seed(0)
    m = DINOMethod(_tiny_cfg(), num_train_batches=5)
    # teacher starts as an exact copy of the student
    for ps, pt in m._pairs():
        assert torch.equal(ps, pt) and not pt.requires_grad
    views = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss = m.training_step(views, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in m.teacher_backbone.parameters())
    assert all(p.grad is None for p in m.teacher_head.parameters())
    assert any(p.grad is not None for p in m.backbone.parameters())
    # perturb the student as an optimiser step would, then EMA
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(0.1)
    before_t = [pt.clone() for _, pt in m._pairs()]
    student = [ps.clone() for ps, _ in m._pairs()]
    mom = m.teacher_momentum(3)
    m.ema_update(mom)
    for t0, s, (_, pt) in zip(before_t, student, m._pairs()):
        assert torch.allclose(pt, mom * t0 + (1 - mom) * s, atol=1e-6)
    # cosine momentum schedule 0.996 -> 1 over the 10 steps
    assert m.teacher_momentum(0) == pytest.approx(0.996)
    assert m.teacher_momentum(10) == pytest.approx(1.0)
    assert m.teacher_momentum(5) == pytest.approx(0.998)
    # k-NN / export use the teacher backbone
    assert m.knn_backbone() is m.teacher_backbone


def test_dino_freezes_last_layer_in_first_epoch_and_clips():
    from core.methods.dino import clip_gradients_per_param, DINOMethod

    m = DINOMethod(_tiny_cfg(), num_train_batches=2)
    views = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    m.training_step(views, 0).backward()
    m.on_before_optimizer_step(None)  # epoch 0 without a trainer
    assert all(p.grad is None for p in m.head.last_layer.parameters())
    lin = torch.nn.Linear(3, 3)
    lin.weight.grad = torch.full((3, 3), 10.0)
    clip_gradients_per_param(lin, 3.0)
    assert lin.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-4)


def test_norm_last_layer_option_frees_the_last_layer_magnitude():
    """dino.norm_last_layer (main_dino.py --norm_last_layer): true (default) keeps the weight-norm magnitude g of
    the student head's last layer at 1 and out of the optimiser; false trains it (in the weight-decayed group, as
    main_dino.py's get_params_groups: g is 2-D), it is frozen with the rest of the last layer in epoch 0, and the
    teacher follows it by EMA. The default builds the same head, parameter for parameter, as before the option."""
    from core.methods.dino import DINOMethod
    from core.methods.optim import split_decay_groups

    def build(**dino):
        torch.manual_seed(0)
        return DINOMethod(_tiny_cfg(dino={"out_dim": 16, **dino}), num_train_batches=2)

    on, off = build(), build(norm_last_layer=False)
    assert on.cfg.dino.norm_last_layer is True and off.cfg.dino.norm_last_layer is False
    g_on = on.head.last_layer.parametrizations.weight.original0
    g_off = off.head.last_layer.parametrizations.weight.original0
    assert on.head.norm_last_layer and not g_on.requires_grad
    assert not off.head.norm_last_layer and g_off.requires_grad and g_off.ndim == 2
    assert not off.teacher_head.last_layer.parametrizations.weight.original0.requires_grad
    # same initial weights either way (the option changes what trains, not the initialisation / RNG use)
    for (n, a), (_, b) in zip(on.named_parameters(), off.named_parameters()):
        assert torch.equal(a, b), n
    weights, _ = split_decay_groups(off.optimized_module())
    assert any(p is g_off for p in weights)
    assert not any(p is g_on for group in split_decay_groups(on.optimized_module()) for p in group)

    views = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    off.training_step(views, 0).backward()
    assert g_off.grad is not None and g_off.grad.abs().sum() > 0
    off.on_before_optimizer_step(None)  # epoch 0: the whole last layer frozen (official freeze_last_layer 1)
    assert g_off.grad is None
    with torch.no_grad():
        g_off.mul_(2.0)  # as an optimiser step would move it
    off.ema_update(0.5)
    g_teacher = off.teacher_head.last_layer.parametrizations.weight.original0
    torch.testing.assert_close(g_teacher, 1.5 * torch.ones_like(g_off))
    # the option is a CLI flag / config field with a one-line refusal of a non-boolean
    from core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _tiny_cfg(dino={"norm_last_layer": "maybe"})
    assert "norm_last_layer" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- official recipe fields
def test_drop_path_in_the_student_only():
    """Official main_dino.py builds the student with drop_path_rate and the teacher without: the
    teacher (a deep copy here) has every DropPath off and is deterministic even in train mode."""
    from core.methods.dino import DINOMethod
    from core.models.registry import drop_path_rates

    torch.manual_seed(0)
    m = DINOMethod(_tiny_cfg(backbone="vit_nano_patch8", drop_path=0.5), num_train_batches=2)
    student, teacher = drop_path_rates(m.backbone), drop_path_rates(m.teacher_backbone)
    # timm: linear per-block rates 0 .. 0.5 over the 4 blocks (block 0 has none), 2 per block
    assert student and max(student) == pytest.approx(0.5) and len(teacher) == len(student)
    assert all(r == 0.0 for r in teacher)
    for ps, pt in m._pairs():  # parameters unchanged and aligned for the EMA
        assert torch.equal(ps, pt)
    x = torch.randn(4, 3, 64, 64)
    m.backbone.train()
    m.teacher_backbone.train()
    with torch.no_grad():
        assert torch.equal(m.teacher_backbone(x), m.teacher_backbone(x))
        assert not torch.allclose(m.backbone(x), m.backbone(x))
    # without drop_path nothing changes: no DropPath anywhere (today's behaviour)
    m0 = DINOMethod(_tiny_cfg(backbone="vit_nano_patch8"), num_train_batches=2)
    assert drop_path_rates(m0.backbone) == [] and drop_path_rates(m0.teacher_backbone) == []


@pytest.mark.parametrize("kw,needle", [
    ({"drop_path": 0.1}, "drop_path=0.1 is not supported by backbone=resnet_tiny (no stochastic depth); use drop_path=0"),
    ({"backbone": "vit_nano_patch8", "drop_path": 1.0}, "drop_path=1.0 must be >= 0 and < 1"),
    ({"backbone": "vit_nano_patch8", "drop_path": -0.1}, "drop_path=-0.1 must be >= 0 and < 1"),
    ({"backbone": "vit_nano_patch8", "drop_path": "x"}, "drop_path='x' must be a number"),
])
def test_drop_path_bad_values_are_one_line(kw, needle):
    from core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _tiny_cfg(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fit_follows_the_lr_and_weight_decay_schedules():
    """A short Lightning fit: before every optimiser step the weights group has the cosine weight decay
    (0.04 -> 0.4 over all steps), the bias/norm group 0; the lr ends at min_lr in every group."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from core.methods.dino import DINOMethod
    from core.methods.optim import cosine_schedule, warmup_cosine

    class Record(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.seen.append({g["name"]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups})

    torch.manual_seed(0)
    n_batches, epochs, base, min_lr = 3, 2, 1e-3, 1e-6
    cfg = _tiny_cfg(epochs=epochs, lr=base, min_lr=min_lr, weight_decay=0.04, weight_decay_end=0.4,
                    warmup_epochs=1, data={"image_size": 32})
    views = [[torch.randn(3, 32, 32), torch.randn(3, 32, 32)] for _ in range(4 * n_batches)]
    loader = DataLoader(views, batch_size=4)
    m = DINOMethod(cfg, num_train_batches=n_batches)
    rec = Record()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=[rec],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(m, train_dataloaders=loader)
    total, warm = n_batches * epochs, n_batches
    assert len(rec.seen) == total
    for step, groups in enumerate(rec.seen):
        assert groups["weights"][1] == pytest.approx(cosine_schedule(step, total, 0.04, 0.4))
        assert groups["biases_norms"][1] == 0.0
        want_lr = base * warmup_cosine(step, total, warm, final=min_lr / base)
        assert groups["weights"][0] == pytest.approx(want_lr) and groups["biases_norms"][0] == pytest.approx(want_lr)
    assert rec.seen[0]["weights"][1] == pytest.approx(0.04)
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([min_lr, min_lr])
    assert m.weight_decay_at(total) == pytest.approx(0.4)


def test_collapse_monitors_on_uniform_and_one_hot_teachers():
    """The DINO paper's collapse analysis: h(teacher) is ln K for a uniform collapse and 0 for a one-hot
    one; KL(teacher || student) is 0 when the student matches; h + KL is the loss."""
    import math

    K, B = 16, 4
    loss_fn = DINOLoss(K, teacher_temp=0.04, warmup_teacher_temp=0.04, n_epochs=1, student_temp=0.1)
    loss_fn.eval()  # keep the center at zero
    uniform = torch.zeros(2 * B, K)
    loss = loss_fn(torch.zeros(4 * B, K), uniform, 0)  # 2 global + 2 local crops, all uniform
    st = loss_fn.last_stats
    assert float(st["teacher_entropy"]) == pytest.approx(math.log(K), abs=1e-5)
    assert float(st["teacher_student_kl"]) == pytest.approx(0.0, abs=1e-5)
    assert float(loss) == pytest.approx(math.log(K), abs=1e-5)

    one_hot = torch.full((2 * B, K), -50.0)
    one_hot[:, 3] = 50.0
    torch.manual_seed(0)
    student = torch.randn(4 * B, K)
    loss = loss_fn(student, one_hot, 0)
    st = loss_fn.last_stats
    assert float(st["teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(st["teacher_entropy"]) + float(st["teacher_student_kl"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(st["teacher_student_kl"]) > 0

    teacher = torch.randn(2 * B, K)
    loss = loss_fn(student, teacher, 0)
    st = loss_fn.last_stats
    assert 0 < float(st["teacher_entropy"]) < math.log(K)
    assert float(st["teacher_entropy"]) + float(st["teacher_student_kl"]) == pytest.approx(float(loss), rel=1e-6)
