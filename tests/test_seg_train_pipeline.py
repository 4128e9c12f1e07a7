"""Stage-2 training pipeline: mmseg's VOC train transform, trainaug (SBD layout), poly schedule, new
SegmentConfig fields, ViT position-embedding interpolation."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import tv_tensors

from core.config import SegmentConfig
from core.data.transforms import (
    MEAN,
    STD,
    MMSegTrainTransform,
    PhotoMetricDistortion,
    SegTrainTransform,
    build_seg_train_transform,
    cat_max_crop_box,
    random_resize_size,
)
from core.errors import ConfigError, DataError


def _sample(h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[: h // 2, : w // 2] = 5
    mask[h // 2:, w // 2:] = 12
    mask[0, :] = 255
    return tv_tensors.Image(img), tv_tensors.Mask(mask)


# --------------------------------------------------------------------------- resize / crop
def test_random_resize_size_ratio_range():
    # VOC-like 500x375 (w x h) at scale 512: short side 512 x ratio unless the 4x long cap binds
    for ratio in (0.5, 1.0, 2.0):
        h, w = random_resize_size(375, 500, 512, ratio)
        assert min(h, w) == int(512 * ratio)
    # a very long image is capped by the long side (2048 x ratio)
    h, w = random_resize_size(100, 1000, 512, 1.0)
    assert max(h, w) == 2048


def test_resize_ratio_range_in_transform(monkeypatch):
    seen = []
    import core.data.transforms as T

    orig = T.random_resize_size

    def spy(h, w, scale, ratio, long_factor=4):
        seen.append(ratio)
        return orig(h, w, scale, ratio, long_factor)

    monkeypatch.setattr(T, "random_resize_size", spy)
    t = MMSegTrainTransform(32, 40, photometric=False)
    torch.manual_seed(0)
    for _ in range(40):
        t(*_sample())
    assert all(0.5 <= r <= 2.0 for r in seen) and max(seen) - min(seen) > 0.8


def test_crop_shape_and_255_padding():
    # scale 16 x ratio <= 2 -> the short side is at most 32 < crop 64: padded with 255 on the mask
    t = MMSegTrainTransform(64, 16, photometric=False, cat_max_ratio=1.0)
    torch.manual_seed(0)
    x, y, valid = t.apply(*_sample())
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.uint8
    assert y.shape == (64, 64)
    assert (y[-1, :] == 255).all() and (y[:, -1] == 255).all()
    h, w = valid.tolist()
    assert h < 64 and w < 64 and (y[h:] == 255).all() and (y[:, w:] == 255).all()
    # padded image area is 0 after normalisation on the device, as mmseg pads
    xn = t.batch_transform()(x[None], valid[None])[0]
    assert (xn[:, h:, :] == 0).all() and (xn[:, :, w:] == 0).all() and (xn[:, :h, :w] != 0).any()
    # a big image: the crop is full, no padding beyond what the mask held
    t2 = MMSegTrainTransform(32, 96, photometric=False, cat_max_ratio=1.0)
    x2, y2, v2 = t2.apply(*_sample())
    assert v2.tolist() == [32, 32]
    assert x2.shape == (3, 32, 32) and y2.shape == (32, 32)
    assert set(torch.unique(y2).tolist()) <= {0, 5, 12, 255}


def test_cat_max_ratio_respected():
    torch.manual_seed(0)
    mask = torch.zeros(200, 200, dtype=torch.uint8)  # 90% class 0, one small class-7 block
    mask[150:200, 150:200] = 7
    ok = 0
    for _ in range(30):
        t, l_, ch, cw = cat_max_crop_box(mask, (60, 60), 0.75)
        crop = mask[t:t + ch, l_:l_ + cw].long()
        cnt = torch.bincount(crop.flatten(), minlength=8)
        cnt = cnt[cnt > 0]
        ok += int(cnt.numel() > 1 and float(cnt.max()) / float(cnt.sum()) < 0.75)
    # without the check a 60 px crop rarely holds both classes within 75%; with 10 tries most do
    torch.manual_seed(0)
    base = 0
    for _ in range(30):
        t, l_, ch, cw = cat_max_crop_box(mask, (60, 60), 1.0)
        crop = mask[t:t + ch, l_:l_ + cw].long()
        cnt = torch.bincount(crop.flatten(), minlength=8)
        cnt = cnt[cnt > 0]
        base += int(cnt.numel() > 1 and float(cnt.max()) / float(cnt.sum()) < 0.75)
    assert ok > base and ok >= 10


def test_cat_max_ratio_ignores_255():
    mask = torch.full((40, 40), 255, dtype=torch.uint8)
    mask[:, :20] = 1
    mask[:, 20:] = 2
    mask[:2] = 255
    torch.manual_seed(0)
    t, l_, ch, cw = cat_max_crop_box(mask, (40, 40), 0.75)
    assert (t, l_, ch, cw) == (0, 0, 40, 40)


# --------------------------------------------------------------------------- flip / photometric
def test_flip_applied_jointly():
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:, :, :16] = 200  # bright left half
    mask = torch.zeros(32, 32, dtype=torch.uint8)
    mask[:, :16] = 3  # class 3 on the left
    t = MMSegTrainTransform(32, 32, ratio_range=(1.0, 1.0), photometric=False, cat_max_ratio=1.0)
    flips = 0
    for s in range(20):
        torch.manual_seed(s)
        x, y, _ = t.apply(tv_tensors.Image(img), tv_tensors.Mask(mask))
        bright = x[0] > 0
        assert torch.equal(bright, y == 3)
        flips += int(bool(y[0, -1] == 3))
    assert 0 < flips < 20


def test_photometric_ranges_and_changes():
    img, _ = _sample(32, 32)
    p = PhotoMetricDistortion()
    changed = 0
    for s in range(10):
        torch.manual_seed(s)
        out = p(img)
        assert out.dtype == torch.uint8 and out.shape == img.shape
        changed += int(not torch.equal(out.as_subclass(torch.Tensor), img.as_subclass(torch.Tensor)))
        f = p(img.as_subclass(torch.Tensor).float() / 255)
        assert f.dtype == torch.float32 and float(f.min()) >= 0 and float(f.max()) <= 1
    assert changed >= 7


def test_photometric_leaves_mask_untouched():
    img, mask = _sample(32, 32)
    t = MMSegTrainTransform(32, 32, ratio_range=(1.0, 1.0), hflip=0.0, cat_max_ratio=1.0)
    for s in range(5):
        torch.manual_seed(s)
        x, y, valid = t.apply(img, mask)
        assert torch.equal(y, mask.as_subclass(torch.Tensor))
        assert torch.equal(x, img.as_subclass(torch.Tensor))  # photometric runs on the device batch
    assert t.batch_transform().photometric


# --------------------------------------------------------------------------- simple pipeline unchanged
def test_simple_pipeline_is_the_old_transform(voc_root):
    from core.config import DataConfig
    from core.data.module import build_seg_loaders

    t = build_seg_train_transform("simple", 32)
    assert type(t) is SegTrainTransform and t.size == 32
    img, mask = _sample()
    torch.manual_seed(3)
    a = t(img, mask)
    torch.manual_seed(3)
    b = SegTrainTransform(32)(img, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cfg = DataConfig(root=str(voc_root), image_size=32)
    loaders = build_seg_loaders(cfg, 4)
    assert type(loaders.train_dataset.transform) is SegTrainTransform
    assert loaders.train_dataset.split == "train"
    m = build_seg_loaders(cfg, 4, train_pipeline="mmseg", crop_size=48, train_scale=32)
    assert isinstance(m.train_dataset.transform, MMSegTrainTransform)
    from core.methods.segmentation import _train_batch

    x, y, valid = _train_batch(next(iter(m.train)))  # the regions' batch -> crops (the device half)
    assert x.shape[-2:] == (48, 48) and y.shape[-2:] == (48, 48) and valid.shape == (4, 2)
    assert x.dtype == y.dtype == torch.uint8


def test_mmseg_output_normalised():
    t = MMSegTrainTransform(32, 32, photometric=False, ratio_range=(1.0, 1.0), hflip=0.0, cat_max_ratio=1.0)
    img = tv_tensors.Image(torch.full((3, 32, 32), 255, dtype=torch.uint8))
    x, _, valid = t.apply(img, tv_tensors.Mask(torch.zeros(32, 32, dtype=torch.uint8)))
    x = t.batch_transform()(x[None], valid[None])[0]
    assert math.isclose(float(x[0, 0, 0]), (1 - MEAN[0]) / STD[0], rel_tol=1e-5)


# --------------------------------------------------------------------------- trainaug
def test_trainaug_from_generated_sbd_layout(tmp_path):
    from core.config import DataConfig
    from core.data.module import build_seg_loaders
    from core.data.synthetic import generate_voc
    from core.data.voc import VOCSegmentation, split_ids, voc_ssl_images

    root = generate_voc(tmp_path / "v", n_train=8, n_val=4, size=32, trainaug=True)
    voc = root / "VOCdevkit" / "VOC2012"
    aug_ids = (voc / "ImageSets/Segmentation/trainaug.txt").read_text().split()
    train = set(split_ids(root, "train"))
    val = set(split_ids(root, "val"))
    assert train < set(aug_ids) and not (val & set(aug_ids))
    assert all((voc / "SegmentationClassAug" / f"{i}.png").is_file() for i in aug_ids)
    # a val id slipped into the list is dropped
    (voc / "ImageSets/Segmentation/trainaug.txt").write_text("\n".join(aug_ids + [sorted(val)[0]]) + "\n")
    ds = VOCSegmentation(root, "trainaug")
    assert len(ds) == len(aug_ids) and not (set(ds.ids) & val)
    img, mask = ds[0]
    assert img.shape[-2:] == mask.shape and mask.dtype == torch.int64
    assert not ({p.stem for p in voc_ssl_images(root, "trainaug")} & val)
    loaders = build_seg_loaders(DataConfig(root=str(root), image_size=32), 4, train_split="trainaug",
                                train_pipeline="mmseg")
    assert len(loaders.train_dataset) == len(aug_ids)
    # mmseg's aug.txt (SBD minus train and val) is read as train + aug
    (voc / "ImageSets/Segmentation/trainaug.txt").unlink()
    (voc / "ImageSets/Segmentation/aug.txt").write_text("\n".join(sorted(set(aug_ids) - train)) + "\n")
    assert set(VOCSegmentation(root, "trainaug").ids) == set(aug_ids)


def test_trainaug_missing_layout_is_one_line_error(tmp_path):
    from core.data.synthetic import generate_voc
    from core.data.voc import VOCSegmentation

    root = generate_voc(tmp_path / "v", n_train=4, n_val=2, size=32)
    with pytest.raises(DataError) as e:
        VOCSegmentation(root, "trainaug")
    assert "trainaug.txt" in str(e.value) and "\n" not in str(e.value)


def test_generator_default_output_unchanged(tmp_path):
    from core.data.synthetic import generate_voc

    a = generate_voc(tmp_path / "a", n_train=4, n_val=2, size=32)
    b = generate_voc(tmp_path / "b", n_train=4, n_val=2, size=32, trainaug=True)
    va, vb = a / "VOCdevkit", b / "VOCdevkit"
    files_a = sorted(p.relative_to(va) for p in va.rglob("*") if p.is_file())
    assert not (va / "VOC2012" / "SegmentationClassAug").exists()
    for rel in files_a:
        if rel.name == "twinseg_synthetic.json":
            continue
        assert (va / rel).read_bytes() == (vb / rel).read_bytes(), rel


# --------------------------------------------------------------------------- schedule
def test_poly_schedule_values():
    from core.methods.segmentation import build_lr_lambda, poly_factor, total_steps

    assert poly_factor(0, 100) == 1.0
    assert math.isclose(poly_factor(50, 100), 0.5 ** 0.9)
    assert poly_factor(100, 100) == 0.0 and poly_factor(150, 100) == 0.0
    assert math.isclose(poly_factor(100, 100, 0.01), 0.01)
    assert math.isclose(poly_factor(50, 100, 0.01), 0.01 + 0.99 * 0.5 ** 0.9)
    cfg = SegmentConfig(schedule="poly", max_iters=200)
    assert total_steps(cfg) == 200
    lam = build_lr_lambda(cfg, 200)
    assert lam(0) == 1.0 and math.isclose(lam(200), 0.01) and lam(100) > lam(150)
    # cosine (default) is the old warmup + cosine
    from core.methods.segmentation import WARMUP_FRACTION, _lr_lambda

    old = _lr_lambda(100, max(1, int(round(WARMUP_FRACTION * 100))))
    new = build_lr_lambda(SegmentConfig(), 100)
    assert all(old(s) == new(s) for s in range(0, 101, 7))


def test_poly_schedule_in_optimizer():
    from core.methods.segmentation import SegmentationMethod

    cfg = SegmentConfig(backbone="resnet_tiny", head="linear", schedule="poly", max_iters=10, lr=1e-3)
    m = SegmentationMethod(cfg, 21, [str(i) for i in range(21)])
    out = m.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    base = [g["lr"] for g in opt.param_groups]
    for _ in range(10):
        opt.step()
        sched.step()
    assert all(math.isclose(g["lr"], b * 0.01, rel_tol=1e-6) for g, b in zip(opt.param_groups, base))


# --------------------------------------------------------------------------- config
def test_defaults_keep_current_behaviour():
    c = SegmentConfig()
    assert (c.train_pipeline, c.crop_size, c.train_scale, c.train_split, c.schedule, c.max_iters) == (
        "simple", None, None, "train", "cosine", None)


@pytest.mark.parametrize("kw", [
    {"train_pipeline": "fancy"},
    {"train_pipeline": "mmseg", "crop_size": 8},
    {"train_pipeline": "mmseg", "crop_size": 10000},
    {"train_pipeline": "mmseg", "crop_size": "big"},
    {"crop_size": 64},  # simple pipeline
    {"train_pipeline": "mmseg", "train_scale": 4},
    {"train_scale": 64},  # simple pipeline
    {"cat_max_ratio": 0.0},
    {"cat_max_ratio": 1.5},
    {"cat_max_ratio": "x"},
    {"train_split": "val"},
    {"train_split": "trainaug", "data": {"dataset": "coco_stuff"}},
    {"schedule": "step"},
    {"min_lr_ratio": 1.0},
    {"min_lr_ratio": -0.1},
    {"max_iters": 0},
    {"max_iters": -5},
    {"max_iters": 1.5},
])
def test_bad_values(kw):
    with pytest.raises(ConfigError) as e:
        SegmentConfig.from_dict(kw)
    msg = str(e.value)
    assert "\n" not in msg
    field = next(k for k in kw if k != "data" and k != "train_pipeline") if len(kw) > 1 else next(iter(kw))
    assert field.split(".")[0] in msg or "train_split" in msg


def test_good_values():
    c = SegmentConfig.from_dict({"train_pipeline": "mmseg", "crop_size": 512, "train_scale": 512, "cat_max_ratio": 1,
                                 "train_split": "trainaug", "schedule": "poly", "max_iters": 20000,
                                 "min_lr_ratio": 0.0})
    assert c.crop_size == 512 and c.max_iters == 20000


# --------------------------------------------------------------------------- ViT position embeddings
def test_vit_pos_embed_interpolated_on_load(tmp_path):
    from core.models.registry import create_backbone
    from core.weights import load_source

    small = create_backbone("vit_nano_patch8", image_size=64)
    path = tmp_path / "bb.pt"
    torch.save(small.timm_model.state_dict(), path)
    big = create_backbone("vit_nano_patch8", image_size=96)
    assert big.timm_model.pos_embed.shape[1] == 1 + 12 * 12
    rep = load_source(big, f"checkpoint:{path}")
    assert rep["resized"] and "pos_embed" in rep["resized"][0]
    big.eval()
    with torch.no_grad():
        out = big.forward_all(torch.randn(1, 3, 96, 96))
        assert out.dense.shape == (1, 96, 12, 12)
        # dynamic size: another input size still runs (timm interpolates the pos-embed)
        assert big.forward_dense(torch.randn(1, 3, 48, 80)).shape == (1, 96, 6, 10)


def test_mmseg_crop_equals_resize_then_crop():
    """Worker half (source regions + taps) then device half (`crops_from_regions`, a whole ragged batch): the
    same crops, boxes and RNG draws as resizing image and mask whole, then cropping and flipping (mmseg's
    order); the mask exactly, the image within 1 (uint8 rounding of the resize); 0 / 255 padding."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    import core.data.transforms as T
    from core.data.gpu_augment import crops_from_regions

    g = torch.Generator().manual_seed(1)
    for (h, w), crop, scale in (((37, 53), 40, 30), ((53, 37), 40, 30), ((20, 21), 24, 30), ((75, 100), 64, 64)):
        img = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        mask = torch.randint(0, 4, (h, w), dtype=torch.uint8, generator=g)
        mask[:, : w // 3] = 0
        mask[5] = 255
        t = MMSegTrainTransform(crop, scale, photometric=False, cat_max_ratio=0.75)
        samples, refs = [], []
        for seed in range(12):
            torch.manual_seed(seed)
            samples.append(t(img, tv_tensors.Mask(mask)))
            torch.manual_seed(seed)  # the reference order: resize both whole, crop box on the resized mask, crop, flip
            nh, nw = T.random_resize_size(h, w, scale, T._uniform(0.5, 2.0))
            ri = F.resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=False)
            rm = F.resize(tv_tensors.Mask(mask), [nh, nw], interpolation=InterpolationMode.NEAREST)
            assert torch.equal(rm.as_subclass(torch.Tensor), mask[T.nearest_index(h, nh)][:, T.nearest_index(w, nw)])
            top, left, ch, cw = cat_max_crop_box(rm, (crop, crop), 0.75)
            ri, rm = F.crop(ri, top, left, ch, cw), F.crop(rm, top, left, ch, cw)
            if torch.rand(()).item() < 0.5:
                ri, rm = F.horizontal_flip(ri), F.horizontal_flip(rm)
            refs.append((ri.as_subclass(torch.Tensor), rm.as_subclass(torch.Tensor), ch, cw))
        x, y, valid = crops_from_regions(MMSegTrainTransform.collate(samples))
        assert x.shape == (12, 3, crop, crop) and y.shape == (12, crop, crop) and x.dtype == y.dtype == torch.uint8
        for i, (ri, rm, ch, cw) in enumerate(refs):
            assert valid[i].tolist() == [ch, cw]
            assert (x[i, :, :ch, :cw].int() - ri.int()).abs().max() <= 1, (h, w, i)
            assert torch.equal(y[i, :ch, :cw], rm), (h, w, i)
            assert (x[i, :, ch:] == 0).all() and (x[i, :, :, cw:] == 0).all()
            assert (y[i, ch:] == 255).all() and (y[i, :, cw:] == 255).all()


