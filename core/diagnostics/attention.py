"""Self-attention maps of a ViT, DINO's visualisation method.

Follows `visualize_attention.py` of https://github.com/facebookresearch/dino:

1. attention weights of one block (the last by default), (B, heads, T, T);
2. the CLS token's row, restricted to the patch tokens (prefix tokens -- CLS and registers --
   dropped): (B, heads, gh, gw);
3. nearest upsampling by the patch size to the input resolution;
4. optionally a mask per head keeping the most attended patches that together hold `mass` (60%)
   of the attention: sort, cumulative sum, keep the top patches whose cumulative sum covers it.

Attention is computed only here (the backbone computes weights only for the blocks asked for), so
the training hot path keeps fused attention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.diagnostics._common import eval_mode, module_device, new_figure, save_figure, to_display_images
from core.errors import ConfigError

__all__ = [
    "cls_attention_maps",
    "threshold_attention",
    "plot_attention_gallery",
    "attention_figure",
]


def _check_attention_backbone(backbone: nn.Module) -> int:
    name = getattr(backbone, "name", type(backbone).__name__)
    if not hasattr(backbone, "forward_all"):
        raise ConfigError(
            f"attention maps need a twinseg Backbone with forward_all(); got {type(backbone).__name__}; "
            "build it with core.models.registry.create_backbone"
        )
    if not getattr(backbone, "is_transformer", False) or not getattr(backbone, "has_cls_token", False):
        raise ConfigError(
            f"attention maps (DINO's CLS-to-patch method) need a ViT with a CLS token; {name} has none; "
            "use a vit_* backbone or disable the attention diagnostic"
        )
    patch = getattr(backbone, "patch_size", None)
    if not patch:
        raise ConfigError(f"backbone {name} has no patch_size; attention maps need a patch grid")
    return int(patch)


def cls_attention_maps(backbone: nn.Module, images: Tensor, block: int = -1, upsample: bool = True) -> Tensor:
    """CLS-to-patch attention of one block, per head.

    Args:
        backbone: a twinseg `Backbone` (ViT with a CLS token) exposing `forward_all(x,
            attention_blocks=(block,))`, `patch_size`.
        images: (B, 3, H, W) model-input images (normalised), H and W multiples of the patch size.
        block: block index (negative allowed; -1 = last block).
        upsample: nearest-upsample by the patch size to (H, W) (DINO); False returns the patch grid.

    Returns:
        float tensor (B, heads, H, W) (or (B, heads, gh, gw)) on the CPU; for each image and head
        the values are the attention weights of the CLS query over the patch tokens (non-negative,
        summing to at most 1 -- the remainder goes to the prefix tokens).

    Runs under `torch.no_grad()` with the backbone in eval mode; every submodule's mode is restored.
    """
    patch = _check_attention_backbone(backbone)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    b, _, h, w = images.shape
    if h % patch or w % patch:
        raise ConfigError(
            f"image size {h}x{w} is not divisible by the patch size {patch}; resize the diagnostic images"
        )
    gh, gw = h // patch, w // patch
    device = module_device(backbone)
    with torch.no_grad(), eval_mode(backbone):
        out = backbone.forward_all(images.to(device), attention_blocks=(block,))
    atts = out.attentions
    if block in atts:
        attn = atts[block]
    elif len(atts) == 1:
        attn = next(iter(atts.values()))
    else:
        raise RuntimeError(f"backbone returned attentions for blocks {sorted(atts)}, not for block {block}")
    attn = attn.detach().float()
    if attn.ndim != 4 or attn.shape[0] != b or attn.shape[-1] != attn.shape[-2]:
        raise RuntimeError(f"expected attention weights (B, heads, T, T), got {tuple(attn.shape)}")
    t = attn.shape[-1]
    n_prefix = t - gh * gw
    if n_prefix < 1:
        raise RuntimeError(
            f"attention has {t} tokens, fewer than the {gh}x{gw} patch grid plus a CLS token"
        )
    # CLS is token 0 (timm and vit-pytorch); registers, when any, follow it and are dropped too.
    maps = attn[:, :, 0, n_prefix:].reshape(b, attn.shape[1], gh, gw)
    if upsample:
        maps = F.interpolate(maps, scale_factor=patch, mode="nearest")
    return maps.cpu()


def threshold_attention(maps: Tensor, mass: float = 0.6) -> Tensor:
    """Boolean mask keeping, per map, the fewest highest values whose sum covers `mass` of the total.

    `maps` is (..., H, W) (non-negative; negatives count as 0). Per map: sort descending, cumulative
    sum normalised by the total; an element is needed while the mass *before* it is < `mass`; the
    mask keeps every element >= the smallest needed value (ties are kept whole, so a patch
    upsampled to p x p pixels is kept or dropped as one piece). DINO's `--threshold` (0.6).
    """
    maps = torch.as_tensor(maps)
    if maps.ndim < 2:
        raise ValueError(f"expected maps (..., H, W), got shape {tuple(maps.shape)}")
    if not 0.0 <= float(mass) <= 1.0:
        raise ValueError(f"mass={mass} must be in [0, 1]")
    flat = maps.detach().float().clamp_min(0).flatten(-2)
    if mass <= 0:
        return torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)
    total = flat.sum(-1, keepdim=True)
    val, _ = flat.sort(-1, descending=True)
    frac = val / total.clamp_min(torch.finfo(torch.float32).tiny)
    before = frac.cumsum(-1) - frac
    needed = before < float(mass) - 1e-7
    needed[..., 0] = True  # at least the maximum
    # number of needed elements -> cut-off value (sorted descending)
    k = needed.sum(-1, keepdim=True).clamp_min(1)
    cutoff = val.gather(-1, k - 1)
    mask = flat >= cutoff
    return mask.reshape(maps.shape)


def _normalise01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def plot_attention_gallery(
    images: Tensor,
    maps: Tensor,
    path,
    *,
    masks: Tensor | None = None,
    threshold: float | None = None,
    show_mean: bool = True,
    overlay: bool = True,
    alpha: float = 0.6,
    cmap: str = "inferno",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    title: str | None = None,
    row_titles: Sequence[str] | None = None,
    max_images: int = 8,
    panel_size: float = 1.8,
    dpi: int = 100,
) -> Path:
    """Gallery PNG: one row per image; columns = image, each head's map, (mean over heads).

    Args:
        images: (B, 3, H, W) model-input images (de-normalised with `mean`/`std`, default the data
            module's statistics) or uint8 images.
        maps: (B, heads, h, w) attention maps (any resolution; nearest-resized to the image).
        path: PNG to write (parents created).
        masks: optional bool (B, heads, h, w) masks drawn as contours (e.g. `threshold_attention`).
        threshold: when `masks` is None, compute them with `threshold_attention(maps, threshold)`;
            the mean column gets the mask of the mean map.
        overlay: draw each map over the image with transparency `alpha` (else the map alone).
    Each panel is min-max normalised on its own (as DINO saves each head).
    """
    imgs = to_display_images(images, mean, std)
    maps = torch.as_tensor(maps).detach().float().cpu()
    if maps.ndim == 3:
        maps = maps.unsqueeze(0)
    if maps.ndim != 4 or maps.shape[0] != imgs.shape[0]:
        raise ValueError(f"maps must be (B, heads, h, w) with B={imgs.shape[0]}, got {tuple(maps.shape)}")
    n = min(imgs.shape[0], max_images)
    imgs, maps = imgs[:n], maps[:n]
    h, w = imgs.shape[1:3]
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps, size=(h, w), mode="nearest")
    heads = maps.shape[1]
    if masks is None and threshold is not None:
        masks = threshold_attention(maps, threshold)
    mean_map = maps.mean(1, keepdim=True)
    mean_mask = None
    if masks is not None:
        masks = torch.as_tensor(masks).cpu()[:n].float()
        if masks.shape[-2:] != (h, w):
            masks = F.interpolate(masks, size=(h, w), mode="nearest")
        masks = masks > 0.5
        if threshold is not None:
            mean_mask = threshold_attention(mean_map, threshold)
    cols = 1 + heads + (1 if show_mean else 0)
    fig = new_figure(figsize=(panel_size * cols, panel_size * n + (0.4 if title else 0)))
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        panels = [(maps[i, j].numpy(), None if masks is None else masks[i, j].numpy(), f"head {j}") for j in range(heads)]
        if show_mean:
            panels.append((mean_map[i, 0].numpy(), None if mean_mask is None else mean_mask[i, 0].numpy(), "mean"))
        ax = axes[i, 0]
        ax.imshow(imgs[i])
        if i == 0:
            ax.set_title("image", fontsize=8)
        if row_titles is not None and i < len(row_titles):
            ax.set_ylabel(str(row_titles[i]), fontsize=7)
        for j, (m, mk, name) in enumerate(panels, start=1):
            ax = axes[i, j]
            m = _normalise01(m)
            if overlay:
                ax.imshow(imgs[i])
                ax.imshow(m, cmap=cmap, alpha=alpha, interpolation="nearest", vmin=0, vmax=1)
            else:
                ax.imshow(m, cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
            if mk is not None and mk.any() and not mk.all():
                ax.contour(mk.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            if i == 0:
                ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=dpi)


def attention_figure(
    backbone: nn.Module,
    images: Tensor,
    path,
    *,
    block: int = -1,
    threshold: float | None = 0.6,
    title: str | None = None,
    **plot_kw,
) -> Path:
    """`cls_attention_maps` + `plot_attention_gallery` in one call (what the callback uses)."""
    maps = cls_attention_maps(backbone, images, block=block, upsample=True)
    if title is None:
        name = getattr(backbone, "name", type(backbone).__name__)
        title = f"{name}: CLS attention, block {block}" + (f", {int(threshold * 100)}% mass" if threshold else "")
    return plot_attention_gallery(images, maps, path, threshold=threshold, title=title, **plot_kw)
