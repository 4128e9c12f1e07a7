"""timm VisionTransformer backbones.

Names -> timm architectures (created with ``num_classes=0, dynamic_img_size=True,
img_size=image_size``; the positional embedding is interpolated by timm for other input sizes):
``vit_tiny_patch16`` (vit_tiny_patch16_224), ``vit_small_patch16`` (vit_small_patch16_224),
``vit_small_patch8`` (vit_small_patch8_224), ``vit_base_patch16`` (vit_base_patch16_224),
``vit_base_patch8`` (vit_base_patch8_224) and ``vit_nano_patch8``: a custom tiny timm
VisionTransformer (patch 8, embed 96, depth 4, 3 heads) for CPU.

- pooled: the CLS token after the final norm;
- dense: the patch tokens after the final norm, reshaped to (B, C, H/p, W/p);
- intermediates: raw outputs of the requested blocks (timm `forward_intermediates`, NCHW, no norm);
- attentions: for the requested blocks only, recomputed by a forward hook on `block.attn`
  (see `core.models.backbones.attention`); T = 1 + h*w (CLS first);
- attention_saliency: the last block's CLS row ``attn[:, :, 0, 1:]`` on the patch grid.
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from core.models.backbones.attention import capture_attention, timm_attention_weights
from core.models.backbones.base import Backbone, BackboneOutput

#: twinseg name -> (timm architecture, timm kwargs for a custom model or None)
VIT_ARCHS = {
    "vit_tiny_patch16": ("vit_tiny_patch16_224", None),
    "vit_small_patch16": ("vit_small_patch16_224", None),
    "vit_small_patch8": ("vit_small_patch8_224", None),
    "vit_base_patch16": ("vit_base_patch16_224", None),
    "vit_base_patch8": ("vit_base_patch8_224", None),
    "vit_nano_patch8": ("vit_nano_patch8", dict(patch_size=8, embed_dim=96, depth=4, num_heads=3,
                                                 mlp_ratio=4.0, qkv_bias=True)),
}


class ViTBackbone(Backbone):
    is_transformer = True
    has_cls_token = True
    library_attr = "timm_model"
    family = "vit"

    def __init__(self, name: str, image_size: int = 224, drop_path_rate: float = 0.0, **kw):
        super().__init__()
        arch, custom = VIT_ARCHS[name]
        self.name = name
        self.library_arch = arch
        common = dict(num_classes=0, img_size=image_size, dynamic_img_size=True,
                      drop_path_rate=drop_path_rate, **kw)
        if custom is not None:
            self.timm_kwargs = dict(custom)
            model = VisionTransformer(**custom, **common)
        else:
            self.timm_kwargs = {}
            model = timm.create_model(arch, pretrained=False, **common)
        self.timm_model = model
        self.image_size = image_size
        p = model.patch_embed.patch_size
        self.patch_size = int(p[0] if isinstance(p, (tuple, list)) else p)
        self.size_multiple = self.patch_size
        self.stride = self.patch_size
        self.embed_dim = self.dense_dim = int(model.embed_dim)
        self.num_blocks = len(model.blocks)
        self.num_heads = int(model.blocks[0].attn.num_heads)
        self.num_prefix_tokens = int(model.num_prefix_tokens)

    # ------------------------------------------------------------------ info
    def intermediate_dims(self, indices: Sequence[int]) -> list[int]:
        return [self.embed_dim for _ in self.normalize_indices(indices)]

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size, w // self.patch_size

    def layers(self) -> dict[str, nn.Module]:
        m = self.timm_model
        out: dict[str, nn.Module] = {"patch_embed": m.patch_embed}
        for i, blk in enumerate(m.blocks):
            out[f"block{i}"] = blk
        return out

    def layer_output_to_map(self, output, image_hw):
        if isinstance(output, (tuple, list)):
            output = output[0]
        gh, gw = self.grid_size(*image_hw)
        if output.dim() == 4:  # patch_embed with dynamic size: NHWC
            return output.permute(0, 3, 1, 2)
        tokens = output[:, output.shape[1] - gh * gw:]
        return tokens.transpose(1, 2).reshape(output.shape[0], -1, gh, gw)

    # ------------------------------------------------------------------ forward
    def forward_all(self, x: torch.Tensor, intermediates: Sequence[int] = (),
                    attention_blocks: Sequence[int] = ()) -> BackboneOutput:
        B, _, H, W = x.shape
        self.check_input_size(H, W)
        want = self.normalize_indices(intermediates)
        attn_idx = self.normalize_indices(attention_blocks)
        m = self.timm_model
        mods = {i: m.blocks[j].attn for i, j in zip(attention_blocks, attn_idx)}
        with capture_attention(mods, timm_attention_weights) as attentions:
            if want:
                # forward_intermediates returns the requested blocks in increasing order
                uniq = sorted(set(want))
                tokens, inter = m.forward_intermediates(x, indices=uniq, norm=False,
                                                        output_fmt="NCHW")
                by_idx = dict(zip(uniq, inter))
                inter = [by_idx[i] for i in want]
            else:
                tokens, inter = m.forward_features(x), []
        gh, gw = self.grid_size(H, W)
        pooled = tokens[:, 0]
        dense = tokens[:, self.num_prefix_tokens:].transpose(1, 2).reshape(B, -1, gh, gw)
        return BackboneOutput(pooled=pooled, dense=dense, intermediates=inter,
                              attentions=dict(attentions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x.shape[-2], x.shape[-1])
        return self.timm_model.forward_features(x)[:, 0]

    def attention_saliency(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's CLS-to-patch attention per head, (B, heads, H/p, W/p) (DINO's attention maps)."""
        return self.cls_attention_saliency(x)


def make_vit(name: str):
    def build(image_size: int = 224, **kw) -> ViTBackbone:
        return ViTBackbone(name, image_size=image_size, **kw)
    build.__name__ = name
    return build
