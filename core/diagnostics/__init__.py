"""Diagnostics: attention maps (DINO's method), effective receptive fields (Luo et al.),
Barlow Twins cross-correlation heatmaps, segmentation prediction overlays, how local the dense
features are (effective rank, within-image variance share) -- as plain functions
and as Lightning callbacks writing `<run_dir>/figures/{attention,erf,crosscorr,predictions}_*.png`.

Stable name: `core.diagnostics.effective_receptive_field(model, layer, images) -> (H, W) array`.
"""

from core.diagnostics.attention import (
    attention_figure,
    cls_attention_maps,
    plot_attention_gallery,
    threshold_attention,
)
from core.diagnostics.cross_correlation import CC_CMAP, plot_cc_evolution, plot_cross_correlation
from core.diagnostics.dense_features import dense_feature_stats, effective_rank, local_variance_fraction
from core.diagnostics.predictions import colorize_mask, palette_array, plot_predictions
from core.diagnostics.receptive_field import effective_receptive_field, erf_extent, erf_grid, plot_erf_grid

__all__ = [
    "cls_attention_maps",
    "threshold_attention",
    "plot_attention_gallery",
    "attention_figure",
    "effective_receptive_field",
    "erf_grid",
    "erf_extent",
    "plot_erf_grid",
    "CC_CMAP",
    "plot_cross_correlation",
    "plot_cc_evolution",
    "dense_feature_stats",
    "effective_rank",
    "local_variance_fraction",
    "palette_array",
    "colorize_mask",
    "plot_predictions",
    "DiagnosticCallback",
    "AttentionMapCallback",
    "ReceptiveFieldCallback",
    "CrossCorrelationCallback",
    "PredictionCallback",
]

_CALLBACKS = {"DiagnosticCallback", "AttentionMapCallback", "ReceptiveFieldCallback", "CrossCorrelationCallback",
              "PredictionCallback"}


def __getattr__(name):
    # The callbacks import lightning; load them only when asked for (plain functions stay light).
    if name in _CALLBACKS:
        from core.diagnostics import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'core.diagnostics' has no attribute {name!r}")
