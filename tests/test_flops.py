"""core/flops.py and core/accounting.py: FLOPs per image against a hand count, MFU from the peak table,
the count leaves the run unchanged, runs write flops_per_image / mfu, and a killed attempt's time counts."""

from __future__ import annotations

import json
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from core import flops


# --------------------------------------------------------------------------- hand counts
def test_conv_linear_forward_backward_equals_hand_count():
    cin, cout, k, h, w, classes, b = 3, 8, 3, 16, 16, 10, 2
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(cout * h * w, classes))
    x = torch.randn(b, cin, h, w)
    conv = 2 * cin * cout * k * k * h * w  # per image, FMA = 2 FLOPs, Hout = H, Wout = W (padding 1)
    lin = 2 * (cout * h * w) * classes  # Linear(a, b): 2ab per sample (bias not counted)
    assert flops.count_flops(lambda: model(x)) == b * (conv + lin)
    # backward: the Linear's input and weight gradients (2 x forward); the conv's weight gradient
    # only (1 x forward): its input, the image, needs no gradient
    assert flops.count_flops(lambda: model(x).sum().backward()) == b * (conv + lin) + b * (conv + 2 * lin)


class _TinyModule(nn.Module):
    """A LightningModule-shaped stand-in: training_step over two views, BatchNorm, self.log."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 4))
        self.logged = 0

    def log(self, *a, **k):
        self.logged += 1

    def training_step(self, batch, batch_idx):
        v1, v2 = batch
        loss = (self.net(v1) - self.net(v2)).pow(2).mean()
        self.log("train/loss", loss)
        return loss


def test_training_flops_per_image_counts_views_and_restores_state():
    m = _TinyModule().eval()
    batch = (torch.randn(2, 12), torch.randn(2, 12))
    running = m.net[1].running_mean.clone()
    rng = torch.get_rng_state()
    per_image = flops.training_flops_per_image(m, batch, n_images=2)
    fwd = 2 * (2 * 12 * 6 + 2 * 6 * 4)  # two views through both Linears
    bwd = 2 * (2 * 12 * 6 * 1 + 2 * 6 * 4 * 2)  # first Linear: weight grad only; second: input + weight
    assert per_image == fwd + bwd
    assert torch.equal(m.net[1].running_mean, running)  # BatchNorm statistics restored
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's draws did not move the RNG
    assert m.logged == 0 and not m.training  # self.log silenced, eval mode restored
    assert "log" not in m.__dict__


# --------------------------------------------------------------------------- MFU
@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", 165.2),
])
def test_peak_table(name, tflops):
    assert flops.peak_bf16_flops(name) == pytest.approx(tflops * 1e12)


def test_mfu_formula_and_unknowns():
    # 4.1 GFLOP/img x 2 (BT views) x 3 (fwd+bwd) ~ 24.6 GFLOP at 10,000 img/s on 2 H100 = 24.9% MFU
    assert flops.mfu(24.6e9, 10_000, "NVIDIA H100 80GB HBM3", 2) == pytest.approx(24.6e9 * 1e4 / (2 * 989.4e12))
    assert flops.mfu(1e9, 100.0, None) is None  # CPU
    assert flops.mfu(1e9, 100.0, "cpu") is None
    assert flops.mfu(1e9, 100.0, "NVIDIA Tesla K80") is None  # unknown GPU: not guessed
    assert flops.mfu(None, 100.0, "NVIDIA H200") is None
    assert flops.peak_bf16_flops("NVIDIA L40") is None  # L40 (not S) is not L4


# --------------------------------------------------------------------------- runs
def _cfg(voc_root, **kw):
    from core.config import PretrainConfig

    d = dict(backbone="vit_nano_patch8", projector=(64, 64), batch_size=8, epochs=2, warmup_epochs=0.5,
             optimizer="adamw", wandb="disabled", device="cpu", gpu_augment=False,
             data=dict(root=str(voc_root), image_size=32, limit_train=16, limit_val=8))
    d.update(kw)
    return PretrainConfig.from_dict(d)


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Kill(Callback):
    """Sleeps at the first step of epoch 1 (after the epoch-0 checkpoint), then dies at its second step."""

    def __init__(self, sleep_s: float = 0.0, die: bool = False):
        self.sleep_s, self.die = sleep_s, die

    def on_fit_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        self.span = time.perf_counter() - self.t0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0 and self.sleep_s:
            time.sleep(self.sleep_s)  # work after the checkpoint, lost by the kill
        if trainer.current_epoch == 1 and batch_idx == 1 and self.die:
            raise RuntimeError("simulated kill")


def _fit(out, kill: _Kill, epochs: int = 2):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from core.accounting import AccountingCallback

    acc = AccountingCallback(out, flops_per_image=1e9)
    ck = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="last", monitor=None, save_top_k=1,
                         enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[acc, ck, kill])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(_Tiny(), data, ckpt_path=str(last) if last.is_file() else None)
    return acc


@pytest.mark.parametrize("how", ["exception", "sigkill"])
def test_killed_attempt_time_counts(tmp_path, monkeypatch, how):
    from core import accounting

    if how == "sigkill":  # no hook runs: only the periodic record counts (here after every step)
        monkeypatch.setattr(accounting, "PERSIST_EVERY_S", 0.0)
        monkeypatch.setattr(accounting.AccountingCallback, "on_exception", lambda *a, **k: None)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(RuntimeError, match="simulated kill"):
        _fit(out, _Kill(sleep_s=1.0, die=True))
    persisted = json.loads((out / accounting.ACCOUNTING_FILE).read_text())
    assert persisted["wall_time_s"] > 1.0 and persisted["finished_fit"] is False
    resumed = _Kill()
    acc = _fit(out, resumed)
    m = acc.summary()
    # the killed attempt's time (its 1 s after the last checkpoint included) + the resumed one's;
    # before accounting.json, the killed attempt's whole span was lost (wall_time_s ~ resumed.span)
    assert m["wall_time_s"] >= persisted["wall_time_s"] + resumed.span - 0.05, (m, persisted, resumed.span)
    assert m["wall_time_s"] > resumed.span + 1.0
    assert m["device_seconds"] > 0 and m["train_images"] == 2 * 8  # the redone epoch counted once
    assert m["flops_per_image"] == 10**9 and m["mfu"] is None  # CPU: no MFU
    final = json.loads((out / accounting.ACCOUNTING_FILE).read_text())
    assert final["finished_fit"] is True and final["wall_time_s"] == pytest.approx(m["wall_time_s"], abs=1e-3)


@pytest.mark.slow
def test_pretrain_run_writes_flops_per_image(voc_root, tmp_path):
    from core.data.module import build_ssl_loaders
    from core.methods.registry import get_method
    from core.methods.ssl_base import unpack_views
    from core.runs.pretrain import build_method, run_pretrain

    cfg = _cfg(voc_root, epochs=1)
    m = run_pretrain(cfg, tmp_path / "run", progress=False)
    assert m["mfu"] is None  # CPU
    assert (tmp_path / "run" / "accounting.json").is_file()
    # the same count on the same module built the same way (2 views of 32 px, real samples)
    loaders = build_ssl_loaders(cfg.data, get_method("barlow_twins").views(cfg, False), cfg.batch_size, seed=0)
    method = build_method(cfg, loaders)
    expected = flops.training_flops_per_image(method, flops.sample_batch(loaders.train), 2)
    assert m["flops_per_image"] == expected > 0
    # two views: about twice one view's forward + backward through backbone and projector
    x = unpack_views(flops.sample_batch(loaders.train))[0]
    one_view = flops.count_flops(lambda: method(method.prepare_view(x)).sum().backward()) / 2
    assert 1.6 * one_view < expected < 2.4 * one_view


def test_count_leaves_the_module_and_rng_unchanged(voc_root):
    """DINO (teacher, centre buffer, multi-crop views): counting changes no state, so seeded runs give
    the same results with and without it."""
    from core.data.module import build_ssl_loaders
    from core.methods.registry import get_method
    from core.runs.pretrain import build_method

    cfg = _cfg(voc_root, method="dino", dino={"out_dim": 64, "local_crops": 2})
    views = get_method("dino").views(cfg, False)
    loaders = build_ssl_loaders(cfg.data, views, cfg.batch_size, seed=0)
    method = build_method(cfg, loaders)
    method.loss_fn.center.fill_(0.5)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    n = flops.run_flops_per_image(method, loaders.train, device=torch.device("cpu"))
    assert n > 0
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in method.parameters())
    # the count saw all four crops: more than the two global crops through the student alone
    g = [v[:1] for v in __import__("core.methods.ssl_base", fromlist=["x"]).unpack_views(
        flops.sample_batch(loaders.train))[:2]]
    student_globals = flops.count_flops(lambda: method.head(method.backbone(torch.cat(g))).sum().backward())
    assert n > student_globals


def test_segment_run_counts_flops(voc_root):
    from core.config import SegmentConfig
    from core.runs.segment import SegmentRun

    cfg = SegmentConfig.from_dict(dict(backbone="resnet_tiny", head="linear", batch_size=4, epochs=1,
                                       wandb="disabled", device="cpu",
                                       data=dict(root=str(voc_root), image_size=32, limit_train=8, limit_val=4)))
    run = SegmentRun(cfg)
    run.resolve_device()
    run.build()
    n = run.flops_per_image()
    x, y = flops.sample_batch(run.loaders.train)
    assert x.shape[-1] == 32
    fwd = flops.count_flops(lambda: run.model.model(run.model._prep(x[:1])))  # one image's forward
    assert 1.5 * fwd < n < 3.5 * fwd  # backward ~ 1-2 x forward
