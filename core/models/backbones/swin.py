"""timm Swin Transformer backbones: `swin_tiny` (swin_tiny_patch4_window7_224) and `swin_nano`
(a small timm SwinTransformer for CPU: patch 4, window 4, embed 48, depths (2, 2, 2, 2), heads
(3, 6, 12, 24); at 64 px the stage grids are 16, 8, 4, 2 and the last stage's window clamps to 2).

The library model is always built at its native size (224 for swin_tiny, 64 for swin_nano) with
``dynamic_img_size=True``, so its relative-position tables match the pretrained weights whatever
``image_size`` is; inputs of any multiple of 32 px run (window attention pads / masks per input).

- pooled: average of the last stage after the final norm (timm's ``global_pool='avg'``);
- dense: last stage after the final norm, NHWC -> NCHW (stride 32);
- intermediates: outputs of stages 0..3 (NCHW, strides 4, 8, 16, 32);
- attention: NOT provided. Swin has windowed (local, shifted) attention and no CLS token, so there is
  no (T, T) map over the whole image; ``forward_all(..., attention_blocks=...)`` raises ConfigError.
  Attention fusion (fusion 1 / fusion 2) and attention maps are for ViT backbones.
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from core.errors import ConfigError
from core.models.backbones.base import Backbone, BackboneOutput

SWIN_ARCHS = {
    "swin_tiny": ("swin_tiny_patch4_window7_224", None, 224),
    "swin_nano": ("swin_nano", dict(patch_size=4, window_size=4, embed_dim=48, depths=(2, 2, 2, 2),
                                    num_heads=(3, 6, 12, 24)), 64),
}

SWIN_ATTENTION_ERROR = ("Swin has windowed attention and no CLS token; attention fusion/maps are for "
                        "ViT backbones (e.g. backbone=vit_small_patch16)")


class SwinBackbone(Backbone):
    is_transformer = True
    has_cls_token = False
    library_attr = "timm_model"
    family = "swin"
    size_multiple = 32

    def __init__(self, name: str, image_size: int = 224, drop_path_rate: float = 0.0, **kw):
        super().__init__()
        arch, custom, native = SWIN_ARCHS[name]
        self.name = name
        self.library_arch = arch
        common = dict(num_classes=0, img_size=native, dynamic_img_size=True,
                      drop_path_rate=drop_path_rate, **kw)
        if custom is not None:
            self.timm_kwargs = dict(custom, img_size=native)
            model = SwinTransformer(**custom, **common)
        else:
            self.timm_kwargs = {}
            model = timm.create_model(arch, pretrained=False, **common)
        self.timm_model = model
        self.image_size = image_size
        self.native_size = native
        self.patch_size = 4
        self.stride = 32
        self.num_blocks = len(model.layers)
        self._stage_dims = [int(f["num_chs"]) for f in model.feature_info]
        self.embed_dim = self.dense_dim = int(model.num_features)
        self.num_heads = int(model.layers[-1].blocks[0].attn.num_heads)

    def intermediate_dims(self, indices: Sequence[int]) -> list[int]:
        return [self._stage_dims[i] for i in self.normalize_indices(indices)]

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        return h // 32, w // 32

    def layers(self) -> dict[str, nn.Module]:
        m = self.timm_model
        out: dict[str, nn.Module] = {"patch_embed": m.patch_embed}
        for i, s in enumerate(m.layers):
            out[f"stage{i}"] = s
        return out

    def layer_output_to_map(self, output, image_hw):
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output.permute(0, 3, 1, 2)  # every Swin stage / patch_embed output is NHWC

    def forward_all(self, x: torch.Tensor, intermediates: Sequence[int] = (),
                    attention_blocks: Sequence[int] = ()) -> BackboneOutput:
        if attention_blocks:
            raise ConfigError(SWIN_ATTENTION_ERROR)
        self.check_input_size(x.shape[-2], x.shape[-1])
        want = self.normalize_indices(intermediates)
        m = self.timm_model
        if want:
            uniq = sorted(set(want))
            feats, inter = m.forward_intermediates(x, indices=uniq, norm=False, output_fmt="NCHW")
            by_idx = dict(zip(uniq, inter))
            inter = [by_idx[i] for i in want]
        else:
            feats, inter = m.forward_features(x), []
        dense = feats.permute(0, 3, 1, 2)
        pooled = feats.mean(dim=(1, 2))
        return BackboneOutput(pooled=pooled, dense=dense, intermediates=inter, attentions={})


def make_swin(name: str):
    def build(image_size: int = 224, **kw) -> SwinBackbone:
        return SwinBackbone(name, image_size=image_size, **kw)
    build.__name__ = name
    return build
