"""Barlow Twins cross-correlation matrix heatmaps (a snapshot, and its evolution over training).

Colour scale (the study's convention: "values close to 1 are red and values close to 0 are cyan
blue"): a fixed scale over [-1, 1] (`vmin=-1, vmax=1`, the range of a correlation) with the custom
colormap `CC_CMAP`:

    -1  dark navy      -0.5  blue      0  cyan-blue (#00a8ff)      0.5  amber      1  red

so an off-diagonal entry near 0 is cyan-blue, a diagonal entry near 1 is red, negative correlations
get darker blues, and the scale is identical across snapshots (comparable over training).
Matrices are cropped to their first `max_dims` x `max_dims` block for readability (the scalars in
the title are computed on the full matrix, with `core.losses.barlow_twins.cc_statistics`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.colors import LinearSegmentedColormap

from core.diagnostics._common import figure_to_rgb, new_figure, prepare_path, save_figure

__all__ = ["CC_CMAP", "plot_cross_correlation", "plot_cc_evolution", "cc_gif", "cc_stats"]

CC_CMAP = LinearSegmentedColormap.from_list(
    "twinseg_cc",
    [
        (0.00, "#0b0b3b"),  # -1: dark navy
        (0.25, "#1f3fbf"),  # -0.5: blue
        (0.50, "#00a8ff"),  # 0: cyan-blue
        (0.70, "#9be15d"),  # 0.4: light green
        (0.80, "#ffd23f"),  # 0.6: amber
        (0.90, "#ff7a00"),  # 0.8: orange
        (1.00, "#d00000"),  # 1: red
    ],
)
VMIN, VMAX = -1.0, 1.0


def _as_matrix(c) -> torch.Tensor:
    c = torch.as_tensor(c).detach().float().cpu()
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"expected a square (D, D) cross-correlation matrix, got {tuple(c.shape)}")
    return c


def cc_stats(c) -> dict[str, float]:
    """Mean diagonal and off-diagonal RMS of the full matrix (`cc_statistics` of the loss module)."""
    c = _as_matrix(c)
    try:
        from core.losses.barlow_twins import cc_statistics

        return cc_statistics(c)
    except Exception:  # pragma: no cover - the loss module is part of the repo
        d = c.shape[0]
        off = c[~torch.eye(d, dtype=torch.bool)]
        return {"cc_diag_mean": c.diagonal().mean().item(), "cc_offdiag_rms": off.pow(2).mean().sqrt().item()}


def _draw(ax, c: torch.Tensor, max_dims: int | None, cmap, show_ticks: bool = True):
    d = c.shape[0]
    k = d if not max_dims else min(d, int(max_dims))
    im = ax.imshow(c[:k, :k].numpy(), cmap=cmap, vmin=VMIN, vmax=VMAX, interpolation="nearest")
    if not show_ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    return im, k


def plot_cross_correlation(
    c,
    path,
    title: str | None = None,
    *,
    max_dims: int | None = 64,
    cmap=None,
    show_stats: bool = True,
    figsize=(5.0, 4.3),
    dpi: int = 100,
) -> Path:
    """Heatmap PNG of a (D, D) cross-correlation matrix with a colour bar.

    Shows the first `max_dims` x `max_dims` block (None: all). Colour scale fixed to [-1, 1] with
    `CC_CMAP` (0 cyan-blue, 1 red) unless `cmap` is given. The title gets the full-matrix
    scalars (mean diagonal, off-diagonal RMS) when `show_stats`.
    """
    c = _as_matrix(c)
    fig = new_figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    im, k = _draw(ax, c, max_dims, cmap or CC_CMAP)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    lines = [title] if title else []
    if show_stats:
        s = cc_stats(c)
        lines.append(f"diag mean {s['cc_diag_mean']:.3f}, off-diag RMS {s['cc_offdiag_rms']:.3f}")
    if k < c.shape[0]:
        lines.append(f"first {k}x{k} of {c.shape[0]}x{c.shape[0]}")
    if lines:
        ax.set_title("\n".join(lines), fontsize=8)
    return save_figure(fig, path, dpi=dpi)


def _subsample(snaps: list, max_snapshots: int | None) -> list:
    if not max_snapshots or len(snaps) <= max_snapshots:
        return snaps
    idx = np.unique(np.linspace(0, len(snaps) - 1, int(max_snapshots)).round().astype(int))
    return [snaps[i] for i in idx]


def plot_cc_evolution(
    snapshots: Sequence[tuple[int, object]],
    path,
    *,
    max_dims: int | None = 64,
    max_snapshots: int | None = 8,
    max_cols: int = 8,
    title: str | None = None,
    cmap=None,
    gif_path=None,
    stats: Sequence[dict] | None = None,
    panel_size: float = 2.2,
    dpi: int = 100,
) -> Path:
    """Strip of snapshots over training, [(epoch, C), ...] in order, one shared colour bar.

    `stats` (optional, one dict per snapshot with `cc_diag_mean`/`cc_offdiag_rms`) overrides the
    scalars computed from the given matrices -- for snapshots stored cropped to save memory.

    At most `max_snapshots` panels (evenly spaced, first and last kept). Each panel is titled with
    its epoch and full-matrix scalars. With `gif_path`, also writes an animated GIF of all snapshots
    (via PIL, one frame per snapshot).
    """
    snaps = [(int(e), _as_matrix(c)) for e, c in snapshots]
    if not snaps:
        raise ValueError("plot_cc_evolution needs at least one (epoch, matrix) snapshot")
    if stats is not None:
        if len(stats) != len(snaps):
            raise ValueError(f"stats has {len(stats)} entries for {len(snaps)} snapshots")
        snaps = [(e, c, dict(s)) for (e, c), s in zip(snaps, stats)]
    else:
        snaps = [(e, c, cc_stats(c)) for e, c in snaps]
    shown = _subsample(snaps, max_snapshots)
    n = len(shown)
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(panel_size * cols + 0.8, panel_size * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax, (epoch, c, s) in zip(axes.flat, shown):
        im, _ = _draw(ax, c, max_dims, cmap or CC_CMAP, show_ticks=False)
        ax.set_title(f"epoch {epoch}\ndiag {s['cc_diag_mean']:.2f} off {s['cc_offdiag_rms']:.3f}", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes.flat), fraction=0.02, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=9)
    out = save_figure(fig, path, dpi=dpi)
    if gif_path is not None:
        cc_gif([(e, c) for e, c, _ in snaps], gif_path, max_dims=max_dims, cmap=cmap, stats=[s for *_, s in snaps])
    return out


def cc_gif(snapshots: Sequence[tuple[int, object]], path, *, max_dims: int | None = 64, cmap=None,
           stats: Sequence[dict] | None = None, duration_ms: int = 500, dpi: int = 60) -> Path:
    """Animated GIF, one heatmap frame per (epoch, C) snapshot."""
    from PIL import Image

    frames = []
    for i, (epoch, c) in enumerate(snapshots):
        c = _as_matrix(c)
        fig = new_figure(figsize=(4.0, 3.5))
        ax = fig.add_subplot(1, 1, 1)
        im, _ = _draw(ax, c, max_dims, cmap or CC_CMAP, show_ticks=False)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        s = stats[i] if stats is not None else cc_stats(c)
        ax.set_title(f"epoch {epoch}: diag {s['cc_diag_mean']:.2f}, off {s['cc_offdiag_rms']:.3f}", fontsize=8)
        frames.append(Image.fromarray(figure_to_rgb(fig, dpi=dpi)))
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size) for f in frames]
    path = prepare_path(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return path
