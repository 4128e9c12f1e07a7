"""Photometric augmentation of whole batches on the device (GPU or CPU), per-sample random parameters.

With ``gpu_augment=True`` the CPU data pipeline only crops, flips and converts to float in [0, 1];
the colour part of the recipe runs here on the (B, 3, H, W) batch after the host-to-device copy:
colour jitter (brightness, contrast, saturation, hue; applied with probability ``jitter_p``, in a
random order per batch), grayscale, Gaussian blur (per-sample sigma, separable grouped conv) and
solarization, then ImageNet normalisation. Every sample draws its own parameters, as the per-image
CPU transforms do.

The loaders hand uint8 batches (crop + flip only on the CPU); `BatchAugment` converts them to float
[0, 1] on the device first. Usage (in a LightningModule)::

    views = [aug(v) for aug, v in zip(loaders.batch_augment, batch)]   # loaders from build_ssl_loaders

Segmentation: `SegBatchTransform(photometric)` is the device half of the segmentation train pipelines
(core/data/transforms.py `seg_batch_transform`): uint8 (B, 3, H, W) -> mmseg's PhotoMetricDistortion per
sample (`BatchPhotoMetricDistortion`, mmseg pipeline only) -> /255 -> ImageNet normalisation -> pixels beyond
each sample's valid (h, w) set to 0 (mmseg pads after normalising). Before it, `crops_from_regions` turns
the mmseg loader's batch of source regions (`core.data.transforms.MMSegTrainTransform.collate`) into the
resized, cropped, flipped and padded uint8 crops and masks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from core.data.batch import MEAN, STD  # noqa: E402,F401  (the one home of the normalisation; re-exported)


@dataclass(frozen=True)
class ViewParams:
    """Photometric recipe of one view (probabilities and ranges as in the official recipes)."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on [0, 1] images (PIL's 128 on uint8)

    def to_dict(self) -> dict:
        return asdict(self)


# Barlow Twins (facebookresearch/barlowtwins main.py Transform): blur 1.0 / 0.1, solarize 0.0 / 0.2.
BT_VIEW1 = ViewParams(blur_p=1.0, solarize_p=0.0)
BT_VIEW2 = ViewParams(blur_p=0.1, solarize_p=0.2)
# DINO (facebookresearch/dino main_dino.py DataAugmentationDINO).
DINO_GLOBAL1 = ViewParams(blur_p=1.0, solarize_p=0.0)
DINO_GLOBAL2 = ViewParams(blur_p=0.1, solarize_p=0.2)
DINO_LOCAL = ViewParams(blur_p=0.5, solarize_p=0.0)


def blur_kernel_size(sigma_max: float) -> int:
    """Odd kernel covering +-3 sigma of the largest sigma (13 for sigma 2)."""
    return 2 * math.ceil(3 * sigma_max) + 1


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(1)
    maxc = img.max(1).values
    minc = img.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def _hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    h, s, v = img.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    mask = (i.unsqueeze(1) == torch.arange(6, device=i.device).view(-1, 1, 1)).to(img.dtype)  # B,6,H,W
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)  # B,3,6,H,W
    return torch.einsum("bihw,bxihw->bxhw", mask, a4)


