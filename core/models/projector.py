"""Barlow Twins projector, official formulation (facebookresearch/barlowtwins `main.py`):

    [Linear(no bias) -> BatchNorm1d -> ReLU] for every layer but the last, then Linear(no bias).

It is an `nn.Sequential` so its state-dict keys (``0.weight``, ``1.running_mean`` ...) are the same
as the official ``projector`` module's.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from core.errors import ConfigError


class BarlowTwinsProjector(nn.Sequential):
    def __init__(self, in_dim: int, dims: Sequence[int] = (8192, 8192, 8192)):
        dims = [int(d) for d in dims]
        if not dims or any(d <= 0 for d in dims) or int(in_dim) <= 0:
            raise ConfigError(
                f"projector dims {tuple(dims)} (in_dim={in_dim}) are invalid; use one or more "
                f"positive widths, e.g. (8192, 8192, 8192)"
            )
        sizes = [int(in_dim)] + dims
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
            layers.append(nn.BatchNorm1d(sizes[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        super().__init__(*layers)
        self.in_dim = int(in_dim)
        self.out_dim = sizes[-1]
        self.dims = tuple(dims)
