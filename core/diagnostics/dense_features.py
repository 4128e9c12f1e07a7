"""How local are a backbone's dense features? Two numbers for the segmentation question.

An image-level objective (Barlow Twins on the pooled / CLS representation) can make the patch
features of an image all alike: they then say *which image* this is rather than *what is here*,
which is what a segmentation head needs. Two statistics over a set of images make that visible:

- **effective rank** of the (centred) dense feature vectors, RankMe (Garrido et al., 2023,
  "RankMe: Assessing the downstream performance of pretrained self-supervised representations",
  https://arxiv.org/abs/2210.02885): ``exp(H(p))`` with ``p_k = sigma_k / sum(sigma)`` over the
  singular values ``sigma`` (Roy & Vetterli, 2007). Between 1 (every vector on one line) and the
  feature width (isotropic).
- **local variance fraction**: the share of the feature variance that is *within* images,
  ``sum ||z_bp - mean_p z_b||^2 / sum ||z_bp - mean_bp z||^2`` over images b and positions p.
  1: image means are all alike and every difference is local; 0: every position of an image has
  the same vector (the dense map holds no spatial information).

`dense_feature_stats(backbone, images)` computes both on ``backbone.forward_all(x).dense``
(B, C, h, w) in float32, accumulating C x C moments, so memory does not grow with the image count.
"""

from __future__ import annotations

import math
from typing import Iterable, Union

import torch

from core.errors import ConfigError

__all__ = ["effective_rank", "local_variance_fraction", "DenseMoments", "dense_feature_stats"]


def _rank_from_singular_values(s: torch.Tensor) -> float:
    s = s.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0.0 or not math.isfinite(total):
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(z: torch.Tensor) -> float:
    """RankMe effective rank of the rows of ``z`` (N, D) after centring: exp(entropy of sigma / sum sigma)."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ConfigError(f"effective_rank needs an (N, D) matrix with N >= 2 vectors, got shape {tuple(z.shape)}")
    z = z.double()
    return _rank_from_singular_values(torch.linalg.svdvals(z - z.mean(0)))


def local_variance_fraction(dense: torch.Tensor) -> float:
    """Share of the variance of dense features (B, C, h, w) that lies within images (see module doc)."""
    if dense.ndim != 4 or dense.shape[0] < 1 or dense.shape[2] * dense.shape[3] < 2:
        raise ConfigError(f"local_variance_fraction needs (B, C, h, w) features with h * w >= 2, "
                          f"got shape {tuple(dense.shape)}")
    moments = DenseMoments()
    moments.update(dense)
    return moments.result()["local_variance_fraction"]


class DenseMoments:
    """Streaming moments of dense maps: the total and within-image scatter and the C x C covariance."""

    def __init__(self) -> None:
        self.n = 0  # feature vectors
        self.sum: torch.Tensor | None = None  # (C,)
        self.outer: torch.Tensor | None = None  # (C, C) sum of z z^T
        self.within: torch.Tensor | None = None  # sum over images of the scatter around each image's mean

    def update(self, dense: torch.Tensor) -> None:
        if dense.ndim != 4:
            raise ConfigError(f"dense features must be (B, C, h, w), got shape {tuple(dense.shape)}")
        z = dense.detach().double().flatten(2)  # (B, C, N)
        v = z.transpose(1, 2).reshape(-1, z.shape[1])  # (B*N, C)
        if self.sum is None:  # accumulators stay on the features' device: no host sync per batch
            self.sum = torch.zeros(v.shape[1], dtype=torch.float64, device=v.device)
            self.outer = torch.zeros(v.shape[1], v.shape[1], dtype=torch.float64, device=v.device)
            self.within = torch.zeros((), dtype=torch.float64, device=v.device)
        self.within += ((z - z.mean(2, keepdim=True)) ** 2).sum()
        self.n += v.shape[0]
        self.sum += v.sum(0)
        self.outer += v.T @ v

    def result(self) -> dict:
        if self.n < 2 or self.sum is None or self.outer is None:
            raise ConfigError("dense feature statistics need at least 2 feature vectors; pass more images")
        mean = self.sum / self.n
        scatter = self.outer - self.n * torch.outer(mean, mean)  # centred sum of squares, (C, C)
        scatter = 0.5 * (scatter + scatter.T)
        eig = torch.linalg.eigvalsh(scatter).clamp_min(0)
        total = float(scatter.diagonal().sum())
        return {
            "effective_rank": _rank_from_singular_values(eig.sqrt()),
            "local_variance_fraction": float(self.within) / total if total > 0 else float("nan"),
            "dim": int(self.sum.numel()),
            "num_vectors": int(self.n),
        }


@torch.no_grad()
def dense_feature_stats(backbone, images: Union[torch.Tensor, Iterable], *, max_images: int = 256,
                        device: Union[str, torch.device, None] = None) -> dict:
    """{"effective_rank", "local_variance_fraction", "dim", "num_vectors", "num_images"} of the
    backbone's dense features over ``images``: a (B, 3, H, W) tensor or an iterable of batches
    (tensors, or the k-NN loaders' ``(images, labels)`` / dict batches, read with
    `core.methods.knn_monitor.split_batch`; uint8 images are normalised as there), at most
    ``max_images`` of them. The backbone is run in eval mode and left in the mode it was in."""
    from core.methods.knn_monitor import prepare_images, split_batch

    if max_images < 1:
        raise ConfigError(f"max_images={max_images} must be >= 1")
    batches = [images] if isinstance(images, torch.Tensor) else images
    dev = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    moments, seen = DenseMoments(), 0
    try:
        for batch in batches:
            x = batch if isinstance(batch, torch.Tensor) else split_batch(batch)[0]
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ConfigError("dense_feature_stats needs image batches of shape (B, 3, H, W)")
            x = prepare_images(x[: max_images - seen], dev)
            moments.update(backbone.forward_all(x).dense.float())
            seen += x.shape[0]
            if seen >= max_images:
                break
    finally:
        backbone.train(was_training)
    out = moments.result()
    out["num_images"] = seen
    return out
