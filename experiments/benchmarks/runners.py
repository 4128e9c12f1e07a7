"""Runners: one timed thing each, built from a `BenchCase` with the code the real runs use.

The LightningModule, the loaders and the backbone come from core/runs (`core.runs.pretrain.build_method` /
`build_loaders`; `core.runs.segment.preflight` / `build_loaders` / `build_method`, whose Segmenter is
`core.models.segmenter.build_segmenter`), so a row times the module a run of its config trains. The runner
drives it one optimisation step at a time, as Lightning's automatic optimisation does (training_step under
autocast -> backward -> on_before_optimizer_step -> optimizer.step -> zero_grad -> scheduler.step ->
on_train_batch_end), without a Trainer (`self.log` is a no-op, cheaper than the real logger).

Next to Barlow Twins (unless ``--no-lightly``): lightly's Barlow Twins (`BarlowTwinsProjectionHead` +
`lightly.loss.BarlowTwinsLoss`) on the same backbone architecture, projector widths, batch, optimiser (LARS)
and input.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from experiments.benchmarks.rows import BenchCase
from experiments.benchmarks.settings import SEGMENT, BenchSettings


def to_device(batch: Any, device: torch.device) -> Any:
    """Like Lightning's batch transfer: every tensor `.to(device, non_blocking=True)` (pinned on CUDA)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def first_images(batch: Any, n: int) -> Any:
    """`batch` cut to its first `n` images (every tensor's leading dim; the mmseg loader's packed regions by
    `MMSegTrainTransform.first`)."""
    if isinstance(batch, dict) and "region_image" in batch:
        from core.data.transforms import MMSegTrainTransform

        return MMSegTrainTransform.first(batch, n)
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, (list, tuple)):
        return type(batch)(first_images(b, n) for b in batch)
    if isinstance(batch, dict):
        return {k: first_images(v, n) for k, v in batch.items()}
    return batch


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Runner:
    """One thing to time: `next_batch()` (data, timed as 'wait') then `step(batch)` (train step)."""

    impl = "twinseg"

    def __init__(self, case: BenchCase, device: torch.device, precision: str, detail: str = ""):
        self.case, self.device, self.precision, self.detail = case, device, precision, detail
        self.task, self.mode, self.batch_size = case.task, case.mode, case.config.batch_size
        self.backbone = case.config.backbone
        self._synthetic: Any = None
        self._loader = None
        self._it: Optional[Iterator] = None
        self.step_index = 0

    def set_synthetic(self, batch: Any) -> None:
        self._synthetic = to_device(batch, self.device)

    def set_loader(self, loader) -> None:
        self._loader = loader

    def next_batch(self) -> Any:
        if self._loader is None:
            return self._synthetic
        try:
            b = next(self._it) if self._it is not None else None
        except StopIteration:
            b = None
        if b is None:  # new epoch (persistent workers: cheap)
            self._it = iter(self._loader)
            b = next(self._it)
        return to_device(b, self.device)

    def step(self, batch: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_per_image(self, batch: Any) -> Optional[int]:
        """Forward + backward FLOPs of one image of `batch` (all its views), FlopCounterMode on 2 images."""
        return None

    def close(self) -> None:
        """Stop the loader's (persistent) workers now, so they cannot compete with the next measurement."""
        for it in (self._it, getattr(self._loader, "_iterator", None)):
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
        self._it = None
        self._loader = None


class LightningStepRunner(Runner):
    """Drives a project LightningModule one optimisation step at a time (see the module docstring)."""

    def __init__(self, module, case: BenchCase, device: torch.device, precision: str, detail: str = ""):
        super().__init__(case, device, precision, detail)
        self.module = module.to(self.device)
        self.module.train()
        conf = self.module.configure_optimizers()
        self.opt = conf["optimizer"]
        self.sched = conf["lr_scheduler"]["scheduler"]

    def step(self, batch):
        i = self.step_index
        with autocast(self.device, self.precision):
            loss = self.module.training_step(batch, i)
        loss.backward()
        self.module.on_before_optimizer_step(self.opt)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.module.on_train_batch_end(loss, batch, i)
        self.step_index += 1
        return loss.detach()

    def flops_per_image(self, batch):
        from core.flops import training_flops_per_image

        return training_flops_per_image(self.module, first_images(batch, 2), 2)


class LightlyBarlowTwinsRunner(Runner):
    """lightly's Barlow Twins on the same backbone/widths/batch/optimiser as `BarlowTwinsMethod`."""

    impl = "lightly"

    def __init__(self, net: nn.Module, case: BenchCase, device: torch.device, precision: str, channels_last: bool,
                 gpu_augment: Optional[Sequence] = None, detail: str = ""):
        from lightly.loss import BarlowTwinsLoss as LightlyLoss
        from lightly.models.modules import BarlowTwinsProjectionHead

        from core.methods.optim import build_optimizer, warmup_cosine

        super().__init__(case, device, precision, detail)
        cfg = case.config
        self.net = net
        self.channels_last = channels_last and not net.is_transformer
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.head = BarlowTwinsProjectionHead(net.embed_dim, int(cfg.projector[0]), int(cfg.projector[-1]))
        self.model = nn.ModuleDict({"backbone": self.net, "head": self.head}).to(self.device).train()
        self.encoder = torch.compile(self.net) if cfg.compile else self.net
        self.criterion = LightlyLoss(lambda_param=cfg.barlow_twins.lambd)
        self.opt = build_optimizer(self.model, "lars", None, 1.5e-6, self.batch_size)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warmup_cosine(s, 1000, 10))
        self.gpu_aug = tuple(gpu_augment) if gpu_augment else ()

    def _prep(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.gpu_aug:
            with torch.no_grad():
                x = self.gpu_aug[min(i, len(self.gpu_aug) - 1)](x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _loss(self, batch, autocast_on: bool = True):
        views = batch[0] if isinstance(batch[0], (list, tuple)) else batch
        x1, x2 = self._prep(views[0], 0), self._prep(views[1], 1)
        with autocast(self.device, self.precision if autocast_on else "32"):
            z1 = self.head(self.encoder(x1))
            z2 = self.head(self.encoder(x2))
            return self.criterion(z1, z2)

    def flops_per_image(self, batch):
        from core.flops import count_flops

        saved = self.gpu_aug
        self.gpu_aug = ()  # data augmentation is not model FLOPs
        try:
            n = count_flops(lambda: self._loss(first_images(batch, 2), autocast_on=False).backward())
        finally:
            self.gpu_aug = saved
            self.opt.zero_grad(set_to_none=True)
        return n // 2

    def step(self, batch):
        loss = self._loss(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step_index += 1
        return loss.detach()


# --------------------------------------------------------------------------- builders
def keep_channels_last(module, s: BenchSettings) -> None:
    """The methods put CNNs in channels_last; with --no-channels-last undo it everywhere (A/B comparisons)."""
    if not s.channels_last and getattr(module, "channels_last", False):
        module.channels_last = False
        module.to(memory_format=torch.contiguous_format)


def synthetic_batch(case: BenchCase, sizes: Sequence[int], seed: int, num_classes: int = 0) -> Any:
    """Random normalised views at `sizes` (SSL), or (image, mask) with a few void pixels (segmentation)."""
    g = torch.Generator().manual_seed(seed)
    n = case.config.batch_size
    views = [torch.randn(n, 3, z, z, generator=g) for z in sizes]
    if case.stage != SEGMENT:
        return views
    y = torch.randint(0, num_classes, (n, sizes[0], sizes[0]), generator=g)
    y[:, :2] = 255  # a few void pixels, as VOC borders
    return views[0], y


def build_runners(case: BenchCase, s: BenchSettings, device: torch.device) -> list[Runner]:
    """The runners of one row (Barlow Twins: twinseg, then lightly's unless --no-lightly)."""
    build = _segment_runner if case.stage == SEGMENT else _ssl_runners
    return build(case, s, device)


def _ssl_runners(case: BenchCase, s: BenchSettings, device: torch.device) -> list[Runner]:
    from core.methods.registry import get_method
    from core.runs.pretrain import build_loaders, build_method

    cfg = case.config
    gpu_aug = bool(cfg.gpu_augment and device.type == "cuda")  # as PretrainRun.build decides it
    loaders = build_loaders(cfg, gpu_aug) if case.mode == "pipeline" else None
    sizes = get_method(cfg.method).views(cfg, gpu_aug).sizes
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, loaders)
    keep_channels_last(method, s)
    views = " + ".join(f"{sizes.count(z)}x{z}" for z in dict.fromkeys(sizes))
    extra = f", out {cfg.dino.out_dim}" if cfg.method == "dino" else ""
    proj = "-".join(map(str, cfg.projector))
    runners: list[Runner] = [LightningStepRunner(method, case, device, s.precision,
                                                 f"views {views}, projector {proj}{extra}, {cfg.optimizer}")]
    if s.lightly and cfg.method == "barlow_twins":
        from core.models.registry import create_backbone

        torch.manual_seed(cfg.seed)
        net = create_backbone(cfg.backbone, image_size=cfg.data.image_size)
        runners.append(LightlyBarlowTwinsRunner(net, case, device, s.precision, s.channels_last,
                                                loaders.batch_augment if loaders else None, f"lightly head {proj}, LARS"))
    for r in runners:
        if loaders is not None:
            r.set_loader(loaders.train)
        else:
            r.set_synthetic(synthetic_batch(case, sizes, cfg.seed))
    return runners


def _segment_runner(case: BenchCase, s: BenchSettings, device: torch.device) -> list[Runner]:
    from core.runs.segment import build_loaders, build_method, preflight

    cfg = case.config
    torch.manual_seed(cfg.seed)
    backbone = preflight(cfg, devices=1)  # as the run builds it (E1: dilated, stride 8)
    loaders = build_loaders(cfg)
    method = build_method(cfg, backbone, loaders)
    keep_channels_last(method, s)
    ev = f"{cfg.evaluation}: " if cfg.evaluation else ""
    fusion = f", fusion {cfg.fusion}" if cfg.fusion != "none" else ""
    r = LightningStepRunner(method, case, device, s.precision,
                            f"{ev}head {cfg.head}{fusion}, output stride {backbone.stride}, {cfg.loss}, AdamW")
    if case.mode == "pipeline":
        r.set_loader(loaders.train)
    else:
        r.set_synthetic(synthetic_batch(case, (cfg.data.image_size,), cfg.seed, int(loaders.num_classes)))
    return [r]
