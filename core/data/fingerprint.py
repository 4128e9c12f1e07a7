"""What data a run used, as a comparable record: part of a result's identity (core/runs/identity.py).

`data_fingerprint(data_cfg)` -> ``{"roots": [{"role", "path", "files", "bytes", "digest", "generator"}, ...]}``:
one entry per folder the run reads (the dataset root: for VOC its ``VOC2012/`` folder; the ImageFolder of
``data.ssl_root``), each with the number and total size of its files, a sha256 over the sorted
``relative path, size`` lines (ids and sizes: a file added, removed, renamed or rewritten with another size
changes it; copying the folder elsewhere does not) and, for a dataset written by core.data.synthetic, the
generator's parameters from its marker file (seed included: a regeneration with another seed at the same path is
another dataset even where every file keeps its size). The generated default dataset (``data.root`` none) is
identified by its generator parameters alone: it is a pure function of them (`core.data.synthetic.FORMAT_VERSION`
names the drawing), so a deleted cache regenerated later is the same data.

Only names and sizes are read (``os.scandir``; no file content but the small marker), so the fingerprint of a full
VOC 2012 + SBD tree (~30k files) costs well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional


def _walk(root: Path, out: list[tuple[str, int]], rel: str = "") -> None:
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        name = f"{rel}{e.name}"
        try:
            if e.is_dir(follow_symlinks=True):
                _walk(Path(e.path), out, name + "/")
            elif e.is_file(follow_symlinks=True):
                out.append((name, e.stat(follow_symlinks=True).st_size))
        except OSError:
            continue


def folder_fingerprint(root, role: str) -> dict:
    """The record of one data folder (see the module docstring); a missing folder has 0 files."""
    root = Path(root).expanduser().resolve()
    files: list[tuple[str, int]] = []
    _walk(root, files)
    files.sort()
    h = hashlib.sha256()
    for name, size in files:
        h.update(f"{name}\t{size}\n".encode("utf-8", "surrogateescape"))
    return {"role": role, "path": str(root), "files": len(files), "bytes": sum(s for _, s in files),
            "digest": h.hexdigest(), "generator": generator_marker(root)}


def generator_marker(root) -> Optional[dict]:
    """The parameters core/data/synthetic.py recorded in a folder it generated (its marker file, in the folder,
    its parent or its VOCdevkit/), or None for data it did not make."""
    from core.data.synthetic import MARKER

    root = Path(root).expanduser()
    for cand in (root / MARKER, root.parent / MARKER, root / "VOCdevkit" / MARKER):
        try:
            return json.loads(cand.read_text())
        except (OSError, ValueError):
            continue
    return None


def _generated_params(data_cfg) -> dict:
    from core.data.synthetic import FORMAT_VERSION

    return {"dataset": data_cfg.dataset, "n_train": data_cfg.synthetic_n_train, "n_val": data_cfg.synthetic_n_val,
            "size": data_cfg.image_size, "seed": data_cfg.synthetic_seed, "format": FORMAT_VERSION}


def _dataset_folder(data_cfg) -> Optional[Path]:
    """The folder the dataset's files are read from (None: the generated default dataset)."""
    if data_cfg.dataset == "imagefolder":
        r = data_cfg.root or data_cfg.ssl_root
        return None if r is None else Path(r)
    if not data_cfg.root:
        return None
    if data_cfg.dataset == "voc":
        from core.data.voc import resolve_voc_root
        from core.errors import DataError

        try:
            return resolve_voc_root(data_cfg.root)
        except DataError:  # no layout: the run refuses it later; fingerprint what is there
            return Path(data_cfg.root)
    return Path(data_cfg.root)


def data_roots(data_cfg) -> list[Path]:
    """The folders a run of `data_cfg` reads (resolved): what an output folder must not overlap."""
    from core.data.synthetic import data_cache_dir

    out = []
    for r in (data_cfg.root, data_cfg.ssl_root):
        if r:
            out.append(Path(r).expanduser().resolve())
    if not data_cfg.root and data_cfg.dataset != "imagefolder":
        out.append(data_cache_dir().expanduser().resolve())
    return out


def data_fingerprint(data_cfg) -> dict:
    """The comparable record of the data `data_cfg` designates (see the module docstring)."""
    roots = []
    folder = _dataset_folder(data_cfg)
    if folder is None and data_cfg.dataset != "imagefolder":
        roots.append({"role": "dataset", "generated": _generated_params(data_cfg)})
    elif folder is not None:
        roots.append(folder_fingerprint(folder, "dataset"))
    if data_cfg.ssl_root and (data_cfg.dataset != "imagefolder" or data_cfg.root):
        roots.append(folder_fingerprint(data_cfg.ssl_root, "ssl_root"))
    return {"roots": roots}


def describe_change(old: dict, new: dict) -> Optional[str]:
    """One phrase saying how the data record `new` differs from `old` (None: the same data)."""
    a, b = list(old.get("roots", [])), list(new.get("roots", []))
    if a == b:
        return None
    parts = []
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else {}
        y = b[i] if i < len(b) else {}
        if x == y:
            continue
        where = y.get("path") or x.get("path") or "the generated dataset"
        if x.get("generated") != y.get("generated") and ("generated" in x or "generated" in y):
            parts.append(f"{where}: generator {x.get('generated')} -> {y.get('generated')}")
        elif x.get("generator") != y.get("generator"):
            gx, gy = x.get("generator") or {}, y.get("generator") or {}
            keys = sorted(k for k in set(gx) | set(gy) if gx.get(k) != gy.get(k))
            what = ", ".join(f"{k} {gx.get(k)} -> {gy.get(k)}" for k in keys) or "marker changed"
            parts.append(f"{where} was regenerated ({what})")
        elif x.get("files") != y.get("files") or x.get("bytes") != y.get("bytes"):
            parts.append(f"{where}: {x.get('files')} files / {x.get('bytes')} bytes -> "
                         f"{y.get('files')} files / {y.get('bytes')} bytes")
        else:
            parts.append(f"{where}: file names or sizes changed")
    return "; ".join(parts) or "the data folders differ"
