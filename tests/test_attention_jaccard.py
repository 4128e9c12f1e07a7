"""DINO's attention-mask Jaccard: the 60%-mass threshold, the Jaccard with 255 ignored and the per-object
best head, against hand computations; the ViT `attention_saliency` contract."""

from __future__ import annotations

import math

import pytest
import torch

from core.metrics.attention_jaccard import attention_jaccard, attention_masks, jaccard


def test_attention_masks_keep_the_smallest_set_holding_60_percent_of_the_mass():
    # mass 0.35 + 0.25 = 0.60 exactly would be a tie on the boundary: use 0.4 / 0.25 / 0.2 / 0.15
    # sorted ascending: 0.15, 0.2, 0.25, 0.4 -> cumsum 0.15, 0.35, 0.6, 1.0 ; kept where cumsum > 0.4
    m = torch.tensor([[0.2, 0.4], [0.15, 0.25]])
    assert attention_masks(m).tolist() == [[False, True], [False, True]]  # 0.4 + 0.25 = 0.65 >= 0.6
    # unnormalised maps are normalised first; a scale does not change the mask
    assert torch.equal(attention_masks(m * 7.0), attention_masks(m))
    # one dominant token holds 70% of the mass: it alone is kept
    m2 = torch.tensor([[0.7, 0.1], [0.1, 0.1]])
    assert attention_masks(m2).tolist() == [[True, False], [False, False]]
    # keep=1.0 keeps every token with mass; an all-zero map keeps nothing
    assert attention_masks(m, keep=1.0).all()
    assert not attention_masks(torch.zeros(2, 2)).any()
    # batched (B, heads, gh, gw): each map thresholded on its own
    both = attention_masks(torch.stack([m, m2])[None])
    assert both.shape == (1, 2, 2, 2)
    assert torch.equal(both[0, 0], attention_masks(m)) and torch.equal(both[0, 1], attention_masks(m2))


def test_attention_masks_match_dino_visualize_attention():
    """The reference snippet of DINO's visualize_attention.py (threshold branch), on random maps."""
    g = torch.Generator().manual_seed(0)
    att = torch.rand(3, 16, generator=g)  # (heads, tokens)
    val, idx = torch.sort(att)
    val = val / torch.sum(val, dim=1, keepdim=True)
    th = torch.cumsum(val, dim=1) > (1 - 0.6)
    idx2 = torch.argsort(idx)
    ref = torch.stack([th[h][idx2[h]] for h in range(3)])
    assert torch.equal(attention_masks(att.reshape(3, 4, 4)).reshape(3, 16), ref)


def test_jaccard_by_hand_with_ignored_pixels():
    pred = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    # intersection {(0,0), (1,1)} = 2, union {(0,0), (0,1), (1,0), (1,1)} = 4
    assert float(jaccard(pred, gt)) == pytest.approx(0.5)
    ignore = torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.bool)  # (0,1) is 255: out of the union
    assert float(jaccard(pred, gt, ignore)) == pytest.approx(2 / 3)
    # several heads at once
    out = jaccard(torch.stack([pred, gt]), gt, ignore)
    assert out.shape == (2,) and out.tolist() == pytest.approx([2 / 3, 1.0])
    assert math.isnan(float(jaccard(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool))))


class _FixedSaliency(torch.nn.Module):
    """A stand-in backbone whose attention maps are given: (B, heads, 2, 2) per batch, in order."""

    def __init__(self, maps):
        super().__init__()
        self.maps = list(maps)

    def attention_saliency(self, x):
        return self.maps.pop(0)


