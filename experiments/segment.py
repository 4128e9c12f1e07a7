#!/usr/bin/env python
"""Stage 2, one run: train and evaluate a segmentation model (no Ray needed).

    python experiments/segment.py                       # E2-like default on the generated data
    python experiments/segment.py --evaluation E1
    python experiments/segment.py --evaluation E3 --source checkpoint:results/pt/backbone.pt
    python experiments/segment.py --evaluation E5 --size full --data-root ~/data/VOC --device cuda

Presets E1..E5 (core.evaluations) set backbone / head / fusion / source; any flag given explicitly
wins over the preset. Results go to --output (default results/segment-<evaluation or head>-<time>/):
config.json, history.csv, checkpoints/, model.pt, figures/ and, last, metrics.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.cli import guard  # noqa: E402
from core.config_cli import OneLineParser, add_config_arguments, config_dict_from_args  # noqa: E402
from core.errors import ConfigError, DataError  # noqa: E402

#: the CPU stand-ins used by --size tiny (and by --size auto on the generated data)
TINY_BACKBONES = {"cnn": "resnet_tiny", "vit": "vit_nano_patch8", "swin": "swin_nano"}

EPILOG = """\
backbone size (--size):
  auto  (default) on the generated data (no --data-root), the presets' large backbones are swapped
        for CPU-sized ones: CNN presets (E1: resnet50) -> resnet_tiny, ViT presets (E2-E5:
        vit_small_patch16) -> vit_nano_patch8, Swin -> swin_nano; with --data-root the preset is kept.
  tiny  always swap as above;  full  never swap.
  An explicit --backbone is never swapped.

E5 (DINO weights + affinity fusion): --source dino uses the official DINO weights found in the
weights folder (python -m core.weights fetch, on an online machine); there are no official weights
for the tiny ViT, so on the generated data pass --source checkpoint:PATH to the backbone.pt of a DINO
run (python experiments/pretrain.py --method dino) or use --size full.

Weight sources: random | imagenet | barlowtwins-imagenet | dino | coco-deeplab | checkpoint:PATH
(PATH = a stage-1 run's backbone.pt, {"arch", "state_dict"}). Fusion needs a ViT or Swin backbone.
Every SegmentConfig field is a flag; a data field is --data-FIELD or --data.FIELD; `none` unsets an
optional value.
"""
PROG = "experiments/segment.py"


def build_parser() -> argparse.ArgumentParser:
    """One flag per SegmentConfig field (data fields as --data-FIELD), plus --size / --output / --no-progress."""
    from core.config import SegmentConfig

    p = OneLineParser(prog=PROG, usage=f"{PROG} [--FIELD VALUE ...] [--size auto|tiny|full] [--output DIR] "
                                       "[--overwrite] [--no-progress]",
                      description=__doc__.split("\n\n")[0], epilog=EPILOG)
    run = p.add_argument_group("run")
    run.add_argument("--size", default="auto", choices=("auto", "tiny", "full"),
                     help="swap big preset backbones for CPU ones (see below)")
    run.add_argument("--output", metavar="DIR",
                     help="run folder (default results/segment-<evaluation or head>-<timestamp>)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", "--force", action="store_true",
                     help="--output holds a run of another config: delete that run's files (config.json, "
                          "metrics.json, checkpoints/, logs/, model.pt, ...) and start afresh instead of refusing")
    add_config_arguments(p, SegmentConfig)
    return p


def _family(backbone: str) -> str:
    if backbone.startswith("swin"):
        return "swin"
    if backbone.startswith("vit"):
        return "vit"
    return "cnn"


def _evaluation_name(name):
    """E1..E5 whatever the case (names from core.evaluations.EVALUATIONS); others pass through."""
    from core.evaluations import EVALUATIONS

    if name is None:
        return None
    return {k.lower(): k for k in EVALUATIONS}.get(str(name).lower(), name)


def resolve_config(args: argparse.Namespace):
    """Flags -> SegmentConfig: preset first, explicit flags win, then the --size rule."""
    from core.config import SegmentConfig
    from core.evaluations import apply_evaluation

    d = config_dict_from_args(args, SegmentConfig)
    data = dict(d.pop("data", None) or {})
    if data.get("root") is not None:
        root = Path(str(data["root"])).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-root {data['root']}: no such folder; pass the folder holding VOCdevkit/ "
                            f"(VOC) or the COCO-Stuff root, or omit it to use the generated data")
        data["root"] = str(root)
    explicit = dict(d)  # the top-level fields the user gave
    if d.get("evaluation") is not None:
        ev = _evaluation_name(d["evaluation"])
        explicit["evaluation"] = ev
        d = dict(apply_evaluation(explicit, ev))  # the preset UNDER the explicit flags
        d.update(explicit)  # an explicit `none` too (apply_evaluation reads None as not given)
        preset_data = d.get("data") or {}
        if isinstance(preset_data, dict):
            data = {**preset_data, **data}
    generated = data.get("root") is None
    # --size: CPU stand-ins for the presets' large backbones
    swap = args.size == "tiny" or (args.size == "auto" and generated)
    if swap and "backbone" not in explicit and "backbone" in d:
        d["backbone"] = TINY_BACKBONES[_family(str(d["backbone"]))]
    if swap and d.get("evaluation") == "E5" and "source" not in explicit and d.get("source") == "dino":
        raise ConfigError(
            "E5 uses DINO weights but the tiny ViT (vit_nano_patch8) has no official DINO weights; "
            "pass --source checkpoint:PATH to the backbone.pt of a DINO run (python experiments/pretrain.py "
            "--method dino) or --size full (official ViT-S/16 DINO weights)"
        )
    if data:
        d["data"] = data
    return SegmentConfig.from_dict(d)


def default_output(cfg) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ROOT / "results" / f"segment-{cfg.evaluation or cfg.head}-{stamp}"


@guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    out = Path(args.output).expanduser() if args.output else default_output(cfg)
    from core.runs.segment import run_segment

    m = run_segment(cfg, out, progress=not args.no_progress, overwrite=args.overwrite)
    print(
        f"segment {cfg.evaluation or '-'} {cfg.backbone}+{cfg.head} fusion={cfg.fusion} source={cfg.source} "
        f"mode={cfg.mode}: mIoU {m['mIoU']:.2f}  aAcc {m['aAcc']:.2f}  mAcc {m['mAcc']:.2f}  "
        f"({m.get('wall_time_s', 0):.0f} s)\nrun folder: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
