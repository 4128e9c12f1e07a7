"""Collapse monitors of self-supervised pretraining: the one home of the embedding statistics and of the
default collapse rule (`core.methods.ssl_base.SSLMethod.collapse_reason`; a method may declare its own).

A joint-embedding method collapses when the embeddings of different images become the same point
(complete collapse) or vary along very few directions (dimensional collapse). Two numbers over a set
of images show it, on the embeddings `z` (N, d) of the backbone the method exports (the pooled features
the k-NN monitor reads):

- ``embedding_std``: the mean over dimensions of the per-dimension standard deviation (over images) of
  the L2-normalised embeddings, times ``sqrt(d)``. SimSiam's collapse diagnostic (Chen & He, 2021,
  "Exploring Simple Siamese Representation Learning", section 4.1, Fig. 2; variance-regularised methods read the
  same per-dimension std) is the unscaled value, whose reference for well-spread (isotropic) unit vectors
  is ``1/sqrt(d)``; scaled by ``sqrt(d)`` it is ~1 for isotropic embeddings and 0 for a complete collapse,
  whatever the width. About the RMS angle (radians) between an embedding and the embeddings' mean
  direction when small.
- ``embedding_rank``: the RankMe effective rank (`core.diagnostics.dense_features.effective_rank`) of
  the embeddings, between 1 (one direction) and d.

The default rule (`embedding_collapse_reason`), with the values measured on this project's generated
data (400 images, 64 px): randomly initialised vit_nano_patch8 0.65 std / rank 19, resnet_tiny 0.17 / 44
(its pooled features start with a mean cosine of 0.96); so
- complete collapse: ``embedding_std < STD_MIN = 0.05``: every image within ~3 degrees of one
  direction, 3x tighter than an untrained ResNet;
- dimensional collapse: ``embedding_rank < RANK_MIN = 2``: the embeddings vary along one direction.
A rule that cannot be evaluated (no k-NN images, so no embeddings) says nothing (None).

`METRICS` declares the metrics.json keys of the monitors (core/metrics/registry.py); the SSL method writes
them after training (`SSLMethod.result_metrics` / `collapse_metrics`).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from core.diagnostics.dense_features import effective_rank
from core.metrics.registry import AFTER, EPOCH, MetricSpec
from core.stages import PRETRAIN

__all__ = ["STD_MIN", "RANK_MIN", "embedding_std", "embedding_std_tensor", "embedding_stats", "embedding_collapse_reason"]

STD_MIN = 0.05
RANK_MIN = 2.0


def embedding_std_tensor(z: torch.Tensor) -> torch.Tensor:
    """`embedding_std` as a 0-d tensor on z's device, float32 (no host sync: a per-step log)."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"embedding_std needs an (N, d) matrix with N >= 2, got shape {tuple(z.shape)}")
    zn = F.normalize(z.detach() if z.dtype == torch.float64 else z.detach().float(), dim=1)
    return zn.std(dim=0).mean() * math.sqrt(z.shape[1])


def embedding_std(z: torch.Tensor) -> float:
    """Mean per-dimension std (over the N rows, unbiased) of the L2-normalised rows of `z` (N, d), times
    sqrt(d): ~1 for isotropic embeddings, 0 when every row is the same direction."""
    return float(embedding_std_tensor(z.double()))


def embedding_stats(z: torch.Tensor) -> dict[str, float]:
    """{"embedding_std", "embedding_rank"} of the embeddings `z` (N, d) (module doc)."""
    return {"embedding_std": embedding_std(z), "embedding_rank": effective_rank(z.detach().float())}


def embedding_collapse_reason(metrics: Mapping[str, object]) -> Optional[str]:
    """The default rule on `metrics["embedding_std"]` / `["embedding_rank"]`: a one-line reason when the
    embeddings collapsed, else None (also when neither was measured)."""
    std, rank = metrics.get("embedding_std"), metrics.get("embedding_rank")
    if std is not None and math.isfinite(float(std)) and float(std) < STD_MIN:
        return (f"complete collapse: embedding_std {float(std):.3f} < {STD_MIN} (the L2-normalised embeddings "
                "of all images lie within a few degrees of one direction)")
    if rank is not None and math.isfinite(float(rank)) and float(rank) < RANK_MIN:
        return (f"dimensional collapse: embedding_rank {float(rank):.2f} < {RANK_MIN:g} (the embeddings vary "
                "along one direction)")
    return None


METRICS = (
    MetricSpec("embedding_std", PRETRAIN.name,
               "collapse monitor: mean per-dimension std of the L2-normalised pooled embeddings of the k-NN images x "
               "sqrt(d), last epoch (~1 isotropic, 0 complete collapse; core/diagnostics/collapse.py)", EPOCH),
    MetricSpec("embedding_rank", PRETRAIN.name,
               "collapse monitor: effective rank (RankMe) of the same embeddings, last epoch", EPOCH),
    MetricSpec("collapsed", PRETRAIN.name, "true when the method's collapse rule (SSLMethod.collapse_reason) fired, "
               "false when not, null when none of its monitors was measured", AFTER),
    MetricSpec("collapse_reason", PRETRAIN.name,
               "one line: which collapse and the numbers that show it; null unless collapsed", AFTER),
)
