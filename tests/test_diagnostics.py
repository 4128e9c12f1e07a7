"""Tests of core.diagnostics: attention maps, effective receptive fields, cross-correlation heatmaps,
prediction overlays, and the Lightning callbacks inside real (tiny, CPU) Trainer fits."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core.diagnostics import (
    cls_attention_maps,
    colorize_mask,
    effective_receptive_field,
    erf_grid,
    palette_array,
    plot_attention_gallery,
    plot_cc_evolution,
    plot_cross_correlation,
    plot_erf_grid,
    plot_predictions,
    threshold_attention,
)
from core.diagnostics.predictions import _voc_colormap

torch.set_num_threads(2)


# ----------------------------------------------------------------------------- tiny models
@dataclass
class _Out:
    pooled: torch.Tensor
    dense: torch.Tensor
    intermediates: list = field(default_factory=list)
    attentions: dict = field(default_factory=dict)


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, return_attn=False):
        b, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        x = x + self.mlp(self.norm2(x))
        return (x, attn) if return_attn else x


class TinyViT(nn.Module):
    """A self-made ViT following the Backbone contract (CLS + register tokens, explicit attention)."""

    def __init__(self, patch=8, dim=32, depth=2, heads=4, registers=2):
        super().__init__()
        self.name, self.patch_size, self.num_heads, self.num_blocks = "tinyvit", patch, heads, depth
        self.is_transformer, self.has_cls_token, self.stride = True, True, patch
        self.embed_dim = self.dense_dim = dim
        self.n_prefix = 1 + registers
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.prefix = nn.Parameter(torch.randn(1, self.n_prefix, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.5)  # eval mode matters for the diagnostics

    def layers(self):
        return {"patch_embed": self.patch_embed, **{f"block{i}": b for i, b in enumerate(self.blocks)}}

    def forward_all(self, x, intermediates=(), attention_blocks=()):
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        tok = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.prefix.expand(b, -1, -1), self.drop(tok)], 1)
        want = {(i + self.num_blocks) % self.num_blocks: i for i in attention_blocks}
        atts = {}
        for i, blk in enumerate(self.blocks):
            if i in want:
                x, a = blk(x, return_attn=True)
                atts[want[i]] = a
            else:
                x = blk(x)
        x = self.norm(x)
        dense = x[:, self.n_prefix:].transpose(1, 2).reshape(b, -1, gh, gw)
        return _Out(pooled=x[:, 0], dense=dense, attentions=atts)

    def forward(self, x):
        return self.forward_all(x).pooled


class TinyCNN(nn.Module):
    """A small conv backbone with layers() and BatchNorm (mode restoration matters)."""

    name, is_transformer, has_cls_token, patch_size, num_heads = "tinycnn", False, False, None, 0

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.embed_dim = 16

    def layers(self):
        return {"stem": self.stem, "stage1": self.stage1, "stage2": self.stage2}

    def forward(self, x):
        return self.stage2(self.stage1(self.stem(x))).mean((2, 3))


def conv_stack(k: int, channels: int = 4) -> nn.Sequential:
    layers = []
    for i in range(k):
        conv = nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1, bias=False)
        nn.init.constant_(conv.weight, 1.0 / (9 * channels))
        layers.append(conv)
    return nn.Sequential(*layers)


def _registry():
    try:
        from core.models.registry import create_backbone
    except Exception:
        return None
    return create_backbone


# ----------------------------------------------------------------------------- receptive field
@pytest.mark.parametrize("k", [1, 2, 3])
def test_erf_conv_stack_has_theoretical_support(k):
    model = conv_stack(k)
    images = torch.rand(2, 3, 32, 32)
    erf = effective_receptive_field(model, model[k - 1], images)
    assert erf.shape == (32, 32) and erf.dtype == np.float32
    assert math.isclose(float(erf.max()), 1.0, rel_tol=1e-6)
    rows, cols = np.nonzero(erf > 0)
    # centre unit (16, 16); k stacked 3x3 convs see 16-k .. 16+k: exactly 2k+1 wide
    assert rows.min() == 16 - k and rows.max() == 16 + k
    assert cols.min() == 16 - k and cols.max() == 16 + k
    assert (erf[16 - k:17 + k, 16 - k:17 + k] > 0).all()
    # one box filter is flat; k >= 2 stacked ones peak strictly at the centre (discrete Gaussian)
    if k == 1:
        np.testing.assert_allclose(erf[15:18, 15:18], 1.0, rtol=1e-5)
    else:
        assert np.unravel_index(erf.argmax(), erf.shape) == (16, 16) and (erf == erf.max()).sum() == 1


def test_erf_by_name_and_grid_and_normalisation():
    model = conv_stack(3)
    images = torch.rand(1, 3, 32, 32)
    by_name = effective_receptive_field(model, "1", images)  # named_modules name
    by_mod = effective_receptive_field(model, model[1], images)
    np.testing.assert_allclose(by_name, by_mod)
    assert (by_name > 0).sum() == 25  # 2 layers: 5x5
    s = effective_receptive_field(model, model[2], images, normalize="sum")
    assert math.isclose(float(s.sum()), 1.0, rel_tol=1e-4)
    grid = erf_grid(model, {"c0": model[0], "c2": model[2]}, images)
    assert [int((v > 0).sum()) for v in grid.values()] == [9, 49]
    from core.errors import ConfigError

    with pytest.raises(ConfigError):
        effective_receptive_field(model, "nope", images)


def test_erf_leaves_params_modes_and_hooks_untouched(tmp_path):
    model = TinyCNN()
    model.train()
    model.stage1[1].eval()  # a deliberately frozen BN stays in eval
    images = torch.rand(3, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    erfs = erf_grid(model, None, images)  # layers() of the model
    assert set(erfs) == {"stem", "stage1", "stage2"}
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.stem[1].training and not model.stage1[1].training
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    for k, v in model.state_dict().items():  # BN running stats not updated (eval mode inside)
        assert torch.equal(v, before[k]), k
    assert not images.requires_grad and images.grad is None
    # ERF grows with depth
    ext = [int((erfs[n] > 1e-6).sum()) for n in ("stem", "stage1", "stage2")]
    assert ext[0] < ext[1] < ext[2]
    out = plot_erf_grid(erfs, tmp_path / "erf_test.png", image=images[0], title="tiny cnn")
    assert out.exists() and Image.open(out).size[0] > 100


def test_erf_works_inside_inference_mode():
    model = conv_stack(2)
    images = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        erf = effective_receptive_field(model, model[1], images)
    assert (erf > 0).sum() == 25


def _timm_vit(img_size, reg_tokens=4):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             reg_tokens=reg_tokens, num_classes=0)


@pytest.mark.parametrize("hw", [(32, 32), (32, 48)])
def test_erf_tokens_reshaped_to_grid(hw):
    h, w = hw
    vit = _timm_vit(hw)
    assert vit.num_prefix_tokens == 5  # CLS + 4 registers
    images = torch.randn(2, 3, h, w)
    gh, gw = h // 8, w // 8
    ci, cj = gh // 2, gw // 2
    # patch embedding (no prefix in its output): support is exactly the centre patch
    erf = effective_receptive_field(vit, vit.patch_embed, images)
    rows, cols = np.nonzero(erf > 0)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8 * ci, 8 * ci + 7, 8 * cj, 8 * cj + 7)
    # after a block (prefix tokens present): global support, but the centre patch dominates
    erf = effective_receptive_field(vit, vit.blocks[0], images)
    assert (erf > 0).mean() > 0.9
    per_patch = erf.reshape(gh, 8, gw, 8).sum((1, 3))
    assert np.unravel_index(per_patch.argmax(), per_patch.shape) == (ci, cj)
    erf_explicit = effective_receptive_field(vit, vit.blocks[0], images, num_prefix_tokens=5)
    np.testing.assert_allclose(erf, erf_explicit, rtol=1e-5)
    # ground truth by hand: token 5 + ci * gw + cj of the block output
    vit.eval()
    x = images.clone().requires_grad_(True)
    feats = {}
    hnd = vit.blocks[0].register_forward_hook(lambda m, i, o: feats.setdefault("o", o))
    vit(x)
    hnd.remove()
    (g,) = torch.autograd.grad(feats["o"][:, 5 + ci * gw + cj].sum(), x)
    ref = g.abs().sum(1).mean(0).numpy()
    np.testing.assert_allclose(erf, ref / ref.max(), rtol=1e-4, atol=1e-7)


def test_erf_token_model_without_metadata_infers_prefix():
    vit = TinyViT(registers=2)
    images = torch.randn(2, 3, 32, 32)
    erf = effective_receptive_field(vit, "block1", images)  # name from layers()
    per_patch = erf.reshape(4, 8, 4, 8).sum((1, 3))
    assert np.unravel_index(per_patch.argmax(), per_patch.shape) == (2, 2)
    assert all(p.grad is None for p in vit.parameters())


# ----------------------------------------------------------------------------- attention
def test_cls_attention_maps_match_backbone_attention(tmp_path):
    torch.manual_seed(0)
    vit = TinyViT(heads=4, registers=2)
    vit.train()
    images = torch.randn(3, 3, 32, 48)
    grid = cls_attention_maps(vit, images, block=-1, upsample=False)
    assert grid.shape == (3, 4, 4, 6)
    assert vit.training and vit.drop.training  # mode restored
    with torch.no_grad():
        vit.eval()
        attn = vit.forward_all(images, attention_blocks=(-1,)).attentions[-1]
        vit.train()
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 27))  # softmax rows
    torch.testing.assert_close(grid, attn[:, :, 0, 3:].reshape(3, 4, 4, 6))
    # CLS row: patch mass + prefix mass == 1
    torch.testing.assert_close(grid.sum((-2, -1)) + attn[:, :, 0, :3].sum(-1), torch.ones(3, 4))
    up = cls_attention_maps(vit, images)
    assert up.shape == (3, 4, 32, 48)
    torch.testing.assert_close(up[:, :, ::8, ::8], grid)
    torch.testing.assert_close(up, grid.repeat_interleave(8, -2).repeat_interleave(8, -1))
    # another block
    g0 = cls_attention_maps(vit, images, block=0, upsample=False)
    assert not torch.allclose(g0, grid)
    out = plot_attention_gallery(images, up, tmp_path / "attention_test.png", threshold=0.6)
    assert out.exists()
    from core.errors import ConfigError

    with pytest.raises(ConfigError):
        cls_attention_maps(TinyCNN(), torch.randn(1, 3, 32, 32))


def test_threshold_keeps_mass_with_fewest_patches():
    torch.manual_seed(0)
    maps = torch.rand(5, 3, 6, 7) ** 4
    for mass in (0.3, 0.6, 0.9):
        mask = threshold_attention(maps, mass)
        assert mask.shape == maps.shape and mask.dtype == torch.bool
        flat, fm = maps.flatten(-2), mask.flatten(-2)
        kept = (flat * fm).sum(-1) / flat.sum(-1)
        assert (kept >= mass - 1e-6).all()
        # fewest: dropping the smallest kept value falls below the mass
        smallest_kept = torch.where(fm, flat, torch.full_like(flat, float("inf"))).min(-1).values
        assert ((kept - smallest_kept / flat.sum(-1)) < mass).all()
        # and it is exactly the top-k set
        k = fm.sum(-1)
        vals = flat.sort(-1, descending=True).values
        assert torch.equal(fm, flat >= vals.gather(-1, (k - 1).unsqueeze(-1)))
    # thresholding the upsampled map == upsampling the patch-level mask (patches kept whole)
    up = maps.repeat_interleave(8, -2).repeat_interleave(8, -1)
    torch.testing.assert_close(threshold_attention(up, 0.6),
                               threshold_attention(maps, 0.6).repeat_interleave(8, -2).repeat_interleave(8, -1))
    # a hand-made example: [0.5, 0.3, 0.15, 0.05] at 60% keeps the two largest
    m = threshold_attention(torch.tensor([[0.05, 0.5], [0.3, 0.15]]), 0.6)
    assert m.tolist() == [[False, True], [True, False]]


# ----------------------------------------------------------------------------- cross-correlation
def _heatmap_box(arr):
    """Bounding box of the heatmap in a rendered PNG: columns/rows dominated by the 0 colour."""
    rgb = arr[..., :3].astype(int)
    cyan = (np.abs(rgb - np.array([0, 168, 255])) < 40).all(-1)
    col, row = cyan.sum(0), cyan.sum(1)
    xs = np.nonzero(col > 0.5 * col.max())[0]
    ys = np.nonzero(row > 0.5 * row.max())[0]
    return xs.min(), xs.max(), ys.min(), ys.max()


def _is_red(px):
    r, g, b = (int(v) for v in px[:3])
    return r > 170 and g < 80 and b < 80


def _is_blue(px):
    r, g, b = (int(v) for v in px[:3])
    return b > 200 and r < 80


def test_identity_cross_correlation_red_diagonal_on_blue(tmp_path):
    d = 32
    path = plot_cross_correlation(torch.eye(100), tmp_path / "crosscorr_eye.png", title="identity", max_dims=d)
    arr = np.asarray(Image.open(path).convert("RGB"))
    x0, x1, y0, y1 = _heatmap_box(arr)
    cw, chh = (x1 - x0 + 1) / d, (y1 - y0 + 1) / d
    assert abs(cw - chh) < 1.0 and cw > 3  # square cells, each several pixels
    for i in range(d):
        cy = int(y0 + (i + 0.5) * chh)
        assert _is_red(arr[cy, int(x0 + (i + 0.5) * cw)]), i
        j = (i + 7) % d
        assert _is_blue(arr[cy, int(x0 + (j + 0.5) * cw)]), (i, j)
    # colour bar present: red pixels exist to the right of the heatmap
    right = arr[:, x1 + 5:]
    assert any(_is_red(p) for p in right.reshape(-1, 3)[:: 7])


def test_cc_evolution_strip_and_gif(tmp_path):
    snaps = [(e, torch.eye(16) * (e / 4) + 0.1 * torch.randn(16, 16)) for e in range(10)]
    p = plot_cc_evolution(snaps, tmp_path / "crosscorr_evolution.png", max_snapshots=5,
                          gif_path=tmp_path / "crosscorr_evolution.gif")
    assert p.exists()
    gif = Image.open(tmp_path / "crosscorr_evolution.gif")
    assert gif.n_frames == 10


# ----------------------------------------------------------------------------- predictions
def test_predictions_use_palette_colours(tmp_path):
    pal = _voc_colormap(256)
    flat = pal.reshape(-1).tolist()  # PIL putpalette style
    np.testing.assert_array_equal(palette_array(flat), pal)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[:, :, 32:] = 15
    target[:, 30:34, :] = 255
    pred = torch.full((2, 64, 64), 12, dtype=torch.long)
    pred[:, :32] = 1
    rgb = colorize_mask(target[0], flat)
    assert tuple(rgb[0, 0]) == tuple(pal[0]) and tuple(rgb[0, 40]) == (192, 128, 128)
    assert tuple(rgb[31, 5]) == (255, 255, 255)  # void white
    images = torch.randn(2, 3, 64, 64)
    path = plot_predictions(images, target, pred, flat, tmp_path / "predictions_test.png",
                            class_names=[f"c{i}" for i in range(21)])
    arr = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    for colour in [(192, 128, 128), (128, 0, 0), (64, 0, 128)]:  # classes 15, 1, 12
        assert (arr == colour).all(-1).sum() > 500, colour
    # logits are accepted (argmax)
    logits = F.one_hot(pred, 21).permute(0, 3, 1, 2).float()
    assert plot_predictions(images, target, logits, flat, tmp_path / "predictions_logits.png").exists()


# ----------------------------------------------------------------------------- callbacks in a real fit
L = pytest.importorskip("lightning")


class _PairDS(torch.utils.data.Dataset):
    def __init__(self, n=8, size=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return (x, x.flip(-1) + 0.1 * torch.randn_like(x)), 0


class _SegDS(torch.utils.data.Dataset):
    def __init__(self, n=8, size=32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = (self.x[:, 0] > 0).long() * 15
        self.y[:, :2] = 255

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class TinyBarlow(L.LightningModule):
    def __init__(self, backbone):
        super().__init__()
        from core.losses.barlow_twins import BarlowTwinsLoss

        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(backbone.embed_dim, 16, bias=False), nn.BatchNorm1d(16))
        self.loss_fn = BarlowTwinsLoss()

    def training_step(self, batch, _):
        (v1, v2), _ = batch
        loss = self.loss_fn(self.projector(self.backbone(v1)), self.projector(self.backbone(v2)))
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TinySegmenter(nn.Module):
    def __init__(self, k=21):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, k, 1))

    def forward(self, x):
        return self.net(x)


class TinySeg(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = TinySegmenter()

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.model(x), y, ignore_index=255)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.model(x), y, ignore_index=255))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, callbacks, epochs=2, logger=False, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), log_every_n_steps=1, **kw)


def _names(tmp_path):
    return sorted(p.name for p in (tmp_path / "figures").iterdir())


def test_callbacks_in_barlow_twins_fit(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from core.diagnostics import AttentionMapCallback, CrossCorrelationCallback, ReceptiveFieldCallback

    torch.manual_seed(0)
    module = TinyBarlow(TinyViT())
    images = _PairDS().x[:3]
    cbs = [
        AttentionMapCallback(images, every_n_epochs=1, block=-1, threshold=0.6, at_start=True, strict=True),
        ReceptiveFieldCallback(images, layers=None, every_n_epochs=2, strict=True),
        CrossCorrelationCallback(every_n_epochs=1, strict=True),
    ]
    loader = torch.utils.data.DataLoader(_PairDS(), batch_size=4)
    trainer = _trainer(tmp_path, cbs, logger=CSVLogger(str(tmp_path), name="csv"))
    trainer.fit(module, loader)
    assert _names(tmp_path) == [
        "attention_epoch000.png", "attention_epoch001.png", "attention_init.png",
        "crosscorr_epoch000.png", "crosscorr_epoch001.png", "crosscorr_evolution.gif", "crosscorr_evolution.png",
        "erf_epoch001.png",
    ]
    assert set(cbs[1].last_erfs) == {"patch_embed", "block0", "block1"}
    assert "cc_diag_mean" in trainer.callback_metrics and "cc_offdiag_rms" in trainer.callback_metrics
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    assert sum(1 for r in rows if r.get("cc_diag_mean")) == 2
    assert module.training  # modes restored after the callbacks


def test_attention_callback_skips_cnn_and_erf_on_cnn(tmp_path):
    from core.diagnostics import AttentionMapCallback, ReceptiveFieldCallback

    module = TinyBarlow(TinyCNN())
    images = _PairDS().x[:2]
    cbs = [AttentionMapCallback(images), ReceptiveFieldCallback(images, layers=["stem", "stage2"], strict=True)]
    loader = torch.utils.data.DataLoader(_PairDS(), batch_size=4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _trainer(tmp_path, cbs, epochs=1).fit(module, loader)
    assert any("no CLS" in str(x.message) for x in w)
    assert _names(tmp_path) == ["erf_epoch000.png"]


def test_prediction_callback_in_segmentation_fit_with_disabled_wandb(tmp_path, monkeypatch):
    from core.diagnostics import PredictionCallback

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    loggers = []
    try:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project="twinseg-test", mode="disabled", save_dir=str(tmp_path)))
    except Exception:
        pass
    module = TinySeg()
    module.model.net[1].eval()  # a frozen part must stay in eval after the callback
    train = torch.utils.data.DataLoader(_SegDS(), batch_size=4)
    val = torch.utils.data.DataLoader(_SegDS(), batch_size=4)
    cb = PredictionCallback(every_n_epochs=1, num_images=3, strict=True)  # images from the val loader
    trainer = _trainer(tmp_path, [cb], logger=loggers or False, limit_val_batches=1)
    try:
        trainer.fit(module, train, val)
    finally:  # a disabled wandb run is still a global `wandb.run`: leave none behind for later tests
        import wandb

        wandb.finish()
    assert _names(tmp_path) == ["predictions_epoch000.png", "predictions_epoch001.png"]
    assert cb._images.shape == (3, 3, 32, 32) and cb._targets.shape == (3, 32, 32)
    assert module.model.training and not module.model.net[1].training
    arr = np.asarray(Image.open(tmp_path / "figures" / "predictions_epoch001.png").convert("RGB")).reshape(-1, 3)
    assert (arr == (192, 128, 128)).all(-1).sum() > 200  # class 15 (person) in the truth column


# ----------------------------------------------------------------------------- real tiny backbones
@pytest.mark.skipif(_registry() is None, reason="core.models.registry not available")
def test_real_vit_nano_attention_and_erf(tmp_path):
    create_backbone = _registry()
    torch.manual_seed(0)
    bb = create_backbone("vit_nano_patch8", image_size=32)
    images = torch.randn(2, 3, 32, 32)
    maps = cls_attention_maps(bb, images, upsample=False)
    assert maps.shape == (2, bb.num_heads, 4, 4)
    with torch.no_grad():
        bb.eval()
        attn = bb.forward_all(images, attention_blocks=(-1,)).attentions[-1]
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5, rtol=1e-5)
    n_prefix = attn.shape[-1] - 16
    torch.testing.assert_close(maps, attn[:, :, 0, n_prefix:].reshape(2, -1, 4, 4))
    layers = bb.layers()
    erfs = erf_grid(bb, layers, images)
    last = list(erfs)[-1]
    per_patch = erfs[last].reshape(4, 8, 4, 8).sum((1, 3))
    assert np.unravel_index(per_patch.argmax(), per_patch.shape) == (2, 2)
    assert all(p.grad is None for p in bb.parameters())
    plot_erf_grid(erfs, tmp_path / "erf_vit.png")
    plot_attention_gallery(images, cls_attention_maps(bb, images), tmp_path / "attention_vit.png", threshold=0.6)


@pytest.mark.skipif(_registry() is None, reason="core.models.registry not available")
def test_real_resnet_tiny_erf(tmp_path):
    create_backbone = _registry()
    torch.manual_seed(0)
    bb = create_backbone("resnet_tiny", image_size=64)
    images = torch.randn(2, 3, 64, 64)
    erfs = erf_grid(bb, None, images)
    assert len(erfs) >= 2
    for e in erfs.values():
        assert e.shape == (64, 64) and np.isfinite(e).all() and e.max() == pytest.approx(1.0)
    assert all(p.grad is None for p in bb.parameters())
    plot_erf_grid(erfs, tmp_path / "erf_resnet.png")


@pytest.mark.skipif(_registry() is None, reason="core.models.registry not available")
def test_real_swin_nano_erf_nhwc_centre():
    create_backbone = _registry()
    try:
        bb = create_backbone("swin_nano", image_size=64)
    except Exception as e:  # pragma: no cover - optional backbone
        pytest.skip(f"swin_nano unavailable: {e}")
    images = torch.randn(1, 3, 64, 64)
    erfs = erf_grid(bb, ["patch_embed", list(bb.layers())[1]], images)
    p = int(bb.patch_size or 4)
    c = (64 // p // 2) * p  # centre cell of the (64/p)^2 grid
    rows, cols = np.nonzero(erfs["patch_embed"] > 0)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (c, c + p - 1, c, c + p - 1)
    assert all(p_.grad is None for p_ in bb.parameters())
