"""SegFormer-style all-MLP decoder over four block outputs.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
NeurIPS 2021, arXiv:2105.15203 (the seed study names it as the inspiration for its heads).
Each level -> per-level linear layer (1x1 conv) to a common width (`embed_dim`, mmseg's `channels`: 256;
`SegmentConfig.head_channels`) -> bilinear upsampling to the
finest grid of the four -> concatenation -> fuse 1x1 conv-BN-ReLU -> dropout -> 1x1 classifier.
Levels are the four stages of a hierarchical backbone (CNN, Swin) or four evenly spaced blocks of a
ViT (D//4*(i+1)-1), all on the patch grid.
"""

from __future__ import annotations


import torch
from torch import nn

from core.models.heads.base import FourLevelHead, conv_bn_relu, resize


class SegFormerHead(FourLevelHead):
    name = "segformer"
    width_arg = "embed_dim"  # SegmentConfig.head_channels; mmseg SegformerHead's `channels` (256)

    def __init__(self, in_channels: list[int], num_classes: int, levels: tuple[int, ...], extra_in_channels: int = 0,
                 embed_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.extra_in_channels = extra_in_channels
        self.num_classes = num_classes
        self.needs_intermediates = tuple(levels)
        dims = list(in_channels)
        dims[-1] += extra_in_channels
        self.linears = nn.ModuleList([nn.Conv2d(c, embed_dim, 1) for c in dims])
        self.fuse = conv_bn_relu(len(dims) * embed_dim, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def decode(self, dense, intermediates):
        if len(intermediates) != len(self.linears):
            raise ValueError(f"segformer expects {len(self.linears)} intermediate maps, got {len(intermediates)}")
        size = max((f.shape[-2:] for f in intermediates), key=lambda s: s[0] * s[1])
        feats = [resize(lin(f), size) for lin, f in zip(self.linears, intermediates)]
        return self.classifier(self.dropout(self.fuse(torch.cat(feats[::-1], dim=1))))
