"""Linear head: BatchNorm + 1x1 convolution on the dense patch features.

The "linear" decoder of Segmenter (Strudel et al., "Segmenter: Transformer for Semantic
Segmentation", ICCV 2021, arXiv:2105.05633) and the linear evaluation of frozen features used by
DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021,
arXiv:2104.14294): a per-patch linear classifier, then bilinear upsampling to the input size.
"""

from __future__ import annotations

import torch
from torch import nn

from core.models.heads.base import SegHead


class LinearHead(SegHead):
    name = "linear"

    def __init__(self, in_channels: int, num_classes: int, extra_in_channels: int = 0):
        super().__init__()
        c = in_channels + extra_in_channels
        self.extra_in_channels = extra_in_channels
        self.num_classes = num_classes
        self.norm = nn.BatchNorm2d(c)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    @classmethod
    def from_backbone(cls, backbone, num_classes, extra_in_channels=0, **kw):
        return cls(backbone.dense_dim, num_classes, extra_in_channels, **kw)

    def decode(self, dense: torch.Tensor, intermediates) -> torch.Tensor:
        return self.classifier(self.norm(dense))
