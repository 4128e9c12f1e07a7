"""Stage 2: semantic segmentation as a Lightning module.

`SegmentationMethod(cfg, num_classes, class_names, ignore_index=255, backbone=None)` trains a
`Segmenter` (backbone + head + optional attention fusion, `core.models.segmenter.build_segmenter`)
with the loss of `cfg.loss` (`core.losses.segmentation.build_seg_loss`, void 255 ignored).

- auxiliary heads (``cfg.aux_heads``, SETR-PUP deep supervision, `core.models.heads.setr.SETRUPAuxHead`):
  training loss = criterion(main) + 0.4 x sum over auxiliary heads of criterion(aux), the same loss function
  (255 ignored) as mmseg's ``auxiliary_head`` ``loss_weight=0.4`` (`aux_loss_weight`); ``train/loss`` logs
  that total; validation and predictions use the main head only.
- frozen mode: the backbone is kept in eval mode and receives no gradient (its weights never change,
  BatchNorm statistics included); only the head (and fusion parameters) train.
- fine-tune mode: two AdamW parameter groups, backbone lr = lr x ``backbone_lr_scale``; norm and
  bias parameters carry no weight decay.
- schedule (``cfg.schedule``), per optimizer step over ``cfg.max_iters`` steps (iteration-based training, the
  Trainer's ``max_steps``) or, when none, every step of ``cfg.epochs``: ``cosine``: linear warmup (5% of the
  steps) then cosine (``core.methods.optim.warmup_cosine``); ``poly``: mmseg's PolyLR (open-mmlab/mmsegmentation
  configs/_base_/schedules/schedule_20k.py: ``PolyLR(eta_min=1e-4, power=0.9, begin=0, end=20000,
  by_epoch=False)`` with SGD lr 0.01), ``lr_t = eta_min + (lr - eta_min) (1 - t / T)^0.9`` per parameter
  group, eta_min = its base lr x ``cfg.min_lr_ratio`` (`poly_factor`), no warmup. The optimizer stays AdamW.
- training batches arrive as the loaders make them: uint8 images (B, 3, S, S) and uint8 masks (255 = void), or
  with the mmseg pipeline the uint8 source regions of each crop (`core.data.transforms.MMSegTrainTransform`),
  resized, cropped, flipped and padded on the device first (`core.data.gpu_augment.crops_from_regions`, which
  gives each crop's valid (h, w)); then `seg_batch_transform(cfg.train_pipeline)` (`core.data.gpu_augment.SegBatchTransform`) does the rest of the
  pipeline (mmseg: photometric distortion per sample; normalise; padded pixels 0) and the masks become int64
  there. Float batches (already normalised) are used as they are.
- CNN backbones run channels_last.
- validation scores at the ORIGINAL resolution, as mmseg does (open-mmlab/mmsegmentation
  mmseg/models/segmentors/base.py `postprocess_result`): the val loader gives each image resized
  keeping its aspect ratio (``cfg.eval_scale``, see core/data/module.py) and its ORIGINAL mask; per
  image, logits at the resized input (whole-image or sliding-window inference, ``cfg.inference``,
  `core.models.segmenter.slide_window`) -> padding cropped away -> bilinear resize
  (align_corners=False) to the original H x W -> argmax -> one `SegmentationMetrics` confusion matrix
  over the WHOLE val set (255 ignored). Images of the same resized and original size run together
  (a batch of mixed sizes is split into such groups; no image is padded by another's size, so a
  score does not depend on the batch it came in). Logs ``val/mIoU``, ``val/aAcc``, ``val/mAcc``
  (percent) and ``val/loss`` (mean over images, at the original resolution) once per epoch;
  `final_metrics()` returns the last computed dict ``{"aAcc", "mIoU", "mAcc", "IoU": [per class],
  "val_pixels"}``, ``val_pixels`` = the labelled (non-255) pixels scored, summed over the ranks like
  the confusion matrix (it is its total).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from core.config import SegmentConfig
from core.data import batch as B

WARMUP_FRACTION = 0.05  # of all optimizer steps, for the per-step linear warmup
POLY_POWER = 0.9  # mmseg schedule_20k / 40k / 80k / 160k PolyLR power


# --------------------------------------------------------------------------- helpers
def _train_batch(batch: Any, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(images, masks, valid (B, 2) or None) of a training batch: ``(x, y)`` or ``(x, y, valid)`` (mmseg
    pipeline: each crop's unpadded (h, w)) or a dict with "image", "mask" [, "valid"], or the mmseg loader's
    dict of source regions (`MMSegTrainTransform.collate`), turned into crops here on the batch's device
    (`core.data.gpu_augment.crops_from_regions`)."""
    if B.is_regions(batch):
        from core.data.gpu_augment import crops_from_regions

        return crops_from_regions(batch, ignore_index)
    return (*B.images_targets(batch), B.valid_sizes(batch))


