"""Datasets, generators, transforms and loaders (see ARCHITECTURE.md, "Data").

Names are imported lazily so that `python -m core.data.synthetic` stays light (no torch import
before it is needed).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "generate_voc": "synthetic", "generate_coco_stuff": "synthetic", "default_voc_root": "synthetic",
    "default_coco_root": "synthetic",
    "VOC_CLASSES": "voc", "VOC_PALETTE": "voc", "NUM_CLASSES": "voc", "IGNORE_INDEX": "voc",
    "VOCSegmentation": "voc", "voc_ssl_images": "voc", "image_label_from_mask": "voc", "validate_voc_root": "voc",
    "palette_array": "voc",
    "COCOStuff": "coco_stuff", "COCO_FINE_CLASSES": "coco_stuff", "COCO_COARSE_CLASSES": "coco_stuff",
    "ImageFolderImages": "imagefolder", "UnlabeledImages": "imagefolder", "list_images": "imagefolder",
    "BarlowTwinsTransform": "transforms", "DINOTransform": "transforms", "SegTrainTransform": "transforms",
    "SegValTransform": "transforms", "EvalImageTransform": "transforms", "MEAN": "transforms", "STD": "transforms",
    "denormalize": "transforms", "normalize": "transforms", "keep_ratio_size": "transforms",
    "BatchAugment": "gpu_augment", "ViewParams": "gpu_augment",
    "build_ssl_loaders": "module", "build_seg_loaders": "module", "validate_data": "module",
    "SSLLoaders": "module", "SegLoaders": "module", "seg_val_collate": "module", "EvalShardSampler": "module",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'core.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"core.data.{mod}"), name)
    globals()[name] = value
    return value
