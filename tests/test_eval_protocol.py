"""Evaluation at the ORIGINAL resolution (mmseg's VOC protocol): keep-ratio val resize, original masks,
logits resized back per image, mixed sizes in a batch, val_pixels / eval_protocol in metrics.json,
slide vs whole on non-square images, the DDP val sampler, and the new config fields' bad values.
CPU, tiny models, hand-made and generated non-square VOC trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.config import DataConfig, SegmentConfig
from core.data.module import EvalShardSampler, build_seg_loaders, seg_val_collate
from core.data.transforms import SegValTransform, keep_ratio_size
from core.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # self.log outside a Trainer

K = 21


# --------------------------------------------------------------------------- a hand-made VOC tree
def _mask(h: int, w: int, blocks) -> np.ndarray:
    """Background with class blocks (y0, y1, x0, x1, cls), each outlined by a 2-px 255 band (VOC's void)."""
    m = np.zeros((h, w), np.uint8)
    for y0, y1, x0, x1, c in blocks:
        m[max(0, y0 - 2): y1 + 2, max(0, x0 - 2): x1 + 2] = 255
        m[y0:y1, x0:x1] = c
    return m


#: id -> (H, W, blocks): non-square, all different sizes, none equal to the image_size used (24 / 32)
VAL = {
    "v_a": (40, 60, [(6, 30, 8, 26, 1), (10, 20, 40, 56, 3)]),
    "v_b": (56, 32, [(4, 50, 18, 30, 2)]),
    "v_c": (36, 50, [(0, 36, 0, 12, 15), (20, 30, 30, 46, 1)]),
}
TRAIN = {"t_a": (44, 30, [(5, 25, 5, 25, 1)]), "t_b": (30, 44, [(5, 25, 20, 40, 2)])}


def _voc_tree(root: Path) -> Path:
    from core.data.palette import voc_palette

    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w, blocks) in {**VAL, **TRAIN}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        im = Image.fromarray(_mask(h, w, blocks))
        im.putpalette(voc_palette())
        im.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(TRAIN) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VAL) + "\n")
    return root


def _original_masks(root: Path, ids) -> list[np.ndarray]:
    d = Path(root) / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    return [np.array(Image.open(d / f"{i}.png")) for i in ids]


