"""PASCAL VOC 2012 semantic segmentation (and the SBD `trainaug` extension).

Layout (standard): ``ROOT/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
ImageSets/Segmentation/{train,val,trainval}.txt}``; optional SBD ``SegmentationClassAug/`` with
``ImageSets/Segmentation/trainaug.txt`` (or ``train_aug.txt``; or mmseg's ``aug.txt``, SBD minus VOC train and val,
which open-mmlab/mmsegmentation configs/_base_/datasets/pascal_voc12_aug.py concatenates with train.txt): split
``trainaug``. As mmseg, a train id takes its mask from ``SegmentationClass/``, every other id from
``SegmentationClassAug/``; val ids are always dropped. ``root`` may point at the folder holding ``VOCdevkit/``,
at ``VOCdevkit/`` or at ``VOC2012/``.

Masks are palette ("P") PNGs whose indices are the class ids 0..20; 255 is "void" (object
boundaries, difficult regions) and is kept as 255 everywhere (ignored by losses and metrics; the
seed code mapped it to background, which is wrong).

Errors are one-line `DataError`s naming the path and the fix. Layout is validated at construction;
file contents lazily at load time (corrupt JPEG/PNG, mask values outside {0..20, 255}, image/mask
size mismatch). With ``corrupt_policy="skip"`` a bad sample is replaced by the next good one and
counted (``dataset.skipped``, shared with DataLoader worker processes).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from core.errors import DataError

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_CLASSES = 21
IGNORE_INDEX = 255
VOC_SPLITS = ("train", "val", "trainval", "trainaug")
SSL_SPLITS = ("train", "trainaug", "all_but_val")

HOW_TO_GET = ("generate one with `python -m core.data.synthetic --out DIR` or download VOC 2012 "
              "(VOCtrainval_11-May-2012.tar) and pass the folder holding VOCdevkit/")


from core.data.palette import voc_palette as _voc_palette  # noqa: E402


VOC_PALETTE: list[int] = _voc_palette()  # flat, 768 ints (PIL putpalette format)


def palette_array(palette: Sequence[int] = VOC_PALETTE) -> np.ndarray:
    """(256, 3) uint8 view of a flat palette: ``palette_array()[mask]`` colours a label map."""
    return np.asarray(palette, dtype=np.uint8).reshape(-1, 3)


# --------------------------------------------------------------------------- layout
def resolve_voc_root(root: Union[str, os.PathLike]) -> Path:
    """Return the ``VOC2012`` folder for ``root`` (holder of VOCdevkit/, VOCdevkit/ or VOC2012/)."""
    if root is None:
        raise DataError(f"VOC root is not set; {HOW_TO_GET}")
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"VOC root {p} does not exist; {HOW_TO_GET}")
    if not p.is_dir():
        raise DataError(f"VOC root {p} is not a folder; {HOW_TO_GET}")
    for cand in (p / "VOCdevkit" / "VOC2012", p / "VOC2012", p):
        if (cand / "JPEGImages").is_dir() or (cand / "ImageSets").is_dir():
            return cand
    raise DataError(
        f"no VOC 2012 layout under {p}: expected {p / 'VOCdevkit' / 'VOC2012' / 'JPEGImages'}; {HOW_TO_GET}"
    )


def _read_ids(list_file: Path) -> list[str]:
    """The ids of a split list, one per line (first word). Read as ``utf-8-sig``: a UTF-8 byte-order mark
    (Windows editors write one) is dropped instead of becoming an invisible first character of the first id.
    An id listed twice is refused (DataError naming the count and the first ones): it would silently weigh an
    image twice in training and count its pixels twice in the val scores."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"cannot read split list {list_file}: {e.strerror or e}; check the file permissions") from None
    except UnicodeDecodeError as e:
        raise DataError(f"split list {list_file} is not UTF-8 text ({e.reason} at byte {e.start}); write one image id "
                        f"per line") from None
    ids = [ln.strip().split()[0] for ln in text.splitlines() if ln.strip()]
    if not ids:
        raise DataError(f"split list {list_file} is empty; regenerate the dataset or restore the file")
    seen: set[str] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]
    if dup:
        first = ", ".join(dict.fromkeys(dup[:5]))
        raise DataError(f"split list {list_file} lists {len(dup)} id(s) more than once (first: {first}); remove the "
                        f"repeated lines")
    return ids


