"""How well do a backbone's attention maps segment the objects? DINO's Jaccard of thresholded attention.

Protocol (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294, Sec. 4.2.1 / Fig. 4 table "Segmentations from supervised versus DINO":
"masks obtained by thresholding the self-attention maps to keep 60% of the mass ... Jaccard similarity
between the ground truth and these masks on the validation images of PASCAL VOC12"). Reference figures
(last-block CLS attention, VOC12 val, 480 x 480 images, the paper's Fig. 4 table; comparable only to
`attn_jaccard_dino` at ``attn_eval_size: 480``, see below): **DINO ViT-S/16 45.9** (supervised
ViT-S/16 27.3; DINO ViT-S/8 44.7, supervised ViT-S/8 23.7). The generated 64 px data of the smoke runs is
not VOC: compare runs with each other (before / after, method against method), not with these.

0. Images: DINO's evaluation resolution. DINO's ``visualize_attention.py`` resizes every image with
   ``pth_transforms.Resize(args.image_size)``, ``--image_size`` default ``(480, 480)``: a 480 x 480 SQUARE (the
   image is squashed; a single number on its command line would instead be a 480-px short side), then crops it to
   a multiple of the patch size and upsamples the attention masks by the patch size (``scale_factor=patch``),
   so the snippet's ground-truth mask is compared at that 480 x 480 size. `attention_scores` does the same:
   the val images resized to ``attn_eval_size`` x ``attn_eval_size`` (PretrainConfig, default 480; bilinear,
   antialiased) and their masks to the same square (nearest), the masks cropped to the patch grid; with
   ``attn_eval_size: null`` the k-NN images at the training size are scored against their original masks (the
   smoke grid's setting: its generated 64 px data).
1. Maps: `Backbone.attention_saliency(x)` (B, heads, gh, gw) -- for a ViT the last block's CLS-to-patch
   attention ``attn[:, :, 0, 1:]`` as in DINO's ``visualize_attention.py``; None (CNNs): no score.
2. `attention_masks(maps, keep=0.6)`: DINO's ``visualize_attention.py`` threshold: each map normalised
   to sum 1, values sorted ascending, cumulative sum, a token is kept when its cumulative sum exceeds
   ``1 - keep`` -- the smallest set of the largest tokens holding at least 60% of the mass.
3. The binary grid mask is upsampled (``mode="nearest"``, as DINO's
   ``interpolate(th_attn, scale_factor=patch, mode="nearest")``) to the ground-truth mask's H x W (the
   images are fed resized to the evaluation size; the masks stay at their original resolution).
4. Scoring follows DINO's evaluation code, which the paper does not spell out; its author posted it in
   facebookresearch/dino issue #54 (https://github.com/facebookresearch/dino/issues/54; same code in
   NVlabs/GroupViT issue #34 and Muzammal-Naseer/IPViT ``evaluate_segmentation.py``): per image, for
   every ground-truth object (here: every class present in the mask other than background 0 and the
   ignore label 255; VOC SegmentationClass masks, so objects of one class count together), the Jaccard
   of EACH head's mask with that object's mask; the best head is picked PER OBJECT (``max`` over
   heads); the image's score is the mean over its objects; the reported figure is the mean over images
   (per image, then mean -- not pooled over the dataset). Images without an object are skipped (DINO's
   code would divide by zero there). Two conventions for the 255 band (object borders): `attn_jaccard` ignores
   it (left out of intersection and union, as IPViT tries to); `attn_jaccard_dino` counts it as DINO's snippet
   does (``union = (masko + th_attn) > 0`` over every pixel: attention on the band enlarges the union).

**Which is comparable to DINO's 45.9** (ViT-S/16, VOC12 val): `attn_jaccard_dino` of a run with
``attn_eval_size: 480`` on VOC12 val, the k-NN val split being VOC12 val (and only as far as the snippet, which
the authors call their private code, is the whole protocol). `attn_jaccard` (255 ignored) reads a little higher
on the same maps; neither is comparable at another size or on generated data.

`attention_jaccard` returns ``{"best": DINO's figure (per-object best head) in %, 255 ignored, "best_255": the
same with the 255 band counted (DINO's snippet), "per_head": [the "best" average with the head FIXED, one value
per head, in %], "best_head": index of the best fixed head, "images": images scored}``; ``best >= max(per_head)``. `METRICS` declares what a pretraining run writes
from it (core/metrics/registry.py): `attn_jaccard` before and after pretraining, `attn_jaccard_heads` after,
on the k-NN val images with their masks.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from core.metrics.registry import AFTER, BEFORE, Column, EvalContext, MetricSpec
from core.stages import PRETRAIN

__all__ = ["DINO_KEEP", "attention_masks", "jaccard", "attention_jaccard", "dino_eval_loader"]

#: share of the attention mass the masks keep (DINO: ``--threshold 0.6``)
DINO_KEEP = 0.6


def attention_masks(maps: Tensor, keep: float = DINO_KEEP) -> Tensor:
    """Boolean masks (same shape as ``maps`` (..., gh, gw)) keeping, per map, the smallest set of largest
    values that holds at least ``keep`` of the map's mass (DINO ``visualize_attention.py``: sort, cumsum,
    ``cumval > 1 - threshold``). A map with no mass (all zero) gives an empty mask."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} must be in (0, 1]")
    shape = maps.shape
    flat = maps.detach().reshape(-1, shape[-2] * shape[-1]).double().clamp_min(0)
    total = flat.sum(1, keepdim=True)
    val, idx = torch.sort(flat, dim=1)
    cum = torch.cumsum(val / total.clamp_min(torch.finfo(torch.float64).tiny), dim=1)
    kept_sorted = (cum > 1.0 - keep) & (total > 0)
    out = torch.zeros_like(kept_sorted)
    out.scatter_(1, idx, kept_sorted)
    return out.reshape(shape)


