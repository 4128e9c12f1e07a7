"""SETR decoders: naive, progressive upsampling (PUP) and multi-level feature aggregation (MLA).

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers", CVPR 2021, arXiv:2012.15840 (the seed study adapted setr-pytorch).

- `SETRNaiveHead`: 1x1 conv-BN-ReLU, 1x1 conv to classes, bilinear upsampling to the input size.
- `SETRPUPHead`: log2(stride) stages of [3x3 conv-BN-ReLU, x2 bilinear upsampling] (4 stages for a
  /16 ViT, 3 for /8, 5 for a /32 CNN), then a 1x1 classifier: its native output is already at the
  input resolution. Refuses a stride that is not a power of two.
- `SETRMLAHead`: four block outputs (ViT: blocks D//4*(i+1)-1, e.g. 3/6/9/12-th of 12; CNN/Swin:
  their four stages) -> per-level LayerNorm over the channels of each token (`norms`, eps 1e-6) ->
  per-stream 1x1 conv-BN-ReLU to a common width (`proj`), resized to a common grid (the finest of the
  four; all equal for a ViT) -> top-down aggregation (each stream adds the deeper aggregate) ->
  per-stream 3x3 conv-BN-ReLU on the aggregate (`fuse`) -> per-stream two 3x3 conv-BN-ReLU to
  `mla_channels` (`streams`), concatenation, 1x1 classifier. This is SETR section 3.3 (per stream a
  reshape-conv, a top-down aggregation by element-wise addition after it with an additional 3x3 conv
  on the sum, then conv-conv and x4 upsampling, the streams concatenated) as mmsegmentation
  (github.com/open-mmlab/mmsegmentation) implements it: `mmseg/models/necks/mla_neck.py` (`MLANeck`:
  one LayerNorm per input level on the tokens, then `MLAModule`: `channel_proj` 1x1, top-down sum,
  `feat_extract` 3x3; `configs/_base_/models/setr_mla.py`: BN + ReLU in both) and
  `mmseg/models/decode_heads/setr_mla_head.py` (two 3x3 ConvModules per level, concat, `cls_seg`).
  The x4 upsampling of each stream is left to the segmenter's final resize (the streams share one
  grid here).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.models.heads.base import FourLevelHead, SegHead, conv_bn_relu, resize


class SETRNaiveHead(SegHead):
    name = "setr_naive"

    def __init__(self, in_channels: int, num_classes: int, extra_in_channels: int = 0, channels: int = 256):
        super().__init__()
        self.extra_in_channels = extra_in_channels
        self.num_classes = num_classes
        self.block = conv_bn_relu(in_channels + extra_in_channels, channels, 1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @classmethod
    def from_backbone(cls, backbone, num_classes, extra_in_channels=0, **kw):
        return cls(backbone.dense_dim, num_classes, extra_in_channels, **kw)

    def decode(self, dense, intermediates):
        return self.classifier(self.block(dense))


class SETRPUPHead(SegHead):
    name = "setr_pup"

    def __init__(self, in_channels: int, num_classes: int, stride: int, extra_in_channels: int = 0,
                 channels: int = 256):
        super().__init__()
        self.extra_in_channels = extra_in_channels
        self.num_classes = num_classes
        n = int(round(math.log2(stride))) if stride >= 1 else 0
        self.num_stages = n
        stages = []
        c = in_channels + extra_in_channels
        for _ in range(n):
            stages.append(conv_bn_relu(c, channels, 3))
            c = channels
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    @classmethod
    def refuse(cls, backbone) -> Optional[ConfigError]:
        s = int(backbone.stride)
        if s < 1 or (s & (s - 1)) != 0:
            return ConfigError(
                f"head='setr_pup' upsamples by x2 stages and needs a power-of-two stride, but backbone "
                f"{backbone.name} has stride {s}; choose head=setr_naive, linear or deeplabv3"
            )
        return None

    @classmethod
    def from_backbone(cls, backbone, num_classes, extra_in_channels=0, **kw):
        return cls(backbone.dense_dim, num_classes, int(backbone.stride), extra_in_channels, **kw)

    def decode(self, dense, intermediates):
        x = dense
        for stage in self.stages:
            x = stage(x)
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.classifier(x)


class SETRMLAHead(FourLevelHead):
    name = "setr_mla"

    def __init__(self, in_channels: list[int], num_classes: int, levels: tuple[int, ...], extra_in_channels: int = 0,
                 channels: int = 256, mla_channels: int = 128):
        super().__init__()
        if len(in_channels) != 4:
            raise ConfigError(f"head='setr_mla' needs exactly 4 input levels, got {len(in_channels)}")
        self.extra_in_channels = extra_in_channels
        self.num_classes = num_classes
        self.needs_intermediates = tuple(levels)
        dims = list(in_channels)
        dims[-1] += extra_in_channels
        # mmseg MLANeck.norm: LayerNorm(eps=1e-6) per level over each token's channels
        self.norms = nn.ModuleList([nn.LayerNorm(c, eps=1e-6) for c in dims])
        self.proj = nn.ModuleList([conv_bn_relu(c, channels, 1) for c in dims])  # MLAModule.channel_proj
        self.fuse = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in dims])  # MLAModule.feat_extract
        self.streams = nn.ModuleList(
            [nn.Sequential(conv_bn_relu(channels, mla_channels, 3), conv_bn_relu(mla_channels, mla_channels, 3))
             for _ in dims]
        )
        self.classifier = nn.Conv2d(4 * mla_channels, num_classes, 1)

    @staticmethod
    def _token_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm over the channels of every position of a (B, C, h, w) map (the tokens)."""
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def decode(self, dense, intermediates):
        if len(intermediates) != 4:
            raise ValueError(f"setr_mla expects 4 intermediate maps, got {len(intermediates)}")
        size = max((f.shape[-2:] for f in intermediates), key=lambda s: s[0] * s[1])
        proj = [resize(p(self._token_norm(n, f)), size) for n, p, f in zip(self.norms, self.proj, intermediates)]
        agg = [None] * 4
        agg[3] = proj[3]
        for i in (2, 1, 0):  # top-down: each shallower stream adds the deeper aggregate
            agg[i] = proj[i] + agg[i + 1]
        outs = [s(f(a)) for f, s, a in zip(self.fuse, self.streams, agg)]
        return self.classifier(torch.cat(outs, dim=1))
