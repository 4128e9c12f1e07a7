"""DataLoaders for the two stages, built from a `core.config.DataConfig`.

- `build_ssl_loaders(data_cfg, views, batch_size, ...)` -> `SSLLoaders`, where `views` is the
  method's `MultiViewTransform` (its registry entry builds it, core/methods/registry.py):
  ``.train`` yields a list of views per batch: ``[v1 (B,3,S,S), v2 (B,3,S,S)]`` for Barlow Twins,
  ``[g1, g2, l1..ln]`` for DINO (globals at image_size, locals at ``.view_sizes[2:]``). When the
  transform was built with ``gpu_augment=True`` the views are uint8 (crop + flip only: a quarter of float32's
  bytes to collate, hand over and copy) and ``.batch_augment`` holds one `BatchAugment` per view to apply on
  the device (float conversion, colour, blur, solarize, then normalise); otherwise views are already
  normalised floats and ``.batch_augment`` is None.
  ``.knn_train`` / ``.knn_val`` yield ``(image (B,3,S,S) normalised, label (B,) int64)`` for the
  k-NN monitor (VOC: image label = largest non-background class of the seg mask; seg train / val).
- `build_seg_loaders(data_cfg, batch_size, eval_scale=None, eval_max_long=None, train_pipeline="simple",
  crop_size=None, train_scale=None, cat_max_ratio=0.75, train_split="train")` (train side from a
  SegmentConfig: `seg_train_kwargs(cfg)`) -> `SegLoaders` with
  ``.train`` yielding ``(image (B,3,S,S) uint8, mask (B,S,S) uint8, 255 = ignore)`` (S = image_size), or with
  the mmseg pipeline `MMSegTrainTransform.collate` dicts of each crop's uint8 source region (crops of
  S = crop_size, made on the device by `core.data.gpu_augment.crops_from_regions`): the device half of the
  pipeline (`core.data.transforms.seg_batch_transform`: [photometric distortion],
  normalisation, padding 0) runs in `SegmentationMethod` after the host-to-device copy, masks become int64
  there; and
  ``.val`` yielding dicts (`seg_val_collate`) for scoring at the ORIGINAL resolution: ``image``
  (B,3,h,w) = each image resized keeping its aspect ratio (short side ``eval_scale``, default
  image_size; `core.data.transforms.SegValTransform`) at the top left, zero padded (after
  normalisation, as mmseg pads) to the batch's largest; ``mask`` (B,H,W) int64 = each ORIGINAL mask at
  the top left, padded with 255; ``img_hw`` / ``ori_hw`` (B,2) int64 = each image's resized / original
  (h, w). Images of different sizes share a batch. The val loader's sampler (`EvalShardSampler`) gives
  every val image to exactly one DDP rank (Lightning's default DistributedSampler repeats samples to
  even the ranks out, which would count their pixels twice).

``data_cfg.root is None`` -> the generated dataset (`core.data.synthetic.default_voc_root`).
Bad data is refused in one line before training: split lists with repeated ids or a train/val overlap
(`core.data.voc`), val masks without any labelled pixel (`check_val_labelled`, also in `validate_data`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from core.data.coco_stuff import COCOStuff, coco_images
from core.data.gpu_augment import BatchAugment
from core.data.imagefolder import UnlabeledImages, imagefolder_classes, list_images
from core.data.synthetic import default_coco_root, default_voc_root
from core.data.transforms import EvalImageTransform, SegValTransform, build_seg_train_transform
from core.data.voc import (
    IGNORE_INDEX,
    NUM_CLASSES,
    VOC_CLASSES,
    VOC_PALETTE,
    VOCSegmentation,
    image_label_from_mask,
    voc_ssl_images,
)
from core.errors import ConfigError, DataError


@dataclass
class SSLLoaders:
    train: DataLoader
    knn_train: Optional[DataLoader]
    knn_val: Optional[DataLoader]
    num_images: int
    transform: Any
    batch_augment: Optional[list[BatchAugment]]
    view_sizes: tuple[int, ...]
    knn_num_classes: int = NUM_CLASSES
    root: Optional[Path] = None
    source: str = ""


@dataclass
class SegLoaders:
    train: DataLoader
    val: DataLoader
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    palette: list[int] = field(default_factory=lambda: list(VOC_PALETTE))
    root: Optional[Path] = None
    train_dataset: Optional[Dataset] = None
    val_dataset: Optional[Dataset] = None

    # `train, val, info = build_seg_loaders(...)` also works (info is this object).
    def __iter__(self):
        return iter((self.train, self.val, self))

    def __len__(self) -> int:
        return 3


# --------------------------------------------------------------------------- helpers
class KNNDataset(Dataset):
    """(normalised image, image-level label) from a segmentation dataset returning (uint8 image, mask)."""

    def __init__(self, seg_ds: Dataset, size: int, num_classes: int = NUM_CLASSES, background: Optional[int] = 0):
        self.seg_ds = seg_ds
        self.transform = EvalImageTransform(size)
        self.num_classes = num_classes
        self.background = background

    def __len__(self) -> int:
        return len(self.seg_ds)

    def __getitem__(self, i: int):
        img, mask = self.seg_ds[i]
        label = image_label_from_mask(mask, self.num_classes, self.background, IGNORE_INDEX)
        return self.transform(img), label


class _ImagesWithMasks(Dataset):
    """(normalised (S,S) image, ORIGINAL mask) of the segmentation dataset under a `KNNDataset`."""

    def __init__(self, knn_ds: KNNDataset):
        self.knn_ds = knn_ds

    def __len__(self) -> int:
        return len(self.knn_ds.seg_ds)

    def __getitem__(self, i: int):
        img, mask = self.knn_ds.seg_ds[i]
        return self.knn_ds.transform(img), torch.as_tensor(mask).long()


def knn_mask_loader(knn_loader: Optional[DataLoader]) -> Optional[DataLoader]:
    """The images of a k-NN loader (same dataset, same (S,S) images, same batch size, in order) with their
    segmentation masks at the original resolution: batches ``(images (B,3,S,S), [mask (H_i,W_i) int64, ...])``
    for the dense evaluations of a pretraining (core/metrics/attention_jaccard.py, dense_probe.py). None when
    the k-NN images have no masks (imagefolder sources)."""
    ds = getattr(knn_loader, "dataset", None)
    if not isinstance(ds, KNNDataset):
        return None
    # its own generator: a DataLoader without one draws its base seed from the global RNG at every pass,
    # which would shift the training augmentations drawn after these evaluations
    g = torch.Generator()
    g.manual_seed(0)
    return DataLoader(_ImagesWithMasks(ds), batch_size=knn_loader.batch_size, shuffle=False,
                      num_workers=knn_loader.num_workers, collate_fn=_images_masks_collate, generator=g)


def _images_masks_collate(samples: list) -> tuple:
    return torch.stack([x for x, _ in samples]), [m for _, m in samples]


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def _loader(ds: Dataset, data_cfg, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
            collate_fn=None, sampler=None) -> DataLoader:
    nw = int(data_cfg.num_workers)
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(
        ds,
        batch_size=int(batch_size),
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=nw,
        persistent_workers=nw > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker if nw > 0 else None,
        generator=g,
        collate_fn=collate_fn,
    )


def _limit(seq: list, n: Optional[int]) -> list:
    return seq if n is None else seq[: int(n)]


def data_root(data_cfg) -> Path:
    """The dataset root for ``data_cfg`` (generated when root is None)."""
    if data_cfg.dataset == "coco_stuff":
        return default_coco_root(data_cfg)
    if data_cfg.dataset == "imagefolder":
        r = data_cfg.root or data_cfg.ssl_root
        if r is None:
            raise ConfigError("data.dataset=imagefolder needs data.root (or data.ssl_root) pointing at an image tree")
        return Path(r).expanduser()
    return default_voc_root(data_cfg)


# --------------------------------------------------------------------------- SSL
def build_ssl_loaders(data_cfg, transform, batch_size: int, seed: int = 0) -> SSLLoaders:
    size = int(data_cfg.image_size)

    root = data_root(data_cfg)
    knn_train = knn_val = None
    knn_classes = NUM_CLASSES
    pol = data_cfg.corrupt_policy
    bs_eval = max(int(batch_size), 32)

    if data_cfg.dataset == "voc":
        if data_cfg.ssl_root:
            paths = list_images(data_cfg.ssl_root)
            source = f"imagefolder:{data_cfg.ssl_root}"
        else:
            paths = voc_ssl_images(root, data_cfg.ssl_split)
            source = f"voc:{data_cfg.ssl_split}"
        ktr = VOCSegmentation(root, "train", corrupt_policy=pol, limit=data_cfg.limit_train)
        kva = VOCSegmentation(root, "val", corrupt_policy=pol, limit=data_cfg.limit_val)
        knn_train = _loader(KNNDataset(ktr, size), data_cfg, bs_eval, False, False, seed)
        knn_val = _loader(KNNDataset(kva, size), data_cfg, bs_eval, False, False, seed)
    elif data_cfg.dataset == "coco_stuff":
        paths = list_images(data_cfg.ssl_root) if data_cfg.ssl_root else coco_images(root, "train")
        source = f"imagefolder:{data_cfg.ssl_root}" if data_cfg.ssl_root else "coco_stuff:train2017"
        knn_classes = 27 if data_cfg.coco_labels == "coarse" else 171
        ktr = COCOStuff(root, "train", data_cfg.coco_labels, corrupt_policy=pol, limit=data_cfg.limit_train)
        kva = COCOStuff(root, "val", data_cfg.coco_labels, corrupt_policy=pol, limit=data_cfg.limit_val)
        knn_train = _loader(KNNDataset(ktr, size, knn_classes, None), data_cfg, bs_eval, False, False, seed)
        knn_val = _loader(KNNDataset(kva, size, knn_classes, None), data_cfg, bs_eval, False, False, seed)
    else:  # imagefolder
        src = Path(data_cfg.ssl_root).expanduser() if data_cfg.ssl_root else root
        paths = list_images(src)
        source = f"imagefolder:{src}"
        try:
            cpaths, labels, classes = imagefolder_classes(src)
        except DataError:
            cpaths = []
        if cpaths:  # labelled tree: k-NN on a deterministic 80/20 split
            tr = [i for i in range(len(cpaths)) if i % 5 != 0]
            va = [i for i in range(len(cpaths)) if i % 5 == 0]
            tr, va = _limit(tr, data_cfg.limit_train), _limit(va, data_cfg.limit_val)
            knn_classes = len(classes)
            ev = EvalImageTransform(size)
            knn_train = _loader(UnlabeledImages([cpaths[i] for i in tr], ev, pol, [labels[i] for i in tr], "k-NN train"),
                                data_cfg, bs_eval, False, False, seed)
            knn_val = _loader(UnlabeledImages([cpaths[i] for i in va], ev, pol, [labels[i] for i in va], "k-NN val"),
                              data_cfg, bs_eval, False, False, seed)

    paths = _limit(paths, data_cfg.limit_train)
    if len(paths) < int(batch_size):
        raise ConfigError(
            f"batch_size={batch_size} is larger than the {len(paths)} self-supervision images of {source} "
            f"(drop_last keeps only full batches); lower batch_size or use more images"
        )
    ssl_ds = UnlabeledImages(paths, transform, pol, name=f"SSL {source}")
    train = _loader(ssl_ds, data_cfg, batch_size, True, True, seed)
    return SSLLoaders(
        train=train, knn_train=knn_train, knn_val=knn_val, num_images=len(paths), transform=transform,
        batch_augment=transform.batch_augments(), view_sizes=transform.sizes, knn_num_classes=knn_classes,
        root=root, source=source,
    )


# --------------------------------------------------------------------------- segmentation
def seg_val_collate(samples: list) -> dict:
    """Collate ``(image (3,h,w) float, mask (H,W))`` val samples of DIFFERENT sizes into one batch dict.

    ``image`` (B,3,max h,max w): each image at the top left, zeros elsewhere (0 after normalisation is
    mmseg's pad_val=0, applied after normalising in its SegDataPreProcessor); ``mask`` (B,max H,max W)
    int64: each original mask at the top left, 255 (ignored) elsewhere (mmseg's seg_pad_val=255);
    ``img_hw`` / ``ori_hw`` (B,2) int64: the valid (h, w) of each image / mask. Same-size samples are
    plainly stacked."""
    images = [s[0] for s in samples]
    masks = [torch.as_tensor(s[1]).long() for s in samples]
    img_hw = torch.tensor([tuple(x.shape[-2:]) for x in images], dtype=torch.int64).reshape(-1, 2)
    ori_hw = torch.tensor([tuple(m.shape[-2:]) for m in masks], dtype=torch.int64).reshape(-1, 2)
    if len({tuple(x.shape) for x in images}) == 1:
        image = torch.stack(images)
    else:
        h, w = (int(v) for v in img_hw.max(0).values)
        image = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for i, x in enumerate(images):
            image[i, :, : x.shape[-2], : x.shape[-1]] = x
    if len({tuple(m.shape) for m in masks}) == 1:
        mask = torch.stack(masks)
    else:
        h, w = (int(v) for v in ori_hw.max(0).values)
        mask = torch.full((len(masks), h, w), IGNORE_INDEX, dtype=torch.int64)
        for i, m in enumerate(masks):
            mask[i, : m.shape[-2], : m.shape[-1]] = m
    return {"image": image, "mask": mask, "img_hw": img_hw, "ori_hw": ori_hw}


class EvalShardSampler(DistributedSampler):
    """Validation sampler: rank r of W gets indices r, r + W, ... -- every sample exactly once over the
    ranks, none repeated (torch's DistributedSampler, which Lightning injects otherwise, pads the last
    ranks with repeats so they all get the same count; the repeats would be scored twice). The world is
    read when iterating (torch.distributed when initialised, else one process), so the loader can be
    built before the process group exists; being a DistributedSampler, Lightning leaves it in place.
    Ranks may get one batch more or less: validation makes no collective call per step (the confusion
    matrix and the loss are reduced once, at the epoch end)."""

    def __init__(self, dataset: Dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        # DistributedSampler.__init__ is not called: it needs an initialised process group.
        self.dataset = dataset
        self._num_replicas, self._rank = num_replicas, rank
        self.epoch, self.shuffle, self.seed, self.drop_last = 0, False, 0, False

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return int(self._num_replicas)
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return int(self._rank)
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def num_samples(self) -> int:
        return len(self)

    @property
    def total_size(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


def seg_display_batch(dataset: Dataset, n: int = 4, size_divisor: Optional[int] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n,3,h,w), masks (n,h,w)) of the first `n` val samples for prediction figures: each mask
    resized (nearest) to its image's evaluation size, both padded (0 / 255) to a common size, a multiple
    of `size_divisor` when given (the model then takes them as they are). For display only: scores use
    the original masks."""
    n = min(int(n), len(dataset))
    samples = [dataset[i] for i in range(n)]
    imgs, masks = [], []
    for x, m in samples:
        m = torch.as_tensor(m).long()
        if tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
            m = torch.nn.functional.interpolate(m[None, None].float(), size=tuple(x.shape[-2:]),
                                                mode="nearest")[0, 0].long()
        imgs.append(x)
        masks.append(m)
    h = max(x.shape[-2] for x in imgs)
    w = max(x.shape[-1] for x in imgs)
    if size_divisor:
        h, w = -(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor
    image = imgs[0].new_zeros((n, imgs[0].shape[0], h, w))
    mask = torch.full((n, h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, (x, m) in enumerate(zip(imgs, masks)):
        image[i, :, : x.shape[-2], : x.shape[-1]] = x
        mask[i, : m.shape[-2], : m.shape[-1]] = m
    return image, mask


def seg_train_kwargs(cfg) -> dict:
    """The train-side keyword arguments of `build_seg_loaders` from a `SegmentConfig`."""
    return {"train_pipeline": cfg.train_pipeline, "crop_size": cfg.crop_size, "train_scale": cfg.train_scale,
            "cat_max_ratio": cfg.cat_max_ratio, "train_split": cfg.train_split}


def build_seg_loaders(data_cfg, batch_size: int, seed: int = 0, val_batch_size: Optional[int] = None,
                      eval_scale: Optional[int] = None, eval_max_long: Optional[int] = None,
                      train_pipeline: str = "simple", crop_size: Optional[int] = None,
                      train_scale: Optional[int] = None, cat_max_ratio: float = 0.75,
                      train_split: str = "train") -> SegLoaders:
    """Train loader and val loader (images resized keeping their aspect ratio to short side `eval_scale`
    (default image_size), long side at most `eval_max_long` (default 4 x short); ORIGINAL masks;
    `seg_val_collate` batches; `EvalShardSampler`).

    Train side (`SegmentConfig` fields, `seg_train_kwargs(cfg)`): ``train_pipeline`` simple =
    `SegTrainTransform` at image_size (unchanged default) | mmseg = `MMSegTrainTransform` (crop `crop_size`,
    none: image_size; RandomResize short side `train_scale`, none: `eval_scale` or image_size;
    `cat_max_ratio`); ``train_split`` train | trainaug (VOC only: SBD ``SegmentationClassAug``)."""
    size = int(data_cfg.image_size)
    scale = train_scale if train_scale is not None else (eval_scale if eval_scale is not None else size)
    train_tf = build_seg_train_transform(train_pipeline, size, crop_size, scale, cat_max_ratio)
    val_tf = SegValTransform(int(eval_scale) if eval_scale is not None else size, eval_max_long)
    pol = data_cfg.corrupt_policy
    if data_cfg.dataset == "imagefolder":
        raise ConfigError("data.dataset=imagefolder has no masks; segmentation needs data.dataset=voc or coco_stuff")
    root = data_root(data_cfg)
    if data_cfg.dataset == "coco_stuff":
        if train_split != "train":
            raise ConfigError(f"train_split={train_split!r} is VOC only (SBD SegmentationClassAug); use train_split=train "
                              f"with data.dataset=coco_stuff")
        tr = COCOStuff(root, "train", data_cfg.coco_labels, train_tf, pol, data_cfg.limit_train)
        va = COCOStuff(root, "val", data_cfg.coco_labels, val_tf, pol, data_cfg.limit_val)
        num_classes, names = tr.num_classes, tuple(tr.class_names)
    else:
        if train_split not in ("train", "trainaug"):
            raise ConfigError(f"train_split={train_split!r} is not allowed; choose one of: train, trainaug")
        tr = VOCSegmentation(root, train_split, train_tf, pol, data_cfg.limit_train)
        va = VOCSegmentation(root, "val", val_tf, pol, data_cfg.limit_val)
        num_classes, names = NUM_CLASSES, VOC_CLASSES
    check_val_labelled(va)
    train = _loader(tr, data_cfg, batch_size, True, len(tr) > int(batch_size), seed,
                    collate_fn=getattr(train_tf, "collate", None))  # mmseg: ragged source regions
    val = _loader(va, data_cfg, val_batch_size or batch_size, False, False, seed, collate_fn=seg_val_collate,
                  sampler=EvalShardSampler(va))
    return SegLoaders(train=train, val=val, num_classes=num_classes, class_names=names, ignore_index=IGNORE_INDEX,
                      palette=list(VOC_PALETTE), root=root, train_dataset=tr, val_dataset=va)


def check_val_labelled(val_ds) -> None:
    """Refuse (one-line DataError) a val set whose masks hold no labelled pixel at all (every pixel 255): the
    scores would be undefined (metrics.json of nulls, then a crash). Reads masks only until the first labelled
    pixel (normally the first mask), so it is cheap on a good set; a corrupt mask raises as it would in training
    (or is skipped with corrupt_policy=skip)."""
    n = len(val_ds)
    for i in range(n):
        try:
            m = val_ds.load_mask(i)
        except DataError:
            if getattr(val_ds, "corrupt_policy", "stop") == "skip":
                continue
            raise
        if bool((np.asarray(m) != IGNORE_INDEX).any()):
            return
    where = val_ds.describe() if hasattr(val_ds, "describe") else "the val set"
    raise DataError(f"all {n} val masks of {where} are 255 (ignore) everywhere: no labelled pixel to score; "
                    f"check the masks (class ids 0..{NUM_CLASSES - 1} for VOC, 255 = void) or the val split list")


def validate_data(data_cfg, stage: str = "both", train_split: str = "train") -> Path:
    """Pre-flight check (layout, split lists and their train/val overlap or repeated ids, listed files) and, for
    segmentation, that the val masks hold a labelled pixel (`check_val_labelled`: reads masks up to the first
    labelled one); returns the root.

    ``stage``: a stage name (`core.stages`) or "both"; what is checked follows the stages' declarations:
    `trains_on_ssl_images` (the SSL images are listed) and `trains_on_masks` (the val masks must hold a
    labelled pixel). ``train_split``: the segmentation training split (train | trainaug, VOC), checked
    for a stage that trains on masks alone. Raises DataError / ConfigError with one line.
    """
    from core.stages import stages_of

    wanted = stages_of(stage)
    ssl = any(s.trains_on_ssl_images for s in wanted)
    masks = any(s.trains_on_masks for s in wanted)
    root = data_root(data_cfg)
    lim = data_cfg.limit_val
    if data_cfg.dataset == "voc":
        if ssl:
            if data_cfg.ssl_root:
                list_images(data_cfg.ssl_root)
            else:
                voc_ssl_images(root, data_cfg.ssl_split)
        VOCSegmentation(root, train_split if masks and not ssl else "train")
        va = VOCSegmentation(root, "val", corrupt_policy=data_cfg.corrupt_policy, limit=lim)
        if masks:
            check_val_labelled(va)
    elif data_cfg.dataset == "coco_stuff":
        COCOStuff(root, "train", data_cfg.coco_labels)
        va = COCOStuff(root, "val", data_cfg.coco_labels, corrupt_policy=data_cfg.corrupt_policy, limit=lim)
        if masks:
            check_val_labelled(va)
    else:
        if masks and not ssl:
            raise ConfigError("data.dataset=imagefolder has no masks; segmentation needs voc or coco_stuff")
        list_images(data_cfg.ssl_root or root)
    return root
