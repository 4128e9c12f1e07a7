"""The `Backbone` contract every wrapped library model follows (see ARCHITECTURE.md, "Models").

A backbone wraps one library model (timm, torchvision, vit-pytorch) without editing the library's
files and exposes:

- ``forward(x) -> (B, embed_dim)``: pooled embedding (CLS token for ViTs, global average otherwise);
- ``forward_dense(x) -> (B, dense_dim, h, w)``: the last feature map (ViT: patch tokens after the
  final norm reshaped to the patch grid; CNN: last stage; Swin: last stage after the final norm);
- ``forward_all(x, intermediates=(), attention_blocks=()) -> BackboneOutput``: everything in one
  pass; attention weights are computed only for the blocks asked for (hooks that recompute
  ``softmax(q k^T * scale)`` from the block's own projections), so training keeps fused attention;
- ``attention_saliency(x) -> (B, heads, gh, gw) | None``: per-head non-negative saliency of the LAST
  block on the patch grid (ViT: the CLS token's attention to every patch, DINO's attention maps;
  Swin: the attention each token receives inside its window); None for a backbone without attention.

Attributes: ``name, embed_dim, dense_dim, stride, is_transformer, has_cls_token, num_heads,
num_blocks, patch_size, num_prefix_tokens, size_multiple`` and the wrapped library model under ``timm_model`` /
``tv_model`` / ``vp_model`` (also reachable as ``library_model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from core.errors import ConfigError


@dataclass
class BackboneOutput:
    """What `Backbone.forward_all` returns.

    pooled: (B, embed_dim); dense: (B, dense_dim, h, w); intermediates: list of (B, C_i, h_i, w_i)
    in the order asked; attentions: {block index as asked: (B, heads, T, T)} where T includes the
    prefix (CLS) tokens and every row sums to 1.
    """

    pooled: torch.Tensor
    dense: torch.Tensor
    intermediates: list = field(default_factory=list)
    attentions: dict = field(default_factory=dict)


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement `forward_all`."""

    name: str = "backbone"
    embed_dim: int = 0
    dense_dim: int = 0
    stride: int = 1
    is_transformer: bool = False
    has_cls_token: bool = False
    num_heads: int = 0
    num_blocks: int = 0
    patch_size: int | None = None
    #: tokens before the patch tokens in attention maps (1 = CLS for ViTs; 0 otherwise)
    num_prefix_tokens: int = 0
    #: input sides must be a multiple of this (ViT: patch size; Swin: 32); None: any size >= min_size
    size_multiple: int | None = None
    min_size: int = 1
    #: attribute name of the wrapped library model ("timm_model", "tv_model", "vp_model")
    library_attr: str = ""
    #: the family used to match weight files ("resnet", "vit", "swin", "vitpytorch")
    family: str = ""
    #: the arch string of the wrapped library model (timm / torchvision name), for exports
    library_arch: str = ""

    # ------------------------------------------------------------------ helpers
    @property
    def library_model(self) -> nn.Module:
        """The wrapped timm / torchvision / vit-pytorch model (its state dict is the plain one)."""
        return getattr(self, self.library_attr)

    def check_input_size(self, h: int, w: int) -> None:
        """ConfigError (one line) when (h, w) does not fit the patch grid of this backbone."""
        m = self.size_multiple
        if m:
            if h % m or w % m or h < m or w < m:
                raise ConfigError(
                    f"image size {h}x{w} is not divisible by patch size {m} of {self.name}; "
                    f"use a multiple of {m}"
                )
        elif h < self.min_size or w < self.min_size:
            raise ConfigError(
                f"image size {h}x{w} is too small for {self.name} (minimum {self.min_size}x"
                f"{self.min_size}); use a larger image size"
            )

    def grid_size(self, h: int, w: int) -> tuple[int, int]:
        """(gh, gw) of the dense map for an (h, w) input."""
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def normalize_indices(self, indices: Sequence[int], n: int | None = None) -> list[int]:
        """Block indices (negative allowed, Python style) -> non-negative; ConfigError if out of range."""
        n = self.num_blocks if n is None else n
        out = []
        for i in indices:
            j = int(i) + n if int(i) < 0 else int(i)
            if not 0 <= j < n:
                raise ConfigError(
                    f"block index {i} is out of range for {self.name} ({n} blocks); "
                    f"use an index in [-{n}, {n - 1}]"
                )
            out.append(j)
        return out

    def intermediate_dims(self, indices: Sequence[int]) -> list[int]:
        """Channel count of the intermediate maps returned for `indices`."""
        raise NotImplementedError

    def layers(self) -> dict[str, nn.Module]:
        """Named stages / blocks (in forward order) for diagnostics such as the ERF."""
        raise NotImplementedError

    def layer_output_to_map(self, output, image_hw: tuple[int, int]) -> torch.Tensor:
        """Turn the raw output of a module from `layers()` into a (B, C, h, w) map.

        CNN stages already are NCHW; ViT blocks give tokens (B, prefix + h*w, C); Swin stages NHWC.
        """
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output

    # ------------------------------------------------------------------ forward API
    def forward_all(self, x: torch.Tensor, intermediates: Sequence[int] = (),
                    attention_blocks: Sequence[int] = ()) -> BackboneOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x).pooled

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x).dense

    def attention_saliency(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-head saliency maps of the LAST block, (B, heads, gh, gw), non-negative, on the patch grid;
        None when the backbone has no attention (CNNs: this default). Read by
        `core.metrics.attention_jaccard` (DINO's thresholded attention masks)."""
        return None

    def cls_attention_saliency(self, x: torch.Tensor) -> torch.Tensor:
        """For backbones with a CLS token: the last block's attention rows of the CLS token to the patch
        tokens, ``attn[:, :, 0, prefix:]`` reshaped to (B, heads, gh, gw) -- the maps of DINO's
        `visualize_attention.py` (``get_last_selfattention(img)[0, :, 0, 1:]``)."""
        _, _, h, w = x.shape
        attn = self.forward_all(x, attention_blocks=[-1]).attentions[-1]
        gh, gw = self.grid_size(h, w)
        return attn[:, :, 0, self.num_prefix_tokens:].reshape(attn.shape[0], attn.shape[1], gh, gw)

    def extra_repr(self) -> str:
        return (f"name={self.name}, embed_dim={self.embed_dim}, dense_dim={self.dense_dim}, "
                f"stride={self.stride}")
