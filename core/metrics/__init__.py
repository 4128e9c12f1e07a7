"""Metrics. Stable name: `SegmentationMetrics`; k-NN / linear-probe monitors live in `core.metrics.knn`."""

from core.metrics.segmentation import SegmentationMetrics

__all__ = ["SegmentationMetrics", "knn_accuracy", "linear_probe_accuracy"]


def __getattr__(name):  # k-NN monitors are imported lazily (their module is written separately)
    if name in ("knn_accuracy", "linear_probe_accuracy"):
        from core.metrics import knn

        return getattr(knn, name)
    raise AttributeError(name)