def check_no_overlap(voc: Path, split: str, ids: Sequence[str]) -> None:
    """Refuse (one-line DataError: count + first ids) a train list holding val ids or a val list holding train
    ids: the val images would be trained on and the val scores (and the k-NN monitor) would be inflated. Only
    train / val are checked (trainval holds both by definition; trainaug drops val ids, see `_list_ids`), and
    only when the other list exists."""
    other = {"train": "val", "val": "train"}.get(split)
    if other is None:
        return
    f = voc / "ImageSets" / "Segmentation" / f"{other}.txt"
    if not f.is_file():
        return
    other_ids = set(_read_ids(f))
    both = [i for i in ids if i in other_ids]
    if both:
        first = ", ".join(both[:5])
        raise DataError(f"{len(both)} id(s) of {voc / 'ImageSets' / 'Segmentation' / (split + '.txt')} are also in "
                        f"{f.name} (first: {first}); train and val must not share images: remove them from one list")


def _split_list_file(voc: Path, split: str) -> Path:
    seg = voc / "ImageSets" / "Segmentation"
    if split == "trainaug":
        # aug.txt: mmseg's converter (tools/dataset_converters/voc_aug.py) writes SBD minus VOC train and val;
        # pascal_voc12_aug.py trains on train.txt (SegmentationClass) + aug.txt (SegmentationClassAug)
        for name in ("trainaug.txt", "train_aug.txt", "aug.txt"):
            if (seg / name).is_file():
                return seg / name
        raise DataError(
            f"split 'trainaug' needs {seg / 'trainaug.txt'} (or mmseg's aug.txt) and {voc / 'SegmentationClassAug'} "
            f"(SBD augmented set, 10,582 images); add them or use split 'train'"
        )
    f = seg / f"{split}.txt"
    if not f.is_file():
        raise DataError(f"split list {f} is missing; {HOW_TO_GET}")
    return f


def _list_ids(voc: Path, split: str, list_file: Path) -> list[str]:
    """The ids of `split` from its list file; trainaug from mmseg's ``aug.txt`` is train.txt + aug.txt (as
    pascal_voc12_aug.py concatenates them), and trainaug never holds a val id."""
    ids = _read_ids(list_file)
    if split != "trainaug":
        check_no_overlap(voc, split, ids)
        return ids
    if list_file.name == "aug.txt":
        ids = _read_ids(_split_list_file(voc, "train")) + ids
    val_ids = set(_read_ids(_split_list_file(voc, "val")))
    seen: set[str] = set()
    out = [i for i in ids if i not in val_ids and not (i in seen or seen.add(i))]
    if not out:
        raise DataError(f"split list {list_file} holds only val ids; list the SBD train ids there")
    return out


def split_ids(root: Union[str, os.PathLike], split: str) -> list[str]:
    """Image ids listed for a segmentation split (train / val / trainval / trainaug)."""
    if split not in VOC_SPLITS:
        raise DataError(f"VOC split {split!r} is unknown; choose one of: {', '.join(VOC_SPLITS)}")
    voc = resolve_voc_root(root)
    return _list_ids(voc, split, _split_list_file(voc, split))


def validate_voc_root(root: Union[str, os.PathLike], splits: Iterable[str] = ("train", "val")) -> Path:
    """Check the layout (folders, split lists, listed files) before any training; return VOC2012/."""
    voc = resolve_voc_root(root)
    for split in splits:
        VOCSegmentation(voc, split)
    return voc