class RampSegmenter(nn.Module):
    """Known logits at ANY input size: class 1 scores ((u + 0.5) / w - 0.5) * 10 along the width, class 0
    scores 0, the rest -10. Bilinear resizing (align_corners=False) keeps a linear ramp linear, so at the
    original W the prediction is class 1 exactly on columns j >= W / 2 (W even): a hand computation."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Identity()  # no size_multiple: no padding
        self.fusion = None
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        b, _, h, w = x.shape
        self.seen.append(tuple(x.shape))
        out = torch.full((b, K, h, w), -10.0)
        out[:, 0] = 0.0
        out[:, 1] = ((torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5) * 10
        return out


def _method(**kw):
    from core.methods.segmentation import SegmentationMethod

    cfg = SegmentConfig.from_dict({"backbone": "vit_nano_patch8", "head": "linear", "data": {"image_size": 32}, **kw})
    return SegmentationMethod(cfg, K, [str(i) for i in range(K)]).eval()


def _validate(m, loader) -> dict:
    m.on_validation_epoch_start()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            m.validation_step(batch, i)
    m.on_validation_epoch_end()
    return m.final_metrics()


def _hand_scores(masks) -> dict:
    conf = np.zeros((K, K), np.int64)
    for t in masks:
        p = np.zeros_like(t)
        p[:, t.shape[1] // 2:] = 1
        v = t != 255
        np.add.at(conf, (t[v].astype(np.int64), p[v].astype(np.int64)), 1)
    tp, gt, pr = np.diag(conf), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan) * 100
    return {"aAcc": tp.sum() / conf.sum() * 100, "mIoU": np.nanmean(iou), "val_pixels": int(conf.sum())}


@pytest.fixture(scope="module")
def hand_root(tmp_path_factory) -> Path:
    return _voc_tree(tmp_path_factory.mktemp("handvoc"))


# --------------------------------------------------------------------------- (a) + (b)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_full_resolution_scores_equal_a_hand_computation(hand_root, batch_size):
    S = build_seg_loaders(DataConfig(root=str(hand_root), image_size=32), batch_size, eval_scale=24)
    m = _method()
    m.model = RampSegmenter()
    got = _validate(m, S.val)
    want = _hand_scores(_original_masks(hand_root, VAL))
    labelled = sum(int((t != 255).sum()) for t in _original_masks(hand_root, VAL))
    assert got["val_pixels"] == want["val_pixels"] == labelled and 0 < got["mIoU"] < 100
    assert got["aAcc"] == pytest.approx(want["aAcc"], abs=1e-9)
    assert got["mIoU"] == pytest.approx(want["mIoU"], abs=1e-9)
    # the model saw each image resized keeping its aspect ratio to short side 24, never the squashed square
    sizes = {s[-2:] for s in m.model.seen}
    assert sizes == {keep_ratio_size(h, w, 24) for h, w, _ in VAL.values()} == {(24, 36), (42, 24), (24, 33)}


def test_mixed_sizes_share_a_batch(hand_root):
    S = build_seg_loaders(DataConfig(root=str(hand_root), image_size=32), 3, eval_scale=24)
    (batch,) = list(S.val)
    assert batch["img_hw"].tolist() == [[24, 36], [42, 24], [24, 33]]
    assert batch["ori_hw"].tolist() == [[h, w] for h, w, _ in VAL.values()]
    assert tuple(batch["image"].shape) == (3, 3, 42, 36) and tuple(batch["mask"].shape) == (3, 56, 60)
    masks = _original_masks(hand_root, VAL)
    for i, t in enumerate(masks):  # the ORIGINAL masks, untouched; 255 outside each
        h, w = t.shape
        assert torch.equal(batch["mask"][i, :h, :w], torch.from_numpy(t).long())
        assert (batch["mask"][i, h:] == 255).all() and (batch["mask"][i, :, w:] == 255).all()
        ih, iw = batch["img_hw"][i].tolist()
        assert (batch["image"][i, :, ih:] == 0).all() and (batch["image"][i, :, :, iw:] == 0).all()
    # same-size samples stack plainly
    same = seg_val_collate([(torch.ones(3, 8, 10), torch.zeros(12, 15)), (torch.ones(3, 8, 10), torch.ones(12, 15))])
    assert same["image"].shape == (2, 3, 8, 10) and same["mask"].shape == (2, 12, 15)


def test_keep_ratio_resize_follows_mmcv_rescale_size():
    # mmseg VOC: Resize(scale=(2048, 512), keep_ratio=True): 500x375 -> 683x512
    assert keep_ratio_size(375, 500, 512, 2048) == (512, 683)
    assert keep_ratio_size(500, 375, 512, 2048) == (683, 512)
    assert keep_ratio_size(64, 64, 64) == (64, 64)
    assert keep_ratio_size(20, 400, 40) == (8, 160)  # long side capped at 4 x 40: the short side ends below 40
    img = torch.randint(0, 255, (3, 48, 40), dtype=torch.uint8)
    mask = torch.randint(0, 21, (48, 40))
    x, m = SegValTransform(32)(img, mask)
    assert x.shape == (3, 38, 32) and torch.equal(m.long(), mask)


def test_square_data_at_image_size_is_scored_as_before(voc_root):
    """64-px generated data evaluated at 64: the resize is the identity and the new path gives the
    confusion matrix of the old one (whole batch through the model, argmax, scored at 64 x 64)."""
    from core.metrics.segmentation import SegmentationMetrics

    S = build_seg_loaders(DataConfig(root=str(voc_root), image_size=64, limit_val=8), 4)
    torch.manual_seed(0)
    m = _method(data={"image_size": 64})
    got = _validate(m, S.val)
    ref = SegmentationMetrics(K)
    with torch.no_grad():
        for batch in S.val:
            assert batch["img_hw"].tolist() == batch["ori_hw"].tolist() == [[64, 64]] * len(batch["image"])
            ref.update(m.model(batch["image"]).argmax(1), batch["mask"])
    assert torch.equal(m.metrics.confusion, ref.confusion)
    assert got["val_pixels"] == int(ref.confusion.sum())


# --------------------------------------------------------------------------- (e) slide vs whole
def test_slide_equals_whole_on_a_non_square_image_when_the_crop_covers_it():
    torch.manual_seed(0)
    whole, slide = _method(), _method(inference="slide", slide_crop=72, slide_stride=48)
    slide.model.load_state_dict(whole.model.state_dict())
    x = torch.randn(2, 3, 40, 72)  # a keep-ratio-resized non-square image; the 72-px crop covers it
    out = slide.predict_logits(x)
    assert out.shape == (2, K, 40, 72) and torch.allclose(out, whole.predict_logits(x), atol=1e-5)
    y = torch.randn(1, 3, 36, 60)  # sides not patch multiples: the single window is padded like whole
    assert torch.allclose(slide.predict_logits(y), whole.predict_logits(y), atol=1e-5)
    # and scored at the original size the same way
    a = whole.predict_original(x, (40, 72), (75, 135))
    assert a.shape == (2, K, 75, 135) and torch.allclose(slide.predict_original(x, (40, 72), (75, 135)), a, atol=1e-5)


def test_slide_windows_on_a_non_square_image_with_derived_defaults():
    from core.models.segmenter import slide_inference, slide_window, whole_inference

    cfg = SegmentConfig.from_dict({"backbone": "vit_nano_patch8", "head": "linear", "inference": "slide",
                                   "eval_scale": 60, "data": {"image_size": 32}})
    assert slide_window(cfg, 8) == (56, 37)  # short side 60 rounded down to the patch multiple, 2/3 stride
    assert slide_window(cfg.replace(eval_scale=512), 16) == (512, 341)  # mmseg's crop 512, stride 341
    assert slide_window(cfg.replace(slide_crop=48, slide_stride=None), 8) == (48, 32)

    class Pointwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, K, 1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    model, x = Pointwise().eval(), torch.randn(1, 3, 60, 90)  # several windows along the long side
    assert torch.allclose(slide_inference(model, x, 56, 37, K, size_divisor=8), whole_inference(model, x), atol=1e-5)


# --------------------------------------------------------------------------- DDP: each image once
def test_eval_shard_sampler_gives_each_image_to_one_rank():
    ds = list(range(10))
    shards = [list(EvalShardSampler(ds, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == ds  # none repeated, none lost
    assert [len(EvalShardSampler(ds, num_replicas=3, rank=r)) for r in range(3)] == [4, 3, 3]
    assert list(EvalShardSampler(ds)) == ds  # no process group: one process sees everything
    assert isinstance(EvalShardSampler(ds), torch.utils.data.DistributedSampler)  # Lightning keeps it


# --------------------------------------------------------------------------- (c) segment.py end to end
def test_run_segment_on_non_square_images_writes_original_val_pixels(tmp_path):
    from core.data.synthetic import generate_voc
    from core.runs.segment import run_segment

    root = generate_voc(tmp_path / "voc", n_train=8, n_val=5, size=64, seed=1,
                        sizes=[(72, 48), (48, 80), (64, 56), (90, 60)])
    val_ids = (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    masks = _original_masks(root, val_ids)
    assert len({t.shape for t in masks}) > 1 and all(t.shape[0] != t.shape[1] for t in masks)
    cfg = SegmentConfig.from_dict({
        "backbone": "vit_nano_patch8", "head": "linear", "epochs": 1, "batch_size": 4, "wandb": "disabled",
        "device": "cpu", "data": {"root": str(root), "image_size": 32, "limit_train": 8}})
    out = tmp_path / "run"
    m = run_segment(cfg, out, progress=False)
    assert m["val_pixels"] == sum(int((t != 255).sum()) for t in masks)
    assert m["eval_protocol"] == {"split": "val", "images": 5, "resolution": "original", "eval_scale": 32,
                                  "eval_max_long": 128, "inference": "whole"}
    assert json.loads((out / "metrics.json").read_text())["val_pixels"] == m["val_pixels"]
    assert 0.0 <= m["mIoU"] <= 100.0
    assert list((out / "figures").glob("predictions_*.png")), "the prediction figure needs display-sized masks"


# --------------------------------------------------------------------------- (d) bad values
@pytest.mark.parametrize("over,needle", [
    ({"eval_scale": 0}, "eval_scale=0 must be between 16 and 4096"),
    ({"eval_scale": 8}, "eval_scale=8 must be between 16 and 4096"),
    ({"eval_scale": 5000}, "eval_scale=5000"),
    ({"eval_scale": "big"}, "eval_scale='big' must be an integer"),
    ({"eval_max_long": 4}, "eval_max_long=4 must be between"),
    ({"eval_scale": 512, "eval_max_long": 256}, "eval_max_long=256 must be >= the evaluation short side 512"),
    ({"eval_max_long": 32, "data": {"image_size": 64}}, "eval_max_long=32 must be >= the evaluation short side 64"),
    ({"slide_crop": 0}, "slide_crop=0 must be > 0"),
    ({"slide_stride": -1}, "slide_stride=-1 must be > 0"),
    ({"slide_crop": 32, "slide_stride": 48}, "slide_stride=48 must be <= slide_crop=32"),
    ({"slide_stride": 80, "data": {"image_size": 64}}, "slide_stride=80 must be <= the sliding-window crop 64"),
    ({"inference": "tiled"}, "inference='tiled' is not allowed"),
])
def test_bad_eval_values_are_one_line_config_errors(over, needle):
    d = {"data": {"image_size": 32}}
    d.update(over)
    with pytest.raises(ConfigError) as e:
        SegmentConfig.from_dict(d)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_check_fit_refuses_windows_the_backbone_cannot_take():
    from core.models.registry import create_backbone
    from core.runs.segment import check_fit

    bb = create_backbone("vit_nano_patch8", image_size=32)
    base = {"backbone": "vit_nano_patch8", "head": "linear", "inference": "slide", "data": {"image_size": 32}}
    with pytest.raises(ConfigError, match="slide_crop=12 is not a multiple of 8"):
        check_fit(SegmentConfig.from_dict({**base, "slide_crop": 12}), bb)
    with pytest.raises(ConfigError, match="slide_stride=60 must be <= the sliding-window crop 56"):
        check_fit(SegmentConfig.from_dict({**base, "eval_scale": 60, "slide_stride": 60}), bb)
    check_fit(SegmentConfig.from_dict({**base, "eval_scale": 60}), bb)  # derived: crop 56, stride 37