def _val_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """(images, masks, [resized (h, w)], [original (H, W)]) of a val batch: a `seg_val_collate` dict or a
    plain ``(image, mask)`` pair (every image then fills the tensor, every mask too)."""
    x, y = B.images_targets(batch)
    b = int(x.shape[0])
    img_hw = batch.get(B.IMG_HW) if isinstance(batch, dict) else None
    ori_hw = batch.get(B.ORI_HW) if isinstance(batch, dict) else None
    img = [tuple(r) for r in img_hw.tolist()] if img_hw is not None else [tuple(x.shape[-2:])] * b
    ori = [tuple(r) for r in ori_hw.tolist()] if ori_hw is not None else [tuple(y.shape[-2:])] * b
    return x, y, img, ori


def resize_to_original(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (B, K, h, w) at the resized input -> (B, K, H, W) at the original size: bilinear,
    align_corners=False (mmseg `postprocess_result`: ``resize(i_seg_logits, size=img_meta['ori_shape'],
    mode='bilinear', align_corners=self.align_corners)``, False for every head used here)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks when torch.distributed runs (as SegmentationMetrics.synced_confusion does)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = t.detach().clone().to(dev)
    dist.all_reduce(out)
    return out.to(t.device)


def _lr_lambda(total: int, warmup: int):
    """Per-step multiplier: linear warmup then cosine to FINAL_LR_FACTOR (core.methods.optim)."""
    from core.methods.optim import warmup_cosine

    # warmup_cosine starts at 0 for step 0; shift by one so the first step already learns
    return lambda step: warmup_cosine(step + 1, total + 1, warmup)


def poly_factor(step: int, total: int, min_ratio: float = 0.0, power: float = POLY_POWER) -> float:
    """Multiplier of a group's base lr at optimizer step `step` (0-based) of mmseg's PolyLR (mmengine
    ``PolyLR``, closed form): ``min_ratio + (1 - min_ratio) (1 - min(step, total) / total)^power``; 1 at step 0,
    `min_ratio` from step `total` on."""
    total = max(int(total), 1)
    t = min(max(int(step), 0), total) / total
    return float(min_ratio) + (1.0 - float(min_ratio)) * (1.0 - t) ** float(power)


def total_steps(cfg: SegmentConfig, trainer=None) -> int:
    """Optimizer steps of the whole run: ``cfg.max_iters`` when set, else the Trainer's estimate (epochs)."""
    if cfg.max_iters is not None:
        return int(cfg.max_iters)
    return int(trainer.estimated_stepping_batches) if trainer is not None else 1


def build_lr_lambda(cfg: SegmentConfig, total: int):
    """The LambdaLR multiplier of ``cfg.schedule`` over `total` optimizer steps."""
    if cfg.schedule == "poly":
        ratio = float(cfg.min_lr_ratio)
        return lambda step: poly_factor(step, total, ratio)
    warmup = max(1, int(round(WARMUP_FRACTION * total)))
    return _lr_lambda(total, warmup)


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
        from core.models.heads.setr import AUX_LOSS_WEIGHT

        self.aux_loss_weight = AUX_LOSS_WEIGHT  # mmseg SETR auxiliary_head loss_weight
        self._final: Optional[dict] = None
        self._val_loss_sum, self._val_images = 0.0, 0  # val loss x images, images (reset per epoch)
        self.frozen = cfg.mode == "frozen"
        if self.frozen and not getattr(self.model, "frozen", False):
            self.model.freeze_backbone()
        self.channels_last = not bool(getattr(self.backbone, "is_transformer", False))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # optional torch.compile of the training forward (kept outside the module tree, so
        # checkpoints and state dicts keep their plain keys)
        self.__dict__["_train_forward"] = torch.compile(self.model) if cfg.compile else self.model
        from core.data.transforms import seg_batch_transform

        # the device half of the training pipeline (uint8 batch -> [photometric] -> normalised float)
        self.batch_transform = seg_batch_transform(cfg.train_pipeline)

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
        if x.dtype == torch.uint8:  # raw images (val loaders normalise): /255 and ImageNet normalisation
            from core.methods.knn_monitor import prepare_images

            x = prepare_images(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _size_multiple(self) -> Optional[int]:
        return getattr(self.backbone, "size_multiple", None) or getattr(self.backbone, "patch_size", None)

    def slide_window(self) -> tuple[int, int]:
        """(crop, stride) of sliding-window inference (`core.models.segmenter.slide_window`)."""
        from core.models.segmenter import slide_window

        return slide_window(self.cfg, self._size_multiple())

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) at the input's size with the configured inference mode (whole image padded
        to the patch multiple, or sliding windows)."""
        from core.models.segmenter import slide_inference, whole_inference

        x = self._prep(x)
        if self.cfg.inference == "slide":
            crop, stride = self.slide_window()
            return slide_inference(self.model, x, crop=crop, stride=stride, num_classes=self.num_classes,
                                   size_divisor=self._size_multiple())
        return whole_inference(self.model, x, size_divisor=self._size_multiple())

    @torch.no_grad()
    def predict_original(self, x: torch.Tensor, img_hw: tuple[int, int], ori_hw: tuple[int, int]) -> torch.Tensor:
        """Logits (B, K, H, W) at the ORIGINAL size for images that share their resized size `img_hw`
        (valid top-left region of `x`) and original size `ori_hw`: inference on the valid region, then
        `resize_to_original`."""
        h, w = img_hw
        return resize_to_original(self.predict_logits(x[..., :h, :w]), ori_hw)

    # ------------------------------------------------------------------ training
    def training_loss(self, logits: torch.Tensor, y: torch.Tensor, aux: Sequence[torch.Tensor] = ()):
        """(total, main): criterion(logits, y) + `aux_loss_weight` x sum of criterion(a, y) over `aux`
        (each resized to the mask first, like the main logits)."""
        def ce(out):
            if out.shape[-2:] != y.shape[-2:]:
                out = F.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=False)
            return self.criterion(out, y)

        main = ce(logits)
        loss = main
        for a in aux:
            loss = loss + self.aux_loss_weight * ce(a)
        return loss, main

    def train_inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float images, int64 masks) on the device from a training batch (`_train_batch`): uint8
        images go through `batch_transform` here, after the host-to-device copy."""
        x, y, valid = _train_batch(batch, self.ignore_index)
        if x.dtype == torch.uint8:
            x = self.batch_transform(x, valid)
        return x, y.long()

    def training_step(self, batch, batch_idx):
        x, y = self.train_inputs(batch)
        if self.model.aux_heads is not None:
            logits, aux = self._train_forward(self._prep(x), with_aux=True)
            loss, _ = self.training_loss(logits, y.long(), aux)
        else:
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
        self._val_loss_sum, self._val_images = 0.0, 0

    def validation_step(self, batch, batch_idx):
        x, y, img_hw, ori_hw = _val_batch(batch)
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(img_hw, ori_hw)):
            groups.setdefault(key, []).append(i)
        for (hw, ori), idx in groups.items():
            if len(idx) == x.shape[0]:  # one size in the batch (e.g. the generated square data)
                xs, ys = x, y
            else:
                sel = torch.as_tensor(idx, device=x.device)
                xs, ys = x.index_select(0, sel), y.index_select(0, sel.to(y.device))
            logits = self.predict_original(xs, hw, ori)
            ys = ys[..., : ori[0], : ori[1]].long()
            loss = self.criterion(logits.float(), ys)
            ok = torch.isfinite(loss.detach())  # an all-void group has no loss; no host sync here
            self._val_loss_sum = self._val_loss_sum + torch.where(ok, loss.detach().double() * len(idx), 0.0)
            self._val_images = self._val_images + ok.double() * len(idx)
            self.metrics.update(logits.argmax(1), ys)

    def on_validation_epoch_end(self) -> None:
        m = _sync_compute(self.metrics, self)
        vl = _all_reduce_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu()
                                          for v in (self._val_loss_sum, self._val_images)]))
        self._final = {"aAcc": float(m["aAcc"]), "mIoU": float(m["mIoU"]), "mAcc": float(m["mAcc"]),
                       "IoU": [float(v) for v in _as_list(m["IoU"])], "val_pixels": int(m["n_pixels"])}
        for k in ("mIoU", "aAcc", "mAcc"):
            self.log(f"val/{k}", self._final[k], prog_bar=(k == "mIoU"))
        if float(vl[1]) > 0:  # mean over the val images of each batch's loss (weighted by its images)
            self.log("val/loss", float(vl[0] / vl[1]))

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
        total = total_steps(self.cfg, self.trainer if self._trainer is not None else None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, build_lr_lambda(self.cfg, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


# --------------------------------------------------------------------------- helpers
def _as_list(v) -> list:
    if isinstance(v, torch.Tensor):
        return v.flatten().tolist()
    return list(v)


def _sync_compute(metrics, module: pl.LightningModule) -> dict:
    """compute() over every rank's confusion matrix (SegmentationMetrics all-reduces under DDP)."""
    return metrics.compute()
