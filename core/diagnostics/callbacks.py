"""Lightning callbacks for the diagnostics: attention maps, effective receptive fields,
cross-correlation heatmaps, segmentation predictions.

Common behaviour (`DiagnosticCallback`):
- runs at the end of every `every_n_epochs`-th training epoch (and always at the last epoch;
  optionally also before training with `at_start=True`), on global rank 0 only, never during the
  sanity check; nothing is added to the training hot path;
- fixed images chosen once: the `images` given to the constructor, or (when None) the first
  `num_images` of the first validation batch (the training batch when there is no val loop);
- PNGs go to `<out_dir or trainer.default_root_dir>/figures/<prefix>_epoch{NNN}.png` (NNN is the
  0-based epoch as in history.csv; `_init` for `at_start`);
- each PNG is also logged with `WandbLogger.log_image` when the trainer has a WandbLogger; a wandb
  failure (disabled, offline, no run) only warns once;
- figures are made under `torch.no_grad()` (ERF: gradients w.r.t. the input only) with the models
  in eval mode, every submodule's train/eval flag restored afterwards;
- a failing diagnostic warns and training continues (`strict=True` re-raises, for tests).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from core.diagnostics._common import eval_mode, module_device

__all__ = [
    "DiagnosticCallback",
    "AttentionMapCallback",
    "ReceptiveFieldCallback",
    "CrossCorrelationCallback",
    "PredictionCallback",
    "find_backbone",
]

_IMAGE_KEYS = ("image", "images", "img", "x", "inputs")
_TARGET_KEYS = ("mask", "masks", "target", "targets", "label", "labels", "y")


def _get_path(obj, dotted: str):
    for part in dotted.split("."):
        if obj is None or not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def find_backbone(pl_module, attr: str | None = None):
    """The backbone of a method: `attr` (dotted) when given, else `backbone`, `model.backbone`,
    `student.backbone`, `teacher.backbone`, `student`."""
    candidates = [attr] if attr else ["backbone", "model.backbone", "student.backbone", "teacher.backbone", "student"]
    for c in candidates:
        b = _get_path(pl_module, c)
        if isinstance(b, torch.nn.Module):
            return b
    return None


def _split_batch(batch):
    """(images (B,C,H,W) float, targets (B,H,W) int or None) from a dataloader batch."""
    if isinstance(batch, torch.Tensor):
        return (batch, None) if batch.ndim == 4 else (None, None)
    if isinstance(batch, Mapping):
        img = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        tgt = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if isinstance(img, (list, tuple)):
            img = img[0]
        return img, tgt if isinstance(tgt, torch.Tensor) and tgt.ndim == 3 else None
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], torch.Tensor):
            first = first[0]  # SSL views: (view1, view2)
        img = first if isinstance(first, torch.Tensor) and first.ndim == 4 else None
        tgt = None
        if len(batch) > 1 and isinstance(batch[1], torch.Tensor) and batch[1].ndim == 3:
            tgt = batch[1]
        return img, tgt
    return None, None


def _first_batch(trainer):
    sources = []
    vdl = getattr(trainer, "val_dataloaders", None)
    if vdl is not None:
        sources.append(vdl)
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and hasattr(dm, "val_dataloader"):
        sources.append(lambda: dm.val_dataloader())
    tdl = getattr(trainer, "train_dataloader", None)
    if tdl is not None:
        sources.append(tdl)
    for src in sources:
        try:
            loader = src() if callable(src) and not hasattr(src, "__iter__") else src
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            if loader is None:
                continue
            for batch in loader:
                img, tgt = _split_batch(batch)
                if img is not None:
                    return img, tgt
                break
        except Exception:
            continue
    return None, None


class DiagnosticCallback(Callback):
    """Base class: scheduling, fixed images, output folder, wandb logging, error policy."""

    prefix = "diagnostic"
    needs_targets = False

    def __init__(self, images=None, targets=None, *, every_n_epochs: int = 1, num_images: int = 4,
                 out_dir=None, at_start: bool = False, strict: bool = False, log_to_wandb: bool = True):
        super().__init__()
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1")
        self.every_n_epochs = int(every_n_epochs)
        self.num_images = int(num_images)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.at_start = bool(at_start)
        self.strict = bool(strict)
        self.log_to_wandb = bool(log_to_wandb)
        self._images = None if images is None else torch.as_tensor(images).detach().cpu()
        if self._images is not None and self._images.ndim == 3:
            self._images = self._images.unsqueeze(0)
        self._targets = None if targets is None else torch.as_tensor(targets).detach().cpu()
        if self._targets is not None and self._targets.ndim == 2:
            self._targets = self._targets.unsqueeze(0)
        self._warned: set[str] = set()
        self.written: list[Path] = []

    # ------------------------------------------------------------------ plumbing
    def figures_dir(self, trainer) -> Path:
        root = self.out_dir if self.out_dir is not None else Path(trainer.default_root_dir)
        d = root / "figures"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def figure_path(self, trainer, tag: str, suffix: str = ".png") -> Path:
        return self.figures_dir(trainer) / f"{self.prefix}_{tag}{suffix}"

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def is_due(self, trainer) -> bool:
        if getattr(trainer, "sanity_checking", False) or not getattr(trainer, "is_global_zero", True):
            return False
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def fixed_images(self, trainer):
        """(images, targets) on the CPU, chosen once."""
        if self._images is None:
            img, tgt = _first_batch(trainer)
            if img is None:
                return None, None
            self._images = img[: self.num_images].detach().cpu().float()
            if tgt is not None:
                self._targets = tgt[: self.num_images].detach().cpu()
        return self._images, self._targets

    def log_image(self, trainer, path: Path, caption: str | None = None) -> None:
        if not self.log_to_wandb:
            return
        try:
            from lightning.pytorch.loggers import WandbLogger
        except Exception:  # pragma: no cover
            return
        for logger in getattr(trainer, "loggers", []) or []:
            if not isinstance(logger, WandbLogger):
                continue
            try:
                kw = {"caption": [caption]} if caption else {}
                logger.log_image(key=f"diagnostics/{self.prefix}", images=[str(path)], step=trainer.global_step, **kw)
            except Exception as e:  # wandb disabled / offline / no run: never fail training
                self._warn_once("wandb", f"{type(self).__name__}: could not log {path.name} to wandb ({e})")

    def _run(self, trainer, pl_module, tag: str) -> None:
        try:
            paths = self.make_figures(trainer, pl_module, tag)
        except Exception as e:
            if self.strict:
                raise
            self._warn_once(f"fail-{type(e).__name__}", f"{type(self).__name__} skipped ({type(e).__name__}: {e})")
            return
        for p in paths or []:
            self.written.append(Path(p))
            self.log_image(trainer, Path(p), caption=f"{self.prefix} {tag}")

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start and getattr(trainer, "is_global_zero", True):
            self._run(trainer, pl_module, "init")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.is_due(trainer):
            self._run(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")

    def make_figures(self, trainer, pl_module, tag: str) -> list[Path]:  # pragma: no cover - abstract
        raise NotImplementedError


class AttentionMapCallback(DiagnosticCallback):
    """DINO-style CLS attention gallery of the method's ViT backbone (`attention_<tag>.png`).

    Args:
        images: (B, 3, H, W) fixed model-input images (None: first val batch, `num_images` of it).
        every_n_epochs: period in epochs. block: block index (-1 = last). threshold: attention mass
            kept by the contour masks (None: no masks). backbone_attr: dotted attribute of the
            backbone on the LightningModule (default: `backbone`, `model.backbone`, ...).
    A backbone without a CLS token (CNN, Swin) makes the callback warn once and do nothing.
    """

    prefix = "attention"

    def __init__(self, images=None, every_n_epochs: int = 1, block: int = -1, threshold: float | None = 0.6, *,
                 num_images: int = 4, backbone_attr: str | None = None, out_dir=None, at_start: bool = False,
                 show_mean: bool = True, strict: bool = False, log_to_wandb: bool = True):
        super().__init__(images, every_n_epochs=every_n_epochs, num_images=num_images, out_dir=out_dir,
                         at_start=at_start, strict=strict, log_to_wandb=log_to_wandb)
        self.block = int(block)
        self.threshold = threshold
        self.backbone_attr = backbone_attr
        self.show_mean = show_mean

    def make_figures(self, trainer, pl_module, tag):
        from core.diagnostics.attention import attention_figure

        backbone = find_backbone(pl_module, self.backbone_attr)
        if backbone is None:
            self._warn_once("nobb", "AttentionMapCallback: the LightningModule has no backbone; skipped")
            return []
        if not (getattr(backbone, "is_transformer", False) and getattr(backbone, "has_cls_token", False)):
            self._warn_once("nocls", f"AttentionMapCallback: backbone {getattr(backbone, 'name', '?')} has no CLS "
                                     "attention (CNN or Swin); skipped")
            return []
        images, _ = self.fixed_images(trainer)
        if images is None:
            self._warn_once("noimg", "AttentionMapCallback: no images (pass images= or give the trainer a val loader)")
            return []
        name = getattr(backbone, "name", type(backbone).__name__)
        title = f"{name} {tag}: CLS attention, block {self.block}"
        if self.threshold:
            title += f" (contours: {int(round(self.threshold * 100))}% mass)"
        return [attention_figure(backbone, images, self.figure_path(trainer, tag), block=self.block,
                                 threshold=self.threshold, title=title, show_mean=self.show_mean)]


class ReceptiveFieldCallback(DiagnosticCallback):
    """Effective receptive fields of several backbone layers (`erf_<tag>.png`).

    Args:
        images: fixed model-input images (None: first val batch). layers: None (all of
            `backbone.layers()`), a list of names from `backbone.layers()` / `named_modules()`, or a
            {name: module} dict. every_n_epochs: period. backbone_attr: as AttentionMapCallback.
        gamma: display exponent (0.5 brightens the tails, which a ViT's residual-dominated ERF hides
            on a linear scale); the arrays in `last_erfs` are unchanged.
    """

    prefix = "erf"

    def __init__(self, images=None, layers=None, every_n_epochs: int = 1, *, num_images: int = 4,
                 backbone_attr: str | None = None, gamma: float = 0.5, out_dir=None, at_start: bool = False,
                 strict: bool = False, log_to_wandb: bool = True):
        super().__init__(images, every_n_epochs=every_n_epochs, num_images=num_images, out_dir=out_dir,
                         at_start=at_start, strict=strict, log_to_wandb=log_to_wandb)
        self.layers = layers
        self.gamma = float(gamma)
        self.backbone_attr = backbone_attr
        self.last_erfs: dict = {}

    def make_figures(self, trainer, pl_module, tag):
        from core.diagnostics.receptive_field import erf_grid, plot_erf_grid

        backbone = find_backbone(pl_module, self.backbone_attr) or pl_module
        images, _ = self.fixed_images(trainer)
        if images is None:
            self._warn_once("noimg", "ReceptiveFieldCallback: no images (pass images= or give the trainer a val loader)")
            return []
        erfs = erf_grid(backbone, self.layers, images)
        self.last_erfs = erfs
        name = getattr(backbone, "name", type(backbone).__name__)
        g = f", display gamma {self.gamma:g}" if self.gamma != 1.0 else ""
        return [plot_erf_grid(erfs, self.figure_path(trainer, tag), image=images[0], gamma=self.gamma,
                              title=f"{name} {tag}: effective receptive fields (centre unit{g})")]


class CrossCorrelationCallback(DiagnosticCallback):
    """Barlow Twins cross-correlation matrix over training.

    At the end of each epoch reads the detached matrix of the last step (`pl_module.loss_fn.last_cc`,
    else `pl_module.last_cc`, `criterion.last_cc`, `loss.last_cc`), logs `cc_diag_mean` and
    `cc_offdiag_rms` (unless the method already logs them), and every `every_n_epochs` writes
    `crosscorr_<tag>.png` and keeps a (cropped) snapshot; at train end writes
    `crosscorr_evolution.png` (and `crosscorr_evolution.gif` when `gif=True`).

    Args: every_n_epochs, max_dims (block shown, default 64), gif, log_scalars, out_dir.
    """

    prefix = "crosscorr"

    def __init__(self, every_n_epochs: int = 1, *, max_dims: int | None = 64, gif: bool = True,
                 log_scalars: bool = True, max_snapshots: int | None = 8, out_dir=None, strict: bool = False,
                 log_to_wandb: bool = True):
        super().__init__(None, every_n_epochs=every_n_epochs, out_dir=out_dir, strict=strict,
                         log_to_wandb=log_to_wandb)
        self.max_dims = max_dims
        self.gif = gif
        self.log_scalars = log_scalars
        self.max_snapshots = max_snapshots
        self.snapshots: list[tuple[int, torch.Tensor]] = []
        self.snapshot_stats: list[dict] = []
        self._logged_names: set[str] = set()

    @staticmethod
    def find_cc(pl_module):
        for attr in ("loss_fn.last_cc", "last_cc", "criterion.last_cc", "loss.last_cc"):
            c = _get_path(pl_module, attr)
            if isinstance(c, torch.Tensor):
                return c
        return None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        c = self.find_cc(pl_module)
        if c is None:
            self._warn_once("nocc", "CrossCorrelationCallback: no last_cc on the module or its loss; skipped")
            return
        from core.diagnostics.cross_correlation import cc_stats

        stats = cc_stats(c)
        if self.log_scalars:
            for k, v in stats.items():
                # Do not overwrite a value the method logs itself under the same name.
                if k in trainer.callback_metrics and k not in self._logged_names:
                    continue
                self._logged_names.add(k)
                pl_module.log(k, float(v), on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)
        if self.is_due(trainer):
            c = c.detach().float().cpu()
            k = c.shape[0] if not self.max_dims else min(c.shape[0], int(self.max_dims))
            self.snapshots.append((trainer.current_epoch, c[:k, :k].clone()))
            self.snapshot_stats.append(stats)
            self._run(trainer, pl_module, f"epoch{trainer.current_epoch:03d}", cc=c)

    def _run(self, trainer, pl_module, tag, cc=None):  # type: ignore[override]
        self._cc = cc
        try:
            super()._run(trainer, pl_module, tag)
        finally:
            self._cc = None

    def make_figures(self, trainer, pl_module, tag):
        from core.diagnostics.cross_correlation import plot_cross_correlation

        if self._cc is None:
            return []
        return [plot_cross_correlation(self._cc, self.figure_path(trainer, tag),
                                       title=f"cross-correlation, {tag}", max_dims=self.max_dims)]

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.snapshots or not getattr(trainer, "is_global_zero", True):
            return
        from core.diagnostics.cross_correlation import plot_cc_evolution

        try:
            path = self.figure_path(trainer, "evolution")
            plot_cc_evolution(self.snapshots, path, max_dims=self.max_dims, max_snapshots=self.max_snapshots,
                              stats=self.snapshot_stats, title="cross-correlation over training",
                              gif_path=self.figure_path(trainer, "evolution", ".gif") if self.gif else None)
        except Exception as e:
            if self.strict:
                raise
            self._warn_once("evo", f"CrossCorrelationCallback: evolution figure skipped ({e})")
            return
        self.written.append(path)
        self.log_image(trainer, path, caption="cross-correlation evolution")


class PredictionCallback(DiagnosticCallback):
    """Image | truth | prediction rows in the VOC palette (`predictions_<tag>.png`).

    Calls `pl_module.<model_attr>` (default `model`, a Segmenter returning (B, K, H, W) logits; the
    LightningModule itself when absent) in eval mode under no_grad.

    Args:
        images, targets: fixed (B, 3, H, W) images and (B, H, W) masks (both None: first val batch).
        every_n_epochs, num_images, palette (default VOC_PALETTE), class_names (default VOC_CLASSES),
        ignore_index (255), model_attr, out_dir.
    """

    prefix = "predictions"

    def __init__(self, images=None, targets=None, every_n_epochs: int = 1, *, num_images: int = 4, palette=None,
                 class_names: Sequence[str] | None = None, ignore_index: int = 255, model_attr: str = "model",
                 out_dir=None, at_start: bool = False, strict: bool = False, log_to_wandb: bool = True):
        if (images is None) != (targets is None):
            raise ValueError("PredictionCallback needs both images and targets, or neither (first val batch)")
        super().__init__(images, targets, every_n_epochs=every_n_epochs, num_images=num_images, out_dir=out_dir,
                         at_start=at_start, strict=strict, log_to_wandb=log_to_wandb)
        self.palette = palette
        self.class_names = class_names
        self.ignore_index = ignore_index
        self.model_attr = model_attr

    def make_figures(self, trainer, pl_module, tag):
        from core.diagnostics.predictions import plot_predictions

        images, targets = self.fixed_images(trainer)
        if images is None or targets is None:
            self._warn_once("noimg", "PredictionCallback: no (image, mask) batch (pass images= and targets=)")
            return []
        model = _get_path(pl_module, self.model_attr) if self.model_attr else None
        if not isinstance(model, torch.nn.Module):
            model = pl_module
        with torch.no_grad(), eval_mode(model):
            logits = model(images.to(module_device(model)))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = logits.detach().float().cpu()
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits, size=tuple(targets.shape[-2:]), mode="bilinear", align_corners=False)
        preds = logits.argmax(1)
        return [plot_predictions(images, targets, preds, self.palette, self.figure_path(trainer, tag),
                                 class_names=self.class_names, ignore_index=self.ignore_index,
                                 title=f"predictions, {tag}")]
