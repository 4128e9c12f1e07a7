"""Augmentations (torchvision.transforms.v2).

- `BarlowTwinsTransform(size)`: the official asymmetric two-view recipe (facebookresearch/barlowtwins):
  RandomResizedCrop(size, scale=(0.08, 1), bicubic), flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
  grayscale p 0.2, Gaussian blur sigma 0.1-2 (p 1.0 / 0.1), solarize (p 0.0 / 0.2), ImageNet normalise.
- `DINOTransform(global_size, local_size, n_local)`: 2 global crops (scale 0.4-1) + n local crops
  (scale 0.05-0.4), DINO's photometric recipe per crop.
- With ``gpu_augment=True`` both only crop + flip on the CPU and return uint8 (3, h, w) views (a quarter of
  float32's bytes to collate, share with the main process and copy to the device); ``batch_augments()`` (one
  `core.data.gpu_augment.BatchAugment` per view) converts to float, does the colour part and normalises on
  the device. The image is converted to a uint8 tensor ONCE per image (not per view).
- `SegTrainTransform`: joint image/mask transform on tv_tensors (masks resized with nearest; 255
  preserved), returning the uint8 image and the uint8 mask; float conversion and normalisation run on the
  device (`seg_batch_transform`, called by `core.methods.segmentation.SegmentationMethod`).
- `MMSegTrainTransform(crop_size, scale, ...)`: mmseg's VOC train pipeline (RandomResize ratio 0.5-2.0,
  RandomCrop with cat_max_ratio, RandomFlip, pad to the crop with 0 / 255 on the CPU, uint8; then on the device
  PhotoMetricDistortion, normalise, padded pixels set to 0: `seg_batch_transform` ->
  `core.data.gpu_augment.SegBatchTransform`); `PhotoMetricDistortion` (per image) on its own.
  `build_seg_train_transform(pipeline, ...)` picks simple / mmseg; `seg_batch_transform(pipeline)` its device half.
- `SegValTransform(short, long_cap)`: the image resized keeping its aspect ratio (`keep_ratio_size`,
  mmseg's Resize(keep_ratio=True)), the mask left at its original size (scored there).
- `EvalImageTransform`: resize + normalise (k-NN monitor, diagnostics). `MEAN`, `STD`, `denormalize`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from core.data.gpu_augment import (
    BT_VIEW1,
    BT_VIEW2,
    DINO_GLOBAL1,
    DINO_GLOBAL2,
    DINO_LOCAL,
    MEAN,
    STD,
    BatchAugment,
    SegBatchTransform,
    ViewParams,
    blur_kernel_size,
)

__all__ = [
    "MEAN", "STD", "denormalize", "normalize", "BarlowTwinsTransform", "DINOTransform", "SegTrainTransform",
    "SegValTransform", "EvalImageTransform", "ViewParams", "BT_VIEW1", "BT_VIEW2", "default_local_size",
    "keep_ratio_size", "MMSegTrainTransform", "PhotoMetricDistortion", "build_seg_train_transform",
    "SEG_TRAIN_PIPELINES", "seg_batch_transform", "image_tensor",
]


def denormalize(img: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """Undo ImageNet normalisation of (3, H, W) or (B, 3, H, W); returns float in [0, 1]."""
    m = torch.tensor(mean, dtype=img.dtype, device=img.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img * s + m).clamp(0, 1)


def normalize(img: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """ImageNet-normalise a float image/batch in [0, 1]."""
    m = torch.tensor(mean, dtype=img.dtype, device=img.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img - m) / s


class _Plain:
    """Last step: tv_tensors -> plain tensors (collate into ordinary batches)."""

    def __call__(self, *x):
        out = tuple(t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t for t in x)
        return out[0] if len(out) == 1 else out

    def __repr__(self) -> str:
        return "ToPlainTensor()"


def photometric(p: ViewParams) -> list:
    """CPU (per-image) version of a view's colour recipe, for float images in [0, 1]."""
    ops: list = []
    if p.jitter_p > 0 and any(p.jitter):
        ops.append(v2.RandomApply([v2.ColorJitter(*p.jitter)], p=p.jitter_p))
    if p.gray_p > 0:
        ops.append(v2.RandomGrayscale(p=p.gray_p))
    if p.blur_p > 0:
        blur = v2.GaussianBlur(kernel_size=blur_kernel_size(p.blur_sigma[1]), sigma=p.blur_sigma)
        ops.append(blur if p.blur_p >= 1.0 else v2.RandomApply([blur], p=p.blur_p))
    if p.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=p.solarize_threshold, p=p.solarize_p))
    return ops


