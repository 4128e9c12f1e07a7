"""What a run's metrics.json holds, key by key: the run record declared here, the measurements in the
metric registry (core/metrics/registry.py).

`core.runs.skeleton` checks every metrics dict against `keys(stage)` before writing it, so a key cannot
be written without being declared. Measurements (k-NN, probes, attention Jaccard, collapse monitors,
segmentation scores, an SSL method's `result_keys`, ...) are declared next to their computation as
`MetricSpec`s; this module declares the run's RECORD: what the config, the bookkeeping and the
accounting (core/accounting.py) write, as `MetricSpec(when=RUN)` entries (ARCHITECTURE.md lists these
keys; a test compares them).
"""

from __future__ import annotations

from typing import Iterable

from core.metrics.registry import RUN, Column, MetricSpec
from core.stages import PRETRAIN as _PRE
from core.stages import SEGMENT as _SEG
from core.stages import stages

#: every run, both stages (core/accounting.py writes the accounting keys)
COMMON: dict[str, str] = {
    "stage": "the stage's name (core/stages.py): " + " or ".join(f'"{s}"' for s in stages()),
    "backbone": "backbone name",
    "source": "initial weights (random, imagenet, ..., checkpoint:PATH)",
    "seed": "random seed",
    "epochs": "training epochs",
    "skipped_files": "corrupt files skipped under data.corrupt_policy=skip",
    "wall_time_s": "wall time of training (s)",
    "device_seconds": "device time: wall x GPUs, or CPU seconds on the CPU, summed over DDP workers",
    "device": "what ran it, e.g. '1x NVIDIA H200' or 'cpu (2 cores)'",
    "images_per_s": "training images per second (all views of an image count once)",
    "train_images": "training images seen",
    "peak_mem_mb": "peak device memory (MB; CPU: peak RSS)",
    "flops_per_image": "forward + backward FLOPs of one training image with all its views, counted at run start "
                       "(core/flops.py, torch FlopCounterMode, FMA = 2 FLOPs); null when not countable",
    "mfu": "model FLOPs utilisation: flops_per_image x images_per_s / (dense bf16 peak x GPUs), a fraction; "
           "null on the CPU and on a GPU not in core/flops.py PEAK_BF16_TFLOPS",
    "workers": "DDP workers (only when > 1)",
    "device_seconds_per_worker": "device seconds of each DDP worker (only when > 1)",
    "identity": "what produced the result (core/runs/identity.py): {config, data, weights}; a folder is reused "
                "only when all three match the request",
}

PRETRAIN: dict[str, str] = {
    "method": "SSL method (core/methods/registry.py)",
    "method_label": "the method's display name (the report's row label)",
    "final_loss": "training loss of the last epoch",
    "knn_k": "neighbours of the k-NN monitor",
    "knn_backbone": "which backbone is evaluated and exported (backbone | teacher_backbone)",
    "backbone_path": "path of backbone.pt (the input of checkpoint:PATH)",
    "num_ssl_images": "images used for self-supervision",
    "ssl_source": "where they came from, e.g. voc:train",
    "gpu_augment": "whether colour/blur/solarize ran on whole batches on the device",
    "weights_loaded": "tensors loaded from the weight source",
}

SEGMENT: dict[str, str] = {
    "evaluation": "preset E1..E5 or null",
    "head": "segmentation head",
    "fusion": "attention fusion: none | features | affinity",
    "mode": "frozen | finetune",
    "loss": "ce | dice | focal",
    "inference": "whole | slide",
    "dataset": "voc | coco_stuff",
    "image_size": "training side in pixels (evaluation: eval_protocol.eval_scale)",
    "num_classes": "classes of the label space",
    "output_stride": "input pixels per cell of the backbone's dense map",
    "eval_protocol": "how val was scored: {split, images, resolution: original, eval_scale (short side), "
                     "eval_max_long, inference, slide_crop / slide_stride when slide}; logits resized "
                     "(bilinear) to each original mask, 255 ignored",
    "class_names": "class names in label order",
    "final_train_loss": "training loss of the last epoch",
    "val_loss": "validation loss",
    "source_report": "what loading the weight source did (counts of loaded / missing keys)",
    "model_path": "path of model.pt",
}

#: report columns of record keys (pretraining table), key -> Column(s)
_COLUMNS: dict[str, tuple[Column, ...]] = {
    "final_loss": (Column("pretraining", "Final loss", 3, position=50),),
    "wall_time_s": (Column("pretraining", "Wall time (s)", 1, position=70),),
    "device_seconds": (Column("pretraining", "Device-hours", 4, best=-1, position=71, name="device_hours",
                              transform=lambda s: s / 3600),),
    "images_per_s": (Column("pretraining", "Img/s", 1, best=+1, position=72),),
    "flops_per_image": (Column("pretraining", "GFLOP/img", 3, position=73, name="gflop_per_image",
                               transform=lambda f: f * 1e-9),),
    "mfu": (Column("pretraining", "MFU (%)", 1, position=74, name="mfu_pct", transform=lambda m: m * 100.0),),
    "peak_mem_mb": (Column("pretraining", "Peak mem (MB)", 1, position=75),),
}
_HEADLINE = {(_PRE.name, "final_loss")}


def _record(stage: str, table: dict[str, str]) -> tuple[MetricSpec, ...]:
    return tuple(MetricSpec(k, stage, d, RUN, columns=_COLUMNS.get(k, ()) if stage == _PRE.name else (),
                            headline=(stage, k) in _HEADLINE) for k, d in table.items())


METRICS = (*_record(_PRE.name, COMMON), *_record(_PRE.name, PRETRAIN),
           *_record(_SEG.name, COMMON), *_record(_SEG.name, SEGMENT))


def record_keys(stage) -> dict[str, str]:
    """The run-record keys of `stage` declared here (what ARCHITECTURE.md lists)."""
    name = getattr(stage, "name", stage)
    return {s.key: s.description for s in METRICS if s.stage == name}


def keys(stage) -> dict[str, str]:
    """Every key a run of `stage` may write, with its description (the record and every registered metric)."""
    from core.metrics.registry import descriptions

    return descriptions(stage)


def check(stage, metrics: dict, extra_allowed: Iterable[str] = ()) -> None:
    """A programming-error check before metrics.json is written: every key is declared."""
    unknown = sorted(set(metrics) - set(keys(stage)) - set(extra_allowed))
    if unknown:
        raise RuntimeError(f"metrics.json keys {', '.join(unknown)} are not declared; declare each as a MetricSpec "
                           "next to its computation (core/metrics/registry.py), or in core/runs/metrics_schema.py "
                           "when it is part of the run record")
