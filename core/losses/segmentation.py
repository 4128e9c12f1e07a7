"""Segmentation losses; pixels labelled `ignore_index` (255 = VOC void) never contribute.

`build_seg_loss(name, num_classes, ignore_index=255)` -> module `loss(logits (B,K,H,W), target (B,H,W))`:
- ce:    `F.cross_entropy(..., ignore_index)` (mean over valid pixels);
- dice:  soft Dice (Milletari et al., V-Net, arXiv:1606.04797) on softmax probabilities over the
         valid pixels, 1 - mean Dice over the classes present in the batch's target;
- focal: softmax focal loss (Lin et al., "Focal Loss for Dense Object Detection", arXiv:1708.02002),
         gamma 2, mean over valid pixels.
A batch whose pixels are all ignored gives 0 (with a graph), never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError

SEG_LOSSES = ("ce", "dice", "focal")


def _zero(logits: torch.Tensor) -> torch.Tensor:
    return logits.sum() * 0.0


class CrossEntropySegLoss(nn.Module):
    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def forward(self, logits, target):
        # Sum / count instead of mean: no host-device sync on the hot path, and an all-ignored
        # batch gives 0 (not NaN) without a data-dependent branch.
        target = target.long()
        total = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        return total / (target != self.ignore_index).sum().clamp_min(1)


class DiceSegLoss(nn.Module):
    def __init__(self, num_classes: int, ignore_index: int = 255, smooth: float = 1.0):
        super().__init__()
        self.num_classes, self.ignore_index, self.smooth = num_classes, ignore_index, smooth

    def forward(self, logits, target):
        target = target.long()
        valid = target != self.ignore_index  # (B,H,W)
        if not valid.any():
            return _zero(logits)
        k = logits.shape[1]
        probs = logits.float().softmax(dim=1).permute(0, 2, 3, 1)[valid]  # (N, K)
        onehot = F.one_hot(target[valid], k).to(probs.dtype)  # (N, K)
        inter = (probs * onehot).sum(0)
        denom = probs.sum(0) + onehot.sum(0)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        present = onehot.sum(0) > 0
        return 1.0 - dice[present].mean()


class FocalSegLoss(nn.Module):
    def __init__(self, num_classes: int, ignore_index: int = 255, gamma: float = 2.0):
        super().__init__()
        self.num_classes, self.ignore_index, self.gamma = num_classes, ignore_index, gamma

    def forward(self, logits, target):
        target = target.long()
        valid = target != self.ignore_index
        if not valid.any():
            return _zero(logits)
        logp = logits.float().log_softmax(dim=1).permute(0, 2, 3, 1)[valid]  # (N, K)
        logpt = logp.gather(1, target[valid].unsqueeze(1)).squeeze(1)
        pt = logpt.exp()
        return (-((1 - pt) ** self.gamma) * logpt).mean()


def build_seg_loss(name: str, num_classes: int, ignore_index: int = 255) -> nn.Module:
    losses = {"ce": CrossEntropySegLoss, "dice": DiceSegLoss, "focal": FocalSegLoss}
    if name not in losses:
        raise ConfigError(f"loss={name!r} is not known; choose one of: {', '.join(SEG_LOSSES)}")
    return losses[name](num_classes, ignore_index=ignore_index)
