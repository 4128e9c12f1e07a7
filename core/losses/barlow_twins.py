"""Barlow Twins loss (Zbontar et al., 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", https://arxiv.org/abs/2103.03230), official formulation
(https://github.com/facebookresearch/barlowtwins/blob/main/main.py):

    z_n = (z - mean_batch(z)) / sqrt(var_batch(z) + eps)       # BatchNorm1d(affine=False), biased var
    C   = z1_n^T z2_n / N                                       # (D, D) cross-correlation
    L   = scale * [ sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 ]

Under DDP the embeddings are gathered with an autograd-aware all_gather so that C is computed over
the *global* batch and gradients flow back to every rank's local samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BN_EPS = 1e-5


def gather_with_grad(z: Tensor) -> Tensor:
    """Concatenate `z` from every DDP rank along dim 0, keeping gradients (no-op when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            from torch.distributed.nn.functional import all_gather

            return torch.cat(all_gather(z), dim=0)
    return z


def batch_normalize(z: Tensor, eps: float = BN_EPS) -> Tensor:
    """Normalise each dimension over the batch exactly as BatchNorm1d(affine=False) in training mode."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = BN_EPS, gather: bool = True) -> Tensor:
    """Empirical cross-correlation matrix (D, D) of two (N, D) embeddings over the (global) batch.

    Computed in float32 even under autocast: the normalisation and the D x D product are the
    numerically delicate part of the loss. `gather=False`: over this process' batch only (no
    collective call, e.g. a statistic that one DDP rank computes alone).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"cross_correlation expects two (N, D) tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if gather:
        z1 = gather_with_grad(z1)
        z2 = gather_with_grad(z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError("cross_correlation needs a batch of at least 2 samples")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1n = batch_normalize(z1.float(), eps)
        z2n = batch_normalize(z2.float(), eps)
        return z1n.T @ z2n / n


def off_diagonal(c: Tensor) -> Tensor:
    """Flattened off-diagonal entries of a square matrix (the official repo's trick, no mask alloc)."""
    n, m = c.shape
    assert n == m
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss_from_cc(c: Tensor, lambd: float, scale: float = 1.0) -> Tensor:
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return scale * (on_diag + lambd * off_diag)


def cc_statistics(c: Tensor) -> dict[str, float]:
    """Scalars that show how close C is to the identity: mean diagonal and off-diagonal RMS."""
    c = c.detach().float()
    return {
        "cc_diag_mean": torch.diagonal(c).mean().item(),
        "cc_offdiag_rms": off_diagonal(c).pow(2).mean().sqrt().item(),
    }


class BarlowTwinsLoss(nn.Module):
    """`BarlowTwinsLoss(lambd=0.0051, scale=1.0)(z1, z2) -> scalar`.

    After a call, `last_cc` holds the detached cross-correlation matrix (for diagnostics; no extra
    computation).
    """

    def __init__(self, lambd: float = 0.0051, scale: float = 1.0):
        super().__init__()
        if lambd < 0:
            raise ValueError(f"lambd={lambd} must be >= 0")
        self.lambd = float(lambd)
        self.scale = float(scale)
        self.last_cc: Tensor | None = None

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        c = cross_correlation(z1, z2)
        self.last_cc = c.detach()
        return barlow_twins_loss_from_cc(c, self.lambd, self.scale)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, scale={self.scale}"
