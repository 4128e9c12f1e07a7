"""DINO projection head, official formulation (facebookresearch/dino `vision_transformer.DINOHead`).

MLP: Linear(in, hidden) -> GELU -> [Linear(hidden, hidden) -> GELU] x (nlayers - 2) ->
Linear(hidden, bottleneck) (a single Linear(in, bottleneck) when nlayers == 1; optional BN after
each hidden Linear), trunc-normal(0.02) init, zero biases; then L2 normalisation and a
weight-normalised Linear(bottleneck, out_dim, bias=False) whose magnitude ``g`` is filled with 1 and
frozen when ``norm_last_layer`` (torch.nn.utils.parametrizations.weight_norm: ``g`` is
``last_layer.parametrizations.weight.original0``, the direction ``v`` is ``original1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from core.errors import ConfigError


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        if min(int(in_dim), int(out_dim), int(hidden), int(bottleneck)) <= 0:
            raise ConfigError(
                f"DINO head sizes in_dim={in_dim} out_dim={out_dim} hidden={hidden} "
                f"bottleneck={bottleneck} must be positive"
            )
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden, hidden))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden, bottleneck))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.norm_last_layer = bool(norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
