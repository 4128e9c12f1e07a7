"""What a pretraining run writes about its dense features: how many directions they use (RankMe effective
rank) and how local they are (share of their variance within images), before and after pretraining, on the
k-NN val images (`core.diagnostics.dense_features.dense_feature_stats`, computed once per evaluation).
Declared for the metric registry (core/metrics/registry.py)."""

from __future__ import annotations

from typing import Optional

from core.metrics.registry import AFTER, BEFORE, Column, EvalContext, MetricSpec
from core.stages import PRETRAIN


def dense_stats(ctx: EvalContext) -> dict:
    """`dense_feature_stats` of an evaluation's backbone on the k-NN val images."""
    def run():
        from core.diagnostics.dense_features import dense_feature_stats

        return dense_feature_stats(ctx.backbone, ctx.loaders.knn_val, device=ctx.device)

    return ctx.once("dense", run)


def _stat(name: str):
    def compute(ctx: EvalContext) -> Optional[float]:
        return dense_stats(ctx).get(name)

    return compute


_RANK, _LOCAL = _stat("effective_rank"), _stat("local_variance_fraction")

METRICS = (
    MetricSpec("dense_rank", PRETRAIN.name, "effective rank (RankMe) of the dense features after pretraining", AFTER,
               compute=_RANK, order=20,
               columns=(Column("pretraining", "Dense eff. rank", 1, position=30),
                        Column("emerging", "Dense eff. rank", 1, position=50))),  # a higher rank is not better
    MetricSpec("dense_rank_init", PRETRAIN.name, "the same before pretraining", BEFORE, compute=_RANK, order=21),
    MetricSpec("dense_local_var", PRETRAIN.name,
               "share of the dense features' variance within images, after pretraining", AFTER,
               compute=_LOCAL, order=22, columns=(Column("pretraining", "Dense local var.", 2, position=31),)),
    MetricSpec("dense_local_var_init", PRETRAIN.name, "the same before pretraining", BEFORE, compute=_LOCAL, order=23),
)
