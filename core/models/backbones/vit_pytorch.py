"""`vitpytorch_small`: the `ViT` of the vit-pytorch package (lucidrains), ViT-S/16 sized
(dim 384, depth 12, 6 heads of 64, MLP 1536), wrapped to the Backbone contract.

The package's `ViT.forward` returns only a pooled / classified vector, so the wrapper runs the same
modules itself: patch embedding -> CLS + positional embedding -> transformer layers -> final norm.
- pooled: CLS token after the final norm; dense: patch tokens after the final norm -> (B, C, h, w);
- intermediates: raw outputs of the requested layers; the positional embedding (built for
  ``image_size``) is resampled (timm ``resample_abs_pos_embed``) for other input sizes;
- attentions: vit-pytorch computes its attention with an explicit ``nn.Softmax`` (``attend``) in
  every layer (it has no fused path); a forward hook on ``attend`` of the requested layers only
  copies that softmax out, and is removed after the pass; attention_saliency: the last layer's CLS row
  ``attn[:, :, 0, 1:]`` on the patch grid.
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import repeat
from timm.layers import resample_abs_pos_embed
from torch import nn
from vit_pytorch import ViT

from core.models.backbones.base import Backbone, BackboneOutput

VITPYTORCH_ARCHS = {
    "vitpytorch_small": dict(patch_size=16, dim=384, depth=12, heads=6, dim_head=64, mlp_dim=1536),
}


class ViTPytorchBackbone(Backbone):
    is_transformer = True
    has_cls_token = True
    library_attr = "vp_model"
    family = "vitpytorch"
    num_prefix_tokens = 1

    def __init__(self, name: str, image_size: int = 224, dropout: float = 0.0, **kw):
        super().__init__()
        cfg = dict(VITPYTORCH_ARCHS[name])
        cfg.update(kw)
        self.name = name
        self.library_arch = "vit_pytorch.ViT"
        self.vp_kwargs = dict(cfg, image_size=image_size, num_classes=0)
        self.vp_model = ViT(image_size=image_size, num_classes=0, dropout=dropout,
                            emb_dropout=dropout, **cfg)
        self.image_size = image_size
        self.patch_size = self.size_multiple = self.stride = int(cfg["patch_size"])
        self.embed_dim = self.dense_dim = int(cfg["dim"])
        self.num_blocks = int(cfg["depth"])
        self.num_heads = int(cfg["heads"])
        self.base_grid = (image_size // self.patch_size, image_size // self.patch_size)

    def intermediate_dims(self, indices: Sequence[int]) -> list[int]:
        return [self.embed_dim for _ in self.normalize_indices(indices)]

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size, w // self.patch_size

    def layers(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for i, layer in enumerate(self.vp_model.transformer.layers):
            out[f"block{i}"] = layer[1]  # the feed-forward closes the residual block
        return out

    def layer_output_to_map(self, output, image_hw):
        gh, gw = self.grid_size(*image_hw)
        tokens = output[:, output.shape[1] - gh * gw:]
        return tokens.transpose(1, 2).reshape(output.shape[0], -1, gh, gw)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.vp_model.pos_embedding.unsqueeze(0)
        if (gh, gw) != self.base_grid:
            pos = resample_abs_pos_embed(pos, new_size=(gh, gw), old_size=self.base_grid,
                                         num_prefix_tokens=1)
        return pos

    def forward_all(self, x: torch.Tensor, intermediates: Sequence[int] = (),
                    attention_blocks: Sequence[int] = ()) -> BackboneOutput:
        B, _, H, W = x.shape
        self.check_input_size(H, W)
        gh, gw = self.grid_size(H, W)
        want = self.normalize_indices(intermediates)
        attn_idx = self.normalize_indices(attention_blocks)
        m = self.vp_model
        store: dict[int, torch.Tensor] = {}
        handles = []
        for asked, j in zip(attention_blocks, attn_idx):
            def hook(module, args, output, _k=asked):
                store[_k] = output
            handles.append(m.transformer.layers[j][0].attend.register_forward_hook(hook))
        try:
            t = m.to_patch_embedding(x)
            cls = repeat(m.cls_token, "... d -> b ... d", b=B)
            t = torch.cat((cls, t), dim=1) + self._pos_embed(gh, gw)
            t = m.dropout(t)
            outs = {}
            for i, (attn, ff) in enumerate(m.transformer.layers):
                t = attn(t) + t
                t = ff(t) + t
                outs[i] = t
            t = m.transformer.norm(t)
        finally:
            for h in handles:
                h.remove()
        inter = [outs[i][:, 1:].transpose(1, 2).reshape(B, -1, gh, gw) for i in want]
        dense = t[:, 1:].transpose(1, 2).reshape(B, -1, gh, gw)
        return BackboneOutput(pooled=t[:, 0], dense=dense, intermediates=inter, attentions=store)

    def attention_saliency(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's CLS-to-patch attention per head, (B, heads, H/p, W/p) (DINO's attention maps)."""
        return self.cls_attention_saliency(x)


def make_vitpytorch(name: str):
    def build(image_size: int = 224, **kw) -> ViTPytorchBackbone:
        return ViTPytorchBackbone(name, image_size=image_size, **kw)
    build.__name__ = name
    return build