def image_tensor(img) -> torch.Tensor:
    """A PIL image or an image tensor as a uint8 (3, H, W) tensor (what `v2.ToImage` makes of a PIL image)."""
    if isinstance(img, torch.Tensor):
        return img.as_subclass(torch.Tensor)
    return v2.functional.pil_to_tensor(img.convert("RGB") if img.mode != "RGB" else img)


class _CropFlip:
    """A view's crop + flip on a uint8 tensor, as ``v2.Compose([RandomResizedCrop, RandomHorizontalFlip])`` does it
    (the same parameter draws, in the same order, the same pixels: tests compare) without the per-call dispatch
    of Compose and tv_tensors (~0.07 ms a view: 20% of DINO's 8-crop loader time)."""

    def __init__(self, size: int, scale: tuple[float, float], hflip: float = 0.5):
        self.size = [int(size), int(size)]
        self.transforms = [
            v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=hflip),
        ]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rrc, flip = self.transforms
        p = rrc.make_params([x])
        y = v2.functional.resized_crop_image(x.as_subclass(torch.Tensor), p["top"], p["left"], p["height"],
                                             p["width"], self.size, interpolation=rrc.interpolation,
                                             antialias=rrc.antialias)
        if torch.rand(1) < flip.p:  # v2.RandomHorizontalFlip: skipped when rand >= p
            y = v2.functional.horizontal_flip_image(y)
        return y

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms[0]!r}, {self.transforms[1]!r})"


def _view(size: int, scale: tuple[float, float], p: ViewParams, gpu_augment: bool):
    """One view on a uint8 (3, H, W) tensor: crop + flip (uint8 out, `_CropFlip`) with gpu_augment, else the
    whole recipe (float conversion, colour ops on [0, 1] floats, normalise) as before."""
    if gpu_augment:
        return _CropFlip(size, scale)
    ops = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
    ]
    ops += [v2.ToDtype(torch.float32, scale=True)] + photometric(p) + [v2.Normalize(MEAN, STD)]
    ops.append(_Plain())
    return v2.Compose(ops)


class MultiViewTransform:
    """Apply each view's transform to the same image; returns a tuple of (3, h, w) tensors: uint8 with
    ``gpu_augment`` (the device converts, augments and normalises), else float normalised. The image (PIL or
    tensor) becomes a uint8 tensor once, every view crops that tensor."""

    tensor_input = True  # datasets may hand a decoded uint8 (3, H, W) tensor instead of a PIL image

    def __init__(self, sizes: Sequence[int], scales: Sequence[tuple[float, float]], view_params: Sequence[ViewParams],
                 gpu_augment: bool = False):
        self.sizes = tuple(int(s) for s in sizes)
        self.scales = tuple(tuple(s) for s in scales)
        self.view_params = tuple(view_params)
        self.gpu_augment = bool(gpu_augment)
        self.views = [_view(s, sc, p, self.gpu_augment) for s, sc, p in zip(self.sizes, self.scales, self.view_params)]

    def __call__(self, img):
        x = image_tensor(img)
        if not self.gpu_augment:
            x = tv_tensors.Image(x)
        return tuple(t(x) for t in self.views)

    def batch_augments(self) -> Optional[list[BatchAugment]]:
        """One BatchAugment per view when gpu_augment, else None (the CPU already did everything)."""
        return [BatchAugment(p) for p in self.view_params] if self.gpu_augment else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, gpu_augment={self.gpu_augment})"


class BarlowTwinsTransform(MultiViewTransform):
    """Official Barlow Twins asymmetric two views: ``t(img) -> (view1, view2)``."""

    def __init__(self, size: int, gpu_augment: bool = False, scale: tuple[float, float] = (0.08, 1.0),
                 view_params: Sequence[ViewParams] = (BT_VIEW1, BT_VIEW2)):
        super().__init__((size, size), (scale, scale), view_params, gpu_augment)
        self.size = int(size)


def default_local_size(global_size: int, multiple: int = 16) -> int:
    """DINO's 96/224 local/global ratio, rounded to a multiple of `multiple` (at least `multiple`)."""
    return max(multiple, int(round(global_size * 96 / 224 / multiple)) * multiple)


