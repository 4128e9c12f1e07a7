"""Semantic segmentation metrics from one confusion matrix over the whole evaluation set.

Definitions follow mmsegmentation (`mmseg.evaluation.metrics.IoUMetric`), in percent (0-100):
- aAcc  = trace(C) / sum(C)  (pixel accuracy over non-ignored pixels);
- IoU_c = TP_c / (TP_c + FP_c + FN_c); NaN for a class absent from both truth and prediction;
- Acc_c = TP_c / (TP_c + FN_c); NaN for a class absent from the truth;
- mIoU / mAcc = NaN-ignoring means of IoU / Acc.
C[t, p] counts pixels of true class t predicted as p; pixels whose target is `ignore_index` are
skipped. Accumulation uses `torch.bincount` on the device of the predictions (no Python loop).
Distributed: `compute()` all-reduces (sums) a copy of C when torch.distributed is initialised, so
every rank must call it; `merge(other)` adds another instance's counts.

`METRICS` declares what a segmentation run writes from the final validation (core/metrics/registry.py):
the dict of `compute()` plus `val_pixels` (`core.methods.segmentation.SegmentationMethod.final_metrics`).
"""

from __future__ import annotations

import math

import torch

from core.errors import DataError
from core.metrics.registry import EVAL, Column, MetricSpec
from core.stages import SEGMENT


class SegmentationMetrics:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: (B,H,W) labels or (B,K,H,W) logits/probabilities (argmax over K); target: (B,H,W)."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        k = self.num_classes
        target = target.to(pred.device).long()
        pred = pred.long()
        valid = target != self.ignore_index
        t, p = target[valid], pred[valid]
        if t.numel() and (t.min() < 0 or t.max() >= k):
            bad = int(t[(t < 0) | (t >= k)][0])
            raise DataError(
                f"mask value {bad} is outside the label space 0..{k - 1} (and is not the ignore index "
                f"{self.ignore_index}); fix the masks or the number of classes"
            )
        if p.numel() and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"predicted labels must lie in 0..{k - 1}")
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        if self.confusion.device != counts.device:
            self.confusion = self.confusion.to(counts.device)
        self.confusion += counts

    def merge(self, other: "SegmentationMetrics") -> "SegmentationMetrics":
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge metrics with different numbers of classes")
        self.confusion = self.confusion + other.confusion.to(self.confusion.device)
        return self

    def state_dict(self) -> dict:
        return {"confusion": self.confusion.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.confusion = state["confusion"].clone().long()

    def synced_confusion(self) -> torch.Tensor:
        conf = self.confusion.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            backend = torch.distributed.get_backend()
            dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            conf = conf.to(dev)
            torch.distributed.all_reduce(conf)
        return conf.cpu()

    def compute(self, sync: bool = True) -> dict:
        conf = (self.synced_confusion() if sync else self.confusion.cpu()).double()
        tp = conf.diag()
        gt = conf.sum(1)
        pr = conf.sum(0)
        total = conf.sum()
        union = gt + pr - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan) * 100
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan) * 100

        def nanmean(v: torch.Tensor) -> float:
            ok = ~torch.isnan(v)
            return float(v[ok].mean()) if ok.any() else math.nan

        return {
            "aAcc": float(tp.sum() / total * 100) if total > 0 else math.nan,
            "mIoU": nanmean(iou),
            "mAcc": nanmean(acc),
            "IoU": [float(v) for v in iou],
            "Acc": [float(v) for v in acc],
            "n_pixels": int(total),
        }


def _final(key: str, cast=None):
    def compute(final: dict):
        return final[key] if cast is None else cast(final[key])

    return compute


METRICS = (
    MetricSpec("mIoU", SEGMENT.name, "mean IoU (%) over the val set at the original mask resolution (confusion "
               "matrix, 255 ignored)", EVAL, compute=_final("mIoU"), order=10, headline=True, required=True,
               columns=(Column("segmentation", "mIoU", position=10, best=+1, matrix=True),)),
    MetricSpec("aAcc", SEGMENT.name, "pixel accuracy (%)", EVAL, compute=_final("aAcc"), order=11, headline=True,
               columns=(Column("segmentation", "aAcc", position=11, best=+1, matrix=True),)),
    MetricSpec("mAcc", SEGMENT.name, "mean class accuracy (%)", EVAL, compute=_final("mAcc"), order=12,
               headline=True, columns=(Column("segmentation", "mAcc", position=12, best=+1),)),
    MetricSpec("IoU", SEGMENT.name, "per-class IoU (%), null for a class absent from truth and prediction", EVAL,
               compute=_final("IoU"), order=13),
    MetricSpec("val_pixels", SEGMENT.name, "labelled (non-255) pixels scored: those of the ORIGINAL val masks (total "
               "of the confusion matrix, summed over DDP ranks; each val image on one rank)", EVAL,
               compute=_final("val_pixels", int), order=14),
)
