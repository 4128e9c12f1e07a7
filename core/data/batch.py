"""The layout of a batch and the input normalisation, declared once: what the loaders of core/data/module.py
yield and how every consumer (methods, metrics, diagnostics, accounting, benchmarks) reads it.

- Labelled batch (segmentation train / val, k-NN, probes): a tuple `(images, targets[, valid])`, or a dict
  with `IMAGE`, `MASK` (k-NN also `LABEL`) and optionally `VALID` (each crop's unpadded (h, w)), `IMG_HW` /
  `ORI_HW` (`core.data.module.seg_val_collate`). Targets are masks (B, H, W) or image labels (B,).
- mmseg source regions (`core.data.transforms.MMSegTrainTransform.collate`): a dict holding `REGION_IMAGE`,
  turned into crops on the device by `core.data.gpu_augment.crops_from_regions`.
- SSL batch: `[v1, v2, ...]` (one tensor per view), `(views, ...)` (lightly style `(views, targets, names)`),
  or a dict with `VIEWS`.
- Images are uint8 until they are on the device, then normalised with `MEAN` / `STD` (ImageNet statistics,
  the ones every pretrained backbone here was trained with).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

IMAGE, MASK, LABEL, VALID, VIEWS = "image", "mask", "label", "valid", "views"
IMG_HW, ORI_HW, REGION_IMAGE = "img_hw", "ori_hw", "region_image"

#: ImageNet channel mean / std of images scaled to [0, 1] (torchvision's and timm's IMAGENET_DEFAULT_*)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def is_regions(batch: Any) -> bool:
    """True for the mmseg loader's packed source regions (crops still to be made on the device)."""
    return isinstance(batch, Mapping) and REGION_IMAGE in batch


def images_targets(batch: Any) -> tuple[Any, Any]:
    """(images, targets) of a labelled batch (a dict's targets: its MASK, else its LABEL)."""
    if isinstance(batch, Mapping):
        return batch[IMAGE], (batch[MASK] if MASK in batch else batch[LABEL])
    return batch[0], batch[1]


def valid_sizes(batch: Any) -> Optional[Any]:
    """The (B, 2) unpadded (h, w) of each crop of a labelled batch, or None when it has none."""
    if isinstance(batch, Mapping):
        return batch.get(VALID)
    return batch[2] if len(batch) > 2 else None


def views(batch: Any) -> list:
    """The list of augmented views of an SSL batch."""
    if isinstance(batch, Mapping):
        batch = batch[VIEWS]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (list, tuple)):
        batch = batch[0]
    if hasattr(batch, "shape"):
        raise TypeError("an SSL batch must hold several views, got a single tensor")
    return list(batch)


def batch_size(batch: Any) -> int:
    """Number of images in any batch: the first tensor's leading dim (views share it); of a dict, its VALID
    sizes (one row per image; the mmseg loader's regions are packed flat) or its first value."""
    while (isinstance(batch, (list, tuple)) and batch) or (isinstance(batch, Mapping) and batch):
        if isinstance(batch, Mapping):
            batch = batch[VALID] if VALID in batch else next(iter(batch.values()))
        else:
            batch = batch[0]
    return int(batch.shape[0]) if hasattr(batch, "shape") else 0
