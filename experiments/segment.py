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

from core.cli import fail, guard  # noqa: E402
from core.errors import ConfigError, DataError  # noqa: E402

#: the CPU stand-ins used by --size tiny (and by --size auto on the generated data)
TINY_BACKBONES = {"cnn": "resnet_tiny", "vit": "vit_nano_patch8", "swin": "swin_nano"}
#: small defaults for the generated dataset (64 px images): each of E1-E4 trains in ~1 minute on a laptop CPU
GENERATED_DEFAULTS = {"epochs": 8, "batch_size": 16}

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
(PATH = a stage-1 run's backbone.pt, {"arch", "state_dict"}). Fusion needs a ViT backbone.
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (twinseg: error: ...) and exit 2."""

    def error(self, message: str):  # noqa: D401
        fail(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="experiments/segment.py", description=__doc__.split("\n\n")[0],
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--evaluation", help="preset E1..E5 (core.evaluations); explicit flags override it")
    a("--backbone", help="backbone name (core.models.registry), e.g. vit_nano_patch8, resnet_tiny, vit_small_patch16")
    a("--head", help="linear | setr_naive | setr_pup | setr_mla | deeplabv3 | segformer")
    a("--fusion", help="none | features (fusion 1) | affinity (fusion 2); ViT only")
    a("--source", help="random | imagenet | dino | coco-deeplab | barlowtwins-imagenet | checkpoint:PATH")
    a("--mode", help="frozen | finetune")
    a("--loss", help="ce | dice | focal")
    a("--epochs")
    a("--batch-size")
    a("--image-size", help="training / evaluation image side in px (multiple of the patch size)")
    a("--lr", help="head learning rate (the backbone gets lr x --backbone-lr-scale when fine-tuning)")
    a("--backbone-lr-scale")
    a("--inference", help="whole | slide")
    a("--slide-crop")
    a("--slide-stride")
    a("--data-root", help="folder holding VOCdevkit/ (voc) or the COCO-Stuff root; default: generated data")
    a("--dataset", help="voc | coco_stuff")
    a("--limit-train", help="use only the first N training images")
    a("--limit-val", help="use only the first N validation images")
    a("--num-workers")
    a("--corrupt-policy", help="stop (default: the first corrupt image/mask ends the run, naming it) | skip "
                               "(skip and count bad files: metrics.json skipped_files)")
    a("--size", default="auto", choices=("auto", "tiny", "full"), help="swap big preset backbones for CPU ones (see below)")
    a("--output", help="run folder (default results/segment-<evaluation or head>-<timestamp>)")
    a("--seed")
    a("--device", help="auto | cpu | cuda")
    a("--devices", help="GPUs (DDP when > 1)")
    a("--precision", help="32 | bf16-mixed | 16-mixed")
    a("--wandb", help="offline (default) | online | disabled")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def _family(backbone: str) -> str:
    if backbone.startswith("swin"):
        return "swin"
    if backbone.startswith("vit"):
        return "vit"
    return "cnn"


def _apply_preset(evaluation: str, d: dict) -> dict:
    from core.evaluations import apply_evaluation

    return dict(apply_evaluation(d, evaluation))


def resolve_config(args: argparse.Namespace):
    """Flags -> SegmentConfig: preset first, explicit flags win, then the --size rule."""
    from core.config import SegmentConfig

    flat = {
        "backbone": args.backbone, "head": args.head, "fusion": args.fusion, "source": args.source,
        "mode": args.mode, "loss": args.loss, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "backbone_lr_scale": args.backbone_lr_scale, "inference": args.inference,
        "slide_crop": args.slide_crop, "slide_stride": args.slide_stride, "seed": args.seed,
        "device": args.device, "devices": args.devices, "precision": args.precision, "wandb": args.wandb,
    }
    explicit = {k: v for k, v in flat.items() if v is not None}
    data = {"root": args.data_root, "dataset": args.dataset, "image_size": args.image_size,
            "limit_train": args.limit_train, "limit_val": args.limit_val, "num_workers": args.num_workers,
            "corrupt_policy": args.corrupt_policy}
    data = {k: v for k, v in data.items() if v is not None}
    if args.data_root is not None:
        root = Path(args.data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-root {args.data_root}: no such folder; pass the folder holding VOCdevkit/ "
                            f"(VOC) or the COCO-Stuff root, or omit it to use the generated data")
        data["root"] = str(root)

    d: dict = dict(explicit)
    if args.evaluation is not None:
        ev = str(args.evaluation).upper() if str(args.evaluation).lower() in {f"e{i}" for i in range(1, 6)} \
            else args.evaluation
        d = _apply_preset(ev, d)
        for k, v in explicit.items():  # explicit flags always win
            d[k] = v
        preset_data = d.get("data") or {}
        if isinstance(preset_data, dict):
            data = {**preset_data, **data}
    generated = data.get("root") is None
    if generated:
        for k, v in GENERATED_DEFAULTS.items():
            if k not in explicit:
                d[k] = v
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

    m = run_segment(cfg, out, progress=not args.no_progress)
    print(
        f"segment {cfg.evaluation or '-'} {cfg.backbone}+{cfg.head} fusion={cfg.fusion} source={cfg.source} "
        f"mode={cfg.mode}: mIoU {m['mIoU']:.2f}  aAcc {m['aAcc']:.2f}  mAcc {m['mAcc']:.2f}  "
        f"({m.get('wall_time_s', 0):.0f} s)\nrun folder: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