def jaccard(pred_mask: Tensor, gt_fg: Tensor, ignore: Optional[Tensor] = None) -> Tensor:
    """Jaccard (IoU, fraction in [0, 1]) of boolean ``pred_mask`` (..., H, W) with boolean ``gt_fg`` (H, W)
    over the pixels not in ``ignore`` (H, W) (None: every pixel); shape (...,). NaN where the union is empty."""
    pred = pred_mask.bool()
    gt = gt_fg.bool().to(pred.device)
    if ignore is not None:
        valid = ~ignore.bool().to(pred.device)
        pred, gt = pred & valid, gt & valid
    inter = (pred & gt).flatten(-2).sum(-1).double()
    union = (pred | gt).flatten(-2).sum(-1).double()
    return inter / union  # 0/0 -> NaN


def _object_head_jaccard(heads: Tensor, mask: Tensor, background: Optional[int], ignore_index: int,
                         count_ignored: bool = False) -> Tensor:
    """(objects, heads) Jaccard of every head's mask (heads, H, W) with every object (class) of ``mask``;
    ``count_ignored``: ``ignore_index`` pixels stay in the union (DINO's snippet), else they are left out."""
    labels = torch.unique(mask)
    labels = labels[(labels != ignore_index) & ((labels != background) if background is not None else True)]
    if labels.numel() == 0:
        return heads.new_zeros((0, heads.shape[0]), dtype=torch.float32)
    # pixel counts are exact in float32 up to 2^24 pixels per image
    gt = (mask.flatten()[None] == labels[:, None]).float()  # (K, P); 255 is never a label here
    pred = heads.flatten(1).float()  # (Hh, P)
    if not count_ignored:
        pred = pred * (mask != ignore_index).flatten().float()  # ignored pixels dropped
    inter = gt @ pred.T  # (K, Hh)
    union = gt.sum(1, keepdim=True) + pred.sum(1)[None] - inter
    return inter / union  # union >= |object| > 0


def _split(batch: Any) -> tuple[Tensor, list]:
    if isinstance(batch, dict):
        return batch["image"], list(batch["mask"])
    x, m = batch[0], batch[1]
    return x, list(m)


@torch.no_grad()
def attention_jaccard(backbone, loader: Iterable, device: Any = "cpu", keep: float = DINO_KEEP,
                      background: Optional[int] = 0, ignore_index: int = 255, crop: bool = False) -> Optional[dict]:
    """DINO's attention-mask Jaccard of ``backbone`` on ``loader`` (batches ``(images (B,3,S,S), masks)``,
    masks a (B,H,W) tensor or a list of (H_i,W_i) masks at their original resolution); see the module doc.
    ``background``: the label that is not an object (VOC 0; None: every label is one, e.g. COCO-Stuff).
    ``crop``: the masks are at the images' size; images and masks are cropped to a multiple of the backbone's
    patch (`size_multiple`), as DINO's ``img[:, :w, :h]`` before the forward pass.
    None when the backbone has no attention maps or no image holds an object."""
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    per_head_sum: Optional[Tensor] = None
    best_sum, best_255_sum, n = 0.0, 0.0, 0
    try:
        for batch in loader:
            x, masks = _split(batch)
            if crop:  # DINO: "make the image divisible by the patch size"
                mult = int(getattr(backbone, "size_multiple", 0) or 1)
                x = x[..., : x.shape[-2] - x.shape[-2] % mult, : x.shape[-1] - x.shape[-1] % mult]
            sal = backbone.attention_saliency(x.to(device).float())
            if sal is None:
                return None
            grid = attention_masks(sal.float(), keep).float()  # (B, heads, gh, gw)
            for g, m in zip(grid, masks):
                m = torch.as_tensor(m).to(g.device).long()
                if crop:  # the mask at the image's size, cropped as the image
                    m = m[..., : x.shape[-2], : x.shape[-1]]
                up = F.interpolate(g[None], size=tuple(m.shape[-2:]), mode="nearest")[0] > 0.5
                jac = _object_head_jaccard(up, m, background, ignore_index)
                if jac.shape[0] == 0:
                    continue
                per_head = jac.mean(0).cpu()
                per_head_sum = per_head if per_head_sum is None else per_head_sum + per_head
                best_sum += float(jac.max(1).values.mean())
                best_255_sum += float(_object_head_jaccard(up, m, background, ignore_index, True).max(1).values.mean())
                n += 1
    finally:
        backbone.train(was_training)
    if n == 0 or per_head_sum is None:
        return None
    per_head = [float(v) * 100.0 / n for v in per_head_sum]
    return {"best": best_sum * 100.0 / n, "best_255": best_255_sum * 100.0 / n, "per_head": per_head,
            "best_head": int(max(range(len(per_head)), key=per_head.__getitem__)), "images": n}