# --------------------------------------------------------------------------- loading helpers
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _high_bit_to_8bit(im: Image.Image, path: Path) -> Image.Image:
    """A 16-bit greyscale image (PIL mode I;16*, or I holding values 0..65535 as older Pillow reads 16-bit PNGs)
    as 8-bit RGB, scaled by its bit depth (v * 255 / 65535, rounded); ``convert("RGB")`` would clip every value
    above 255 to white. Wider values (mode I beyond 16 bits, negative) are refused in one line."""
    a = np.asarray(im)
    if im.mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise DataError(f"image {path} is a 32-bit integer image (values {int(a.min())}..{int(a.max())}); convert it "
                        f"to 8-bit RGB (or 16-bit) first")
    g = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.stack([g, g, g], -1)), "RGB")


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an RGB image; DataError naming the file when it is corrupt. 16-bit greyscale images
    are scaled to 8 bits (`_high_bit_to_8bit`)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in HIGH_BIT_MODES:
                return _high_bit_to_8bit(im, path)
            return im.convert("RGB")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image {path} is missing; restore it or remove its id from the split list") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"replace the file or set data.corrupt_policy=skip") from None


def load_image_tensor(path: Path) -> torch.Tensor:
    """`load_image` as a uint8 (3, H, W) tensor. JPEGs are decoded by ``torchvision.io.decode_jpeg`` straight
    into a tensor (the same libjpeg-turbo pixels as PIL, measured identical on VOC-size JPEGs, without PIL's
    image object and the array copy: ~0.4 ms less per 500x375 image); any file it cannot decode goes through
    `load_image` (which names the file in its DataError)."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        try:
            from torchvision.io import ImageReadMode, decode_jpeg, read_file

            return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError, ValueError):
            pass
    img = load_image(path)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def load_label_map(path: Path) -> np.ndarray:
    """Decode a label PNG (palette 'P' or single channel 'L'; a 16-bit single-channel one whose values are all
    <= 255 too) to an (H, W) uint8 array of class ids."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in HIGH_BIT_MODES:
                a = np.asarray(im)
                if a.size and (int(a.min()) < 0 or int(a.max()) > 255):
                    raise DataError(
                        f"mask {path} is a {im.mode} image with values up to {int(a.max())}; class-id masks hold "
                        f"0..255 (255 = ignore): write an 8-bit palette (P) or single-channel (L) PNG of class ids"
                    )
                return a.astype(np.uint8)
            if im.mode not in ("P", "L"):
                raise DataError(
                    f"mask {path} has mode {im.mode}; expected a palette (P) or single-channel (L) PNG of class "
                    f"ids (colour-rendered masks are not label maps)"
                )
            return np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"mask {path} is missing; restore it or remove its id from the split list") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"mask {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"replace the file or set data.corrupt_policy=skip") from None