def test_bilinear_taps_are_torch_resize():
    """Float images: the taps' lerp is F.interpolate(bilinear, align_corners=False) to float precision, for
    up- and downscaling and an unchanged axis; any output window."""
    from core.data.transforms import bilinear_taps

    x = torch.rand(3, 37, 53, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for nh, nw in ((74, 106), (20, 29), (37, 80), (50, 53), (19, 27)):
        full = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        for top in (0, nh // 3):
            i0, i1, wy = (torch.from_numpy(a) for a in bilinear_taps(37, nh, top, nh - top))
            j0, j1, wx = (torch.from_numpy(a) for a in bilinear_taps(53, nw, 0, nw))
            v = x[:, i0] * (1 - wy.double())[:, None] + x[:, i1] * wy.double()[:, None]
            out = v[..., j0] * (1 - wx.double()) + v[..., j1] * wx.double()
            assert torch.allclose(out, full[:, top:], atol=1e-5), (nh, nw, top)  # float32 weights


def test_mmseg_regions_are_smaller_than_crops_and_cross_workers(voc_root):
    """Upscaled crops hand over their source region (fewer bytes than the crop); the batch packed in a worker
    (shared memory) is the batch packed in the main process."""
    from torch.utils.data import DataLoader

    from core.data.voc import VOCSegmentation

    t = MMSegTrainTransform(48, 48, photometric=False, ratio_range=(2.0, 2.0))
    img, mask = _sample()
    r, m, taps, weights, valid = t(img, mask)
    assert r.numel() < 3 * 48 * 48 / 2 and m.numel() < 48 * 48 / 2
    assert taps.shape == (6, 48) and taps.dtype == torch.int32 and weights.shape == (2, 48)
    assert weights.dtype == torch.float32 and valid.tolist() == [48, 48]
    # crop 256 > the 32 px resize: every box is the whole image, no flip: the same samples in any process
    ds = VOCSegmentation(voc_root, "train", transform=MMSegTrainTransform(256, 32, photometric=False,
                                                                          ratio_range=(1.0, 1.0), hflip=0.0))
    batches = []
    for workers in (0, 1):
        g = torch.Generator().manual_seed(0)
        dl = DataLoader(ds, batch_size=3, shuffle=True, generator=g, num_workers=workers, collate_fn=t.collate)
        batches.append(next(iter(dl)))
    a, b = batches
    assert a.keys() == b.keys() and [tuple(s) for s in a["region_shapes"]] == [tuple(s) for s in b["region_shapes"]]
    for k in ("region_image", "region_mask", "taps", "weights", "valid"):
        assert torch.equal(a[k], b[k]), k


def test_box_label_counts_equal_the_gathered_box():
    """cat_max_ratio counts each candidate box from the source mask with row / column weights: equal to the
    label histogram of the box of the nearest-resized mask (ignore left out), up- and downscaled."""
    import numpy as np

    import core.data.transforms as T

    g = torch.Generator().manual_seed(2)
    for h, w in ((37, 53), (60, 45)):
        mask = torch.randint(0, 5, (h, w), dtype=torch.uint8, generator=g)
        mask[:, : w // 2] = 3
        mask[h // 3] = 255
        for nh, nw in ((2 * h, 2 * w), (h // 2, w // 2), (h + 7, w - 5), (h, w)):
            rows, cols = T.nearest_index(h, nh).numpy(), T.nearest_index(w, nw).numpy()
            counts = T._BoxLabelCounts(mask.numpy(), rows, cols, 255)
            labels = [k for k in range(256) if k != 255 and bool((mask == k).any())]
            resized = mask.numpy()[rows][:, cols]
            for top, left, ch, cw in ((0, 0, nh, nw), (1, 2, nh // 2, nw // 3), (nh - 5, nw - 4, 5, 4)):
                ref = np.bincount(resized[top:top + ch, left:left + cw].reshape(-1), minlength=256)[labels]
                assert np.array_equal(counts(top, left, ch, cw).numpy().astype(np.int64), ref), (h, w, nh, nw, top)


def test_first_samples_of_a_region_batch():
    """`MMSegTrainTransform.first(batch, n)` = the batch collated from the first n samples."""
    t = MMSegTrainTransform(40, 30, photometric=False)
    torch.manual_seed(0)
    samples = [t(*_sample(h, w, seed=i)) for i, (h, w) in enumerate(((48, 64), (30, 70), (64, 40)))]
    head, ref = MMSegTrainTransform.first(t.collate(samples), 2), t.collate(samples[:2])
    assert [tuple(s) for s in head["region_shapes"]] == [tuple(s) for s in ref["region_shapes"]]
    for k in ("region_image", "region_mask", "taps", "weights", "valid"):
        assert torch.equal(head[k], ref[k]), k