def test_attention_jaccard_per_object_best_head_mean_per_image_by_hand():
    # image 1: two heads on a 2x2 grid, the mask 4x4 (each cell = 2x2 pixels after nearest upsampling)
    head_a = torch.tensor([[0.7, 0.1], [0.1, 0.1]])  # keeps the top-left cell
    head_b = torch.tensor([[0.05, 0.05], [0.45, 0.45]])  # keeps the bottom row (0.9 of the mass)
    mask1 = torch.tensor([[1, 1, 0, 0],
                          [1, 1, 0, 0],
                          [2, 2, 2, 2],
                          [2, 2, 255, 255]])
    # object 1 (4 px, top-left): head a -> 4/4 = 1; head b -> 0
    # object 2 (6 labelled px in the bottom rows; 2 ignored): head a -> 0; head b -> 6 / 6 = 1
    # image 2: only background + ignore -> skipped; image 3: object 3 on the right half
    mask2 = torch.zeros(4, 4, dtype=torch.long)
    mask2[0, 0] = 255
    mask3 = torch.zeros(4, 4, dtype=torch.long)
    mask3[:, 2:] = 3  # 8 px
    # head a keeps top-left cell (4 px): inter 0 -> 0 ; head b keeps bottom row (8 px): inter 4, union 12 -> 1/3
    maps = torch.stack([torch.stack([head_a, head_b])] * 3)  # (3 images, 2 heads, 2, 2)
    loader = [(torch.zeros(3, 3, 16, 16), [mask1, mask2, mask3])]
    out = attention_jaccard(_FixedSaliency([maps]), loader)
    # per image: img1 best per object = (1 + 1) / 2 = 1; img3 best = 1/3 -> mean over the 2 scored images
    assert out["images"] == 2
    assert out["best"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    # fixed head: a -> img1 (1 + 0) / 2 = 0.5, img3 0 -> 25 ; b -> img1 (0 + 1) / 2, img3 1/3 -> 41.67
    assert out["per_head"] == pytest.approx([25.0, 100 * (0.5 + 1 / 3) / 2])
    assert out["best_head"] == 1 and out["best"] >= max(out["per_head"])
    # background=None (COCO-Stuff): label 0 is an object too
    out2 = attention_jaccard(_FixedSaliency([maps]), loader, background=None)
    assert out2["images"] == 3


def test_attention_jaccard_none_for_a_cnn():
    from core.models.registry import create_backbone

    bb = create_backbone("resnet_tiny")
    assert bb.attention_saliency(torch.zeros(1, 3, 32, 32)) is None
    loader = [(torch.zeros(1, 3, 32, 32), [torch.ones(32, 32, dtype=torch.long)])]
    assert attention_jaccard(bb, loader) is None


@pytest.mark.parametrize("name", ["vit_nano_patch8", "vitpytorch_small"])
def test_vit_attention_saliency_is_the_cls_row_of_the_last_block(name):
    from core.models.registry import create_backbone

    torch.manual_seed(0)
    size = 32
    bb = create_backbone(name, image_size=size).eval()
    x = torch.randn(2, 3, size, size * 2)  # non-square: the grid is (h/p, w/p)
    with torch.no_grad():
        sal = bb.attention_saliency(x)
        attn = bb.forward_all(x, attention_blocks=[-1]).attentions[-1]
    p = bb.patch_size
    assert sal.shape == (2, bb.num_heads, size // p, 2 * size // p)
    assert (sal >= 0).all()
    ref = attn[:, :, 0, bb.num_prefix_tokens:].reshape(sal.shape)
    assert torch.allclose(sal, ref)
    # a CLS row sums to 1 over all tokens, so over the patches to at most 1
    assert (sal.flatten(2).sum(-1) <= 1 + 1e-5).all()


def test_attention_jaccard_on_a_vit_and_the_generated_data(voc_data_cfg):
    from torch.utils.data import DataLoader

    from core.data.module import KNNDataset, data_root, knn_mask_loader
    from core.data.voc import VOCSegmentation
    from core.models.registry import create_backbone

    ds = KNNDataset(VOCSegmentation(data_root(voc_data_cfg), "val", limit=8), 32)
    loader = knn_mask_loader(DataLoader(ds, batch_size=4))
    torch.manual_seed(0)
    bb = create_backbone("vit_nano_patch8", image_size=32)
    out = attention_jaccard(bb, loader)
    assert 0.0 <= out["best"] <= 100.0 and len(out["per_head"]) == bb.num_heads
    assert 0 <= out["best_head"] < bb.num_heads and out["best"] >= max(out["per_head"]) - 1e-9
    assert bb.training  # the mode is restored


def test_dino_255_convention_counts_the_band_in_the_union():
    """`best_255` (metrics.json attn_jaccard_dino): DINO's snippet, ``union = (masko + th_attn) > 0`` over every
    pixel, so a head covering the 255 band loses; `best` leaves the band out."""
    head_a = torch.tensor([[0.7, 0.1], [0.1, 0.1]])
    head_b = torch.tensor([[0.05, 0.05], [0.45, 0.45]])
    mask1 = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [2, 2, 2, 2], [2, 2, 255, 255]])
    mask3 = torch.zeros(4, 4, dtype=torch.long)
    mask3[:, 2:] = 3
    maps = torch.stack([torch.stack([head_a, head_b])] * 2)
    out = attention_jaccard(_FixedSaliency([maps]), [(torch.zeros(2, 3, 16, 16), [mask1, mask3])])
    # image 1: object 1 -> 1; object 2: head b keeps the 8 bottom pixels, 2 of them 255 -> 6 / 8 (DINO) vs 6 / 6
    # image 3: no 255 -> both 1/3
    assert out["best_255"] == pytest.approx(100 * ((1 + 0.75) / 2 + 1 / 3) / 2)
    assert out["best"] == pytest.approx(100 * (1 + 1 / 3) / 2) and out["best"] > out["best_255"]