class _EvalSquare:
    """(image, mask) of a segmentation dataset both resized to (size, size): the image as the k-NN images
    (`EvalImageTransform`: bilinear, antialiased, normalised), the mask nearest (DINO's evaluation size)."""

    def __init__(self, seg_ds: Any, size: int):
        from core.data.transforms import EvalImageTransform

        self.seg_ds, self.size, self.transform = seg_ds, int(size), EvalImageTransform(size)

    def __len__(self) -> int:
        return len(self.seg_ds)

    def __getitem__(self, i: int):
        img, mask = self.seg_ds[i]
        m = torch.as_tensor(mask).long()[None, None].float()
        m = F.interpolate(m, size=(self.size, self.size), mode="nearest")[0, 0].long()
        return self.transform(img), m


#: images per batch at the evaluation size (a 480 px ViT/8 image has 3600 tokens: bounded attention memory)
EVAL_BATCH = 8


def dino_eval_loader(knn_loader: Any, size: int) -> Optional[Any]:
    """The k-NN loader's segmentation images and masks, in order, both at (size, size) (module doc, step 0):
    batches ``(images (B,3,size,size), [mask (size,size), ...])``; None when it has no masks."""
    from torch.utils.data import DataLoader

    from core.data.module import KNNDataset, _images_masks_collate

    ds = getattr(knn_loader, "dataset", None)
    if not isinstance(ds, KNNDataset):
        return None
    g = torch.Generator()  # its own: a pass must not draw from the global RNG (training augmentations)
    g.manual_seed(0)
    return DataLoader(_EvalSquare(ds.seg_ds, size), batch_size=EVAL_BATCH, shuffle=False,
                      num_workers=knn_loader.num_workers, collate_fn=_images_masks_collate, generator=g)


def attention_scores(ctx: EvalContext) -> Optional[dict]:
    """`attention_jaccard` of an evaluation's backbone on the k-NN val images with masks (computed once per
    evaluation) at the config's `attn_eval_size` (None, or data made by core/data/synthetic.py: the k-NN images
    as they are, original masks); None
    without masks or attention maps. VOC: class 0 is background; COCO-Stuff: every label is an object."""
    def run():
        size = getattr(ctx.cfg, "attn_eval_size", None)
        if size is not None and ctx.cfg.data.is_generated_root():
            size = None  # generated squares (64 px) carry nothing more at 480 px, at ~35x the CPU time
        if size is None:
            masks = ctx.mask_loaders()
            loader = None if masks is None else masks[1]
        else:
            loader = dino_eval_loader(ctx.loaders.knn_val, size)
        if loader is None:
            return None
        background = 0 if ctx.cfg.data.dataset == "voc" else None
        return attention_jaccard(ctx.backbone, loader, ctx.device, background=background, crop=size is not None)

    return ctx.once("attn", run)


_DESC = ("DINO's attention-mask Jaccard (%) after pretraining: last-block attention maps thresholded to 60% of "
         "their mass vs each val object, best head per object, mean per image then over images "
         "(core/metrics/attention_jaccard.py); null without attention maps (CNNs) or masks")

METRICS = (
    MetricSpec("attn_jaccard", PRETRAIN.name, _DESC, AFTER, order=30,
               compute=lambda ctx: (attention_scores(ctx) or {}).get("best"),
               columns=(Column("emerging", "Attn Jaccard (%)", 2, best=+1, position=30),)),
    MetricSpec("attn_jaccard_init", PRETRAIN.name, "the same before pretraining", BEFORE, order=31,
               compute=lambda ctx: (attention_scores(ctx) or {}).get("best")),
    MetricSpec("attn_jaccard_heads", PRETRAIN.name,
               "the same score with each head fixed, one value (%) per head, after pretraining", AFTER, order=32,
               compute=lambda ctx: (attention_scores(ctx) or {}).get("per_head")),
    MetricSpec("attn_jaccard_dino", PRETRAIN.name,
               "attn_jaccard with the 255 band counted in the union as DINO's evaluation snippet does: at "
               "attn_eval_size 480 on VOC12 val, the figure comparable to DINO's 45.9 (ViT-S/16)", AFTER, order=33,
               compute=lambda ctx: (attention_scores(ctx) or {}).get("best_255")),
)
