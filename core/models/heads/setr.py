"""SETR decoders: naive, progressive upsampling (PUP) and multi-level feature aggregation (MLA).

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers", CVPR 2021, arXiv:2012.15840 (the seed study adapted setr-pytorch).

- `SETRNaiveHead`: 1x1 conv-BN-ReLU, 1x1 conv to classes, bilinear upsampling to the input size.
- `SETRPUPHead`: log2(stride) stages of [3x3 conv-BN-ReLU, x2 bilinear upsampling] (4 stages for a
  /16 ViT, 3 for /8, 5 for a /32 CNN), then a 1x1 classifier: its native output is already at the
  input resolution. Refuses a stride that is not a power of two.
  Its input (`input_norm`, `SegmentConfig.head_input_norm`): mmsegmentation's `SETRUPHead` normalises its input
  itself, ``norm_layer=dict(type='LN', eps=1e-6, requires_grad=True)`` applied to the (n, h*w, c) tokens
  (`mmseg/models/decode_heads/setr_up_head.py`, 2 x C parameters: 768 for ViT-S), and its SETR backbone has no
  final norm (`mmseg/models/backbones/vit.py` ``final_norm=False``, kept by `configs/_base_/models/setr_pup.py`):
  the head's fresh LayerNorm (weight 1, bias 0, trained at the head's lr) sees the last block's raw output. By
  default the head instead reads the backbone's dense map, the tokens after the backbone's own final norm. The two
  agree at initialisation (the same LayerNorm at weight 1, bias 0, eps 1e-6) but not once weights are loaded: an
  ImageNet / DINO checkpoint's final norm carries a learnt affine transform (trained for the CLS token and then
  fine-tuned at the backbone's lr) that mmseg drops. Hence an option: `input_norm=True` reads the last block's
  raw output (`needs_intermediates`), normalises it with the head's own LayerNorm (the backbone channels only;
  fusion-1 channels are appended after it, unnormalised) and freezes the backbone's final norm, which nothing
  reads then (`_freeze_final_norm`). Off by default (the smoke study unchanged); the paper grid turns it on for
  E2-E5.
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
- Width: `channels` (mmseg's 256) is the width of the naive/PUP convs, of MLA's `proj` / `fuse` and of the
  auxiliary heads' convs (`width_arg`, set by `SegmentConfig.head_channels`); MLA's `mla_channels` stays 128.
- `SETRUPAuxHead` / `aux_blocks` / `aux_heads_refusal`: SETR-PUP's auxiliary heads (deep supervision,
  `SegmentConfig.aux_heads`), as mmsegmentation trains them: `configs/_base_/models/setr_pup.py` (ViT-L,
  24 blocks, ``out_indices=(9, 14, 19, 23)``, the decode head on ``in_index=3`` = block 23) and
  `configs/setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py` (``auxiliary_head``: three `SETRUPHead` on
  ``in_index`` 0, 1, 2 = blocks 9, 14, 19, ``channels=256, num_convs=2, kernel_size=3``, each a
  ``CrossEntropyLoss`` at ``loss_weight=0.4``); `mmseg/models/decode_heads/setr_up_head.py` (`SETRUPHead`:
  LayerNorm(eps 1e-6) over each token's channels, then ``num_convs`` x [3x3 ConvModule (conv-BN-ReLU),
  x``up_scale`` bilinear upsampling, default 4], then `cls_seg` 1x1). Auxiliary heads run only in
  training (mmseg's `EncoderDecoder` calls them in `loss` only, never in `predict`).
  Blocks (`aux_blocks`): for a backbone of N blocks, 0-based ``floor(N * f) - 1`` for f = 10/24, 15/24,
  20/24, i.e. the blocks at which 41.7%, 62.5% and 83.3% of the depth is done: exactly mmseg's 9, 14, 19
  for N=24; 4, 6, 9 for N=12 (ViT-B); 0, 1, 2 for N=4 (vit_nano_patch8). Floor keeps every index below
  the last block N-1 (the main head's); duplicates (N < 6) are dropped, negatives (N=1) too.
  Upsampling: two stages whose factors multiply to the input block's stride (`block_stride`: 4 x 4 for /16, as
  mmseg; 4 x 2 for /8; on Swin each stage's own stride, 4, 8 and 16, not the last stage's 32); the segmenter
  resizes the result to the input size if it still differs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.models.heads.base import FourLevelHead, SegHead, conv_bn_relu, resize


def token_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of every position of a (B, C, h, w) map (the tokens)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _freeze_final_norm(backbone) -> Optional[nn.Module]:
    """Stop training the backbone's final norm (timm ViT / Swin: `norm`, vit-pytorch: `transformer.norm`; a CNN has
    none: None) and return it. With `SETRPUPHead(input_norm=True)` nothing reads it: mmseg's SETR
    backbone has no final norm (`VisionTransformer(final_norm=False)`, the default its SETR configs keep) and
    the head normalises the raw last block itself (`SETRUPHead.norm`). Frozen, the weights stay in the state
    dict (checkpoints load unchanged), out of the optimiser, and DDP finds no parameter without a gradient."""
    lib = backbone.library_model if getattr(backbone, "library_attr", "") else backbone
    norm = getattr(lib, "norm", None)
    if norm is None:
        norm = getattr(getattr(lib, "transformer", None), "norm", None)
    if not isinstance(norm, nn.LayerNorm):
        return None
    return norm.requires_grad_(False)


class SETRNaiveHead(SegHead):
    name = "setr_naive"
    width_arg = "channels"  # SegmentConfig.head_channels (mmseg: 256)

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
    """SETR-PUP (module docstring). `input_norm` (`SegmentConfig.head_input_norm`): mmseg's form of the head's
    input (module docstring, `_freeze_final_norm`); off (the default), the head reads the backbone's dense map, the
    last block's tokens after the backbone's own final norm. `last_block`: the block whose raw output the head
    normalises (input_norm only)."""

    name = "setr_pup"
    width_arg = "channels"  # SegmentConfig.head_channels (mmseg: 256)

    def __init__(self, in_channels: int, num_classes: int, stride: int, extra_in_channels: int = 0,
                 channels: int = 256, input_norm: bool = False, last_block: int = -1):
        super().__init__()
        self.extra_in_channels = extra_in_channels
        self.num_classes = num_classes
        self.input_norm = bool(input_norm)
        if self.input_norm:
            # mmseg SETRUPHead.norm: LayerNorm(eps 1e-6) over each token's channels (fusion-1 channels excluded),
            # on the last block's raw output; fusion-1 channels join that block output (SegHead.inject)
            self.norm = nn.LayerNorm(in_channels, eps=1e-6)
            self.needs_intermediates = (int(last_block),)
            self.multi_level = True
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
    def from_backbone(cls, backbone, num_classes, extra_in_channels=0, input_norm: bool = False, **kw):
        if not input_norm:
            return cls(backbone.dense_dim, num_classes, int(backbone.stride), extra_in_channels, **kw)
        last = int(backbone.num_blocks) - 1
        _freeze_final_norm(backbone)
        return cls(int(backbone.intermediate_dims([last])[0]), num_classes, int(backbone.stride), extra_in_channels,
                   input_norm=True, last_block=last, **kw)

    def decode(self, dense, intermediates):
        x = dense
        if self.input_norm:
            x = intermediates[-1]
            c = self.norm.normalized_shape[0]
            tokens = token_norm(self.norm, x[:, :c])
            x = torch.cat([tokens, x[:, c:]], dim=1) if x.shape[1] > c else tokens
        for stage in self.stages:
            x = stage(x)
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.classifier(x)


class SETRMLAHead(FourLevelHead):
    name = "setr_mla"
    width_arg = "channels"  # SegmentConfig.head_channels (mmseg: 256)

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

    def decode(self, dense, intermediates):
        if len(intermediates) != 4:
            raise ValueError(f"setr_mla expects 4 intermediate maps, got {len(intermediates)}")
        size = max((f.shape[-2:] for f in intermediates), key=lambda s: s[0] * s[1])
        proj = [resize(p(token_norm(n, f)), size) for n, p, f in zip(self.norms, self.proj, intermediates)]
        agg = [None] * 4
        agg[3] = proj[3]
        for i in (2, 1, 0):  # top-down: each shallower stream adds the deeper aggregate
            agg[i] = proj[i] + agg[i + 1]
        outs = [s(f(a)) for f, s, a in zip(self.fuse, self.streams, agg)]
        return self.classifier(torch.cat(outs, dim=1))


# ---------------------------------------------------------------------- SETR-PUP auxiliary heads
AUX_FRACTIONS = ((10, 24), (15, 24), (20, 24))  # mmseg ViT-L: blocks 9, 14, 19 of 24 (0-based)
AUX_LOSS_WEIGHT = 0.4  # mmseg auxiliary_head loss_decode loss_weight


def aux_blocks(num_blocks: int) -> tuple[int, ...]:
    """0-based blocks read by the auxiliary heads: ``floor(N * a / b) - 1`` for each (a, b) in
    AUX_FRACTIONS, negatives and duplicates dropped (see the module docstring)."""
    n = int(num_blocks)
    out: list[int] = []
    for a, b in AUX_FRACTIONS:
        i = n * a // b - 1
        if i >= 0 and i not in out:
            out.append(i)
    return tuple(out)


def aux_heads_refusal(head: str, backbone) -> Optional[ConfigError]:
    """Why `aux_heads=true` cannot be used with `head` on `backbone` (None if it fits)."""
    if head != "setr_pup":
        return ConfigError(f"aux_heads=true is SETR-PUP's deep supervision and needs head=setr_pup, not "
                           f"head={head!r}; set aux_heads=false or head=setr_pup")
    if not bool(getattr(backbone, "is_transformer", False)):
        return ConfigError(f"aux_heads=true reads intermediate transformer blocks but backbone {backbone.name} is a "
                           f"CNN; set aux_heads=false or use a vit_* backbone")
    if not aux_blocks(getattr(backbone, "num_blocks", 0) or 0):
        return ConfigError(f"aux_heads=true needs a backbone with at least 2 blocks, {backbone.name} has "
                           f"{backbone.num_blocks}; set aux_heads=false or use a deeper backbone")
    return None


def block_stride(backbone, block: int) -> int:
    """The stride of block `block`'s output: timm's `feature_info` reduction of that block (a ViT: the patch size
    for every block; Swin: 4, 8, 16, 32 for its stages), else the backbone's stride."""
    info = getattr(getattr(backbone, "library_model", None), "feature_info", None) \
        if getattr(backbone, "library_attr", "") else None
    if isinstance(info, (list, tuple)) and 0 <= int(block) < len(info) and "reduction" in info[int(block)]:
        return int(info[int(block)]["reduction"])
    return int(backbone.stride)


