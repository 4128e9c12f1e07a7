"""Helpers shared by the diagnostics: matplotlib (Agg) setup, image de-normalisation, mode handling."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

# Figures are built with `matplotlib.figure.Figure` + the Agg canvas directly, never pyplot: no
# display is touched, no global backend is switched, nothing accumulates in pyplot's figure manager,
# and it is safe from callback threads.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

def default_mean_std() -> tuple[Sequence[float], Sequence[float]]:
    """(MEAN, STD) of the model inputs (`core.data.batch`)."""
    from core.data.batch import MEAN, STD

    return MEAN, STD


def to_display_images(images, mean=None, std=None, denormalize: bool = True) -> np.ndarray:
    """Model-input images -> (B, H, W, 3) float array in [0, 1] for imshow.

    Accepts a (B, 3, H, W) / (3, H, W) tensor or array. uint8 input is scaled by 1/255 and never
    de-normalised; float input is de-normalised with (mean, std) (defaults: the data module's)
    unless `denormalize=False`. Single-channel images are repeated to RGB.
    """
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
        if denormalize:
            if mean is None or std is None:
                dm, ds = default_mean_std()
                mean = dm if mean is None else mean
                std = ds if std is None else std
            c = x.shape[1]
            m = torch.as_tensor(mean, dtype=x.dtype).flatten()[:c].view(1, -1, 1, 1)
            s = torch.as_tensor(std, dtype=x.dtype).flatten()[:c].view(1, -1, 1, 1)
            x = x * s + m
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x[:, :3].clamp(0, 1).permute(0, 2, 3, 1).numpy()


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each submodule's own flag afterwards.

    Restoring per submodule (not `module.train(previous)`) keeps deliberately frozen parts (a frozen
    backbone kept in eval inside a training module) as they were.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in modes:
            m.training = flag


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def prepare_path(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def new_figure(figsize=(6.4, 4.8)) -> Figure:
    """A headless Agg figure (no pyplot)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Save `fig` to `path` (PNG unless the suffix says otherwise) atomically (`core.io.atomic_save_figure`)."""
    from core.io import atomic_save_figure

    return atomic_save_figure(fig, path, dpi=dpi)


def figure_to_rgb(fig, dpi: int = 100) -> np.ndarray:
    """Render `fig` to an (H, W, 3) uint8 array (for GIF frames)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
