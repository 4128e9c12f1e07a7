"""Stage 2: semantic segmentation as a Lightning module.

`SegmentationMethod(cfg, num_classes, class_names, ignore_index=255, backbone=None)` trains a
`Segmenter` (backbone + head + optional attention fusion, `core.models.segmenter.build_segmenter`)
with the loss of `cfg.loss` (`core.losses.segmentation.build_seg_loss`, void 255 ignored).

- frozen mode: the backbone is kept in eval mode and receives no gradient (its weights never change,
  BatchNorm statistics included); only the head (and fusion parameters) train.
- fine-tune mode: two AdamW parameter groups, backbone lr = lr x ``backbone_lr_scale``; norm and
  bias parameters carry no weight decay.
- schedule: per-step linear warmup (5% of the steps) then cosine (``core.methods.optim.warmup_cosine``).
- CNN backbones run channels_last.
- validation accumulates one `SegmentationMetrics` confusion matrix over the WHOLE val set with
  whole-image or sliding-window inference (``cfg.inference``, ``slide_crop``, ``slide_stride``) and
  logs ``val/mIoU``, ``val/aAcc``, ``val/mAcc`` (percent) once per epoch; `final_metrics()` returns
  the last computed dict ``{"aAcc", "mIoU", "mAcc", "IoU": [per class]}``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from core.config import SegmentConfig

WARMUP_FRACTION = 0.05  # of all optimizer steps, for the per-step linear warmup


# --------------------------------------------------------------------------- helpers
def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["image"], batch["mask"]
    return batch[0], batch[1]


def _lr_lambda(total: int, warmup: int):
    """Per-step multiplier: linear warmup then cosine to FINAL_LR_FACTOR (core.methods.optim)."""
    from core.methods.optim import warmup_cosine

    # warmup_cosine starts at 0 for step 0; shift by one so the first step already learns
    return lambda step: warmup_cosine(step + 1, total + 1, warmup)


# --------------------------------------------------------------------------- module
class SegmentationMethod(pl.LightningModule):
    def __init__(self, cfg: SegmentConfig, num_classes: int, class_names: Sequence[str],
                 ignore_index: int = 255, backbone: Optional[nn.Module] = None) -> None:
        super().__init__()
        from core.losses.segmentation import build_seg_loss
        from core.metrics.segmentation import SegmentationMetrics
        from core.models.segmenter import build_segmenter

        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.ignore_index = int(ignore_index)
        self.save_hyperparameters({"config": cfg.to_dict(), "num_classes": self.num_classes,
                                   "class_names": self.class_names, "ignore_index": self.ignore_index})
        self.model = build_segmenter(cfg, self.num_classes, backbone=backbone)
        self.criterion = build_seg_loss(cfg.loss, self.num_classes, ignore_index=self.ignore_index)
        self.metrics = SegmentationMetrics(self.num_classes, ignore_index=self.ignore_index)
        self._final: Optional[dict] = None
        self.frozen = cfg.mode == "frozen"
        if self.frozen and not getattr(self.model, "frozen", False):
            self.model.freeze_backbone()
        self.channels_last = not bool(getattr(self.backbone, "is_transformer", False))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # optional torch.compile of the training forward (kept outside the module tree, so
        # checkpoints and state dicts keep their plain keys)
        self.__dict__["_train_forward"] = torch.compile(self.model) if cfg.compile else self.model

    # ------------------------------------------------------------------ structure
    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def train(self, mode: bool = True):  # keep a frozen backbone in eval (BatchNorm stats fixed)
        super().train(mode)
        if getattr(self, "frozen", False):
            self.model.backbone.eval()
        return self

    # ------------------------------------------------------------------ forward / inference
    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # loaders normally normalise; tolerate raw images
            x = x.float() / 255.0
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _size_multiple(self) -> Optional[int]:
        return getattr(self.backbone, "size_multiple", None) or getattr(self.backbone, "patch_size", None)

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) with the configured inference mode (whole image or sliding window)."""
        from core.models.segmenter import slide_inference, whole_inference

        x = self._prep(x)
        if self.cfg.inference == "slide":
            return slide_inference(self.model, x, crop=self.cfg.slide_crop, stride=self.cfg.slide_stride,
                                   num_classes=self.num_classes)
        return whole_inference(self.model, x, size_divisor=self._size_multiple())

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, y = _split_batch(batch)
        logits = self._train_forward(self._prep(x))
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = self.criterion(logits, y.long())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        alpha = getattr(self.model.fusion, "alpha", None)
        if torch.is_tensor(alpha):  # fusion 2: the learned mixing weight a, per epoch in history.csv
            self.log("fusion/alpha", alpha.detach().float(), on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.metrics.reset()

    def validation_step(self, batch, batch_idx):
        x, y = _split_batch(batch)
        logits = self.predict_logits(x)
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        y = y.long()
        loss = self.criterion(logits.float(), y)
        self.log("val/loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.metrics.update(logits.argmax(1), y)

    def on_validation_epoch_end(self) -> None:
        m = _sync_compute(self.metrics, self)
        self._final = {"aAcc": float(m["aAcc"]), "mIoU": float(m["mIoU"]), "mAcc": float(m["mAcc"]),
                       "IoU": [float(v) for v in _as_list(m["IoU"])]}
        for k in ("mIoU", "aAcc", "mAcc"):
            self.log(f"val/{k}", self._final[k], prog_bar=(k == "mIoU"))

    def final_metrics(self) -> Optional[dict]:
        """The metrics of the last validation pass over the whole val set (None before any)."""
        return None if self._final is None else dict(self._final, IoU=list(self._final["IoU"]))

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict]:
        """head (+fusion) at lr, backbone at lr x backbone_lr_scale (none when frozen); no decay on
        biases / norms / scalars."""
        cfg = self.cfg
        return self.model.param_groups(cfg.lr, backbone_lr_scale=cfg.backbone_lr_scale, weight_decay=cfg.weight_decay,
                                       gate_lr=cfg.fusion_alpha_lr)

    def configure_optimizers(self):
        groups = self.param_groups()
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        warmup = max(1, int(round(WARMUP_FRACTION * total)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


# --------------------------------------------------------------------------- helpers
def _as_list(v) -> list:
    if isinstance(v, torch.Tensor):
        return v.flatten().tolist()
    return list(v)


def _sync_compute(metrics, module: pl.LightningModule) -> dict:
    """compute() over every rank's confusion matrix (SegmentationMetrics all-reduces under DDP)."""
    return metrics.compute()