def _split_scale(stride: int) -> tuple[int, int]:
    """Two power-of-two upsampling factors whose product is `stride` (rounded to a power of two)."""
    n = max(int(round(math.log2(stride))), 0) if stride >= 1 else 0
    return 2 ** ((n + 1) // 2), 2 ** (n // 2)


class SETRUPAuxHead(SegHead):
    """mmseg's auxiliary `SETRUPHead` on one intermediate block: token LayerNorm, two [3x3 conv-BN-ReLU,
    bilinear upsampling] stages, 1x1 classifier. Reads `intermediates[0]` (the block in `needs_intermediates`)."""

    name = "setr_pup_aux"
    width_arg = "channels"  # SegmentConfig.head_channels, as the main head (mmseg: 256)

    def __init__(self, in_channels: int, num_classes: int, block: int, stride: int, channels: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.needs_intermediates = (int(block),)
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        self.scales = _split_scale(stride)
        self.stages = nn.ModuleList([conv_bn_relu(in_channels, channels, 3), conv_bn_relu(channels, channels, 3)])
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @classmethod
    def refuse(cls, backbone) -> Optional[ConfigError]:
        return aux_heads_refusal("setr_pup", backbone)

    @classmethod
    def for_backbone(cls, backbone, num_classes: int, **kw) -> list["SETRUPAuxHead"]:
        """One auxiliary head per block of `aux_blocks(backbone.num_blocks)`."""
        cls.check(backbone)
        blocks = aux_blocks(backbone.num_blocks)
        dims = backbone.intermediate_dims(blocks)
        return [cls(int(d), num_classes, b, block_stride(backbone, b), **kw) for b, d in zip(blocks, dims)]

    def decode(self, dense, intermediates):
        x = token_norm(self.norm, intermediates[0])
        for stage, s in zip(self.stages, self.scales):
            x = stage(x)
            if s > 1:
                x = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        return self.classifier(x)