class BatchAugment:
    """Apply one view's photometric recipe to a (B, 3, H, W) float batch in [0, 1], then normalise.

    ``BatchAugment(BT_VIEW2)(x)``; ``generator`` (a torch.Generator on x's device) makes it reproducible.
    Returns float32 on x's device.
    """

    def __init__(self, view_params: ViewParams = BT_VIEW1, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD, normalize: bool = True):
        self.params = view_params
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"BatchAugment({self.params})"

    def _u(self, n: int, lo: float, hi: float, like: torch.Tensor, gen) -> torch.Tensor:
        return torch.rand(n, device=like.device, generator=gen) * (hi - lo) + lo

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"BatchAugment expects a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        p = self.params
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        B = x.shape[0]
        g = generator
        dev = x.device
        view = (B, 1, 1, 1)

        # colour jitter (per sample, applied with prob jitter_p; op order random per batch)
        if p.jitter_p > 0 and any(p.jitter):
            on = torch.rand(B, device=dev, generator=g) < p.jitter_p
            b, c, s, h = p.jitter
            bf = torch.where(on, self._u(B, max(0.0, 1 - b), 1 + b, x, g), torch.ones(B, device=dev))
            cf = torch.where(on, self._u(B, max(0.0, 1 - c), 1 + c, x, g), torch.ones(B, device=dev))
            sf = torch.where(on, self._u(B, max(0.0, 1 - s), 1 + s, x, g), torch.ones(B, device=dev))
            hf = torch.where(on, self._u(B, -h, h, x, g), torch.zeros(B, device=dev))
            order = torch.randperm(4, device="cpu").tolist()
            for op in order:
                if op == 0 and b > 0:
                    x = (x * bf.view(view)).clamp(0, 1)
                elif op == 1 and c > 0:
                    m = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
                    x = (cf.view(view) * x + (1 - cf.view(view)) * m).clamp(0, 1)
                elif op == 2 and s > 0:
                    gr = _gray(x)
                    x = (sf.view(view) * x + (1 - sf.view(view)) * gr).clamp(0, 1)
                elif op == 3 and h > 0:
                    # whole batch + select: no data-dependent host sync on the hot path
                    hsv = _rgb_to_hsv(x)
                    hsv[:, 0] = torch.remainder(hsv[:, 0] + hf.view(-1, 1, 1), 1.0)
                    x = torch.where(on.view(view), _hsv_to_rgb(hsv), x)
        # grayscale
        if p.gray_p > 0:
            on = (torch.rand(B, device=dev, generator=g) < p.gray_p).view(view)
            x = torch.where(on, _gray(x).expand_as(x), x)
        # gaussian blur (per-sample sigma)
        if p.blur_p > 0:
            on = torch.rand(B, device=dev, generator=g) < p.blur_p
            x = torch.where(on.view(view), self._blur(x, g).clamp(0, 1), x)
        # solarize
        if p.solarize_p > 0:
            on = (torch.rand(B, device=dev, generator=g) < p.solarize_p).view(view)
            x = torch.where(on & (x >= p.solarize_threshold), 1.0 - x, x)
        if self.normalize:
            mean = torch.tensor(self.mean, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x

    def _blur(self, x: torch.Tensor, g) -> torch.Tensor:
        B, C, H, W = x.shape
        lo, hi = self.params.blur_sigma
        k = blur_kernel_size(hi)
        k = max(1, min(k, 2 * ((min(H, W) - 1) // 2) + 1))  # reflect padding needs pad < size
        r = k // 2
        sigma = self._u(B, lo, hi, x, g)
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        ker = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
        ker = ker / ker.sum(dim=1, keepdim=True)  # B, k
        ker = ker.repeat_interleave(C, dim=0)  # B*C, k
        y = x.reshape(1, B * C, H, W)
        y = F.pad(y, (r, r, 0, 0), mode="reflect")
        y = F.conv2d(y, ker.view(B * C, 1, 1, k), groups=B * C)
        y = F.pad(y, (0, 0, r, r), mode="reflect")
        y = F.conv2d(y, ker.view(B * C, 1, k, 1), groups=B * C)
        return y.view(B, C, H, W)


def batch_augments_for(view_params: Sequence[ViewParams]) -> list[BatchAugment]:
    return [BatchAugment(vp) for vp in view_params]


class BatchPhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` (open-mmlab/mmsegmentation mmseg/datasets/transforms/transforms.py) on
    a whole (B, 3, H, W) batch on the 0-255 scale, every sample drawing its own parameters: brightness (+delta
    uniform in +-`brightness_delta`, p 0.5), contrast (x alpha in `contrast_range`, p 0.5) either second or last
    (mode drawn per sample), saturation (HSV S x alpha, p 0.5), hue (+ an integer delta in [-hue_delta,
    hue_delta) of OpenCV's 0-180 scale, p 0.5); clipped to 0-255 and floored after each step as mmseg's
    ``astype(np.uint8)``. The same arithmetic as the per-image `core.data.transforms.PhotoMetricDistortion`
    (tests compare them on the same parameters). Every step is per pixel."""

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = int(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def draw(self, b: int, device, generator: Optional[torch.Generator] = None) -> dict:
        """Per-sample parameters: ``on_*`` (bool (B,)), ``mode`` (1: contrast second, 0: last), values."""
        def u(lo, hi):
            return torch.rand(b, device=device, generator=generator) * (hi - lo) + lo

        def coin():
            return torch.rand(b, device=device, generator=generator) < 0.5

        d = self.brightness_delta
        return {"on_b": coin(), "delta_b": u(-d, d), "mode": coin(), "on_c": coin(), "alpha_c": u(*self.contrast_range),
                "on_s": coin(), "alpha_s": u(*self.saturation_range), "on_h": coin(),
                "delta_h": torch.randint(-self.hue_delta, self.hue_delta, (b,), device=device, generator=generator)}

    @staticmethod
    def _u8(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 255).floor()

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        v4 = (-1, 1, 1, 1)

        def sel(on, new, old):
            return torch.where(on.view(v4), new, old)

        x = sel(p["on_b"], self._u8(x + p["delta_b"].view(v4)), x)
        contrast = p["on_c"] & p["mode"]
        x = sel(contrast, self._u8(x * p["alpha_c"].view(v4)), x)
        # saturation: scale HSV S (hue and V = max channel kept), S clipped to 1
        v = x.amax(1, keepdim=True)
        s = (v - x.amin(1, keepdim=True)) / v.clamp_min(1e-6)
        a = torch.minimum(p["alpha_s"].view(v4).expand_as(s), 1.0 / s.clamp_min(1e-6))
        x = sel(p["on_s"], self._u8(v - a * (v - x) + 1e-4), x)
        # hue on OpenCV's 0-180 scale: delta / 180 of the circle
        hsv = _rgb_to_hsv(x / 255.0)
        hsv[:, 0] = torch.remainder(hsv[:, 0] + (p["delta_h"].to(x.dtype) / 180.0).view(-1, 1, 1), 1.0)
        x = sel(p["on_h"], self._u8(_hsv_to_rgb(hsv) * 255.0 + 1e-4), x)
        contrast = p["on_c"] & ~p["mode"]
        return sel(contrast, self._u8(x * p["alpha_c"].view(v4)), x)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.apply(x.float(), self.draw(x.shape[0], x.device, generator))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
                f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta})")


class SegBatchTransform:
    """The device half of a segmentation train pipeline: a uint8 (B, 3, H, W) batch (the CPU cropped, flipped
    and padded it) -> [`BatchPhotoMetricDistortion` when ``photometric``] -> /255 -> (x - mean) / std -> the
    pixels beyond each sample's ``valid`` (B, 2) = (h, w) set to 0 (mmseg pads the normalised image with 0).
    A float batch is taken as already normalised and returned unchanged (CPU transforms of old)."""

    def __init__(self, photometric: bool = False, mean: Sequence[float] = MEAN, std: Sequence[float] = STD):
        self.photometric = bool(photometric)
        self.distort = BatchPhotoMetricDistortion() if self.photometric else None
        self.mean, self.std = tuple(mean), tuple(std)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        y = x.float()
        if self.distort is not None:
            y = self.distort(y, generator)
        mean = torch.tensor(self.mean, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        y = (y / 255.0 - mean) / std
        if valid is not None:
            valid = valid.to(y.device).view(-1, 2)
            h, w = y.shape[-2:]
            keep = ((torch.arange(h, device=y.device).view(1, h, 1) < valid[:, 0].view(-1, 1, 1))
                    & (torch.arange(w, device=y.device).view(1, 1, w) < valid[:, 1].view(-1, 1, 1)))
            y = y * keep.unsqueeze(1).to(y.dtype)
        return y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(photometric={self.photometric})"


@torch.no_grad()
def crops_from_regions(batch: dict, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The resize, crop, flip and pad half of the mmseg train pipeline, on the device, for a whole batch of
    `core.data.transforms.MMSegTrainTransform.collate`: returns ``(images uint8 (B, 3, C, C), masks uint8
    (B, C, C), valid (B, 2))`` with C the crop size, the image 0 and the mask `ignore_index` beyond each
    sample's valid (h, w).

    Each sample's source region is placed in a zero-padded batch; the bilinear resize is two gathers and a
    lerp per axis with the worker's int32 taps and float32 weights (`bilinear_taps`: aten's indices and
    weights, so it is torch's / cv2's resize up to uint8 rounding), then rounded to uint8 as a uint8 resize
    is; the mask takes its nearest rows and columns (`nearest_index`: exact). The flip is in the column taps.
    Region shapes come as a list of ints (no device sync)."""
    taps, weights, valid = batch["taps"].long(), batch["weights"], batch["valid"]
    shapes = [tuple(int(v) for v in s) for s in batch["region_shapes"]]
    dev = taps.device
    B, _, C = taps.shape
    ry, rx = max(s[0] for s in shapes), max(s[1] for s in shapes)
    my, mx = max(s[2] for s in shapes), max(s[3] for s in shapes)
    img = torch.zeros((B, 3, ry, rx), dtype=torch.uint8, device=dev)
    msk = torch.full((B, my, mx), ignore_index, dtype=torch.uint8, device=dev)
    flat_img, flat_mask = batch["region_image"], batch["region_mask"]
    o = m = 0
    for b, (h, w, mh, mw) in enumerate(shapes):
        img[b, :, :h, :w] = flat_img[o:o + 3 * h * w].view(3, h, w)
        msk[b, :mh, :mw] = flat_mask[m:m + mh * mw].view(mh, mw)
        o, m = o + 3 * h * w, m + mh * mw
    iy0, iy1, mrow, ix0, ix1, mcol = taps.unbind(1)  # image row taps, mask rows, image column taps, mask columns
    wy, wx = weights.float().unbind(1)

    def rows(i: torch.Tensor) -> torch.Tensor:
        return img.gather(2, i[:, None, :, None].expand(B, 3, C, rx)).float()

    v = torch.lerp(rows(iy0), rows(iy1), wy[:, None, :, None])

    def cols(i: torch.Tensor) -> torch.Tensor:
        return v.gather(3, i[:, None, None, :].expand(B, 3, C, C))

    x = torch.lerp(cols(ix0), cols(ix1), wx[:, None, None, :]).round_().clamp_(0, 255)
    y = msk.gather(1, mrow[:, :, None].expand(B, C, mx)).gather(2, mcol[:, None, :].expand(B, C, C))
    ar = torch.arange(C, device=dev)
    keep = (ar.view(1, C, 1) < valid[:, 0].view(B, 1, 1)) & (ar.view(1, 1, C) < valid[:, 1].view(B, 1, 1))
    x = (x * keep[:, None].to(x.dtype)).to(torch.uint8)
    y = torch.where(keep, y, torch.full_like(y, ignore_index))
    return x, y, valid
