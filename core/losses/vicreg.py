"""VICReg loss (Bardes, Ponce, LeCun, ICLR 2022, "VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning", https://arxiv.org/abs/2105.04906), official formulation
(https://github.com/facebookresearch/vicreg/blob/main/main_vicreg.py, `VICReg.forward`):

    inv = mse(z1, z2)                                               # local batch, before any gather
    z   = z - mean_batch(z)                                         # over the gathered (global) batch
    std = sqrt(var_batch(z) + eps)                                  # unbiased variance (N - 1)
    var = mean(relu(1 - std_1)) / 2 + mean(relu(1 - std_2)) / 2
    C   = z^T z / (N - 1)                                           # (D, D) covariance
    cov = sum_{i != j} C1_ij^2 / D + sum_{i != j} C2_ij^2 / D
    L   = sim_coeff * inv + std_coeff * var + cov_coeff * cov       # defaults 25, 25, 1

As in the official code (its `FullGatherLayer`), the variance and covariance terms are computed over
the batch gathered from every DDP rank with gradients (`gather_with_grad`, shared with Barlow Twins);
without an initialised process group the gather is a no-op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.losses.barlow_twins import gather_with_grad, off_diagonal


def _variance_term(z: Tensor, eps: float) -> Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)  # unbiased, as torch's default (and the official code)
    return torch.mean(F.relu(1 - std))


def _covariance_term(z: Tensor) -> Tensor:
    n, d = z.shape
    cov = z.T @ z / (n - 1)  # z is centred
    return off_diagonal(cov).pow(2).sum() / d


class VICRegLoss(nn.Module):
    """`VICRegLoss(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, gather=True)(z1, z2) -> scalar`.

    Computed in float32 even under autocast. After a call, `last_terms` holds the detached,
    *unweighted* terms `{"invariance", "variance", "covariance"}` (0-d float32 tensors, so logging
    them costs no extra device sync until they are read). `gather=False`: variance/covariance over
    this process' batch only.
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4, gather: bool = True):
        super().__init__()
        for name, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff),
                            ("eps", eps)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        self.sim_coeff = float(sim_coeff)
        self.std_coeff = float(std_coeff)
        self.cov_coeff = float(cov_coeff)
        self.eps = float(eps)
        self.gather = bool(gather)
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[1] < 1:
            raise ValueError(f"VICRegLoss expects two (N, D) tensors of the same shape, got "
                             f"{tuple(z1.shape)} and {tuple(z2.shape)}")
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = z1.float(), z2.float()
            inv = F.mse_loss(z1, z2)
            if self.gather:
                z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
            if z1.shape[0] < 2:
                raise ValueError(f"VICRegLoss needs a batch of at least 2 samples, got shapes "
                                 f"{tuple(z1.shape)} and {tuple(z2.shape)}")
            z1 = z1 - z1.mean(dim=0)
            z2 = z2 - z2.mean(dim=0)
            var = _variance_term(z1, self.eps) / 2 + _variance_term(z2, self.eps) / 2
            cov = _covariance_term(z1) + _covariance_term(z2)
            loss = self.sim_coeff * inv + self.std_coeff * var + self.cov_coeff * cov
        self.last_terms = {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}
        return loss

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, "
                f"eps={self.eps}, gather={self.gather}")
