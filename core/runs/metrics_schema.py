"""The one declaration of what a run's metrics.json holds, key by key.

`core.runs.skeleton` checks every metrics dict against this schema before writing it, so a key
cannot be added without being documented here; ARCHITECTURE.md lists the same keys (a test compares
them). An SSL method adds its own keys, documented where it computes them: the `result_keys`
mapping (key -> description) of its LightningModule (core/methods/<name>.py).
"""

from __future__ import annotations

from typing import Iterable

#: every run, both stages (core/accounting.py writes the accounting keys)
COMMON: dict[str, str] = {
    "stage": '"pretrain" or "segment"',
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
}

PRETRAIN: dict[str, str] = {
    "method": "SSL method (core/methods/registry.py)",
    "method_label": "the method's display name (the report's row label)",
    "knn_acc": "k-NN accuracy (%) of the frozen pooled features after pretraining",
    "knn_acc_init": "the same before pretraining",
    "linear_probe_acc": "linear-probe accuracy (%) on the frozen pooled features after pretraining",
    "dense_rank": "effective rank (RankMe) of the dense features after pretraining",
    "dense_rank_init": "the same before pretraining",
    "dense_local_var": "share of the dense features' variance within images, after pretraining",
    "dense_local_var_init": "the same before pretraining",
    "attn_jaccard": "DINO's attention-mask Jaccard (%) after pretraining: last-block attention maps thresholded "
                    "to 60% of their mass vs each val object, best head per object, mean per image then over "
                    "images (core/metrics/attention_jaccard.py); null without attention maps (CNNs) or masks",
    "attn_jaccard_init": "the same before pretraining",
    "attn_jaccard_heads": "the same score with each head fixed, one value (%) per head, after pretraining",
    "dense_probe_miou": "val mIoU (%) of a linear classifier on the frozen dense features, fitted on the train "
                        "masks with a bounded budget (core/metrics/dense_probe.py), after pretraining; null "
                        "without masks or with dense_probe_steps 0",
    "dense_probe_miou_init": "the same before pretraining",
    "final_loss": "training loss of the last epoch",
    "knn_k": "neighbours of the k-NN monitor",
    "knn_backbone": "which backbone is evaluated and exported (backbone | teacher_backbone)",
    "backbone_path": "path of backbone.pt (the input of checkpoint:PATH)",
    "num_ssl_images": "images used for self-supervision",
    "ssl_source": "where they came from, e.g. voc:train",
    "gpu_augment": "whether colour/blur/solarize ran on whole batches on the device",
    "weights_loaded": "tensors loaded from the weight source",
    "embedding_std": "collapse monitor: mean per-dimension std of the L2-normalised pooled embeddings of the k-NN "
                     "images x sqrt(d), last epoch (~1 isotropic, 0 complete collapse; core/diagnostics/collapse.py)",
    "embedding_rank": "collapse monitor: effective rank (RankMe) of the same embeddings, last epoch",
    "collapsed": "true when the method's collapse rule (SSLMethod.collapse_reason) fired, false when not, null "
                 "when none of its monitors was measured",
    "collapse_reason": "one line: which collapse and the numbers that show it; null unless collapsed",
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
    "mIoU": "mean IoU (%) over the val set at the original mask resolution (confusion matrix, 255 ignored)",
    "aAcc": "pixel accuracy (%)",
    "mAcc": "mean class accuracy (%)",
    "IoU": "per-class IoU (%), null for a class absent from truth and prediction",
    "val_pixels": "labelled (non-255) pixels scored: those of the ORIGINAL val masks (total of the confusion "
                  "matrix, summed over DDP ranks; each val image on one rank)",
    "eval_protocol": "how val was scored: {split, images, resolution: original, eval_scale (short side), "
                     "eval_max_long, inference, slide_crop / slide_stride when slide}; logits resized "
                     "(bilinear) to each original mask, 255 ignored",
    "class_names": "class names in label order",
    "final_train_loss": "training loss of the last epoch",
    "val_loss": "validation loss",
    "source_report": "what loading the weight source did (counts of loaded / missing keys)",
    "model_path": "path of model.pt",
}

STAGES = {"pretrain": PRETRAIN, "segment": SEGMENT}


def method_keys() -> dict[str, str]:
    """The keys SSL methods add, from their modules' `result_keys`."""
    from core.methods.registry import ssl_methods

    out: dict[str, str] = {}
    for spec in ssl_methods().values():
        out.update(spec.module.result_keys)
    return out


def keys(stage: str) -> dict[str, str]:
    """Every key a run of `stage` may write, with its description."""
    extra = method_keys() if stage == "pretrain" else {}
    return {**COMMON, **STAGES[stage], **extra}


def check(stage: str, metrics: dict, extra_allowed: Iterable[str] = ()) -> None:
    """A programming-error check before metrics.json is written: every key is documented here."""
    unknown = sorted(set(metrics) - set(keys(stage)) - set(extra_allowed))
    if unknown:
        raise RuntimeError(f"metrics.json keys {', '.join(unknown)} are not declared in core/runs/metrics_schema.py; "
                           "document them there")
