"""k-NN monitor of a pretraining run: pooled features of a frozen backbone on labelled images.

Labels are image labels (the largest non-background class of the mask, see
`core.data.voc.image_label_from_mask`). Loaders yield `(images, labels)`; a batch whose second item
is a mask (B, H, W) is converted to image labels on the fly; a dict batch with "image"/"label" keys
is accepted too.

- `extract_features(backbone, loader, device) -> (feats (N, D) float32 CPU, labels (N,) int64)`.
- `KNNMonitorMixin`: validation hooks for a LightningModule whose val dataloaders are
  `[knn_train, knn_val]` (order fixed): features of every rank are gathered, `val/knn_acc` logged.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from core.data.batch import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD, images_targets


def _labels_from_masks(masks: Tensor) -> Tensor:
    try:
        from core.data.voc import image_label_from_mask
    except ImportError:  # pragma: no cover - data module absent
        image_label_from_mask = None
    out = []
    for m in masks:
        if image_label_from_mask is not None:
            out.append(int(image_label_from_mask(m)))
        else:
            v = m[(m != 0) & (m != 255)]
            out.append(int(torch.bincount(v.flatten().long()).argmax()) if v.numel() else 0)
    return torch.tensor(out, dtype=torch.long)


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(images float, labels (B,)) from a k-NN loader batch."""
    x, y = images_targets(batch)
    y = torch.as_tensor(y)
    if y.ndim >= 2:
        y = _labels_from_masks(y)
    return x, y.long().flatten()


def prepare_images(x: Tensor, device: Optional[torch.device] = None) -> Tensor:
    """uint8 images -> float normalised with ImageNet statistics; float images are passed through."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x.float() / 255.0 - mean) / std
    return x


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable, device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """Pooled embeddings of `backbone` in eval mode (restored afterwards), no grad."""
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            x, y = split_batch(batch)
            f = backbone(prepare_images(x, device))
            feats.append(f.float().cpu())
            labels.append(y.cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def knn_eval(backbone: nn.Module, train_loader: Iterable, val_loader: Iterable, device: Any = "cpu", k: int = 20,
             T: float = 0.07, linear_probe: bool = False) -> dict[str, float]:
    """{"knn_acc": ..., ["linear_probe_acc": ...]} of `backbone` on (train -> val) loaders."""
    from core.metrics.knn import knn_accuracy, linear_probe_accuracy

    ftr, ytr = extract_features(backbone, train_loader, device)
    fte, yte = extract_features(backbone, val_loader, device)
    out = {"knn_acc": knn_accuracy(ftr, ytr, fte, yte, k=k, T=T)}
    if linear_probe:
        out["linear_probe_acc"] = linear_probe_accuracy(ftr, ytr, fte, yte)
    return out


class KNNMonitorMixin:
    """Mixin for a LightningModule with `self.knn_backbone()` (the backbone to evaluate) and
    `self.knn_k`. Validation dataloaders: index 0 = k-NN train (memory bank), 1 = k-NN val."""

    knn_k: int = 20
    knn_T: float = 0.07

    def knn_backbone(self) -> nn.Module:  # overridden
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self._knn_store: dict[int, list[tuple[Tensor, Tensor]]] = {0: [], 1: []}

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = split_batch(batch)
        with torch.no_grad():
            f = self.knn_backbone()(prepare_images(x, self.device)).float()
        self._knn_store.setdefault(dataloader_idx, []).append((f.detach(), y.to(f.device)))
        return None

    def _gathered(self, idx: int) -> tuple[Tensor, Tensor]:
        items = self._knn_store.get(idx, [])
        if not items:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        f = torch.cat([a for a, _ in items])
        y = torch.cat([b for _, b in items])
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            f = self.all_gather(f).flatten(0, 1)
            y = self.all_gather(y).flatten(0, 1)
        return f.cpu(), y.cpu()

    def on_validation_epoch_end(self) -> None:
        from core.metrics.knn import knn_accuracy

        store = getattr(self, "_knn_store", {})
        if not store.get(0) or not store.get(1):
            return
        ftr, ytr = self._gathered(0)
        fte, yte = self._gathered(1)
        acc = knn_accuracy(ftr, ytr, fte, yte, k=self.knn_k, T=self.knn_T)
        self.last_knn_acc = acc
        self.log("val/knn_acc", acc, on_epoch=True, prog_bar=True, sync_dist=False, add_dataloader_idx=False)
        self._knn_store = {0: [], 1: []}
