"""Loader builders: SSL (Barlow Twins / DINO, CPU or device augmentation), k-NN monitor, segmentation,
COCO-Stuff and ImageFolder sources, limits and clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import DataConfig
from core.data.coco_stuff import (
    COCO_COARSE_CLASSES,
    COCO_FINE_CLASSES,
    COCO_FINE_TO_COARSE,
    COCO_UNUSED_IDS,
    COCOStuff,
)
from core.data.imagefolder import ImageFolderImages, imagefolder_classes, list_images
from core.data.module import build_seg_loaders, build_ssl_loaders, validate_data
from core.errors import ConfigError, DataError


def _views(data_cfg, method="barlow_twins", gpu_augment=False, **options):
    """The method's views, as a pretraining run builds them (its registry entry)."""
    from core.config import PretrainConfig
    from core.methods.registry import get_method

    cfg = PretrainConfig.from_dict({"method": method, "data": data_cfg.to_dict(), **options})
    return get_method(method).views(cfg, gpu_augment)


def test_ssl_loaders_barlow_twins(voc_data_cfg):
    L = build_ssl_loaders(voc_data_cfg, _views(voc_data_cfg), batch_size=8)
    assert L.num_images == 48 and len(L.train) == 6 and L.batch_augment is None
    views = next(iter(L.train))
    assert isinstance(views, list) and len(views) == 2
    assert views[0].shape == views[1].shape == (8, 3, 64, 64)
    x, y = next(iter(L.knn_train))
    assert x.shape[1:] == (3, 64, 64) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 20 and (y > 0).all()  # every image has an object
    assert len(L.knn_train.dataset) == 48 and len(L.knn_val.dataset) == 24
    assert L.train.drop_last


def test_ssl_loaders_gpu_augment_and_all_but_val(voc_root):
    cfg = DataConfig(root=str(voc_root), ssl_split="all_but_val", image_size=32, limit_val=5)
    L = build_ssl_loaders(cfg, _views(cfg, gpu_augment=True), batch_size=10)
    assert L.num_images == 48 + 12 and L.view_sizes == (32, 32)
    v1, v2 = next(iter(L.train))
    assert v1.dtype == v2.dtype == torch.uint8  # colour, float conversion and normalisation on the device
    out = [aug(v) for aug, v in zip(L.batch_augment, (v1, v2))]
    assert out[0].shape == (10, 3, 32, 32)
    assert len(L.knn_val.dataset) == 5


def test_ssl_loaders_dino(voc_data_cfg):
    L = build_ssl_loaders(voc_data_cfg, _views(voc_data_cfg, "dino", dino={"local_crops": 3}), batch_size=4)
    views = next(iter(L.train))
    assert [tuple(v.shape) for v in views] == [(4, 3, 64, 64)] * 2 + [(4, 3, 32, 32)] * 3
    assert L.view_sizes == (64, 64, 32, 32, 32)


def test_ssl_loader_errors(voc_data_cfg):
    with pytest.raises(ConfigError, match="batch_size=64"):
        build_ssl_loaders(voc_data_cfg, _views(voc_data_cfg), batch_size=64)
    with pytest.raises(DataError, match="does not exist"):
        cfg = DataConfig(root="/nonexistent/voc")
        build_ssl_loaders(cfg, _views(cfg), batch_size=4)


def test_seg_loaders_voc(voc_root):
    cfg = DataConfig(root=str(voc_root), image_size=48, limit_train=20, limit_val=10)
    S = build_seg_loaders(cfg, batch_size=4)
    assert S.num_classes == 21 and len(S.class_names) == 21 and S.ignore_index == 255 and len(S.palette) == 768
    x, m = next(iter(S.train))
    assert x.shape == (4, 3, 48, 48) and x.dtype == torch.uint8  # normalised on the device
    assert m.shape == (4, 48, 48) and m.dtype == torch.uint8
    assert set(m.unique().tolist()) <= set(range(21)) | {255}
    vb = next(iter(S.val))  # val: images at the evaluation scale (short side 48), ORIGINAL 64 px masks
    assert vb["image"].shape == (4, 3, 48, 48) and vb["mask"].shape == (4, 64, 64) and vb["mask"].dtype == torch.int64
    assert vb["img_hw"].tolist() == [[48, 48]] * 4 and vb["ori_hw"].tolist() == [[64, 64]] * 4
    assert sum(len(b["image"]) for b in S.val) == 10
    assert (torch.cat([b["mask"] for b in S.val]) == 255).any()  # void preserved, never mapped to background
    train, val, info = build_seg_loaders(cfg, batch_size=4)  # tuple-unpacking form used by core.runs.segment
    assert info.num_classes == 21 and train.batch_size == 4


def test_workers_and_default_root(voc_root, tmp_path, monkeypatch):
    cfg = DataConfig(root=str(voc_root), num_workers=1, limit_train=8)
    L = build_ssl_loaders(cfg, _views(cfg), batch_size=4)
    assert L.train.persistent_workers and L.train.num_workers == 1
    assert len(list(L.train)) == 2
    monkeypatch.setenv("TWINSEG_DATA_DIR", str(tmp_path))
    cfg = DataConfig(synthetic_n_train=6, synthetic_n_val=3, image_size=32)
    S = build_seg_loaders(cfg, batch_size=2)
    assert S.root == tmp_path / "synthetic-6-3-32-0" and len(S.train.dataset) == 6
    assert validate_data(cfg) == S.root


