"""torchvision ResNet backbones: `resnet50`, `resnet18`, `resnet_tiny` (CPU).

- pooled: global average pool of layer4 (the torchvision `fc` is replaced by Identity, so the
  wrapped model's state dict is a plain torchvision state dict without `fc.*`, exactly the format of
  the official Barlow Twins / DINO ResNet-50 files).
- dense: layer4 output. Its stride is 32 by default. ``output_stride=16`` or ``8`` (ResNet-50 only,
  Bottleneck blocks) uses torchvision's ``replace_stride_with_dilation`` for segmentation heads that
  want finer maps (DeepLabV3 uses 8 or 16); the weights are the same for every output stride.
  torchvision's BasicBlock (resnet18, resnet_tiny) does not support dilation, so these stay at 32.
- intermediates: outputs of layer1..layer4 (block indices 0..3, negative allowed).
- `resnet_tiny`: torchvision-compatible ResNet with BasicBlock, layers [1, 1, 1, 1] and half width
  (32, 64, 128, 256) and a small-image stem (3x3 stride-1 conv, no max-pool, as CIFAR ResNets):
  output stride 8, so a 64 px image still gives an 8x8 dense map; for CPU tests and the smoke grid.
Channels-last friendly: call ``backbone.to(memory_format=torch.channels_last)`` and feed
channels-last input; nothing here forces a contiguous layout.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from core.errors import ConfigError
from core.models.backbones.base import Backbone, BackboneOutput


class NarrowResNet(ResNet):
    """torchvision `ResNet` with configurable stage widths (same key names as torchvision)."""

    def __init__(self, block, layers, widths=(32, 64, 128, 256), num_classes=1000, small_stem=False):
        nn.Module.__init__(self)
        norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        if small_stem:  # stride 1 stem for small images: total stride 8 instead of 32
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


_DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


class ResNetBackbone(Backbone):
    is_transformer = False
    has_cls_token = False
    num_heads = 0
    num_blocks = 4
    patch_size = None
    size_multiple = None
    min_size = 32
    library_attr = "tv_model"
    family = "resnet"

    def __init__(self, name: str, arch: str, image_size: int = 224, output_stride: int = 32,
                 zero_init_residual: bool = False):
        super().__init__()
        if output_stride not in _DILATION:
            raise ConfigError(f"output_stride={output_stride} for {name} is not supported; use 8, 16 or 32")
        self.name = name
        self.library_arch = arch
        if arch == "resnet50":
            block, layers, widths = Bottleneck, [3, 4, 6, 3], (64, 128, 256, 512)
        elif arch == "resnet18":
            block, layers, widths = BasicBlock, [2, 2, 2, 2], (64, 128, 256, 512)
        elif arch == "resnet_tiny":
            block, layers, widths = BasicBlock, [1, 1, 1, 1], (32, 64, 128, 256)
        else:  # pragma: no cover - registry only passes known archs
            raise ConfigError(f"unknown ResNet arch {arch!r}")
        self._stem_stride = 1 if arch == "resnet_tiny" else 4
        if output_stride != 32 and block is BasicBlock:
            raise ConfigError(
                f"output_stride={output_stride} needs dilated Bottleneck blocks; {name} uses "
                f"BasicBlock and only supports output_stride=32 (use resnet50 for 8/16)"
            )
        if arch == "resnet_tiny":
            model = NarrowResNet(block, layers, widths, small_stem=True)
        else:
            model = ResNet(block, layers, replace_stride_with_dilation=_DILATION[output_stride],
                           zero_init_residual=zero_init_residual)
        model.fc = nn.Identity()
        self.tv_model = model
        self.output_stride = output_stride * self._stem_stride // 4
        self.stride = self.output_stride
        self._stage_dims = [w * block.expansion for w in widths]
        self.embed_dim = self.dense_dim = self._stage_dims[-1]
        self.image_size = image_size

    def intermediate_dims(self, indices: Sequence[int]) -> list[int]:
        return [self._stage_dims[i] for i in self.normalize_indices(indices)]

    def _stage_strides(self) -> list[int]:
        s = [4, 8, 16, 32]
        if self.output_stride * 4 // self._stem_stride <= 16:
            s[3] = 16
        if self.output_stride * 4 // self._stem_stride == 8:
            s[2] = s[3] = 8
        return [v * self._stem_stride // 4 for v in s]

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        # the stem and each strided stage round up: ceil(h / stride)
        return -(-h // self.stride), -(-w // self.stride)

    def layers(self) -> dict[str, nn.Module]:
        m = self.tv_model
        return {"stem": m.maxpool, "layer1": m.layer1, "layer2": m.layer2, "layer3": m.layer3,
                "layer4": m.layer4}

    def forward_all(self, x: torch.Tensor, intermediates: Sequence[int] = (),
                    attention_blocks: Sequence[int] = ()) -> BackboneOutput:
        if attention_blocks:
            raise ConfigError(
                f"backbone={self.name} is a CNN and has no attention maps; attention fusion/maps "
                f"are for ViT backbones (e.g. vit_small_patch16)"
            )
        self.check_input_size(x.shape[-2], x.shape[-1])
        want = self.normalize_indices(intermediates)
        m = self.tv_model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        stages = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = layer(x)
            stages.append(x)
        pooled = torch.flatten(m.avgpool(x), 1)
        return BackboneOutput(pooled=pooled, dense=x, intermediates=[stages[i] for i in want])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.tv_model(x)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x).dense


def resnet50(image_size: int = 224, **kw) -> ResNetBackbone:
    return ResNetBackbone("resnet50", "resnet50", image_size, **kw)


def resnet18(image_size: int = 224, **kw) -> ResNetBackbone:
    return ResNetBackbone("resnet18", "resnet18", image_size, **kw)


def resnet_tiny(image_size: int = 224, **kw) -> ResNetBackbone:
    return ResNetBackbone("resnet_tiny", "resnet_tiny", image_size, **kw)
