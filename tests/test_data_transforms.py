"""Augmentations: Barlow Twins / DINO views, GPU batch augmentation (on CPU tensors), seg transforms."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from core.data.gpu_augment import BT_VIEW1, BT_VIEW2, DINO_LOCAL, BatchAugment, ViewParams
from core.data.transforms import (
    MEAN,
    STD,
    BarlowTwinsTransform,
    DINOTransform,
    EvalImageTransform,
    SegTrainTransform,
    SegValTransform,
    default_local_size,
    denormalize,
    normalize,
)


def _img(h=80, w=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _find(compose, cls):
    out = []
    for t in compose.transforms:
        if isinstance(t, v2.RandomApply):
            out += [u for u in t.transforms if isinstance(u, cls)]
            if any(isinstance(u, cls) for u in t.transforms):
                out.append(t)
        elif isinstance(t, cls):
            out.append(t)
    return out


def test_barlow_twins_views_and_official_params():
    t = BarlowTwinsTransform(32)
    v1, v2_ = t(_img())
    assert v1.shape == v2_.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert type(v1) is torch.Tensor
    assert not torch.allclose(v1, v2_)
    p1, p2 = t.view_params
    assert (p1.blur_p, p1.solarize_p) == (1.0, 0.0)
    assert (p2.blur_p, p2.solarize_p) == (0.1, 0.2)
    for p in (p1, p2):
        assert p.jitter == (0.4, 0.4, 0.2, 0.1) and p.jitter_p == 0.8 and p.gray_p == 0.2
        assert p.blur_sigma == (0.1, 2.0)
    rrc = [u for u in t.views[0].transforms if isinstance(u, v2.RandomResizedCrop)][0]
    assert rrc.scale == (0.08, 1.0) and rrc.interpolation == v2.InterpolationMode.BICUBIC
    flip = [u for u in t.views[0].transforms if isinstance(u, v2.RandomHorizontalFlip)][0]
    assert flip.p == 0.5
    # view 1 always blurs, never solarizes; view 2 blurs with p 0.1 and solarizes with p 0.2
    assert any(isinstance(u, v2.GaussianBlur) for u in t.views[0].transforms)
    assert not _find(t.views[0], v2.RandomSolarize)
    blur2 = [u for u in t.views[1].transforms if isinstance(u, v2.RandomApply)
             and isinstance(u.transforms[0], v2.GaussianBlur)]
    assert blur2 and blur2[0].p == 0.1
    sol = [u for u in t.views[1].transforms if isinstance(u, v2.RandomSolarize)]
    assert sol and sol[0].p == 0.2
    assert t.batch_augments() is None


def test_barlow_twins_accepts_pil():
    from PIL import Image

    pil = Image.fromarray(_img().permute(1, 2, 0).numpy())
    v1, v2_ = BarlowTwinsTransform(24)(pil)
    assert v1.shape == (3, 24, 24)


def test_gpu_augment_mode_splits_the_work():
    t = BarlowTwinsTransform(32, gpu_augment=True)
    v1, v2_ = t(_img())
    assert v1.shape == (3, 32, 32) and v1.dtype == torch.uint8  # crop + flip only: the device does the rest
    augs = t.batch_augments()
    assert [a.params for a in augs] == [BT_VIEW1, BT_VIEW2]
    batch = torch.stack([t(_img(seed=i))[0] for i in range(6)])
    out = augs[1](batch)
    assert out.shape == batch.shape and out.dtype == torch.float32


def test_batch_augment_shape_range_and_per_sample_randomness():
    x = torch.rand(1, 3, 24, 24).repeat(16, 1, 1, 1)  # identical samples
    aug = BatchAugment(ViewParams(blur_p=0.5, solarize_p=0.5))
    y = aug(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    d = denormalize(y)
    assert float(d.min()) >= 0 and float(d.max()) <= 1
    raw = BatchAugment(ViewParams(blur_p=0.5, solarize_p=0.5), normalize=False)(x)
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0
    flat = y.flatten(1)
    n_distinct = len({tuple(r.round(decimals=4).tolist()[:50]) for r in flat})
    assert n_distinct >= 12  # each sample drew its own parameters
    # reproducible with a generator, uint8 accepted
    torch.manual_seed(0)  # the op order of the colour jitter uses the global RNG
    a = aug(x, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    b = aug(x, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b)
    u8 = (x * 255).to(torch.uint8)
    assert aug(u8).shape == x.shape


def test_batch_augment_components():
    x = torch.rand(8, 3, 20, 20)
    ident = BatchAugment(ViewParams(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0), normalize=False)
    assert torch.allclose(ident(x), x)
    norm = BatchAugment(ViewParams(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0))
    assert torch.allclose(norm(x), normalize(x), atol=1e-6)
    gray = BatchAugment(ViewParams(jitter_p=0.0, gray_p=1.0, blur_p=0.0), normalize=False)(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    sol = BatchAugment(ViewParams(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=1.0), normalize=False)(x)
    assert torch.allclose(sol, torch.where(x >= 0.5, 1 - x, x))
    blur = BatchAugment(ViewParams(jitter_p=0.0, gray_p=0.0, blur_p=1.0, blur_sigma=(2.0, 2.0)), normalize=False)(x)
    assert blur.std() < x.std()  # smoothing reduces variance
    jit = BatchAugment(ViewParams(jitter_p=1.0, gray_p=0.0, blur_p=0.0), normalize=False)(x)
    assert not torch.allclose(jit, x) and float(jit.min()) >= 0 and float(jit.max()) <= 1
    hue_only = BatchAugment(ViewParams(jitter=(0, 0, 0, 0.5), jitter_p=1.0, gray_p=0.0, blur_p=0.0),
                            normalize=False)(x)
    # hue rotation keeps per-pixel max and min channel (HSV value and chroma)
    assert torch.allclose(hue_only.amax(1), x.amax(1), atol=1e-4)
    assert torch.allclose(hue_only.amin(1), x.amin(1), atol=1e-4)


def test_dino_multicrop():
    t = DINOTransform(64, n_local=3)
    views = t(_img(96, 96))
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert t.local_size == default_local_size(64) == 32 and default_local_size(224) == 96
    rrc = [u for u in t.views[3].transforms if isinstance(u, v2.RandomResizedCrop)][0]
    assert rrc.scale == (0.05, 0.4)
    rrc = [u for u in t.views[0].transforms if isinstance(u, v2.RandomResizedCrop)][0]
    assert rrc.scale == (0.4, 1.0)
    g = DINOTransform(64, 32, 2, gpu_augment=True)
    assert [a.params for a in g.batch_augments()][2] == DINO_LOCAL


def test_seg_transforms_keep_255_and_use_nearest():
    img = tv_tensors.Image(_img(48, 40))
    mask = torch.zeros(48, 40, dtype=torch.long)
    mask[10:30, 8:30] = 7
    mask[10:30, 8] = 255
    mask[10:30, 29] = 255
    tr = SegTrainTransform(32)
    for _ in range(5):
        x, m = tr(img, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8  # normalised on the device
        assert m.shape == (32, 32) and m.dtype == torch.uint8
        assert set(m.unique().tolist()) <= {0, 7, 255}  # nearest: no blended label values
    # val: the image keeps its aspect ratio (short side 32), the mask stays the ORIGINAL one (scored there)
    x, m = SegValTransform(32)(img, mask)
    assert x.shape == (3, 38, 32) and x.dtype == torch.float32
    assert m.shape == (48, 40) and torch.equal(m.long(), mask)
    x, m = SegValTransform(None)(img, mask)
    assert m.shape == (48, 40) and set(m.unique().tolist()) == {0, 7, 255}
    assert torch.allclose(denormalize(x), img.float() / 255, atol=1e-5)
    x, _ = SegValTransform(40)(img, mask)  # already at the scale: the identity
    assert torch.allclose(denormalize(x), img.float() / 255, atol=1e-5)


def test_seg_transform_through_dataset(voc_root):
    from core.data.voc import VOCSegmentation

    ds = VOCSegmentation(voc_root, "train", transform=SegTrainTransform(48))
    x, m = ds[0]
    assert x.shape == (3, 48, 48) and x.dtype == m.dtype == torch.uint8 and (m == 255).any()
    assert type(x) is torch.Tensor and type(m) is torch.Tensor


def test_eval_transform_and_denormalize():
    x = EvalImageTransform(16)(_img())
    assert x.shape == (3, 16, 16)
    d = denormalize(x.unsqueeze(0))
    assert d.shape == (1, 3, 16, 16) and float(d.min()) >= 0 and float(d.max()) <= 1
    assert len(MEAN) == len(STD) == 3


# --------------------------------------------------------------------------- uint8 loaders
def _old_gpu_views(sizes, scales, img):
    """The float views the gpu_augment path made before the loaders handed uint8 (PIL/tensor -> ToImage per
    view -> crop -> flip -> float [0, 1])."""
    from torchvision.transforms.v2 import InterpolationMode

    views = [v2.Compose([v2.ToImage(), v2.RandomResizedCrop(s, scale=sc, interpolation=InterpolationMode.BICUBIC,
                                                             antialias=True),
                         v2.RandomHorizontalFlip(p=0.5), v2.ToDtype(torch.float32, scale=True)])
             for s, sc in zip(sizes, scales)]
    return [t(img).as_subclass(torch.Tensor) for t in views]


def test_uint8_views_give_the_same_device_batches_as_before():
    from PIL import Image

    for t in (BarlowTwinsTransform(40, gpu_augment=True), DINOTransform(40, 24, 3, gpu_augment=True)):
        imgs = [Image.fromarray(_img(70, 90, seed=i).permute(1, 2, 0).numpy()) for i in range(4)]
        torch.manual_seed(0)
        new = [t(im) for im in imgs]
        torch.manual_seed(0)
        old = [_old_gpu_views(t.sizes, t.scales, im) for im in imgs]
        for k, aug in enumerate(t.batch_augments()):
            nb = torch.stack([v[k] for v in new])
            ob = torch.stack([v[k] for v in old])
            assert nb.dtype == torch.uint8 and nb.element_size() * 4 == ob.element_size()
            assert (nb.float() / 255 - ob).abs().max() < 1e-6  # what BatchAugment starts from
            torch.manual_seed(1)
            a = aug(nb, generator=torch.Generator().manual_seed(2))
            torch.manual_seed(1)
            b = aug(ob, generator=torch.Generator().manual_seed(2))
            assert (a - b).abs().max() < 1e-5


def test_seg_uint8_batches_normalised_on_the_device_as_before():
    from core.data.gpu_augment import SegBatchTransform
    from core.data.transforms import MMSegTrainTransform, seg_batch_transform

    img = tv_tensors.Image(_img(48, 40))
    mask = tv_tensors.Mask(torch.randint(0, 21, (48, 40), dtype=torch.uint8))
    old_t = v2.Compose([v2.RandomResizedCrop(32, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip(0.5),
                        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                        v2.Normalize(MEAN, STD)])
    new_t = SegTrainTransform(32)
    torch.manual_seed(4)
    xs, ms = zip(*[new_t(img, mask) for _ in range(3)])
    torch.manual_seed(4)
    xo, mo = zip(*[old_t(img, mask) for _ in range(3)])
    x = seg_batch_transform("simple")(torch.stack(xs))
    assert (x - torch.stack(xo)).abs().max() < 1e-6
    assert all(torch.equal(a, b.as_subclass(torch.Tensor)) for a, b in zip(ms, mo))
    # mmseg without photometric: crop of the old normalised image, padding 0 (old: pad after normalising)
    t = MMSegTrainTransform(64, 16, photometric=False, cat_max_ratio=1.0)
    torch.manual_seed(0)
    xu, mu, valid = t.apply(img, mask)
    y = SegBatchTransform(False)(xu[None], valid[None])[0]
    h, w = valid.tolist()
    ref = torch.zeros(3, 64, 64)
    ref[:, :h, :w] = normalize(xu[:, :h, :w].float() / 255)
    assert (y - ref).abs().max() < 1e-6


def test_batch_photometric_equals_per_image_mmseg_steps(monkeypatch):
    import core.data.transforms as T
    from core.data.gpu_augment import BatchPhotoMetricDistortion

    x = _img(20, 24).float()[None].repeat(3, 1, 1, 1)
    bp = BatchPhotoMetricDistortion()
    p = {"on_b": torch.tensor([True, False, True]), "delta_b": torch.tensor([10.5, 0.0, -20.25]),
         "mode": torch.tensor([True, False, False]), "on_c": torch.tensor([True, True, False]),
         "alpha_c": torch.tensor([1.3, 0.7, 1.0]), "on_s": torch.tensor([True, True, False]),
         "alpha_s": torch.tensor([0.6, 1.4, 1.0]), "on_h": torch.tensor([True, False, True]),
         "delta_h": torch.tensor([7, 0, -18])}
    out = bp.apply(x.clone(), p)
    for i in range(3):  # the per-image version's draws, in its order, scripted
        ints = [int(p["on_b"][i]), int(p["mode"][i])]
        if p["mode"][i]:
            ints.append(int(p["on_c"][i]))
        ints += [int(p["on_s"][i]), int(p["on_h"][i])]
        if p["on_h"][i]:
            ints.append(int(p["delta_h"][i]))
        if not p["mode"][i]:
            ints.append(int(p["on_c"][i]))
        floats = [float(p["delta_b"][i])] if p["on_b"][i] else []
        if p["mode"][i] and p["on_c"][i]:
            floats.append(float(p["alpha_c"][i]))
        if p["on_s"][i]:
            floats.append(float(p["alpha_s"][i]))
        if not p["mode"][i] and p["on_c"][i]:
            floats.append(float(p["alpha_c"][i]))
        it_i, it_f = iter(ints), iter(floats)
        monkeypatch.setattr(T, "_randint", lambda lo, hi: next(it_i))
        monkeypatch.setattr(T, "_uniform", lambda lo, hi: next(it_f))
        ref = T.PhotoMetricDistortion()(_img(20, 24)).float()
        assert (out[i] - ref).abs().max() <= 1.0 and ((out[i] - ref).abs() > 0).float().mean() < 0.01
    assert not torch.equal(out[0], x[0])
    # drawn parameters: every sample its own, the result stays on the 0-255 integer grid
    y = bp(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, y.floor()) and float(y.min()) >= 0 and float(y.max()) <= 255


def test_batch_layout_is_read_one_way():
    """core.data.batch: the tuple and dict layouts give the same (images, targets, valid), SSL views come out of
    every accepted wrapping, and the normalisation constants are the ones the transforms use."""
    from core.data import batch as B
    from core.data import gpu_augment, transforms

    x, y, v = torch.zeros(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.long), torch.tensor([[4, 4], [3, 2]])
    for b in ((x, y, v), {B.IMAGE: x, B.MASK: y, B.VALID: v}):
        got = (*B.images_targets(b), B.valid_sizes(b))
        assert got[0] is x and got[1] is y and got[2] is v and B.batch_size(b) == 2
    assert B.valid_sizes((x, y)) is None and B.valid_sizes({B.IMAGE: x, B.MASK: y}) is None
    assert B.images_targets({B.IMAGE: x, B.LABEL: y[:, 0, 0]})[1].shape == (2,)
    v1, v2 = torch.zeros(3, 3, 4, 4), torch.ones(3, 3, 4, 4)
    for b in ([v1, v2], ([v1, v2], None), {B.VIEWS: [v1, v2]}):
        assert [t is s for t, s in zip(B.views(b), (v1, v2))] == [True, True] and B.batch_size(b) == 3
    with pytest.raises(TypeError, match="several views"):
        B.views(v1)
    assert B.is_regions({B.REGION_IMAGE: x}) and not B.is_regions((x, y))
    assert transforms.MEAN is gpu_augment.MEAN is B.MEAN and transforms.STD is gpu_augment.STD is B.STD
