"""One self-supervised pretraining run (stage 1), no Ray needed.

    python experiments/pretrain.py                       # Barlow Twins, vit_nano_patch8, generated data
    python experiments/pretrain.py --method dino --backbone resnet_tiny --epochs 4
    python experiments/pretrain.py --source checkpoint:results/x/backbone.pt --lambd 0.01

Writes a run folder (config.json, history.csv, checkpoints/, backbone.pt, figures/, metrics.json)
and prints the k-NN accuracy of the backbone before and after pretraining. A bad flag ends in one
`twinseg: error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from core.errors import ConfigError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise ConfigError(f"{message}; see python experiments/pretrain.py --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python experiments/pretrain.py",
                description="Self-supervised pretraining (Barlow Twins or DINO) of one backbone.")
    # values stay strings here: PretrainConfig coerces and validates them (one-line errors)
    p.add_argument("--method", help="barlow_twins (default) | dino")
    p.add_argument("--backbone", help="backbone name (default vit_nano_patch8)")
    p.add_argument("--source", help="random (default) | imagenet | barlowtwins-imagenet | dino | coco-deeplab | checkpoint:PATH")
    p.add_argument("--lambd", help="Barlow Twins off-diagonal weight (default 0.0051)")
    p.add_argument("--projector", help="projector widths, e.g. 8192-8192-8192")
    p.add_argument("--epochs")
    p.add_argument("--batch-size")
    p.add_argument("--image-size", help="input side in pixels (data.image_size)")
    p.add_argument("--optimizer", help="lars | adamw")
    p.add_argument("--lr", help="base lr (default 2e-3, the CPU setting); 'recipe': the optimiser's official "
                   "recipe scaled by batch/256 (LARS 0.2/0.0048, AdamW 5e-4)")
    p.add_argument("--weight-decay")
    p.add_argument("--warmup-epochs")
    p.add_argument("--data-root", help="folder holding VOCdevkit/ (default: the generated dataset)")
    p.add_argument("--num-workers")
    p.add_argument("--limit-train", help="use only the first N train images")
    p.add_argument("--output", help="run folder (default results/pretrain-<method>-<backbone>-<timestamp>)")
    p.add_argument("--seed")
    p.add_argument("--precision", help="32 | bf16-mixed | 16-mixed")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--devices", help="GPUs (DDP when > 1)")
    p.add_argument("--diagnostics-every", help="epochs between diagnostic figures (0: only at the end)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbone")
    p.add_argument("--no-gpu-augment", dest="gpu_augment", action="store_false", default=None,
                   help="run the whole augmentation recipe on the CPU")
    p.add_argument("--wandb", help="offline (default) | online | disabled")
    p.add_argument("--corrupt-policy", help="stop | skip: what a corrupt image does (default stop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(a: argparse.Namespace):
    from core.config import PretrainConfig

    data = {k: v for k, v in {"root": a.data_root, "image_size": a.image_size, "num_workers": a.num_workers,
                              "limit_train": a.limit_train, "corrupt_policy": a.corrupt_policy}.items()
            if v is not None}
    fields = {
        "method": a.method, "backbone": a.backbone, "source": a.source, "lambd": a.lambd,
        "projector": a.projector, "epochs": a.epochs, "batch_size": a.batch_size, "optimizer": a.optimizer,
        "lr": a.lr, "weight_decay": a.weight_decay, "warmup_epochs": a.warmup_epochs, "seed": a.seed,
        "precision": a.precision, "device": a.device, "devices": a.devices,
        "diagnostics_every": a.diagnostics_every, "compile": a.compile, "gpu_augment": a.gpu_augment,
        "wandb": a.wandb,
    }
    d = {k: v for k, v in fields.items() if v is not None}
    if a.lr == "recipe":
        d["lr"] = None
    if data:
        d["data"] = data
    return PretrainConfig.from_dict(d)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    cfg = config_from_args(a)
    from core.data.module import validate_data

    validate_data(cfg.data, "pretrain")  # bad / missing dataset: one line before anything is written
    out = Path(a.output) if a.output else Path("results") / (
        f"pretrain-{cfg.method}-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
    from core.runs.pretrain import run_pretrain

    m = run_pretrain(cfg, out, progress=not a.no_progress)

    def pct(v):
        return "n/a" if v is None else f"{v:.2f}%"

    print(f"k-NN accuracy ({cfg.backbone}, {cfg.method}): before {pct(m.get('knn_acc_init'))} -> "
          f"after {pct(m.get('knn_acc'))}   linear probe {pct(m.get('linear_probe_acc'))}")
    if m.get("dense_rank") is not None:
        def num(v):
            return "n/a" if v is None else f"{v:.2f}"

        print(f"dense features: effective rank {num(m.get('dense_rank_init'))} -> {num(m.get('dense_rank'))}, "
              f"local variance fraction {num(m.get('dense_local_var_init'))} -> {num(m.get('dense_local_var'))}")
    print(f"wall time {m.get('wall_time_s', 0):.1f}s on {m.get('device', '?')}")
    print(f"metrics: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    from core.cli import guard

    sys.exit(guard(main)())
