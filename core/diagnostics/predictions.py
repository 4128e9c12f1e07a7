"""Segmentation prediction overlays: rows of image | ground truth | prediction in the VOC palette.

Label 255 (VOC "void", ignored in losses and metrics) is drawn in `void_color` (white by default;
VOC's own PNGs use cream (224, 224, 192)). A legend lists the classes present in the shown truths
and predictions. Each row's title gives the pixel accuracy of that prediction (void excluded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.patches import Patch

from core.diagnostics._common import new_figure, save_figure, to_display_images

__all__ = ["palette_array", "colorize_mask", "plot_predictions", "default_palette_and_names"]

IGNORE_INDEX = 255


def default_palette_and_names():
    """(VOC_PALETTE, VOC_CLASSES) from core.data.voc, or the standard VOC colour map and None."""
    try:
        from core.data.voc import VOC_CLASSES, VOC_PALETTE  # type: ignore

        return VOC_PALETTE, list(VOC_CLASSES)
    except Exception:
        return _voc_colormap(256), None


def _voc_colormap(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map as an (n, 3) uint8 array."""
    from core.data.palette import voc_palette

    return np.asarray(voc_palette(n), dtype=np.uint8).reshape(n, 3)


def palette_array(palette) -> np.ndarray:
    """Any palette (flat [r,g,b,r,g,b,...] as PIL's putpalette, a list of (r,g,b), an (N,3) array,
    0-255 ints or 0-1 floats) -> (N, 3) uint8 array."""
    a = np.asarray(palette)
    if a.ndim == 1:
        if a.size % 3:
            raise ValueError(f"a flat palette needs a multiple of 3 values, got {a.size}")
        a = a.reshape(-1, 3)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"palette must be (N, 3) colours, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
        a = a * 255.0
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def colorize_mask(mask, palette, *, ignore_index: int = IGNORE_INDEX, void_color=(255, 255, 255)) -> np.ndarray:
    """(H, W) class-index mask -> (H, W, 3) uint8 RGB; `ignore_index` gets `void_color`; labels
    beyond the palette are shown grey (128, 128, 128)."""
    m = torch.as_tensor(mask).detach().cpu().long().numpy()
    pal = palette_array(palette)
    out = np.full(m.shape + (3,), 128, dtype=np.uint8)
    valid = (m >= 0) & (m < len(pal)) & (m != ignore_index)
    out[valid] = pal[m[valid]]
    out[m == ignore_index] = np.asarray(void_color, dtype=np.uint8)
    return out


def _as_labels(x) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu()
    if x.ndim == 4:  # logits (B, K, H, W)
        x = x.argmax(1)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"expected masks (B, H, W) or logits (B, K, H, W), got {tuple(x.shape)}")
    return x.long()


def plot_predictions(
    images,
    targets,
    preds,
    palette=None,
    path=None,
    *,
    class_names: Sequence[str] | None = None,
    ignore_index: int = IGNORE_INDEX,
    void_color=(255, 255, 255),
    alpha: float | None = None,
    mean=None,
    std=None,
    max_images: int = 8,
    title: str | None = None,
    panel_size: float = 2.2,
    dpi: int = 100,
) -> Path:
    """PNG with one row per image: image | truth | prediction, masks in `palette` colours.

    Args:
        images: (B, 3, H, W) model-input (normalised) or uint8 images.
        targets: (B, H, W) int masks (255 = void).
        preds: (B, H, W) int masks or (B, K, H, W) logits (argmax taken).
        palette: VOC_PALETTE (flat or (N, 3)); default the data module's VOC palette.
        class_names: names for the legend (default VOC_CLASSES when the palette is the default).
        alpha: None draws pure palette colours; a value in (0, 1] blends the masks over the image.
    """
    if path is None:
        raise ValueError("plot_predictions needs an output path")
    if palette is None:
        palette, default_names = default_palette_and_names()
        class_names = class_names if class_names is not None else default_names
    pal = palette_array(palette)
    imgs = to_display_images(images, mean, std)
    tgts = _as_labels(targets)
    prds = _as_labels(preds)
    n = min(imgs.shape[0], tgts.shape[0], prds.shape[0], max_images)
    if not (imgs.shape[1:3] == tuple(tgts.shape[-2:]) == tuple(prds.shape[-2:])):
        raise ValueError(
            f"image {imgs.shape[1:3]}, target {tuple(tgts.shape[-2:])} and prediction "
            f"{tuple(prds.shape[-2:])} sizes differ"
        )
    fig = new_figure(figsize=(panel_size * 3 + 1.8, panel_size * n + (0.4 if title else 0)))
    axes = fig.subplots(n, 3, squeeze=False)
    present: set[int] = set()
    has_void = False
    for i in range(n):
        t, p = tgts[i], prds[i]
        present.update(int(v) for v in torch.unique(t).tolist() if v != ignore_index)
        present.update(int(v) for v in torch.unique(p).tolist() if v != ignore_index)
        has_void |= bool((t == ignore_index).any())
        valid = t != ignore_index
        acc = (p[valid] == t[valid]).float().mean().item() * 100 if valid.any() else float("nan")
        tc = colorize_mask(t, pal, ignore_index=ignore_index, void_color=void_color)
        pc = colorize_mask(p, pal, ignore_index=ignore_index, void_color=void_color)
        if alpha is not None:
            base = (imgs[i] * 255).astype(np.float32)
            tc = (alpha * tc + (1 - alpha) * base).astype(np.uint8)
            pc = (alpha * pc + (1 - alpha) * base).astype(np.uint8)
        axes[i, 0].imshow(imgs[i])
        axes[i, 1].imshow(tc, interpolation="nearest")
        axes[i, 2].imshow(pc, interpolation="nearest")
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
            axes[i, 1].set_title("truth", fontsize=8)
        axes[i, 2].set_title(("prediction\n" if i == 0 else "") + f"pixel acc {acc:.1f}%", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = []
    for c in sorted(present):
        colour = pal[c] / 255.0 if c < len(pal) else np.array([0.5, 0.5, 0.5])
        name = class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
        handles.append(Patch(facecolor=colour, edgecolor="black", linewidth=0.3, label=f"{c}: {name}"))
    if has_void:
        handles.append(Patch(facecolor=np.asarray(void_color) / 255.0, edgecolor="black", linewidth=0.3,
                             label=f"{ignore_index}: void"))
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=dpi)
