"""Procedurally drawn, deterministic datasets in the exact PASCAL VOC 2012 (and COCO-Stuff) layouts.

Each of the 20 VOC foreground classes has its own structure: a class-specific shape (disc, square,
triangle, ring, star, cross, ...), a class-specific texture (stripes / checker / dots / rings /
waves / plain, with a class frequency and orientation in the object's frame) and a class hue range.
Objects (1-3 per image) get random position, scale, rotation, colour jitter and pixel noise, on a
textured, low-saturation background with a few distractor blobs. Masks are palette PNGs with VOC's
255 "void" bands around object boundaries. Everything is vectorised numpy: 144 images of 64 px take
well under a second or two.

CLI: ``python -m core.data.synthetic --out DIR [--n-train N] [--n-val N] [--size PX] [--sizes WxH,...] [--seed S]
[--trainaug]`` (``--trainaug``: also the SBD ``SegmentationClassAug`` layout, see `generate_voc`).
``--sizes`` (``generate_voc(..., sizes=[(W, H), ...])``) draws non-square images of varying sizes, image k
taking size k mod len(sizes) (e.g. VOC-like 500x375,375x500 scaled down); without it every image is
``size`` x ``size`` exactly as before.
``default_voc_root(data_cfg)`` generates once into a cache folder (atomically: a temp folder renamed
into place, so an interrupted run never leaves a half dataset that looks complete).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from core.errors import ConfigError, DataError

MARKER = "twinseg_synthetic.json"  # written inside VOCdevkit/ (or the COCO root) last
FORMAT_VERSION = 2  # bump when the drawing changes: cached datasets are then regenerated
REPO_ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- shapes
# (u, v): pixel coordinates in the object's rotated frame, in units of the object radius.


def _polar(u, v):
    return np.sqrt(u * u + v * v), np.arctan2(v, u)


def _disc(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u, v):
    return (v >= -0.55) & (np.sqrt(3.0) * np.abs(u) + v <= 1.0)


def _ring(u, v):
    r = np.sqrt(u * u + v * v)
    return (r <= 1.0) & (r >= 0.55)


def _star(u, v):
    r, a = _polar(u, v)
    return r <= 0.55 + 0.42 * np.cos(5 * a)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))


def _ellipse(u, v):
    return u * u + (v / 0.5) ** 2 <= 1.0


def _hexagon(u, v):
    au, av = np.abs(u), np.abs(v)
    return np.maximum(au, 0.5 * au + 0.866 * av) <= 0.9


def _crescent(u, v):
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.75 ** 2)


def _frame(u, v):
    m = np.maximum(np.abs(u), np.abs(v))
    return (m <= 0.85) & (m >= 0.5)


def _bar(u, v):
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.28)


def _clover(u, v):
    r, a = _polar(u, v)
    return r <= 0.3 + 0.7 * np.abs(np.cos(1.5 * a))


def _gear(u, v):
    r, a = _polar(u, v)
    return r <= 0.78 + 0.2 * np.sign(np.cos(8 * a))


def _semidisc(u, v):
    return (u * u + (v + 0.4) ** 2 <= 1.0) & (v >= -0.4)


def _lshape(u, v):
    return (((u >= -0.8) & (u <= -0.2) & (np.abs(v) <= 0.8))
            | ((np.abs(u) <= 0.8) & (v >= 0.2) & (v <= 0.8)))


def _dumbbell(u, v):
    return (((u - 0.6) ** 2 + v * v <= 0.16) | ((u + 0.6) ** 2 + v * v <= 0.16)
            | ((np.abs(u) <= 0.6) & (np.abs(v) <= 0.13)))


def _astroid(u, v):
    return np.sqrt(np.abs(u)) + np.sqrt(np.abs(v)) <= 1.0


def _trapezoid(u, v):
    return (np.abs(v) <= 0.6) & (np.abs(u) <= 0.45 + 0.45 * (v + 0.6) / 1.2)


def _heart(u, v):
    x, y = u * 1.25, -v * 1.25 + 0.15
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0


def _chevron(u, v):
    return (v >= 0.9 * np.abs(u) - 0.55) & (v <= 0.9 * np.abs(u) + 0.05) & (np.abs(u) <= 0.95)


SHAPES: dict[str, Callable] = {
    "disc": _disc, "square": _square, "triangle": _triangle, "ring": _ring, "star": _star,
    "cross": _cross, "ellipse": _ellipse, "hexagon": _hexagon, "crescent": _crescent, "frame": _frame,
    "bar": _bar, "clover": _clover, "gear": _gear, "semidisc": _semidisc, "lshape": _lshape,
    "dumbbell": _dumbbell, "astroid": _astroid, "trapezoid": _trapezoid, "heart": _heart, "chevron": _chevron,
}

# --------------------------------------------------------------------------- textures
# t in [0, 1] mixes the class's two colours.


def _soft(x, k=3.0):
    return np.clip(0.5 + k * x, 0.0, 1.0)


def _tex(pattern: str, u, v, freq: float, orient: float):
    two_pi = 2 * np.pi
    if pattern == "stripes":
        return _soft(0.5 * np.sin(two_pi * freq * (u * np.cos(orient) + v * np.sin(orient))))
    if pattern == "checker":
        return _soft(0.5 * np.sin(two_pi * freq * u) * np.sin(two_pi * freq * v) * 2)
    if pattern == "dots":
        d = (0.5 + 0.5 * np.cos(two_pi * freq * u)) * (0.5 + 0.5 * np.cos(two_pi * freq * v))
        return _soft(d - 0.35, 4.0)
    if pattern == "rings":
        return _soft(0.5 * np.sin(two_pi * freq * np.sqrt(u * u + v * v)))
    if pattern == "waves":
        w = u * np.cos(orient) + v * np.sin(orient)
        p = -u * np.sin(orient) + v * np.cos(orient)
        return _soft(0.5 * np.sin(two_pi * freq * (w + 0.25 * np.sin(two_pi * 0.8 * p))))
    if pattern == "gradient":
        return np.clip(0.5 + 0.5 * (u * np.cos(orient) + v * np.sin(orient)), 0.0, 1.0)
    return np.zeros_like(u)  # plain


# class id -> (shape, pattern, frequency (cycles per radius), orientation (rad), hue, second-colour hue shift,
#              saturation, value)
_PATTERNS = ("stripes", "checker", "dots", "rings", "waves", "plain", "gradient")
_SHAPE_ORDER = list(SHAPES)


def _class_table():
    table = {}
    freqs = (0.9, 1.4, 2.0, 2.6)
    shifts = (0.0, 0.5, 0.12, -0.2)
    for c in range(1, 21):
        k = c - 1
        table[c] = dict(
            shape=_SHAPE_ORDER[k],
            pattern=_PATTERNS[(k * 3) % len(_PATTERNS)],
            freq=freqs[(k * 7) % len(freqs)],
            orient=(k % 4) * np.pi / 4,
            hue=(k * 0.61803398875) % 1.0,
            hue2=shifts[(k * 5) % len(shifts)],
            sat=0.55 + 0.35 * ((k * 0.37) % 1.0),
            val=0.6 + 0.35 * ((k * 0.73) % 1.0),
        )
    return table


CLASS_SPECS = _class_table()


def _hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), dtype=np.float32)


# --------------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, xx, yy) -> np.ndarray:
    h = rng.uniform()
    base = _hsv(h, rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.8))
    alt = _hsv(h + rng.uniform(-0.1, 0.1), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.8))
    t = np.zeros_like(xx)
    for _ in range(2):
        f = rng.uniform(0.5, 3.0)
        a = rng.uniform(0, np.pi)
        t += 0.25 * np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 2 * np.pi))
    t += rng.uniform(-0.4, 0.4) * (xx - 0.5) + rng.uniform(-0.4, 0.4) * (yy - 0.5)
    t = np.clip(0.5 + t, 0, 1)[..., None]
    img = base * (1 - t) + alt * t
    for _ in range(rng.integers(0, 3)):  # soft distractor blobs (background, not objects)
        cx, cy, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.15)
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))[..., None]
        img = img * (1 - 0.5 * g) + 0.5 * g * _hsv(rng.uniform(), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.9))
    return img.astype(np.float32)


def _draw_object(rng, img, label, xx, yy, cls_id: int, spec: dict, value: int, scale=(0.12, 0.28),
                 extent=(1.0, 1.0)):
    cx, cy = rng.uniform(0.18, 0.82, size=2) * np.asarray(extent)  # extent: (w, h) / short side
    r = rng.uniform(*scale)
    th = rng.uniform(0, 2 * np.pi)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(th) + dy * np.sin(th)) / r
    v = (-dx * np.sin(th) + dy * np.cos(th)) / r
    inside = SHAPES[spec["shape"]](u, v)
    if not inside.any():
        return
    t = _tex(spec["pattern"], u, v, spec["freq"], spec["orient"])[..., None]
    # Hue is class-specific (with jitter) on top of shape and texture. Measured: with per-instance
    # random hue, 20 epochs of Barlow Twins on the tiny CPU backbones no longer beat random init on
    # k-NN (vit_nano 7.0 -> 5.5%, resnet_tiny 6.5 -> 5.5%), so the CPU default keeps colour as a cue.
    h = spec["hue"] + rng.uniform(-0.05, 0.05)
    s = spec["sat"] + rng.uniform(-0.1, 0.1)
    vv = spec["val"] + rng.uniform(-0.1, 0.1)
    c1 = _hsv(h, s, vv)
    c2 = _hsv(h + spec["hue2"], s * 0.85, vv * 0.45)
    col = c1 * (1 - t) + c2 * t
    img[inside] = col[inside]
    label[inside] = value


def _void_band(label: np.ndarray, width: int) -> np.ndarray:
    """Set pixels within `width` px of a label boundary to 255 (VOC's void outline)."""
    h, w = label.shape
    pad = np.pad(label, width, mode="edge")
    edge = np.zeros(label.shape, dtype=bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dx or dy:
                edge |= pad[width + dy: width + dy + h, width + dx: width + dx + w] != label
    out = label.copy()
    out[edge] = 255
    return out


def _grid(size: int, ss: int = 2, hw: Optional[tuple[int, int]] = None):
    """Pixel-centre coordinates of the supersampled grid: [0, 1]^2 for a square `size`; for ``hw=(h, w)``
    in units of the short side (x in [0, w / short], y in [0, h / short])."""
    if hw is None:
        n = size * ss
        c = (np.arange(n, dtype=np.float32) + 0.5) / n
        xx, yy = np.meshgrid(c, c)
        return xx, yy
    h, w = hw
    n = min(h, w) * ss
    xx, yy = np.meshgrid((np.arange(w * ss, dtype=np.float32) + 0.5) / n,
                         (np.arange(h * ss, dtype=np.float32) + 0.5) / n)
    return xx, yy


def _finish(rng, img_hr: np.ndarray, size: int, ss: int = 2) -> np.ndarray:
    """Supersampled float image -> anti-aliased uint8 with a colour cast and pixel noise."""
    img = img_hr.reshape(img_hr.shape[0] // ss, ss, img_hr.shape[1] // ss, ss, 3).mean(axis=(1, 3))
    img = img * rng.uniform(0.9, 1.1, size=3).astype(np.float32) + rng.uniform(-0.05, 0.05)
    img = img + rng.normal(0.0, 0.03, size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_voc_sample(seed: int, index: int, size: int, hw: Optional[tuple[int, int]] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its label map (H, W) uint8 (0..20, 255 void bands): size x size, or
    ``hw=(H, W)`` (non-square; objects placed over the whole frame, sized relative to the short side)."""
    rng = np.random.default_rng([int(seed), int(index), 7])
    ss = 2
    xx, yy = _grid(size, ss, hw)
    extent = (1.0, 1.0) if hw is None else (hw[1] / min(hw), hw[0] / min(hw))
    img = _background(rng, xx, yy)
    label = np.zeros(xx.shape, dtype=np.uint8)
    n_obj = int(rng.integers(1, 4))
    classes = rng.choice(np.arange(1, 21), size=n_obj, replace=False)
    for c in classes:
        _draw_object(rng, img, label, xx, yy, int(c), CLASS_SPECS[int(c)], int(c), extent=extent)
    out = _finish(rng, img, size, ss)
    lab = label[ss // 2:: ss, ss // 2:: ss]  # nearest from the supersampled grid
    lab = _void_band(lab, max(1, round((size if hw is None else min(hw)) / 80)))
    return out, lab


def _save_jpeg(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="JPEG", quality=92)


def _save_palette_png(label: np.ndarray, path: Path, palette) -> None:
    im = Image.fromarray(label)
    im.putpalette(palette)  # L -> P
    im.save(path, format="PNG")


# --------------------------------------------------------------------------- VOC generator
def _check_sizes(n_train: int, n_val: int, size: int, sizes=None) -> None:
    for name, v, lo in (("n_train", n_train, 1), ("n_val", n_val, 1), ("size", size, 16)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"synthetic {name}={v!r} must be an integer >= {lo}")
    if size > 2048:
        raise ConfigError(f"synthetic size={size} must be <= 2048")
    if sizes is not None:
        if not len(sizes):
            raise ConfigError("synthetic sizes=[] must list at least one WxH, e.g. 96x72,72x96")
        for wh in sizes:
            ok = (isinstance(wh, (tuple, list)) and len(wh) == 2
                  and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 16 <= v <= 2048 for v in wh))
            if not ok:
                raise ConfigError(f"synthetic sizes entry {wh!r} must be (width, height), integers in 16..2048")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"96x72,72x96"`` -> ``[(96, 72), (72, 96)]`` (width x height); ConfigError naming a bad entry."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        w, sep, h = part.partition("x")
        try:
            out.append((int(w), int(h)))
        except ValueError:
            raise ConfigError(f"--sizes entry {part!r} is not WIDTHxHEIGHT; write e.g. --sizes 96x72,72x96") from None
        if not sep:
            raise ConfigError(f"--sizes entry {part!r} is not WIDTHxHEIGHT; write e.g. --sizes 96x72,72x96")
    _check_sizes(1, 1, 16, out)
    return out


def _params(kind: str, n_train, n_val, size, seed, sizes=None, trainaug: bool = False) -> dict:
    out = {"kind": kind, "version": FORMAT_VERSION, "n_train": int(n_train), "n_val": int(n_val),
           "size": int(size), "seed": int(seed)}
    if sizes is not None:  # absent by default: the square datasets' markers (and caches) are unchanged
        out["sizes"] = [[int(w), int(h)] for w, h in sizes]
    if trainaug:  # likewise absent by default
        out["trainaug"] = True
    return out


from core.data.palette import voc_palette  # noqa: E402  (torch-free; re-exported)


def _write_voc(root: Path, n_train: int, n_val: int, size: int, seed: int, sizes=None, trainaug: bool = False) -> None:
    palette = voc_palette()
    voc = root / "VOCdevkit" / "VOC2012"
    jpg, seg, lists = voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation"
    for d in (jpg, seg, lists):
        d.mkdir(parents=True, exist_ok=True)
    n_extra = max(4, n_train // 4)  # JPEGs in no split list (VOC's detection-only images)
    total = n_train + n_val + n_extra
    rng = np.random.default_rng([int(seed), 12345])
    order = rng.permutation(total)  # interleave splits in the id space, like VOC
    ids = [f"{2007 + int(k) % 6}_{int(k):06d}" for k in range(total)]
    train_ids = sorted(ids[int(k)] for k in order[:n_train])
    val_ids = sorted(ids[int(k)] for k in order[n_train:n_train + n_val])
    labelled = set(train_ids) | set(val_ids)
    val_set, aug = set(val_ids), voc / "SegmentationClassAug"
    for k, name in enumerate(ids):
        hw = None if sizes is None else (int(sizes[k % len(sizes)][1]), int(sizes[k % len(sizes)][0]))
        img, lab = render_voc_sample(seed, k, size, hw)
        _save_jpeg(img, jpg / f"{name}.jpg")
        if name in labelled:
            _save_palette_png(lab, seg / f"{name}.png", palette)
        if trainaug and name not in val_set:
            aug.mkdir(exist_ok=True)
            Image.fromarray(lab).save(aug / f"{name}.png", format="PNG")  # SBD masks: single channel (L)
    (lists / "train.txt").write_text("\n".join(train_ids) + "\n")
    (lists / "val.txt").write_text("\n".join(val_ids) + "\n")
    (lists / "trainval.txt").write_text("\n".join(sorted(train_ids + val_ids)) + "\n")
    if trainaug:  # SBD layout: every non-val id (train + the extra images) has a SegmentationClassAug mask
        (lists / "trainaug.txt").write_text("\n".join(sorted(i for i in ids if i not in val_set)) + "\n")


def _is_complete(marker: Path, params: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def _atomic_generate(final: Path, sub: str, params: dict, writer: Callable[[Path], None], overwrite: bool) -> Path:
    """Generate into a temp sibling of ``final/sub`` then rename it into place (marker written last)."""
    final = Path(final)
    target = final / sub
    marker = target / MARKER
    if target.exists():
        if _is_complete(marker, params):
            return final
        if not overwrite:
            raise DataError(
                f"{target} already exists and is not the requested generated dataset ({params}); remove it, "
                f"choose another --out, or pass --overwrite"
            )
    tmp: Optional[Path] = None
    trash: Optional[Path] = None
    try:
        final.mkdir(parents=True, exist_ok=True)  # a read-only cache: the one DataError line below
        tmp = Path(tempfile.mkdtemp(prefix=f".{sub}-tmp-", dir=final))
        writer(tmp)
        (tmp / sub / MARKER).write_text(json.dumps(params))
        if _is_complete(marker, params):  # another process finished the same dataset meanwhile
            return final
        if target.exists():  # stale/different and overwrite=True: move it aside atomically, delete later
            trash = Path(tempfile.mkdtemp(prefix=f".{sub}-old-", dir=final))
            try:
                os.rename(target, trash / sub)
            except FileNotFoundError:
                pass
        try:
            os.rename(tmp / sub, target)
        except OSError:
            if _is_complete(marker, params):  # another process won the race with the same data
                return final
            raise
    except OSError as e:
        raise DataError(f"cannot write the generated dataset to {final}: {e.strerror or e}; check free space and "
                        "permissions, or point TWINSEG_DATA_DIR (the generated data's cache) or --out at a writable "
                        "folder") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return final


def generate_voc(out_dir: Union[str, os.PathLike], n_train: int = 96, n_val: int = 48, size: int = 64,
                 seed: int = 0, overwrite: bool = False, sizes: Optional[Sequence[tuple[int, int]]] = None,
                 trainaug: bool = False) -> Path:
    """Write a procedurally drawn dataset in VOC 2012 layout under ``out_dir/VOCdevkit``; return out_dir.

    ``sizes``: ``[(width, height), ...]``: image k (in id order of generation) is
    ``sizes[k % len(sizes)]`` (non-square, varying sizes, like VOC's 500x375 / 375x500); None: every
    image is ``size`` x ``size`` (the default output, unchanged).
    ``trainaug``: also write the SBD layout mmseg's pascal_voc12_aug.py reads: ``SegmentationClassAug/<id>.png``
    (single-channel class ids) for every non-val image (the train images and the extra ones, a superset of
    train) and ``ImageSets/Segmentation/trainaug.txt``; False (default): nothing else changes.
    Idempotent: an existing dataset generated with the same parameters is reused.
    """
    sizes = None if sizes is None else [tuple(wh) for wh in sizes]
    _check_sizes(n_train, n_val, size, sizes)
    params = _params("voc", n_train, n_val, size, seed, sizes, bool(trainaug))
    return _atomic_generate(Path(out_dir), "VOCdevkit", params,
                            lambda tmp: _write_voc(tmp, n_train, n_val, size, seed, sizes, bool(trainaug)), overwrite)


def data_cache_dir() -> Path:
    env = os.environ.get("TWINSEG_DATA_DIR")
    return Path(env).expanduser() if env else REPO_ROOT / "data"


def default_voc_root(data_cfg) -> Path:
    """``data_cfg.root`` when set; else the generated dataset (created once, cached).

    Cache: ``$TWINSEG_DATA_DIR/synthetic-<n_train>-<n_val>-<size>-<seed>`` (default ``<repo>/data``).
    """
    if getattr(data_cfg, "root", None):
        return Path(data_cfg.root).expanduser()
    n, m, s, seed = data_cfg.synthetic_n_train, data_cfg.synthetic_n_val, data_cfg.image_size, data_cfg.synthetic_seed
    # our own cache: a stale one (older generator version) is replaced
    return generate_voc(data_cache_dir() / f"synthetic-{n}-{m}-{s}-{seed}", n, m, s, seed, overwrite=True)


# --------------------------------------------------------------------------- COCO-Stuff generator
# 0-based thing ids never annotated in COCO 2017 (== core.data.coco_stuff.COCO_UNUSED_IDS; no torch here)
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def _coco_valid_ids() -> tuple[list[int], list[int]]:
    things = [i for i in range(91) if i not in COCO_UNUSED_IDS]
    stuff = list(range(91, 182))
    return things, stuff


def render_coco_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One COCO-Stuff-like image and its stuffthingmap (ids 0..181, 255 unlabeled)."""
    things, stuff = _coco_valid_ids()
    rng = np.random.default_rng([int(seed), int(index), 11])
    ss = 2
    xx, yy = _grid(size, ss)
    img = _background(rng, xx, yy)
    label = np.full(xx.shape, 255, dtype=np.uint8)
    # stuff: 2-3 regions split by random lines, each with its own textured colour
    n_stuff = int(rng.integers(2, 4))
    sids = rng.choice(stuff, size=n_stuff, replace=False)
    label[...] = sids[0]
    for sid in sids[1:]:
        a = rng.uniform(0, 2 * np.pi)
        off = rng.uniform(-0.2, 0.2)
        region = (xx - 0.5) * np.cos(a) + (yy - 0.5) * np.sin(a) > off
        label[region] = sid
    for sid in sids:
        spec = CLASS_SPECS[1 + int(sid) % 20]
        region = label == sid
        t = _tex(spec["pattern"], xx * 4, yy * 4, spec["freq"], spec["orient"])[..., None]
        col = _hsv(spec["hue"], 0.3, 0.6) * (1 - t) + _hsv(spec["hue"] + 0.1, 0.3, 0.35) * t
        img[region] = (0.5 * img + 0.5 * col)[region]
    for tid in rng.choice(things, size=int(rng.integers(1, 3)), replace=False):
        _draw_object(rng, img, label, xx, yy, int(tid), CLASS_SPECS[1 + int(tid) % 20], int(tid))
    out = _finish(rng, img, size, ss)
    lab = label[ss // 2:: ss, ss // 2:: ss].copy()
    if rng.uniform() < 0.5:  # an unlabeled patch
        y0, x0 = rng.integers(0, size // 2, size=2)
        lab[y0: y0 + size // 6, x0: x0 + size // 6] = 255
    return out, lab


def _write_coco(root: Path, n_train: int, n_val: int, size: int, seed: int) -> None:
    base = root / "cocostuff"
    k = 0
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        idir = base / "images" / split
        mdir = base / "stuffthingmaps_trainval2017" / split
        idir.mkdir(parents=True, exist_ok=True)
        mdir.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            img, lab = render_coco_sample(seed, k, size)
            name = f"{100000 + k:012d}"
            _save_jpeg(img, idir / f"{name}.jpg")
            Image.fromarray(lab).save(mdir / f"{name}.png", format="PNG")  # single channel 'L'
            k += 1


def generate_coco_stuff(out_dir: Union[str, os.PathLike], n_train: int = 16, n_val: int = 8, size: int = 64,
                        seed: int = 0, overwrite: bool = False) -> Path:
    """Tiny COCO-Stuff 164k layout; returns the dataset root ``out_dir/cocostuff`` holding
    ``images/{train2017,val2017}`` and ``stuffthingmaps_trainval2017/{train2017,val2017}``."""
    _check_sizes(n_train, n_val, size)
    params = _params("coco_stuff", n_train, n_val, size, seed)
    _atomic_generate(Path(out_dir), "cocostuff", params,
                     lambda tmp: _write_coco(tmp, n_train, n_val, size, seed), overwrite)
    return Path(out_dir) / "cocostuff"


def default_coco_root(data_cfg) -> Path:
    """``data_cfg.root`` when set; else a generated tiny COCO-Stuff (cached like the VOC one)."""
    if getattr(data_cfg, "root", None):
        return Path(data_cfg.root).expanduser()
    n, m, s, seed = data_cfg.synthetic_n_train, data_cfg.synthetic_n_val, data_cfg.image_size, data_cfg.synthetic_seed
    return generate_coco_stuff(data_cache_dir() / f"synthetic-coco-{n}-{m}-{s}-{seed}", n, m, s, seed, overwrite=True)


# --------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise ConfigError(f"{message}; see python -m core.data.synthetic --help")


def main(argv: Optional[list[str]] = None) -> int:
    p = _Parser(prog="python -m core.data.synthetic",
                description="Generate the procedural VOC-2012-layout dataset (or a tiny COCO-Stuff layout).")
    p.add_argument("--out", required=True, help="output folder (VOCdevkit/ is created inside)")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-val", type=int, default=48)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--sizes", default=None, metavar="WxH,...",
                   help="non-square images of varying sizes: image k is the (k mod n)-th WIDTHxHEIGHT (VOC only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainaug", action="store_true",
                   help="also write the SBD SegmentationClassAug/ + trainaug.txt layout (VOC only)")
    p.add_argument("--coco", action="store_true", help="write the COCO-Stuff 164k layout instead")
    p.add_argument("--overwrite", action="store_true", help="replace an existing different dataset")
    a = p.parse_args(argv)
    sizes = parse_sizes(a.sizes) if a.sizes is not None else None
    if a.coco:
        if sizes is not None:
            raise ConfigError("--sizes applies to the VOC layout only; drop --coco or --sizes")
        if a.trainaug:
            raise ConfigError("--trainaug applies to the VOC layout only; drop --coco or --trainaug")
        root = generate_coco_stuff(a.out, a.n_train, a.n_val, a.size, a.seed, overwrite=a.overwrite)
    else:
        root = generate_voc(a.out, a.n_train, a.n_val, a.size, a.seed, overwrite=a.overwrite, sizes=sizes,
                            trainaug=a.trainaug)
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    from core.cli import guard

    sys.exit(guard(main)())