class DINOTransform(MultiViewTransform):
    """DINO multi-crop: ``t(img) -> (global1, global2, local_1..local_n)``."""

    def __init__(self, global_size: int, local_size: Optional[int] = None, n_local: int = 2,
                 gpu_augment: bool = False, global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4)):
        local_size = int(local_size or default_local_size(global_size))
        sizes = [global_size, global_size] + [local_size] * n_local
        scales = [global_scale, global_scale] + [local_scale] * n_local
        params = [DINO_GLOBAL1, DINO_GLOBAL2] + [DINO_LOCAL] * n_local
        super().__init__(sizes, scales, params, gpu_augment)
        self.global_size, self.local_size, self.n_local = int(global_size), local_size, int(n_local)


# --------------------------------------------------------------------------- segmentation
_TO_FLOAT = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


class SegTrainTransform:
    """Joint train transform: random resized crop (scale 0.25-1), flip; uint8 image and uint8 mask out.

    Call with ``(tv_tensors.Image uint8, tv_tensors.Mask)``; masks use nearest so 255 stays 255. The float
    conversion and normalisation run on the device: ``batch_transform()`` (`seg_batch_transform("simple")`).
    """

    photometric = False

    def __init__(self, size: int, scale: tuple[float, float] = (0.25, 1.0), hflip: float = 0.5):
        self.size = int(size)
        self.t = v2.Compose([
            v2.RandomResizedCrop(self.size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(p=hflip),
            _Plain(),
        ])

    def __call__(self, image, mask):
        return self.t(_as_image(image), _as_mask(mask))

    def batch_transform(self) -> SegBatchTransform:
        """The device half: uint8 batch -> float, normalised."""
        return SegBatchTransform(photometric=False)


def keep_ratio_size(h: int, w: int, short: int, long_cap: Optional[int] = None) -> tuple[int, int]:
    """(new_h, new_w) of an (h, w) image rescaled keeping its aspect ratio so that its short side is `short`
    and its long side at most `long_cap` (default 4 x short).

    mmcv's ``rescale_size`` as used by mmseg's ``Resize(scale=(2048, 512), keep_ratio=True)`` (VOC test
    pipeline, open-mmlab/mmsegmentation configs/_base_/datasets/pascal_voc12.py; open-mmlab/mmcv
    mmcv/image/geometric.py): ``factor = min(long_cap / max(h, w), short / min(h, w))``, each side
    ``int(side * factor + 0.5)``."""
    long_cap = int(long_cap) if long_cap else 4 * int(short)
    factor = min(long_cap / max(h, w), int(short) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


class SegValTransform:
    """Val transform for scoring at the ORIGINAL resolution: the image is resized keeping its aspect ratio
    (`keep_ratio_size`: short side `short`, long side at most `long_cap`; bilinear), converted to float and
    normalised; the mask is returned UNTOUCHED (original H x W, 255 kept), to be scored against logits
    resized back to it (mmseg's test pipeline: Resize(keep_ratio=True) on the image, annotations loaded
    after it). ``short=None``: the image keeps its size.

    Returns ``(image (3, h, w) float, mask (H, W))``; h, w need not be multiples of a patch size (inference
    pads, see core/models/segmenter.py)."""

    def __init__(self, short: Optional[int], long_cap: Optional[int] = None):
        self.short = None if short is None else int(short)
        self.long_cap = None if long_cap is None else int(long_cap)
        self.t = v2.Compose([_TO_FLOAT, v2.Normalize(MEAN, STD), _Plain()])

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The (h, w) an (h, w) original becomes."""
        if self.short is None:
            return int(h), int(w)
        return keep_ratio_size(h, w, self.short, self.long_cap)

    def __call__(self, image, mask):
        image = _as_image(image)
        h, w = image.shape[-2:]
        nh, nw = self.output_size(h, w)
        if (nh, nw) != (h, w):  # identity when the size already fits (the generated square data)
            image = v2.functional.resize(image, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return self.t(image), _as_mask(mask).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(short={self.short}, long_cap={self.long_cap})"


# --------------------------------------------------------------------------- mmseg VOC train pipeline
SEG_TRAIN_PIPELINES = ("simple", "mmseg")


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi) from torch's global RNG (seeded per DataLoader worker)."""
    return int(torch.randint(int(lo), int(hi), (1,)).item())


def _uniform(lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(()).item())


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` (open-mmlab/mmsegmentation mmseg/datasets/transforms/transforms.py):
    each step applied with probability 0.5, in this order: brightness (add a delta uniform in
    +-`brightness_delta`), contrast (multiply by alpha in `contrast_range`) either here or last (mode drawn at
    random), saturation (HSV S channel x alpha in `saturation_range`), hue (HSV hue + an integer delta in
    +-`hue_delta` on OpenCV's 0-180 hue scale, i.e. delta/180 of the hue circle), contrast (other mode). The image
    is clipped to 0-255 and rounded down to uint8 after each step, as mmseg does (``astype(np.uint8)``).

    Image only (masks are never touched): a uint8 (3, H, W) tensor in, uint8 out; a float image in [0, 1] in,
    float in [0, 1] out (computed on the 0-255 scale). Vectorised on tensors; torch's global RNG."""

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = int(brightness_delta)
        self.contrast_lower, self.contrast_upper = (float(v) for v in contrast_range)
        self.saturation_lower, self.saturation_upper = (float(v) for v in saturation_range)
        self.hue_delta = int(hue_delta)

    @staticmethod
    def _u8(x: torch.Tensor) -> torch.Tensor:  # np.clip(0, 255).astype(np.uint8) on a float 0-255 image
        return x.clamp(0, 255).floor()

    def _contrast(self, x: torch.Tensor) -> torch.Tensor:
        if _randint(0, 2):
            x = self._u8(x * _uniform(self.contrast_lower, self.contrast_upper))
        return x

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        is_float = image.is_floating_point()
        x = image.as_subclass(torch.Tensor).float() * (255.0 if is_float else 1.0)
        if not is_float:
            x = x.clone()
        if _randint(0, 2):  # brightness
            x = self._u8(x + _uniform(-self.brightness_delta, self.brightness_delta))
        mode = _randint(0, 2)
        if mode == 1:
            x = self._contrast(x)
        if _randint(0, 2):  # saturation: scale HSV S (hue and V = max channel kept), S clipped to 1
            alpha = _uniform(self.saturation_lower, self.saturation_upper)
            v = x.amax(0, keepdim=True)
            s = (v - x.amin(0, keepdim=True)) / v.clamp_min(1e-6)
            a = torch.minimum(torch.full_like(s, alpha), 1.0 / s.clamp_min(1e-6))
            x = self._u8(v - a * (v - x) + 1e-4)
        if _randint(0, 2):  # hue: OpenCV's H is 0-180 for uint8, so delta/180 of the circle
            delta = _randint(-self.hue_delta, self.hue_delta)
            x = self._u8(v2.functional.adjust_hue(x / 255.0, delta / 180.0) * 255.0 + 1e-4)
        if mode == 0:
            x = self._contrast(x)
        out = x / 255.0 if is_float else x.to(torch.uint8)
        return tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.Image) else out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(brightness_delta={self.brightness_delta}, contrast_range=({self.contrast_lower}, "
                f"{self.contrast_upper}), saturation_range=({self.saturation_lower}, {self.saturation_upper}), "
                f"hue_delta={self.hue_delta})")


def random_resize_size(h: int, w: int, scale: int, ratio: float, long_factor: int = 4) -> tuple[int, int]:
    """mmseg ``RandomResize(scale=(long_factor * scale, scale), ratio_range, keep_ratio=True)`` for one drawn
    `ratio`: target scale ``(int(long * ratio), int(short * ratio))``, then mmcv ``rescale_size``
    (`keep_ratio_size`): short side -> scale x ratio unless the long side would exceed long x ratio."""
    return keep_ratio_size(h, w, int(scale * ratio), int(long_factor * scale * ratio))


def nearest_index(size_in: int, size_out: int) -> torch.Tensor:
    """Source index of each output position of torch's ``nearest`` resize from `size_in` to `size_out`
    (aten UpSample.h ``nearest_idx``: identity, ``i >> 1`` at exactly 2x, else ``min(floor(i * (in / out)),
    in - 1)`` in float32): ``mask[..., rows, :][..., cols]`` equals the nearest-resized mask (tests check)."""
    if size_out == size_in:
        return torch.arange(size_out)
    if size_out == 2 * size_in:
        return torch.arange(size_out) >> 1
    scale = torch.tensor(float(size_in), dtype=torch.float32) / torch.tensor(float(size_out), dtype=torch.float32)
    return torch.floor(torch.arange(size_out, dtype=torch.float32) * scale).long().clamp_(max=size_in - 1)


def cat_max_crop_box(mask: torch.Tensor, crop: tuple[int, int], cat_max_ratio: float, ignore_index: int = 255,
                     tries: int = 10, rows: Optional[torch.Tensor] = None,
                     cols: Optional[torch.Tensor] = None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of mmseg's ``RandomCrop(crop_size, cat_max_ratio)``: an offset uniform in
    [0, max(H - ch, 0)] x [0, max(W - cw, 0)] (the crop is smaller than `crop` where the image is); with
    ``cat_max_ratio < 1`` up to `tries` (10) boxes are drawn until one holds more than one class (255 ignored)
    and no class covers more than `cat_max_ratio` of its labelled pixels (else the last box is kept).

    ``rows`` / ``cols`` (`nearest_index`): the mask to crop is ``mask[rows][:, cols]`` (the nearest-resized
    mask) without building it; only each candidate box is gathered."""
    m = mask.as_subclass(torch.Tensor)
    m = m.reshape(-1, *m.shape[-2:])[0].numpy()  # numpy row / column takes: ~8x torch's index kernels on uint8
    rows = np.arange(m.shape[0]) if rows is None else np.asarray(rows)
    cols = np.arange(m.shape[1]) if cols is None else np.asarray(cols)
    H, W = int(rows.size), int(cols.size)
    ch, cw = min(int(crop[0]), H), min(int(crop[1]), W)

    def draw() -> tuple[int, int, int, int]:
        return _randint(0, H - ch + 1), _randint(0, W - cw + 1), ch, cw

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(int(tries)):
            t, l_, _, _ = box
            box_m = torch.from_numpy(np.ascontiguousarray(m[rows[t:t + ch]][:, cols[l_:l_ + cw]]))
            cnt = torch.bincount(box_m.reshape(-1).to(torch.uint8), minlength=256)
            if 0 <= ignore_index < 256:
                cnt[ignore_index] = 0
            cnt = cnt[cnt > 0]
            if cnt.numel() > 1 and float(cnt.max()) / float(cnt.sum()) < cat_max_ratio:
                break
            box = draw()
    return box


def resized_box(image: torch.Tensor, nh: int, nw: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """``F.crop(F.resize(image, [nh, nw], bilinear, antialias=True), top, left, height, width)`` for a uint8 or
    float (C, H, W) image, computing only output rows < top + height and columns < left + width: the
    antialiased bilinear kernel runs on the source prefix those rows need (their support plus a margin) with the
    scale of the whole resize (``scales`` = nh / H, nw / W), so every output pixel is the one of the full
    resize (tests compare; ~1/3 less resize work on average for mmseg's crops). Falls back to the full resize
    where the aten op is unavailable."""
    h, w = (int(v) for v in image.shape[-2:])
    if (nh, nw) == (h, w):
        return image[..., top:top + height, left:left + width]
    sy, sx = h / nh, w / nw
    oh, ow = top + height, left + width
    y1 = min(h, math.ceil(oh * sy + max(sy, 1.0)) + 2)
    x1 = min(w, math.ceil(ow * sx + max(sx, 1.0)) + 2)
    # aten copies an axis whose input and output sizes are equal, whatever the scale: keep them different
    y1 = y1 + 1 if y1 == oh and y1 < h else y1
    x1 = x1 + 1 if x1 == ow and x1 < w else x1
    out = None
    if y1 != oh and x1 != ow:
        try:
            out = torch.ops.aten._upsample_bilinear2d_aa(image[None, :, :y1, :x1], [oh, ow], False, nh / h, nw / w)[0]
        except (RuntimeError, AttributeError):  # pragma: no cover - another torch build
            out = None
    if out is None:
        out = v2.functional.resize(image, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return out[..., top:top + height, left:left + width]


class MMSegTrainTransform:
    """mmseg's PASCAL VOC train pipeline (open-mmlab/mmsegmentation configs/_base_/datasets/pascal_voc12.py and
    pascal_voc12_aug.py): ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``,
    ``RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75)``, ``RandomFlip(prob=0.5)``,
    ``PhotoMetricDistortion``, then (SegDataPreProcessor) normalise and pad to the crop size, the image with 0
    after normalisation and the mask with 255 (bottom / right, mmseg ``stack_batch``).

    ``scale``: the RandomResize short side (mmseg 512; the long cap is 4 x); ``crop_size``: the square crop.
    Joint on ``(tv_tensors.Image uint8, tv_tensors.Mask)``: the image bilinear (antialiased), the mask nearest
    (255 stays 255; photometric ops touch the image only). The CPU part (here) resizes, crops, flips and pads
    the uint8 image with 0 and the mask with 255; it returns ``(image (3, crop, crop) uint8, mask (crop, crop)
    uint8, valid (2,) int64 = the crop's unpadded (h, w))``. The device part, ``batch_transform()``
    (`core.data.gpu_augment.SegBatchTransform`), does PhotoMetricDistortion per sample on the whole batch (each
    step is per pixel, so the padding does not change the valid pixels), normalises and sets the padded pixels
    to 0: the same image as mmseg's, without the per-image float work on the CPU."""

    def __init__(self, crop_size: int, scale: int, ratio_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, hflip: float = 0.5, photometric: bool = True,
                 ignore_index: int = 255):
        self.crop_size = int(crop_size)
        self.scale = int(scale)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.hflip = float(hflip)
        self.ignore_index = int(ignore_index)
        self.photometric = bool(photometric)

    def batch_transform(self) -> SegBatchTransform:
        """The device half: photometric distortion (when on), normalise, padded pixels 0."""
        return SegBatchTransform(photometric=self.photometric)

    def __call__(self, image, mask):
        F = v2.functional
        image, mask = _as_image(image), _as_mask(mask)
        h, w = image.shape[-2:]
        ratio = _uniform(*self.ratio_range)
        nh, nw = random_resize_size(h, w, self.scale, ratio)
        # the mask is never resized whole: nearest resize = index gather, so only the candidate boxes are built
        rows, cols = nearest_index(h, nh), nearest_index(w, nw)
        t, l_, ch, cw = cat_max_crop_box(mask, (self.crop_size, self.crop_size), self.cat_max_ratio,
                                         self.ignore_index, rows=rows, cols=cols)
        m = mask.as_subclass(torch.Tensor).reshape(-1, h, w)[0].numpy()
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(m[rows[t:t + ch].numpy()][:, cols[l_:l_ + cw].numpy()])))
        image = tv_tensors.Image(resized_box(image.as_subclass(torch.Tensor), nh, nw, t, l_, ch, cw))
        if torch.rand(()).item() < self.hflip:
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        pad_b, pad_r = self.crop_size - ch, self.crop_size - cw
        if pad_b or pad_r:
            image = torch.nn.functional.pad(image, (0, pad_r, 0, pad_b), value=0)
            mask = torch.nn.functional.pad(mask, (0, pad_r, 0, pad_b), value=self.ignore_index)
        return image, mask, torch.tensor([ch, cw], dtype=torch.int64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, hflip={self.hflip}, photometric={self.photometric})")


def build_seg_train_transform(pipeline: str, image_size: int, crop_size: Optional[int] = None,
                              scale: Optional[int] = None, cat_max_ratio: float = 0.75):
    """``simple``: `SegTrainTransform(image_size)` (unchanged); ``mmseg``: `MMSegTrainTransform` with crop
    `crop_size` (none: image_size) and RandomResize short side `scale` (none: image_size)."""
    if pipeline == "simple":
        return SegTrainTransform(image_size)
    if pipeline == "mmseg":
        return MMSegTrainTransform(int(crop_size or image_size), int(scale or image_size),
                                   cat_max_ratio=cat_max_ratio)
    from core.errors import ConfigError

    raise ConfigError(f"train_pipeline={pipeline!r} is not allowed; choose one of: {', '.join(SEG_TRAIN_PIPELINES)}")


def seg_batch_transform(pipeline: str) -> SegBatchTransform:
    """The device half of `build_seg_train_transform(pipeline, ...)`: what `SegmentationMethod` applies to a
    uint8 training batch after the host-to-device copy (mmseg: photometric distortion + normalise + padding 0;
    simple: normalise)."""
    return SegBatchTransform(photometric=pipeline == "mmseg")


class EvalImageTransform:
    """Image-only: resize to (size, size), float, normalise (k-NN monitor, diagnostics)."""

    def __init__(self, size: int):
        self.size = int(size)
        self.t = v2.Compose([v2.ToImage(), v2.Resize((self.size, self.size), antialias=True),
                             v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD), _Plain()])

    def __call__(self, img):
        return self.t(img)


def _as_image(x):
    return x if isinstance(x, tv_tensors.Image) else tv_tensors.Image(x)


def _as_mask(x):
    if isinstance(x, tv_tensors.Mask):
        return x
    x = torch.as_tensor(x)
    if x.dtype == torch.int64 and x.numel() and int(x.max()) <= 255 and int(x.min()) >= 0:
        x = x.to(torch.uint8)
    return tv_tensors.Mask(x)