# --------------------------------------------------------------------------- COCO-Stuff
def test_coco_label_spaces():
    assert len(COCO_FINE_CLASSES) == 171 and len(COCO_COARSE_CLASSES) == 27
    assert len(COCO_UNUSED_IDS) == 11
    things = {COCO_FINE_TO_COARSE[i] for i in range(91)}
    stuff = {COCO_FINE_TO_COARSE[i] for i in range(91, 182)}
    assert things == set(range(12)) and stuff == set(range(12, 27))
    assert COCO_COARSE_CLASSES[COCO_FINE_TO_COARSE[0]] == "person"
    assert COCO_COARSE_CLASSES[COCO_FINE_TO_COARSE[2]] == "vehicle"  # car
    assert COCO_COARSE_CLASSES[COCO_FINE_TO_COARSE[156]] == "sky"  # sky-other
    assert COCO_COARSE_CLASSES[COCO_FINE_TO_COARSE[168]] == "plant"  # tree


def test_coco_loader(coco_root):
    fine = COCOStuff(coco_root, "train", "fine")
    coarse = COCOStuff(coco_root, "train", "coarse")
    assert len(fine) == 8 and len(COCOStuff(coco_root, "val")) == 4
    raw = np.array(Image.open(fine.masks[0]))
    _, mf = fine[0]
    _, mc = coarse[0]
    assert ((mf == 255) == torch.from_numpy(raw == 255)).all()
    assert int(mf[mf != 255].max()) < 171 and int(mc[mc != 255].max()) < 27
    ids = sorted(set(np.unique(raw).tolist()) - {255})
    for rid in ids:
        sel = torch.from_numpy(raw == rid)
        assert (mc[sel] == COCO_FINE_TO_COARSE[rid]).all()
        assert (mf[sel] == [i for i in range(182) if i not in COCO_UNUSED_IDS].index(rid)).all()
    S = build_seg_loaders(DataConfig(dataset="coco_stuff", root=str(coco_root), coco_labels="fine"), 4)
    assert S.num_classes == 171 and len(S.class_names) == 171
    x, m = next(iter(S.train))
    assert x.shape == (4, 3, 64, 64) and m.dtype == torch.uint8
    cfg = DataConfig(dataset="coco_stuff", root=str(coco_root))
    L = build_ssl_loaders(cfg, _views(cfg), 4)
    assert L.num_images == 8 and L.knn_num_classes == 27


def test_coco_bad_layout_and_values(coco_root, tmp_path):
    with pytest.raises(DataError, match="stuffthingmaps_trainval2017"):
        (tmp_path / "c" / "images" / "train2017").mkdir(parents=True)
        COCOStuff(tmp_path / "c", "train")
    root = tmp_path / "copy"
    shutil.copytree(coco_root, root)
    ds = COCOStuff(root, "val")
    m = np.array(Image.open(ds.masks[0]))
    m[0, 0] = 200
    Image.fromarray(m).save(ds.masks[0])
    with pytest.raises(DataError) as e:
        ds[0]
    assert str(ds.masks[0]) in str(e.value) and "200" in str(e.value)
    ds.masks[1].unlink()
    with pytest.raises(DataError, match=ds.masks[1].name):
        COCOStuff(root, "val")


# --------------------------------------------------------------------------- ImageFolder
def _tree(root, flat=False, n=5):
    for c in ("cat", "dog"):
        d = root if flat else root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(d / f"{c}_{i}.jpg")


def test_imagefolder_sources(tmp_path, voc_root):
    _tree(tmp_path / "tree")
    _tree(tmp_path / "flat", flat=True)
    assert len(list_images(tmp_path / "tree")) == 10 == len(ImageFolderImages(tmp_path / "flat"))
    x = ImageFolderImages(tmp_path / "tree")[0]
    assert x.shape == (3, 40, 40) and x.dtype == torch.uint8
    paths, labels, classes = imagefolder_classes(tmp_path / "tree")
    assert classes == ["cat", "dog"] and labels.count(1) == 5
    # imagefolder as the SSL source of a VOC run: k-NN still on VOC
    cfg = DataConfig(root=str(voc_root), ssl_root=str(tmp_path / "flat"), image_size=32)
    L = build_ssl_loaders(cfg, _views(cfg), 4)
    assert L.num_images == 10 and len(L.knn_train.dataset) == 48
    # imagefolder dataset with classes: k-NN on a held-out fifth
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "tree"), image_size=32)
    L = build_ssl_loaders(cfg, _views(cfg), 4)
    xb, yb = next(iter(L.knn_val))
    assert xb.shape[1:] == (3, 32, 32) and L.knn_num_classes == 2 and len(L.knn_val.dataset) == 2
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "flat"), image_size=32)
    L = build_ssl_loaders(cfg, _views(cfg), 4)
    assert L.knn_train is None and len(next(iter(L.train))) == 2
    with pytest.raises(ConfigError, match="no masks"):
        build_seg_loaders(DataConfig(dataset="imagefolder", root=str(tmp_path / "tree")), 4)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError) as e:
        list_images(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "empty")
    _tree(tmp_path / "t", n=2)
    bad = tmp_path / "t" / "cat" / "cat_0.jpg"
    bad.write_bytes(b"not an image")
    ds = ImageFolderImages(tmp_path / "t")
    with pytest.raises(DataError, match="cat_0.jpg"):
        [ds[i] for i in range(len(ds))]
    skip = ImageFolderImages(tmp_path / "t", corrupt_policy="skip")
    assert len([skip[i] for i in range(len(skip))]) == 4 and skip.skipped == 1
