"""Metrics. Stable name: `SegmentationMetrics`; k-NN / linear-probe monitors live in `core.metrics.knn`;
DINO's attention-mask Jaccard in `core.metrics.attention_jaccard` and the frozen dense linear probe in
`core.metrics.dense_probe` (import their functions from those modules: the package attribute of the same
name is the submodule). Every metrics.json key is declared once as a `MetricSpec` of `core.metrics.registry`,
next to its computation (each module here exposes its `METRICS`)."""

from core.metrics.segmentation import SegmentationMetrics

__all__ = ["SegmentationMetrics", "knn_accuracy", "linear_probe_accuracy"]


def __getattr__(name):  # k-NN monitors are imported lazily (their module is written separately)
    if name in ("knn_accuracy", "linear_probe_accuracy"):
        from core.metrics import knn

        return getattr(knn, name)
    raise AttributeError(name)
