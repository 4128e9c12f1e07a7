"""Unlabeled images for self-supervision: an ImageFolder tree (class subfolders, e.g. ImageNet
``train/n01440764/*.JPEG``) or a flat folder of images, or any explicit list of paths.

`UnlabeledImages(paths, transform)` is the dataset behind every SSL source (VOC lists too):
``ds[i] -> transform(PIL RGB image)`` (or a uint8 (3, H, W) tensor without transform); a transform with
``tensor_input = True`` (the SSL `MultiViewTransform`) gets the uint8 (3, H, W) tensor decoded straight from
the file (`core.data.voc.load_image_tensor`, no PIL image object). Corrupt
files -> one-line DataError naming the file, or skipped and counted with ``corrupt_policy="skip"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from core.data.voc import _SkippingDataset, load_image, load_image_tensor
from core.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def list_images(root: Union[str, os.PathLike]) -> list[Path]:
    """Every image under ``root`` (recursive, sorted, hidden entries skipped)."""
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"image folder {p} does not exist; point data.ssl_root (or data.root) at an ImageFolder "
                        f"tree such as imagenet/train")
    if not p.is_dir():
        raise DataError(f"image folder {p} is not a folder; point it at a folder of images or class subfolders")
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not out:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {p}; expected files or class "
                        f"subfolders of images")
    return out


def imagefolder_classes(root: Union[str, os.PathLike]) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class names) for a tree with one subfolder per class; DataError if flat."""
    p = Path(root).expanduser()
    paths = list_images(p)
    classes = sorted({q.relative_to(p).parts[0] for q in paths if len(q.relative_to(p).parts) > 1})
    if not classes:
        raise DataError(f"{p} has no class subfolders; labelled ImageFolder needs root/<class>/<image>")
    idx = {c: i for i, c in enumerate(classes)}
    pairs = [(q, idx[q.relative_to(p).parts[0]]) for q in paths if len(q.relative_to(p).parts) > 1]
    return [q for q, _ in pairs], [y for _, y in pairs], classes


class UnlabeledImages(_SkippingDataset):
    """Dataset over image paths: ``ds[i] -> transform(PIL image)`` (uint8 CHW tensor when no transform)."""

    def __init__(self, paths: Sequence[Union[str, os.PathLike]], transform: Optional[Callable] = None,
                 corrupt_policy: str = "stop", labels: Optional[Sequence[int]] = None, name: str = "images"):
        self._init_policy(corrupt_policy)
        self.paths = [Path(q) for q in paths]
        if not self.paths:
            raise DataError(f"the {name} image list is empty; check the dataset root and split")
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> str:
        return f"{self.name} ({len(self.paths)} files from {self.paths[0].parent})"

    def _load(self, index: int):
        if self.transform is None or getattr(self.transform, "tensor_input", False):
            img = load_image_tensor(self.paths[index])
            out = img if self.transform is None else self.transform(img)
        else:
            out = self.transform(load_image(self.paths[index]))
        if self.labels is not None:
            return out, self.labels[index]
        return out


class ImageFolderImages(UnlabeledImages):
    """All images of an ImageFolder-style tree (class subfolders or flat), labels ignored."""

    def __init__(self, root: Union[str, os.PathLike], transform: Optional[Callable] = None,
                 corrupt_policy: str = "stop", limit: Optional[int] = None):
        paths = list_images(root)
        if limit is not None:
            paths = paths[: int(limit)]
        super().__init__(paths, transform, corrupt_policy, name=f"ImageFolder {root}")
        self.root = Path(root)
