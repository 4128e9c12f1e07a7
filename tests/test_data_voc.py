"""VOC loader: root forms, SSL sources, image labels, and every bad input as a one-line DataError."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data.synthetic import generate_voc
from core.data.voc import (
    IGNORE_INDEX,
    NUM_CLASSES,
    VOC_CLASSES,
    VOCSegmentation,
    image_label_from_mask,
    validate_voc_root,
    voc_ssl_images,
)
from core.errors import DataError


@pytest.fixture
def small_voc(tmp_path) -> Path:
    """A private tiny dataset the test may damage (6 train / 3 val, 32 px)."""
    return generate_voc(tmp_path / "voc", n_train=6, n_val=3, size=32, seed=5)


def _voc(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def test_constants():
    assert NUM_CLASSES == 21 == len(VOC_CLASSES) and IGNORE_INDEX == 255
    assert VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"


def test_root_forms(voc_root):
    a = VOCSegmentation(voc_root, "val")
    b = VOCSegmentation(voc_root / "VOCdevkit", "val")
    c = VOCSegmentation(voc_root / "VOCdevkit" / "VOC2012", "val")
    assert a.ids == b.ids == c.ids and len(a) == 24
    assert len(VOCSegmentation(voc_root, "trainval")) == 72
    assert validate_voc_root(voc_root) == _voc(voc_root)


def test_void_stays_255_and_limit(voc_root):
    ds = VOCSegmentation(voc_root, "train", limit=5)
    assert len(ds) == 5
    _, m = ds[0]
    assert (m == 255).any() and m.dtype == torch.int64
    assert set(m.unique().tolist()) <= set(range(21)) | {255}


def test_ssl_sources_never_leak_val(voc_root):
    val = set(_voc(voc_root).joinpath("ImageSets/Segmentation/val.txt").read_text().split())
    train = _voc(voc_root).joinpath("ImageSets/Segmentation/train.txt").read_text().split()
    all_jpgs = {p.stem for p in (_voc(voc_root) / "JPEGImages").glob("*.jpg")}
    t = voc_ssl_images(voc_root, "train")
    assert [p.stem for p in t] == train
    abv = voc_ssl_images(voc_root, "all_but_val")
    stems = {p.stem for p in abv}
    assert not stems & val
    assert stems == all_jpgs - val
    assert len(abv) > len(t)  # includes the extra (unlisted) JPEGs
    with pytest.raises(DataError) as e:
        voc_ssl_images(voc_root, "trainaug")
    _one_line(e, "trainaug.txt", "SegmentationClassAug")
    with pytest.raises(DataError) as e:
        voc_ssl_images(voc_root, "everything")
    _one_line(e, "everything", "all_but_val")


def test_trainaug_when_present(small_voc):
    voc = _voc(small_voc)
    with pytest.raises(DataError) as e:
        VOCSegmentation(small_voc, "trainaug")
    _one_line(e, "trainaug.txt")
    shutil.copytree(voc / "SegmentationClass", voc / "SegmentationClassAug")
    ids = voc.joinpath("ImageSets/Segmentation/trainval.txt").read_text().split()
    val = voc.joinpath("ImageSets/Segmentation/val.txt").read_text().split()
    voc.joinpath("ImageSets/Segmentation/trainaug.txt").write_text("\n".join(ids) + "\n")  # val ids on purpose
    ds = VOCSegmentation(small_voc, "trainaug")
    assert len(ds) == 6 and ds[0][1].dtype == torch.int64  # val ids never train segmentation either
    assert not set(ds.ids) & set(val)
    ssl = voc_ssl_images(small_voc, "trainaug")
    assert len(ssl) == 6 and not {p.stem for p in ssl} & set(val)  # val ids dropped from SSL


def test_image_label_from_mask():
    m = torch.zeros(10, 10, dtype=torch.long)
    assert image_label_from_mask(m) == 0
    m[:, :] = 255
    assert image_label_from_mask(m) == 0
    m[:2, :] = 3  # 20 px
    m[5:8, :] = 7  # 30 px
    m[9, :] = 0
    assert image_label_from_mask(m) == 7
    assert image_label_from_mask(m.numpy()) == 7
    z = torch.zeros(10, 10, dtype=torch.long)
    z[0, 0] = 12
    assert image_label_from_mask(z) == 12  # background never wins
    assert image_label_from_mask(z, background=None) == 0  # COCO-style: every class counts


# --------------------------------------------------------------------------- bad inputs
def test_missing_root(tmp_path):
    with pytest.raises(DataError) as e:
        VOCSegmentation(tmp_path / "nope", "train")
    _one_line(e, str(tmp_path / "nope"), "core.data.synthetic")


def test_wrong_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError) as e:
        VOCSegmentation(tmp_path, "train")
    _one_line(e, str(tmp_path), "JPEGImages")


def test_missing_subfolder(small_voc):
    shutil.rmtree(_voc(small_voc) / "SegmentationClass")
    with pytest.raises(DataError) as e:
        VOCSegmentation(small_voc, "train")
    _one_line(e, "SegmentationClass")


def test_missing_split_list(small_voc):
    (_voc(small_voc) / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError) as e:
        VOCSegmentation(small_voc, "val")
    _one_line(e, "val.txt")


def test_empty_split_list(small_voc):
    (_voc(small_voc) / "ImageSets/Segmentation/train.txt").write_text("\n\n")
    with pytest.raises(DataError) as e:
        VOCSegmentation(small_voc, "train")
    _one_line(e, "train.txt", "empty")


def test_listed_id_without_files(small_voc):
    lst = _voc(small_voc) / "ImageSets/Segmentation/train.txt"
    lst.write_text(lst.read_text() + "2099_999999\n")
    with pytest.raises(DataError) as e:
        VOCSegmentation(small_voc, "train")
    _one_line(e, "2099_999999.jpg", "train.txt")
    ds = VOCSegmentation(small_voc, "val")
    ds.masks[0].unlink()
    with pytest.raises(DataError) as e:
        VOCSegmentation(small_voc, "val")
    _one_line(e, ds.masks[0].name)


def test_corrupt_jpeg(small_voc):
    ds = VOCSegmentation(small_voc, "train")
    ds.images[1].write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError) as e:
        ds[1]
    _one_line(e, str(ds.images[1]), "corrupt")
    ds[0]  # the others still load


def test_truncated_jpeg(small_voc):
    ds = VOCSegmentation(small_voc, "train")
    data = ds.images[2].read_bytes()
    ds.images[2].write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        ds[2]
    _one_line(e, str(ds.images[2]))


def test_truncated_png(small_voc):
    ds = VOCSegmentation(small_voc, "val")
    data = ds.masks[0].read_bytes()
    ds.masks[0].write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        ds[0]
    _one_line(e, str(ds.masks[0]))


def test_mask_values_outside_label_space(small_voc):
    ds = VOCSegmentation(small_voc, "train")
    m = np.array(Image.open(ds.masks[0]))
    m[0, :3] = 37
    m[1, 0] = 200
    bad = Image.fromarray(m)
    bad.putpalette(Image.open(ds.masks[1]).getpalette())
    bad.save(ds.masks[0])
    with pytest.raises(DataError) as e:
        ds[0]
    _one_line(e, str(ds.masks[0]), "37", "200")


def test_rgb_mask_refused(small_voc):
    ds = VOCSegmentation(small_voc, "train")
    Image.open(ds.masks[0]).convert("RGB").save(ds.masks[0])
    with pytest.raises(DataError) as e:
        ds[0]
    _one_line(e, str(ds.masks[0]), "RGB")


def test_size_mismatch(small_voc):
    ds = VOCSegmentation(small_voc, "train")
    im = Image.open(ds.masks[0])
    im.resize((20, 24), Image.NEAREST).save(ds.masks[0])
    with pytest.raises(DataError) as e:
        ds[0]
    _one_line(e, str(ds.masks[0]), str(ds.images[0]), "20x24", "32x32")


def test_skip_policy_counts_and_substitutes(small_voc):
    ds = VOCSegmentation(small_voc, "train", corrupt_policy="skip")
    ds.images[1].write_bytes(b"garbage")
    ds.masks[3].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = [ds[i] for i in range(len(ds))]
    assert len(out) == 6 and all(x.shape == (3, 32, 32) for x, _ in out)
    assert ds.skipped == 2
    assert any(str(ds.images[1]) in s for s in ds.skipped_files)
    # a DataLoader (single process) still yields full batches
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    assert sum(len(b[0]) for b in loader) == 6
    # all bad -> one clear error, not an endless loop
    for p in ds.images:
        p.write_bytes(b"garbage")
    fresh = VOCSegmentation(small_voc, "train", corrupt_policy="skip")
    with pytest.raises(DataError) as e:
        fresh[0]
    _one_line(e, "all 6 samples")


def test_skip_counter_shared_with_workers(small_voc):
    ds = VOCSegmentation(small_voc, "train", corrupt_policy="skip")
    ds.images[0].write_bytes(b"garbage")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert sum(len(b[0]) for b in loader) == 6
    assert ds.skipped >= 1


def test_bad_split_and_policy(voc_root):
    with pytest.raises(DataError) as e:
        VOCSegmentation(voc_root, "test")
    _one_line(e, "test", "train")
    with pytest.raises(DataError) as e:
        VOCSegmentation(voc_root, "train", corrupt_policy="ignore")
    _one_line(e, "ignore", "skip")


# --------------------------------------------------------------------------- split lists, 16-bit files, void val
def _split(root, name):
    return _voc(root) / "ImageSets/Segmentation" / f"{name}.txt"


def test_train_val_overlap_refused(small_voc):
    from core.config import DataConfig
    from core.data.module import validate_data

    val = _split(small_voc, "val").read_text().split()
    train = _split(small_voc, "train")
    train.write_text(train.read_text() + "\n".join(val[:2]) + "\n")
    for split in ("train", "val"):
        with pytest.raises(DataError) as e:
            VOCSegmentation(small_voc, split)
        _one_line(e, "2 id(s)", val[0], "must not share")
    with pytest.raises(DataError):
        validate_data(DataConfig(root=str(small_voc)), "pretrain")
    with pytest.raises(DataError):
        voc_ssl_images(small_voc, "train")


def test_train_val_overlap_cli_exit_and_nothing_written(small_voc, tmp_path, capsys):
    import experiments.pretrain as cli

    val = _split(small_voc, "val").read_text().split()
    train = _split(small_voc, "train")
    train.write_text(train.read_text() + val[0] + "\n")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["--data.root", str(small_voc), "--output", str(out), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("twinseg: error:") and "\n" not in err and val[0] in err and "Traceback" not in err
    assert not out.exists()


def test_duplicate_ids_refused(small_voc):
    train = _split(small_voc, "train")
    ids = train.read_text().split()
    train.write_text("\n".join(ids + [ids[1], ids[1], ids[2]]) + "\n")
    with pytest.raises(DataError) as e:
        VOCSegmentation(small_voc, "train")
    _one_line(e, "3 id(s) more than once", ids[1], "train.txt")


def test_bom_in_split_list_is_dropped(small_voc):
    train = _split(small_voc, "train")
    ids = train.read_text().split()
    train.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(ids) + "\r\n").encode())
    ds = VOCSegmentation(small_voc, "train")
    assert ds.ids == ids and not ds.ids[0].startswith("\ufeff")
    ds[0]


def test_16bit_image_scaled_not_white(tmp_path):
    from core.data.imagefolder import UnlabeledImages
    from core.data.voc import load_image, load_image_tensor

    a = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    x = load_image_tensor(p)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    want = torch.from_numpy(((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert torch.equal(x[0], want) and torch.equal(x[1], want)  # scaled by 16 bits, not clipped to 255
    assert int(x.min()) == 0 and int(x.max()) == 255 and float(x.float().mean()) < 200
    assert np.asarray(load_image(p)).mean() < 200
    assert UnlabeledImages([p])[0].shape == (3, 32, 32)


def test_16bit_mask_read_as_labels_or_refused(small_voc):
    ds = VOCSegmentation(small_voc, "train")
    want = ds.load_mask(0)
    Image.fromarray(want.astype(np.uint16)).save(ds.masks[0])
    assert Image.open(ds.masks[0]).mode.startswith("I")
    assert np.array_equal(ds.load_mask(0), want) and ds[0][1].dtype == torch.int64
    big = want.astype(np.uint16)
    big[0, 0] = 1000
    Image.fromarray(big).save(ds.masks[0])
    with pytest.raises(DataError) as e:
        ds[0]
    _one_line(e, str(ds.masks[0]), "1000")


def test_all_void_val_masks_refused_before_training(small_voc, tmp_path):
    from core.config import DataConfig, SegmentConfig
    from core.data.module import build_seg_loaders, validate_data
    from core.runs.segment import run_segment

    for m in VOCSegmentation(small_voc, "val").masks:
        im = Image.open(m)
        Image.fromarray(np.full((im.height, im.width), 255, np.uint8)).save(m)
    cfg = DataConfig(root=str(small_voc), image_size=32)
    for call in (lambda: validate_data(cfg, "segment"), lambda: validate_data(cfg, "both"),
                 lambda: build_seg_loaders(cfg, 2)):
        with pytest.raises(DataError) as e:
            call()
        _one_line(e, "all 3 val masks", "no labelled pixel")
    validate_data(cfg, "pretrain")  # k-NN labels fall back to background: pretraining is not refused
    out = tmp_path / "seg"
    seg = SegmentConfig(backbone="resnet_tiny", head="linear", epochs=1, batch_size=2, device="cpu",
                        data=cfg.to_dict())
    with pytest.raises(DataError):
        run_segment(seg, out, progress=False)
    assert not (out / "metrics.json").exists() and not (out / "config.json").exists()
