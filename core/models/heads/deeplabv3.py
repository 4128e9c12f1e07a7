"""DeepLabV3 head: Atrous Spatial Pyramid Pooling (ASPP) + 3x3 conv + classifier.

Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", arXiv:1706.05587.
The module is torchvision's own `DeepLabHead` (ASPP with rates (12, 24, 36), image pooling branch,
3x3 conv-BN-ReLU, 1x1 classifier), used as is, on the backbone's dense map. Note: the image-pooling
branch has a BatchNorm on a 1x1 map, so training needs batches of at least 2.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from core.models.heads.base import SegHead


class DeepLabV3Head(SegHead):
    name = "deeplabv3"

    def __init__(self, in_channels: int, num_classes: int, extra_in_channels: int = 0,
                 atrous_rates: Sequence[int] = (12, 24, 36)):
        super().__init__()
        self.extra_in_channels = extra_in_channels
        self.num_classes = num_classes
        self.aspp_head = DeepLabHead(in_channels + extra_in_channels, num_classes, atrous_rates=tuple(atrous_rates))

    @classmethod
    def from_backbone(cls, backbone, num_classes, extra_in_channels=0, **kw):
        return cls(backbone.dense_dim, num_classes, extra_in_channels, **kw)

    def decode(self, dense: torch.Tensor, intermediates) -> torch.Tensor:
        return self.aspp_head(dense)
