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
  RandomCrop with cat_max_ratio, RandomFlip, pad to the crop with 0 / 255). The CPU draws the resize, the box
  and the flip and cuts the uint8 SOURCE region the crop reads (`collate` packs them); on the device
  `core.data.gpu_augment.crops_from_regions` resizes, crops, flips and pads (`bilinear_taps`), then
  PhotoMetricDistortion, normalise, padded pixels set to 0 (`seg_batch_transform` ->
  `core.data.gpu_augment.SegBatchTransform`); `PhotoMetricDistortion` (per image) on its own.
  `build_seg_train_transform(pipeline, ...)` picks simple / mmseg; `seg_batch_transform(pipeline)` its device half.
- `SegValTransform(short, long_cap)`: the image resized keeping its aspect ratio (`keep_ratio_size`,
  mmseg's Resize(keep_ratio=True)), the mask left at its original size (scored there).
- `EvalImageTransform`: resize + normalise (k-NN monitor, diagnostics). `MEAN`, `STD`, `denormalize`.
"""

from __future__ import annotations

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
        return torch.from_numpy(np.arange(size_out, dtype=np.int64))
    if size_out == 2 * size_in:
        return torch.from_numpy(np.arange(size_out, dtype=np.int64) >> 1)
    scale = np.float32(size_in) / np.float32(size_out)  # float32 as aten (numpy: ~5x less overhead than torch here)
    idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return torch.from_numpy(np.minimum(idx, size_in - 1))


def _run_weights(idx: np.ndarray, lo: int, hi: int) -> torch.Tensor:
    """How many entries of the non-decreasing index run `idx` equal each of lo..hi-1, as float32."""
    return torch.from_numpy(np.bincount(idx - lo, minlength=hi - lo).astype(np.float32))


class _BoxLabelCounts:
    """Label counts of boxes of the nearest-resized mask ``m[rows][:, cols]`` without building it.

    Once per image: a float32 one-hot (H, W, K) of the K labels present (`ignore_index` left out). Per box:
    each source row / column weighs as many times as the resize repeats it inside the box (0 where a
    downscale skips it), and the count of label k is ``w_rows @ onehot[..., k] @ w_cols``: two matrix-vector
    products over the box's source rows (torch's, which keep to the DataLoader worker's one thread; numpy's
    BLAS would start its own). Every partial sum is an integer below 2**24 (<= crop h x crop w), so float32
    gives the exact counts. ~0.06 ms a box (+ ~0.6 ms once) on a 500 x 375 VOC-size mask vs ~0.36 ms for
    gathering and bincounting the 512 x 512 box; mmseg's 10 retries fail on most of these images (one class
    over 75% of the crop), so the gathers were about half of the mmseg pipeline's CPU time."""

    def __init__(self, m: np.ndarray, rows: np.ndarray, cols: np.ndarray, ignore_index: int):
        counts = torch.bincount(torch.from_numpy(m).reshape(-1), minlength=256).numpy()  # 2x numpy's on uint8
        if 0 <= ignore_index < counts.size:
            counts[ignore_index] = 0
        labels = np.flatnonzero(counts)
        table = np.zeros((counts.size, labels.size), np.float32)
        table[labels, np.arange(labels.size)] = 1.0
        self.onehot = torch.from_numpy(np.take(table, m, axis=0))  # (H, W, K)
        self.rows, self.cols = rows, cols

    def __call__(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        rr, cc = self.rows[top:top + height], self.cols[left:left + width]
        r0, r1, c0, c1 = int(rr[0]), int(rr[-1]) + 1, int(cc[0]), int(cc[-1]) + 1
        _, w, k = self.onehot.shape
        per_col = (_run_weights(rr, r0, r1) @ self.onehot[r0:r1].reshape(r1 - r0, w * k)).reshape(w, k)
        return _run_weights(cc, c0, c1) @ per_col[c0:c1]


def cat_max_crop_box(mask: torch.Tensor, crop: tuple[int, int], cat_max_ratio: float, ignore_index: int = 255,
                     tries: int = 10, rows: Optional[torch.Tensor] = None,
                     cols: Optional[torch.Tensor] = None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of mmseg's ``RandomCrop(crop_size, cat_max_ratio)`` (mmseg
    datasets/transforms/transforms.py ``RandomCrop.crop_bbox``): an offset uniform in [0, max(H - ch, 0)] x
    [0, max(W - cw, 0)] (the crop is smaller than `crop` where the image is); with ``cat_max_ratio < 1`` up to
    `tries` (10) boxes are drawn until one holds more than one class (`ignore_index` left out) and no class
    covers more than `cat_max_ratio` of its labelled pixels (else the last box is kept).

    ``rows`` / ``cols`` (`nearest_index`): the mask to crop is ``mask[rows][:, cols]`` (the nearest-resized
    mask) without building it; each candidate box is counted from the source mask (`_BoxLabelCounts`)."""
    m = mask.as_subclass(torch.Tensor)
    m = m.reshape(-1, *m.shape[-2:])[0].numpy()
    rows = np.arange(m.shape[0]) if rows is None else np.asarray(rows)
    cols = np.arange(m.shape[1]) if cols is None else np.asarray(cols)
    H, W = int(rows.size), int(cols.size)
    ch, cw = min(int(crop[0]), H), min(int(crop[1]), W)

    def draw() -> tuple[int, int, int, int]:
        return _randint(0, H - ch + 1), _randint(0, W - cw + 1), ch, cw

    box = draw()
    if cat_max_ratio < 1.0:
        counts = _BoxLabelCounts(m, rows, cols, int(ignore_index))
        for _ in range(int(tries)):
            cnt = counts(*box)
            cnt = cnt[cnt > 0]
            if cnt.numel() > 1 and float(cnt.max()) / float(cnt.sum()) < cat_max_ratio:
                break
            box = draw()
    return box


def bilinear_taps(size_in: int, size_out: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source taps of output positions ``start .. start + count - 1`` of a bilinear resize along one axis from
    `size_in` to `size_out` without antialiasing, ``align_corners=False``, as aten computes them
    (UpSample.h ``compute_source_index_and_lambda``: ratio in / out in float32, source
    ``max(ratio * (i + 0.5) - 0.5, 0)``, ``i0 = min(floor(src), in - 1)``, ``i1 = i0 + 1`` unless at the
    last pixel, ``w1 = clamp(src - i0, 0, 1)``; an axis whose size is unchanged is copied).
    Returns ``(i0, i1, w1)``: int64, int64, float32; the value is ``x[i0] * (1 - w1) + x[i1] * w1``.

    This is mmseg's resize: mmcv ``Resize`` (mmcv/transforms/processing.py) calls ``mmcv.imrescale(...,
    interpolation='bilinear', backend='cv2')``, i.e. ``cv2.resize(INTER_LINEAR)``: the same half-pixel
    sampling grid, no antialiasing (uint8 rounding may differ by 1)."""
    i = np.arange(start, start + count, dtype=np.float32)
    if size_in == size_out:
        i0 = i.astype(np.int64)
        return i0, i0, np.zeros(count, np.float32)
    ratio = np.float32(size_in) / np.float32(size_out)
    src = np.maximum(ratio * (i + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.where(i0 < size_in - 1, i0 + 1, i0)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, w1


def _axis_taps(size_in: int, size_out: int, start: int, count: int, crop: int, flip: bool,
               nearest: np.ndarray) -> tuple[int, int, int, int, np.ndarray, np.ndarray]:
    """One axis of a crop ``start .. start + count - 1`` of the resize `size_in` -> `size_out`, padded to
    `crop` and mirrored when `flip`: the image's source span ``[lo, hi)``, the mask's ``[mlo, mhi)``, the
    indices (3, crop) int32 = (bilinear i0, i1 relative to lo, nearest index relative to mlo) and the bilinear
    weights w1 (crop,) float32. Positions >= count are padding (0)."""
    i0, i1, w1 = bilinear_taps(size_in, size_out, start, count)
    near = nearest[start:start + count]
    if flip:
        i0, i1, w1, near = i0[::-1], i1[::-1], w1[::-1], near[::-1]
    lo, hi = int(min(i0.min(), i1.min())), int(max(i0.max(), i1.max())) + 1
    mlo, mhi = int(near.min()), int(near.max()) + 1
    idx = np.zeros((3, crop), np.int32)
    idx[0, :count], idx[1, :count], idx[2, :count] = i0 - lo, i1 - lo, near - mlo
    weights = np.zeros(crop, np.float32)
    weights[:count] = w1
    return lo, hi, mlo, mhi, idx, weights


def _batch_buffer(like: torch.Tensor, numel: int) -> torch.Tensor:
    """An empty flat tensor of `like`'s dtype for a collated batch: in a DataLoader worker it lives in shared
    memory from the start (as ``default_collate`` does), so handing it to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is not None:
        storage = like._typed_storage()._new_shared(numel, device=like.device)
        return like.new(storage).resize_(numel)
    return torch.empty(numel, dtype=like.dtype)


def _pack(tensors: list) -> torch.Tensor:
    out = _batch_buffer(tensors[0], sum(int(t.numel()) for t in tensors))
    off = 0
    for t in tensors:
        out[off:off + t.numel()].view(t.shape).copy_(t)
        off += t.numel()
    return out


class MMSegTrainTransform:
    """mmseg's PASCAL VOC train pipeline (open-mmlab/mmsegmentation configs/_base_/datasets/pascal_voc12.py and
    pascal_voc12_aug.py): ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``,
    ``RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75)``, ``RandomFlip(prob=0.5)``,
    ``PhotoMetricDistortion``, then (SegDataPreProcessor) normalise and pad to the crop size, the image with 0
    after normalisation and the mask with 255 (bottom / right, mmseg ``stack_batch``).

    ``scale``: the RandomResize short side (mmseg 512; the long cap is 4 x); ``crop_size``: the square crop.
    The image is resized bilinear without antialiasing (mmcv's cv2 resize, `bilinear_taps`), the mask nearest
    (255 stays 255; photometric ops touch the image only).

    Split between the loader worker and the device (a worker must feed 190 img/s, BENCHMARKS.md; resizing and
    handing over a 512 px crop cost ~1.5 of its ~6 ms per image):

    - here (CPU, per image): draw the resize ratio, choose the crop box (`cat_max_crop_box`, counted on the
      source mask), draw the flip, and cut the SOURCE region the crop reads: returns ``(image region uint8
      (3, ry, rx), mask region uint8 (my, mx), taps int32 (6, crop) = (row i0, i1, mask row, column i0, i1,
      mask column) relative to the regions (columns mirrored when flipped, 0 beyond the crop), weights float32
      (2, crop) = the row / column bilinear w1, valid (2,) int64 = the crop's unpadded (h, w))``: indices stay
      integers (a half-precision input cast could not round them). An upscaled crop's
      region is smaller than the crop (at ratio 2 a quarter of it): fewer bytes to collate and hand over.
    - `collate` packs a batch: the ragged regions flat, their shapes as a list of ints (no device sync).
    - on the device, `batch_transform()`: `core.data.gpu_augment.crops_from_regions` resizes, crops, flips
      and pads the whole batch with gathers (image 0, mask 255), then `SegBatchTransform` does
      PhotoMetricDistortion per sample (each step is per pixel, so the padding does not change the valid
      pixels), normalises and sets the padded pixels to 0: the same image as mmseg's up to uint8 rounding of
      the resize (tests compare with torch's full resize then crop)."""

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
        """The device half after `core.data.gpu_augment.crops_from_regions`: photometric distortion (when on),
        normalise, padded pixels 0."""
        return SegBatchTransform(photometric=self.photometric)

    def __call__(self, image, mask):
        image, mask = _as_image(image), _as_mask(mask)
        h, w = (int(v) for v in image.shape[-2:])
        ratio = _uniform(*self.ratio_range)
        nh, nw = random_resize_size(h, w, self.scale, ratio)
        rows, cols = nearest_index(h, nh).numpy(), nearest_index(w, nw).numpy()
        t, l_, ch, cw = cat_max_crop_box(mask, (self.crop_size, self.crop_size), self.cat_max_ratio,
                                         self.ignore_index, rows=rows, cols=cols)
        flip = torch.rand(()).item() < self.hflip
        y0, y1, my0, my1, iy, wy = _axis_taps(h, nh, t, ch, self.crop_size, False, rows)
        x0, x1, mx0, mx1, ix, wx = _axis_taps(w, nw, l_, cw, self.crop_size, flip, cols)
        region = image.as_subclass(torch.Tensor)[..., y0:y1, x0:x1]
        mregion = mask.as_subclass(torch.Tensor).reshape(-1, h, w)[0, my0:my1, mx0:mx1]
        taps = torch.from_numpy(np.concatenate([iy, ix]))
        weights = torch.from_numpy(np.stack([wy, wx]))
        return region, mregion, taps, weights, torch.tensor([ch, cw], dtype=torch.int64)

    def apply(self, image, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both halves for one sample, here (figures, tests): ``(crop uint8 (3, C, C), mask uint8 (C, C),
        valid (2,))`` as the device gets them before `batch_transform()`."""
        from core.data.gpu_augment import crops_from_regions

        x, y, valid = crops_from_regions(self.collate([self(image, mask)]), self.ignore_index)
        return x[0], y[0], valid[0]

    @staticmethod
    def collate(samples: list) -> dict:
        """A batch of `__call__` outputs as one dict (region_image, region_mask, region_shapes, taps, weights,
        valid; read by `core.data.gpu_augment.crops_from_regions`): the regions packed flat (shared
        memory in a worker), ``region_shapes`` a list of (ry, rx, my, mx) ints, the rest stacked."""
        from torch.utils.data import default_collate

        return {"region_image": _pack([s[0] for s in samples]), "region_mask": _pack([s[1] for s in samples]),
                "region_shapes": [(*(int(v) for v in s[0].shape[-2:]), *(int(v) for v in s[1].shape[-2:]))
                                  for s in samples],
                **default_collate([{"taps": s[2], "weights": s[3], "valid": s[4]} for s in samples])}

    @staticmethod
    def first(batch: dict, n: int) -> dict:
        """The first `n` samples of a `collate` batch (any device): the packed regions cut at their offsets."""
        shapes = [tuple(int(v) for v in s) for s in batch["region_shapes"]][:n]
        ni, nm = sum(3 * s[0] * s[1] for s in shapes), sum(s[2] * s[3] for s in shapes)
        return {"region_image": batch["region_image"][:ni], "region_mask": batch["region_mask"][:nm],
                "region_shapes": shapes, "taps": batch["taps"][:n], "weights": batch["weights"][:n],
                "valid": batch["valid"][:n]}

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
