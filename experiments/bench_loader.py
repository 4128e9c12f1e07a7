"""Loader throughput: images/s of ONE DataLoader worker per training recipe, no model step.

    python experiments/bench_loader.py                       # generated 500x375 / 375x500 JPEGs, all recipes
    python experiments/bench_loader.py --root /data/voc --recipes bt,dino --images 512

What a training step receives from the loader is timed: decode, the recipe's CPU transforms, collate, and
the hand-over to the main process (shared memory), with ``num_workers`` worker processes (default 1, so
img/s is per worker) over JPEGs of VOC's size. Recipes (``--recipes``), at the paper's sizes:

- ``bt``: Barlow Twins' two views at ``--image-size`` (224) with ``gpu_augment`` (the CPU crops and flips;
  colour / blur / solarize run on the device): `core.data.transforms.BarlowTwinsTransform`;
- ``dino``: DINO's 2 global crops at ``--image-size`` + ``--local-crops`` (6) local crops of ``--local-size``
  (96) with ``gpu_augment``: `DINOTransform`;
- ``seg``: the simple segmentation train transform at ``--image-size`` (`SegTrainTransform`);
- ``seg_mmseg``: mmseg's VOC train pipeline of paper.yaml, crop ``--crop-size`` (512), RandomResize
  short side ``--crop-size`` x 0.5-2.0, cat_max_ratio 0.75, flip, photometric distortion
  (`MMSegTrainTransform`: the worker cuts each crop's uint8 source region; resize, crop, flip, pad and the
  photometric part run on the device, not timed here).

Each recipe: one untimed batch (worker start-up), then ``--images`` images timed; img/s per worker =
images / seconds / workers, and its ratio to ``--target`` (190 img/s per worker = 1,500 img/s per GPU with
8 workers, with some headroom). ``img/cpu-s`` = images per CPU-second of the worker processes (user + system
time from /proc): what a worker gives with a core to itself, the number to compare on a shared, loaded
machine where wall-clock img/s mostly measures waiting for a core. ``bytes/img`` is the size of one image's
share of the batch handed over (uint8: a quarter of float32's).
Without ``--root`` the JPEGs are generated once (`core.data.synthetic`, ``--generate`` images, half
500x375, half 375x500) under ``data/bench-loader-<n>``. A bad flag ends in one ``twinseg: error: ...`` line,
exit status 2. ``main(argv) -> int`` is what ``experiments/bench.py --suite loader`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import guard  # noqa: E402
from core.errors import ConfigError  # noqa: E402

RECIPES = ("bt", "dino", "seg", "seg_mmseg")
TARGET = 190.0  # img/s per worker: 1,500 img/s per GPU with 8 workers
VOC_SIZES = ((500, 375), (375, 500))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise ConfigError(f"{message}; see python experiments/bench_loader.py --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python experiments/bench_loader.py",
                description="img/s of one DataLoader worker per training recipe (decode + CPU transforms + "
                            "collate + hand-over), no model step.")
    p.add_argument("--root", default=None, help="VOC root (folder holding VOCdevkit/); default: generated JPEGs")
    p.add_argument("--generate", type=int, default=64,
                   help="images to generate when --root is not given (default 64, 500x375 and 375x500)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma separated, of: {', '.join(RECIPES)}")
    p.add_argument("--images", type=int, default=256, help="images timed per recipe (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (default 1)")
    p.add_argument("--image-size", type=int, default=224, help="view / simple seg crop side (default 224)")
    p.add_argument("--local-crops", type=int, default=6, help="DINO local crops (default 6, paper.yaml)")
    p.add_argument("--local-size", type=int, default=96, help="DINO local crop side (default 96)")
    p.add_argument("--crop-size", type=int, default=512, help="mmseg crop side and resize scale (default 512)")
    p.add_argument("--target", type=float, default=TARGET, help=f"img/s per worker to reach (default {TARGET:g})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return p


def _check(a: argparse.Namespace) -> tuple[str, ...]:
    recipes = tuple(r for r in str(a.recipes).split(",") if r)
    bad = [r for r in recipes if r not in RECIPES]
    if not recipes or bad:
        raise ConfigError(f"--recipes {a.recipes!r}: unknown {', '.join(bad) or '(empty)'}; choose from "
                          f"{', '.join(RECIPES)}")
    for name, lo in (("images", 1), ("batch_size", 1), ("workers", 1), ("image_size", 16), ("local_crops", 0),
                     ("local_size", 16), ("crop_size", 16), ("generate", 2)):
        if getattr(a, name) < lo:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(a, name)} must be at least {lo}")
    if not a.target > 0:
        raise ConfigError(f"--target {a.target} must be positive")
    if a.root is not None and not Path(a.root).expanduser().is_dir():
        raise ConfigError(f"--root {a.root} is not a folder; pass the folder holding VOCdevkit/ or leave it out")
    if a.json:
        jp = Path(a.json).expanduser()
        if not jp.parent.is_dir():
            raise ConfigError(f"--json {a.json}: folder {jp.parent} does not exist; create it or choose another path")
    return recipes


def _root(a: argparse.Namespace) -> Path:
    if a.root is not None:
        return Path(a.root).expanduser()
    from core.data.synthetic import generate_voc

    n = int(a.generate)
    return generate_voc(REPO_ROOT / "data" / f"bench-loader-{n}", n_train=n, n_val=2, size=64, seed=0,
                        sizes=list(VOC_SIZES))


def build_dataset(recipe: str, root: Path, a: argparse.Namespace):
    """The training dataset of `recipe` with its real transform (what the training loaders build)."""
    from core.data.imagefolder import UnlabeledImages
    from core.data.transforms import BarlowTwinsTransform, DINOTransform, build_seg_train_transform
    from core.data.voc import VOCSegmentation, voc_ssl_images

    if recipe in ("bt", "dino"):
        if recipe == "bt":
            tf = BarlowTwinsTransform(a.image_size, gpu_augment=True)
        else:
            tf = DINOTransform(a.image_size, a.local_size, a.local_crops, gpu_augment=True)
        return UnlabeledImages(voc_ssl_images(root, "train"), tf, name="bench")
    if recipe == "seg":
        tf = build_seg_train_transform("simple", a.image_size)
    else:
        tf = build_seg_train_transform("mmseg", a.image_size, a.crop_size, a.crop_size, 0.75)
    return VOCSegmentation(root, "train", transform=tf)


def _nbytes(x: Any) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.element_size() * x.numel()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _batch_len(x: Any) -> int:
    import torch

    while not isinstance(x, torch.Tensor):  # a dict: its "valid" rows (the mmseg regions are packed flat)
        x = (x["valid"] if "valid" in x else next(iter(x.values()))) if isinstance(x, dict) else x[0]
    return int(x.shape[0])


def measure(ds, images: int, batch_size: int, workers: int, seed: int = 0) -> dict:
    """Time `images` images through a DataLoader over `ds` (after one untimed batch)."""
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(int(seed))
    bs = min(int(batch_size), len(ds))
    loader = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=int(workers),
                        persistent_workers=True, generator=g, collate_fn=getattr(getattr(ds, "transform", None), "collate", None))
    it = iter(loader)
    first = next(it)
    per_img = _nbytes(first) / max(_batch_len(first), 1)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in _flat(first)})
    pids = [w.pid for w in getattr(it, "_workers", [])]
    n = 0
    c0 = _cpu_seconds(pids)
    t0 = time.perf_counter()
    while n < images:
        try:
            b = next(it)
        except StopIteration:  # persistent workers: a new epoch is cheap
            it = iter(loader)
            continue
        n += _batch_len(b)
    dt = time.perf_counter() - t0
    c1 = _cpu_seconds(pids)
    cpu = (c1 - c0) if c0 is not None and c1 is not None else None
    del it
    return {"images": n, "seconds": dt, "img_per_s": n / dt, "img_per_s_per_worker": n / dt / int(workers),
            "worker_cpu_s": cpu, "img_per_cpu_s": (n / cpu) if cpu else None,
            "bytes_per_image": per_img, "dtypes": dtypes}


def _cpu_seconds(pids: Sequence[int]) -> Optional[float]:
    """User + system CPU seconds of the worker processes (Linux /proc), None where unavailable: img per
    worker CPU-second does not drop when other processes share the machine, wall-clock img/s does."""
    if not pids:
        return None
    try:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))
        return total / tick
    except (OSError, ValueError, IndexError):
        return None


def _flat(x: Any) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if not isinstance(x, (list, tuple)):
        return []  # e.g. the region shapes' ints
    return [t for v in x for t in _flat(v)]


@guard
def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    recipes = _check(a)
    import torch

    torch.set_num_threads(1)  # the workers are single-threaded; keep the main process from competing
    root = _root(a)
    rows = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# loader throughput: {a.workers} worker(s), batch {a.batch_size}, {a.images} images per recipe, "
          f"root {root}, {os.cpu_count()} CPUs, load {load:.2f}")
    print(f"{'recipe':<10} {'img/s/worker':>12} {'x target':>9} {'img/cpu-s':>9} {'x target':>9} {'bytes/img':>10}  dtypes")
    for r in recipes:
        ds = build_dataset(r, root, a)
        res = measure(ds, a.images, a.batch_size, a.workers, a.seed)
        cpu = res["img_per_cpu_s"]
        res.update(recipe=r, ratio=res["img_per_s_per_worker"] / a.target,
                   cpu_ratio=None if cpu is None else cpu / a.target)
        rows.append(res)
        cpu_txt = f"{cpu:>9.1f} {res['cpu_ratio']:>9.2f}" if cpu is not None else f"{'n/a':>9} {'':>9}"
        print(f"{r:<10} {res['img_per_s_per_worker']:>12.1f} {res['ratio']:>9.2f} {cpu_txt} "
              f"{res['bytes_per_image']:>10.0f}  {','.join(res['dtypes'])}", flush=True)
    if a.json:
        out = {"target": a.target, "workers": a.workers, "batch_size": a.batch_size, "root": str(root),
               "cpus": os.cpu_count(), "machine": platform.platform(), "load_before": load, "results": rows}
        Path(a.json).expanduser().write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