def test_eval_size_loader_squares_images_and_masks_and_crops_to_the_patch_grid(voc_data_cfg):
    """`dino_eval_loader`: images and masks at (size, size) (DINO visualize_attention.py Resize((480, 480)));
    with crop=True a size that is not a multiple of the patch scores as the image cropped to the grid."""
    from torch.utils.data import DataLoader

    from core.data.module import KNNDataset, data_root
    from core.data.voc import VOCSegmentation
    from core.metrics.attention_jaccard import dino_eval_loader
    from core.models.registry import create_backbone

    seg = VOCSegmentation(data_root(voc_data_cfg), "val", limit=6)
    loader = dino_eval_loader(DataLoader(KNNDataset(seg, 32), batch_size=4), 44)
    batches = list(loader)
    x, masks = batches[0]
    assert x.shape[1:] == (3, 44, 44) and all(m.shape == (44, 44) for m in masks)
    assert sum(len(m) for _, m in batches) == 6
    _, m0 = seg[0]
    assert set(masks[0].unique().tolist()) <= set(torch.as_tensor(m0).unique().tolist())  # nearest: no new labels
    torch.manual_seed(0)
    bb = create_backbone("vit_nano_patch8", image_size=32)
    got = attention_jaccard(bb, loader, crop=True)
    cropped = [(xb[..., :40, :40], [m[:40, :40] for m in mb]) for xb, mb in batches]  # 44 -> 5 x 8 px
    want = attention_jaccard(bb, cropped)
    assert got["best"] == pytest.approx(want["best"]) and got["best_255"] == pytest.approx(want["best_255"])
    assert got["images"] == want["images"] > 0
    assert dino_eval_loader(None, 480) is None  # no masks (imagefolder): no score


@pytest.mark.parametrize("bad", [8, 0, -480, 5000, "480px", True])
def test_attn_eval_size_bad_values_are_refused_in_one_line(bad):
    from core.config import PretrainConfig
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"attn_eval_size") as e:
        PretrainConfig.from_dict({"attn_eval_size": bad})
    assert "\n" not in str(e.value)
    assert PretrainConfig.from_dict({"attn_eval_size": None}).attn_eval_size is None
    assert PretrainConfig().attn_eval_size == 480


def test_generated_data_is_scored_as_it_is_and_real_data_at_480(tmp_path, voc_root):
    """The 480-px default applies to real data; data made by core/data/synthetic.py (its marker file) is scored at
    its own size (core/metrics/attention_jaccard.py attention_scores)."""
    import shutil

    from core.config import DataConfig
    from core.data.synthetic import MARKER

    assert DataConfig().is_generated_root()  # the default: generated on first use
    assert DataConfig(root=str(voc_root)).is_generated_root()
    real = tmp_path / "real"
    shutil.copytree(voc_root, real)
    for marker in real.rglob(MARKER):
        marker.unlink()
    assert not DataConfig(root=str(real)).is_generated_root()
