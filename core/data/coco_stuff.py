"""COCO-Stuff 164k semantic segmentation with the fine (171) and coarse (27) label spaces.

Layout: ``ROOT/images/{train2017,val2017}/*.jpg`` and
``ROOT/stuffthingmaps_trainval2017/{train2017,val2017}/*.png`` (single-channel maps of ids 0..181:
0-90 things, 91-181 stuff, 255 unlabeled), as distributed by https://github.com/nightrome/cocostuff.

- ``fine``: the 182 ids minus the 11 thing ids COCO never annotates (street sign, hat, shoe, eye
  glasses, plate, mirror, window, desk, door, blender, hair brush) -> contiguous 0..170.
- ``coarse``: the 27 supercategories of IIC / PiCIE / STEGO: things -> 0..11, stuff -> 12..26.
  255 stays 255 (ignored) in both; the unused ids also map to 255.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from core.data.voc import _SkippingDataset, _to_sample, load_image_tensor, load_label_map
from core.errors import DataError

IGNORE_INDEX = 255

# 0-based ids of the 182-id space (labels.txt of cocostuff minus 1).
COCO_STUFF_182_NAMES: tuple[str, ...] = (
    # things 0..90
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
    # stuff 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
assert len(COCO_STUFF_182_NAMES) == 182

# Thing ids present in the 182-id space but never annotated in COCO 2017 (0-based).
COCO_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

FINE_IDS: tuple[int, ...] = tuple(i for i in range(182) if i not in COCO_UNUSED_IDS)
COCO_FINE_CLASSES: tuple[str, ...] = tuple(COCO_STUFF_182_NAMES[i] for i in FINE_IDS)
assert len(COCO_FINE_CLASSES) == 171

# Coarse (27) supercategories, index order as in STEGO / PiCIE / IIC ("cocostuff27"):
# things 0-11, stuff 12-26.
COCO_COARSE_CLASSES: tuple[str, ...] = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water",
)

# fine (182-id, 0-based) -> coarse (27). Copied verbatim from the `fine_to_coarse` table of STEGO
# (mhamilton723/STEGO, src/data.py, class Coco), which is PiCIE's (janghyuncho/PiCIE) mapping of
# the cocostuff supercategories (IIC's "cocostuff27" split). Listed here as fine_to_coarse[i], i = 0..181.
COCO_FINE_TO_COARSE: tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7,  # 0-19
    7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10,  # 20-39
    10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2,  # 40-59
    2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1,  # 60-79
    1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,  # 80-99
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,  # 100-119
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21,  # 120-139
    17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24,  # 140-159
    15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19,  # 160-179
    19, 24,  # 180-181
)
assert len(COCO_FINE_TO_COARSE) == 182


def _lut(labels: str) -> np.ndarray:
    """256-entry lookup table raw id -> training id (255 for unlabeled / unused / out of range)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if labels == "fine":
        for new, old in enumerate(FINE_IDS):
            lut[old] = new
    elif labels == "coarse":
        for old in FINE_IDS:
            lut[old] = COCO_FINE_TO_COARSE[old]
    else:
        raise DataError(f"coco_labels={labels!r} is unknown; choose fine (171 classes) or coarse (27 classes)")
    return lut


HOW_TO_GET = ("download COCO-Stuff 164k (images/{train2017,val2017} and stuffthingmaps_trainval2017.zip, see "
              "github.com/nightrome/cocostuff) or generate a tiny one with "
              "`python -m core.data.synthetic --coco --out DIR` (root is DIR/cocostuff)")


def resolve_coco_root(root: Union[str, os.PathLike]) -> Path:
    if root is None:
        raise DataError(f"COCO-Stuff root is not set; {HOW_TO_GET}")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataError(f"COCO-Stuff root {p} does not exist; {HOW_TO_GET}")
    if not (p / "images").is_dir() and (p / "cocostuff" / "images").is_dir():
        p = p / "cocostuff"
    return p


def coco_split_dirs(root: Union[str, os.PathLike], split: str) -> tuple[Path, Path]:
    if split not in ("train", "val"):
        raise DataError(f"COCO-Stuff split {split!r} is unknown; choose train or val")
    p = resolve_coco_root(root)
    img_dir = p / "images" / f"{split}2017"
    map_dir = p / "stuffthingmaps_trainval2017" / f"{split}2017"
    for d in (img_dir, map_dir):
        if not d.is_dir():
            raise DataError(f"COCO-Stuff folder {d} is missing; {HOW_TO_GET}")
    return img_dir, map_dir


def coco_images(root: Union[str, os.PathLike], split: str = "train") -> list[Path]:
    img_dir, _ = coco_split_dirs(root, split)
    paths = sorted(q for q in img_dir.iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise DataError(f"no images in {img_dir}; {HOW_TO_GET}")
    return paths


class COCOStuff(_SkippingDataset):
    """``ds[i] -> (image uint8 (3, H, W), mask int64 (H, W))`` in the chosen label space (255 ignored)."""

    ignore_index = IGNORE_INDEX

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", labels: str = "coarse",
                 transform: Optional[Callable] = None, corrupt_policy: str = "stop", limit: Optional[int] = None):
        self._init_policy(corrupt_policy)
        self.lut = _lut(labels)
        self.labels = labels
        self.num_classes = 171 if labels == "fine" else 27
        self.class_names = COCO_FINE_CLASSES if labels == "fine" else COCO_COARSE_CLASSES
        self.split = split
        self.transform = transform
        img_dir, map_dir = coco_split_dirs(root, split)
        self.images = coco_images(root, split)
        if limit is not None:
            self.images = self.images[: int(limit)]
        self.masks = [map_dir / f"{q.stem}.png" for q in self.images]
        missing = [m for m in self.masks if not m.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"label map {missing[0]} is missing{more} for an image in {img_dir}; "
                            f"unpack stuffthingmaps_trainval2017.zip next to images/")
        self.root = resolve_coco_root(root)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        return f"COCO-Stuff {self.split} at {self.root}"

    def load_mask(self, index: int) -> np.ndarray:
        path = self.masks[index]
        raw = load_label_map(path)
        bad = np.unique(raw[(raw >= 182) & (raw != 255)])
        if bad.size:
            shown = ", ".join(str(int(v)) for v in bad[:8])
            raise DataError(f"label map {path} has values outside the COCO-Stuff ids {{0..181, 255}}: {shown}; "
                            f"use stuffthingmaps (0-based ids) or set data.corrupt_policy=skip")
        return self.lut[raw]

    def _load(self, index: int):
        img = load_image_tensor(self.images[index])
        mask = self.load_mask(index)
        h, w = (int(v) for v in img.shape[-2:])
        if mask.shape != (h, w):
            raise DataError(f"label map {self.masks[index]} is {mask.shape[1]}x{mask.shape[0]} but image "
                            f"{self.images[index]} is {w}x{h}; they must have the same size")
        return _to_sample(img, mask, self.transform)
