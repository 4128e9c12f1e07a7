"""One self-supervised pretraining run (stage 1), no Ray needed.

    python experiments/pretrain.py                       # Barlow Twins, vit_nano_patch8, generated data
    python experiments/pretrain.py --method dino --backbone resnet_tiny --epochs 4
    python experiments/pretrain.py --source checkpoint:results/x/backbone.pt --lambd 0.01
    python experiments/pretrain.py --optimizer lars --lr none  # lr none: the optimiser's official recipe
    python experiments/pretrain.py --data-root ~/data/VOC --data-ssl-split trainaug --image-size 224

Every PretrainConfig field is a flag (`--help` lists them with their doc and default): `--batch-size
64`, a data field as `--data-limit-val 8` or `--data.limit_val 8`, a bool as `--compile` /
`--no-gpu-augment`, an optional value unset with `none`.

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

from core.cli import guard  # noqa: E402
from core.config_cli import OneLineParser, add_config_arguments, config_dict_from_args  # noqa: E402

PROG = "python experiments/pretrain.py"


def build_parser() -> argparse.ArgumentParser:
    """One flag per PretrainConfig field (data fields as --data-FIELD), plus --output / --no-progress."""
    from core.config import PretrainConfig

    p = OneLineParser(prog=PROG, usage=f"{PROG} [--FIELD VALUE ...] [--output DIR] [--overwrite] [--no-progress]",
                      description="Self-supervised pretraining of one backbone (--method: any registered SSL method). "
                                  "Every flag below is a PretrainConfig field; values are checked by the "
                                  "config (one-line error naming the field).",
                      epilog="examples:\n" + __doc__.split("\n\n")[1])
    run = p.add_argument_group("run")
    run.add_argument("--output", metavar="DIR",
                     help="run folder (default results/pretrain-<method>-<backbone>-<timestamp>)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", "--force", action="store_true",
                     help="--output holds a run of another config: delete that run's files (config.json, "
                          "metrics.json, checkpoints/, logs/, backbone.pt, ...) and start afresh instead of refusing")
    add_config_arguments(p, PretrainConfig)
    return p


def config_from_args(a: argparse.Namespace):
    """The flags the user gave -> PretrainConfig (every other field: the method's registry `defaults`, else the
    dataclass default)."""
    from core.config import PretrainConfig

    return PretrainConfig.from_dict(config_dict_from_args(a, PretrainConfig))


@guard
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    cfg = config_from_args(a)
    from core.data.module import validate_data

    validate_data(cfg.data, "pretrain")  # bad / missing dataset: one line before anything is written
    out = Path(a.output) if a.output else Path("results") / (
        f"pretrain-{cfg.method}-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
    from core.runs.pretrain import run_pretrain

    m = run_pretrain(cfg, out, progress=not a.no_progress, overwrite=a.overwrite)

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
    sys.exit(main())
