"""The procedural VOC-layout generator: torchvision compatibility, masks, determinism, class structure, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data.synthetic import (
    CLASS_SPECS,
    MARKER,
    default_voc_root,
    generate_voc,
    render_voc_sample,
)
from core.data.voc import VOC_PALETTE, VOCSegmentation
from core.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _voc(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def test_layout_and_split_sizes(voc_root):
    voc = _voc(voc_root)
    lists = voc / "ImageSets" / "Segmentation"
    train = lists.joinpath("train.txt").read_text().split()
    val = lists.joinpath("val.txt").read_text().split()
    trainval = lists.joinpath("trainval.txt").read_text().split()
    assert len(train) == 48 and len(val) == 24
    assert not set(train) & set(val)
    assert sorted(trainval) == sorted(train + val)
    jpgs = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    pngs = sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png"))
    assert sorted(pngs) == sorted(trainval)
    extras = set(jpgs) - set(trainval)
    assert len(extras) >= 4  # JPEGs in no split list
    assert (voc_root / "VOCdevkit" / MARKER).is_file()


def test_torchvision_roundtrip(voc_root):
    from torchvision.datasets import VOCSegmentation as TVVOC

    for split in ("train", "val"):
        tv = TVVOC(str(voc_root), year="2012", image_set=split, download=False)
        ours = VOCSegmentation(voc_root, split)
        assert len(tv) == len(ours)
        for i in (0, len(ours) - 1):
            img, target = tv[i]
            assert target.mode == "P"
            assert target.getpalette()[:768] == VOC_PALETTE[: len(target.getpalette()[:768])]
            x, m = ours[i]
            assert x.dtype == torch.uint8 and x.shape == (3, 64, 64)
            assert m.dtype == torch.int64 and m.shape == (64, 64)
            assert torch.equal(x, torch.from_numpy(np.array(img)).permute(2, 0, 1))
            assert torch.equal(m, torch.from_numpy(np.array(target)).long())


def test_masks_have_void_bands_and_voc_classes(voc_root):
    ds = VOCSegmentation(voc_root, "train")
    seen = set()
    with_objects = 0
    for i in range(len(ds)):
        m = ds.load_mask(i)
        vals = set(np.unique(m).tolist())
        assert vals <= set(range(21)) | {255}
        assert 255 in vals, "every image has objects, so every mask has a void band"
        with_objects += len(vals - {0, 255}) >= 1
        seen |= vals - {0, 255}
        # the band surrounds objects: every object pixel touching background goes through 255
        fg = (m != 0) & (m != 255)
        bg = m == 0
        for a, b in ((fg[:, 1:], bg[:, :-1]), (fg[:, :-1], bg[:, 1:]), (fg[1:], bg[:-1]), (fg[:-1], bg[1:])):
            assert not (a & b).any()
    assert with_objects >= len(ds) - 2
    assert len(seen) >= 15  # most classes appear in 48 images


def test_deterministic_for_a_seed():
    a_img, a_lab = render_voc_sample(3, 5, 48)
    b_img, b_lab = render_voc_sample(3, 5, 48)
    c_img, _ = render_voc_sample(4, 5, 48)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)


def test_generate_twice_same_files(tmp_path):
    r1 = generate_voc(tmp_path / "a", 6, 3, 32, seed=1)
    r2 = generate_voc(tmp_path / "b", 6, 3, 32, seed=1)
    f1 = sorted(p.relative_to(r1) for p in r1.rglob("*") if p.is_file())
    f2 = sorted(p.relative_to(r2) for p in r2.rglob("*") if p.is_file())
    assert f1 == f2
    for rel in f1:
        assert (r1 / rel).read_bytes() == (r2 / rel).read_bytes(), rel
    # idempotent: same parameters -> reused; different -> refused without --overwrite
    assert generate_voc(tmp_path / "a", 6, 3, 32, seed=1) == r1
    with pytest.raises(DataError, match="already exists"):
        generate_voc(tmp_path / "a", 6, 3, 32, seed=2)
    generate_voc(tmp_path / "a", 6, 3, 32, seed=2, overwrite=True)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp dirs left


def _instance_features(root: Path, split: str):
    """Per (image, class) instance: structure only (no hue): grey-level spread and high-frequency
    energy of its pixels, and how much of its bounding box the shape fills."""
    ds = VOCSegmentation(root, split)
    feats, labels = [], []
    for i in range(len(ds)):
        x, m = ds[i]
        img = x.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
        m = m.numpy()
        lap = np.abs(img[1:-1, 1:-1] * 4 - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:]).mean(-1)
        mm = m[1:-1, 1:-1]
        for c in np.unique(mm):
            if c in (0, 255):
                continue
            sel = mm == c
            if sel.sum() < 12:
                continue
            px = img[1:-1, 1:-1][sel].mean(-1)
            ys, xs = np.nonzero(sel)
            fill = sel.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            feats.append(np.array([px.std(), lap[sel].mean(), fill]))
            labels.append(int(c))
    return np.array(feats), np.array(labels)


def test_class_specific_statistics(voc_root):
    """Structure statistics (no colour) separate classes: nearest-centroid on val >> chance (5%)."""
    ftr, ytr = _instance_features(voc_root, "train")
    fva, yva = _instance_features(voc_root, "val")
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    classes = sorted(set(ytr))
    cent = np.stack([ftr[ytr == c].mean(0) for c in classes])
    # within-class spread is smaller than the spread of class centroids
    within = np.mean([ftr[ytr == c].var(0).sum() for c in classes if (ytr == c).sum() > 1])
    between = cent.var(0).sum()
    assert between > 0.5 * within
    keep = np.isin(yva, classes)
    d = ((fva[keep, None, :] - cent[None]) ** 2).sum(-1)
    acc = (np.array(classes)[d.argmin(1)] == yva[keep]).mean()
    assert acc > 0.35, acc


def test_palette_and_ids_match_loaders():
    from core.data.coco_stuff import COCO_UNUSED_IDS
    from core.data.synthetic import COCO_UNUSED_IDS as GEN_UNUSED
    from core.data.synthetic import voc_palette

    assert voc_palette() == VOC_PALETTE and len(VOC_PALETTE) == 768
    assert VOC_PALETTE[255 * 3: 256 * 3] == [224, 224, 192] and VOC_PALETTE[3:6] == [128, 0, 0]
    assert GEN_UNUSED == COCO_UNUSED_IDS


def test_class_table_is_distinct():
    shapes = [s["shape"] for s in CLASS_SPECS.values()]
    assert len(CLASS_SPECS) == 20 and len(set(shapes)) == 20
    hues = sorted(s["hue"] for s in CLASS_SPECS.values())
    assert min(np.diff(hues)) > 0.01


def test_default_voc_root_caches_atomically(tmp_path, monkeypatch):
    from core.config import DataConfig

    monkeypatch.setenv("TWINSEG_DATA_DIR", str(tmp_path))
    cfg = DataConfig(synthetic_n_train=5, synthetic_n_val=3, image_size=32, synthetic_seed=2)
    root = default_voc_root(cfg)
    assert root == tmp_path / "synthetic-5-3-32-2"
    assert len(VOCSegmentation(root, "train")) == 5
    mtime = (root / "VOCdevkit" / MARKER).stat().st_mtime_ns
    assert default_voc_root(cfg) == root
    assert (root / "VOCdevkit" / MARKER).stat().st_mtime_ns == mtime  # not regenerated
    assert default_voc_root(DataConfig(root=str(tmp_path / "x"))) == tmp_path / "x"
    # a cache written by an older generator version is replaced, not reused
    marker = root / "VOCdevkit" / MARKER
    marker.write_text(marker.read_text().replace('"version": ', '"version": -'))
    assert default_voc_root(cfg) == root and '"version": -' not in marker.read_text()
    # a half-written (killed) generation never looks complete: temp dirs are dot-prefixed siblings
    assert sorted(p.name for p in root.iterdir()) == ["VOCdevkit"]


def test_generation_is_fast(tmp_path):
    import time

    t = time.perf_counter()
    generate_voc(tmp_path, 96, 48, 64, seed=0)
    assert time.perf_counter() - t < 30  # ~1-2 s on an idle laptop core; generous for loaded CI
    assert len(list((tmp_path / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))) > 144


def _run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TWINSEG_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "core.data.synthetic", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_flag_one_line_exit_2():
    r = _run_cli("--out", "/tmp/never", "--bogus", "3")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twinseg: error:"), r.stderr
    assert "--bogus" in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_bad_value_and_missing_out():
    r = _run_cli("--out", "/tmp/never", "--n-train", "zero")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = _run_cli("--n-train", "3")
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr
    r = _run_cli("--out", "/tmp/never", "--n-train", "0")
    assert r.returncode == 2 and "n_train" in r.stderr and "Traceback" not in r.stderr


def test_cli_writes_dataset(tmp_path):
    r = _run_cli("--out", str(tmp_path / "d"), "--n-train", "4", "--n-val", "2", "--size", "32", "--seed", "1")
    assert r.returncode == 0, r.stderr
    ds = VOCSegmentation(tmp_path / "d", "val")
    assert len(ds) == 2 and ds[0][0].shape == (3, 32, 32)
    im = Image.open(ds.masks[0])
    assert im.mode == "P"


def test_sizes_option_draws_non_square_images_of_varying_sizes(tmp_path):
    sizes = [(40, 24), (24, 48), (36, 30)]
    root = generate_voc(tmp_path / "ns", n_train=4, n_val=3, size=64, seed=2, sizes=sizes)
    voc = _voc(root)
    names = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    ids = sorted(names, key=lambda n: int(n.split("_")[1]))  # generation order k = the number in the id
    for k, name in enumerate(ids):
        w, h = sizes[k % len(sizes)]
        assert Image.open(voc / "JPEGImages" / f"{name}.jpg").size == (w, h)
        png = voc / "SegmentationClass" / f"{name}.png"
        if png.is_file():
            lab = np.array(Image.open(png))
            assert lab.shape == (h, w) and (lab == 255).any() and set(np.unique(lab)) - {255} <= set(range(21))
    ds = VOCSegmentation(root, "val")
    assert {tuple(ds[i][1].shape) for i in range(len(ds))} <= {(h, w) for w, h in sizes}
    # the default (square) output and its cache marker do not change
    a_img, a_lab = render_voc_sample(3, 5, 48)
    b_img, b_lab = render_voc_sample(3, 5, 48, None)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    import json

    assert "sizes" not in json.loads((generate_voc(tmp_path / "sq", 4, 2, size=32) / "VOCdevkit" / MARKER).read_text())
    assert json.loads((root / "VOCdevkit" / MARKER).read_text())["sizes"] == [list(s) for s in sizes]


def test_cli_sizes(tmp_path):
    r = _run_cli("--out", str(tmp_path / "d"), "--n-train", "2", "--n-val", "2", "--sizes", "40x24,24x40")
    assert r.returncode == 0, r.stderr
    ds = VOCSegmentation(tmp_path / "d", "val")
    assert {tuple(ds[i][1].shape) for i in range(len(ds))} <= {(24, 40), (40, 24)}
    for bad, needle in (("40by24", "'40by24' is not WIDTHxHEIGHT"), ("8x40", "(8, 40) must be (width, height)")):
        r = _run_cli("--out", str(tmp_path / "e"), "--sizes", bad)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