def check_label_values(mask: np.ndarray, path: Path, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
    a = np.asarray(mask)
    outside = a >= num_classes  # two vector compares: ~0.04 ms on a VOC mask (np.unique ~2.5 ms, bincount 0.26)
    if a.dtype.kind == "i":
        outside |= a < 0
    outside &= a != ignore_index
    if outside.any():
        bad = np.unique(a[outside])
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
        raise DataError(
            f"mask {path} has values outside the label space {{0..{num_classes - 1}, {ignore_index}}}: {shown}; "
            f"use class-id masks (not colour/0-255 scaled) or set data.corrupt_policy=skip"
        )


class _SkipCounter:
    """A skip counter shared with DataLoader workers (fork or spawn); falls back to a local int."""

    def __init__(self) -> None:
        try:
            self._v = multiprocessing.Value("i", 0)
        except (OSError, PermissionError):  # pragma: no cover - e.g. no /dev/shm
            self._v = None
        self._local = 0

    def incr(self) -> None:
        if self._v is not None:
            with self._v.get_lock():
                self._v.value += 1
        else:
            self._local += 1

    @property
    def value(self) -> int:
        return int(self._v.value) if self._v is not None else self._local

    def __getstate__(self):
        from multiprocessing.context import get_spawning_popen

        # A shared Value can only travel to a process being spawned (DataLoader workers); anything
        # else that pickles the dataset (Ray, deepcopy) gets a fresh local counter.
        if get_spawning_popen() is None:
            return {"_v": None, "_local": self.value}
        return {"_v": self._v, "_local": self._local}

    def __setstate__(self, state):
        self.__dict__.update(state)


class _SkippingDataset(torch.utils.data.Dataset):
    """Base: `__getitem__` loads via `_load(i)`; with policy "skip" bad samples are skipped."""

    corrupt_policy: str = "stop"

    def _init_policy(self, corrupt_policy: str) -> None:
        if corrupt_policy not in ("stop", "skip"):
            raise DataError(f"corrupt_policy={corrupt_policy!r} is not allowed; choose stop or skip")
        self.corrupt_policy = corrupt_policy
        self._counter = _SkipCounter()
        self.skipped_files: list[str] = []  # this process only
        self._bad: set[int] = set()

    @property
    def skipped(self) -> int:
        """Number of bad samples skipped so far (all DataLoader workers together)."""
        return self._counter.value

    def _load(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(index)
        if self.corrupt_policy == "stop":
            return self._load(index)
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except DataError as e:
                self._bad.add(j)
                self._counter.incr()
                self.skipped_files.append(str(e))
                log.warning("skipping bad sample: %s", e)
        raise DataError(f"all {n} samples of {self.describe()} are unreadable; check the dataset files")

    def describe(self) -> str:
        return type(self).__name__


# --------------------------------------------------------------------------- dataset
class VOCSegmentation(_SkippingDataset):
    """VOC 2012 segmentation: ``ds[i] -> (image uint8 (3, H, W), mask int64 (H, W))``.

    ``transform(image, mask)``, when given, is a joint transform called with a
    ``tv_tensors.Image`` (uint8) and a ``tv_tensors.Mask`` (uint8, H x W); its outputs (image, mask[, more])
    are returned as plain tensors, a uint8 mask kept uint8 (the training transforms: 255 = ignore fits, the
    loss converts on the device), any other mask cast to int64.
    """

    num_classes = NUM_CLASSES
    class_names = VOC_CLASSES
    ignore_index = IGNORE_INDEX
    palette = VOC_PALETTE

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", transform: Optional[Callable] = None,
                 corrupt_policy: str = "stop", limit: Optional[int] = None):
        self._init_policy(corrupt_policy)
        if split not in VOC_SPLITS:
            raise DataError(f"VOC split {split!r} is unknown; choose one of: {', '.join(VOC_SPLITS)}")
        self.voc_dir = resolve_voc_root(root)
        self.split = split
        self.transform = transform
        img_dir = self.voc_dir / "JPEGImages"
        mask_dir = self.voc_dir / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
        list_file = _split_list_file(self.voc_dir, split)  # trainaug: explains SBD when missing
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise DataError(f"VOC folder {d} is missing; {HOW_TO_GET}")
        ids = _list_ids(self.voc_dir, split, list_file)  # trainaug: val ids dropped
        if limit is not None:
            ids = ids[: int(limit)]
        self.ids = ids
        self.images = [img_dir / f"{i}.jpg" for i in ids]
        if split == "trainaug":  # as mmseg: VOC's own (finer) masks for the train ids, SBD's for the others
            voc_train = set(_read_ids(_split_list_file(self.voc_dir, "train")))
            seg_dir = self.voc_dir / "SegmentationClass"
            self.masks = [(seg_dir if i in voc_train else mask_dir) / f"{i}.png" for i in ids]
        else:
            self.masks = [mask_dir / f"{i}.png" for i in ids]
        missing = [p for pair in zip(self.images, self.masks) for p in pair if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"{missing[0]} is missing{more} but its id is listed in {list_file}; restore the files or "
                f"regenerate the dataset"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self) -> str:
        return f"VOC {self.split} at {self.voc_dir}"

    def load_mask(self, index: int) -> np.ndarray:
        path = self.masks[index]
        mask = load_label_map(path)
        check_label_values(mask, path, NUM_CLASSES)
        return mask

    def _load(self, index: int):
        img_path = self.images[index]
        image = load_image_tensor(img_path)
        mask = self.load_mask(index)
        h, w = (int(v) for v in image.shape[-2:])
        if mask.shape != (h, w):
            raise DataError(
                f"mask {self.masks[index]} is {mask.shape[1]}x{mask.shape[0]} but image {img_path} is "
                f"{w}x{h}; image and mask must have the same size"
            )
        return _to_sample(image, mask, self.transform)


def _to_sample(img, mask: np.ndarray, transform: Optional[Callable]):
    """``(image uint8 (3, H, W), mask int64 (H, W))`` without a transform; else the transform's outputs as plain
    tensors (image, mask[, more]), the mask kept uint8 when the transform returns uint8 (255 = ignore fits: the
    training loaders hand uint8 to the device, the loss converts to int64 there) and int64 otherwise."""
    from torchvision import tv_tensors

    if isinstance(img, torch.Tensor):
        image = img
    else:
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    m = torch.from_numpy(np.ascontiguousarray(mask))
    if transform is None:
        return image, m.long()
    out = transform(tv_tensors.Image(image), tv_tensors.Mask(m))
    image, m = out[0].as_subclass(torch.Tensor), out[1].as_subclass(torch.Tensor)
    if m.dtype != torch.uint8:
        m = m.long()
    return (image, m, *out[2:])


# --------------------------------------------------------------------------- SSL sources / labels
def voc_ssl_images(root: Union[str, os.PathLike], split: str = "train") -> list[Path]:
    """JPEGs used for self-supervision; never a seg-val image.

    ``train``: the seg train list; ``trainaug``: SBD trainaug (minus any val id);
    ``all_but_val``: every JPEG in JPEGImages/ except the seg val ids (detection-only images included).
    """
    if split not in SSL_SPLITS:
        raise DataError(f"SSL split {split!r} is unknown; choose one of: {', '.join(SSL_SPLITS)}")
    voc = resolve_voc_root(root)
    img_dir = voc / "JPEGImages"
    if not img_dir.is_dir():
        raise DataError(f"VOC folder {img_dir} is missing; {HOW_TO_GET}")
    val_ids = set(_read_ids(_split_list_file(voc, "val")))
    if split == "all_but_val":
        paths = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p.stem not in val_ids)
        if not paths:
            raise DataError(f"no JPEG images outside the val list in {img_dir}; {HOW_TO_GET}")
        return paths
    ids = [i for i in _list_ids(voc, split, _split_list_file(voc, split)) if i not in val_ids]
    paths = [img_dir / f"{i}.jpg" for i in ids]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]} is missing but listed in the {split} split; restore it or regenerate the dataset")
    return paths


def image_label_from_mask(mask, num_classes: int = NUM_CLASSES, background: Optional[int] = 0,
                          ignore_index: int = IGNORE_INDEX) -> int:
    """Image-level label for k-NN: the non-background class with the most pixels, 0 if none.

    ``background=None`` counts every class (e.g. COCO-Stuff, where stuff fills the image).
    255 (void) never counts.
    """
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    m = m.reshape(-1).astype(np.int64)
    m = m[(m >= 0) & (m < num_classes) & (m != ignore_index)]
    counts = np.bincount(m, minlength=num_classes)
    if background is not None:
        counts[background] = 0
    if counts.sum() == 0:
        return int(background) if background is not None else 0
    return int(np.argmax(counts))
