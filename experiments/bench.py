#!/usr/bin/env python
"""Throughput benchmark: images/s, peak memory and MFU of ONE training step of a run config.

    python experiments/bench.py                                   # CPU-sized default, < 2 min on 2 cores
    python experiments/bench.py --method dino --backbone resnet_tiny --mode model
    python experiments/bench.py --evaluation E2 E4 --backbone vit_nano_patch8 --mode model
    python experiments/bench.py --backbone resnet50 vit_small_patch16 --image-size 224 \\
        --batch-size 256 --precision bf16 --projector 8192-8192-8192 --json bench.json --markdown

    python experiments/bench.py --suite gpu                      # the fixed GPU check, <= 8 min on one H100/H200
    python experiments/bench.py --suite loader --recipes bt,dino  # loader img/s per worker (bench_loader.py)

A benchmark row is a run config plus a measurement: the `PretrainConfig` / `SegmentConfig` of any registered
SSL method (``--method``, ``--tasks``), segmentation head or evaluation preset (``--evaluation``) and backbone
(``--backbone``), built as the CLIs and grid trials build theirs, with the LightningModule, loaders and backbone
the real runs build (core/runs). Modes (``--mode``): ``model`` (synthetic tensors already on the device: the
model's speed) and ``pipeline`` (the run's DataLoader over the generated VOC-layout data or ``--data-root``,
pinned memory, persistent workers and, on CUDA, the colour part of the recipe on the device; ``data wait`` =
the share of the step time spent waiting for the loader). Next to Barlow Twins, lightly's Barlow Twins on the
same backbone, widths, batch, optimiser and input (``--no-lightly`` to skip); the two losses are also compared
on the same embeddings. Every row carries ``GFLOP/img`` and ``MFU`` (core/flops.py).

``--suite gpu`` (experiments/benchmarks/suites.py): Barlow Twins ResNet-50 and ViT-S/16 at 224 px, batch 256,
bf16 (synthetic and real-pipeline rows), DINO ViT-S/16, the E1 and E2 steps at 512 px (E2 also fed by
paper.yaml's mmseg loader) and with 2 GPUs a 2-process DDP check; it replaces its table in BENCHMARKS.md
between the ``<!-- bench-suite gpu -->`` markers (machine, date, command). Without a GPU the same rows run
tiny on the CPU and go to a separate ``cpu-fallback`` block. The package experiments/benchmarks/ holds the
code (settings, rows, runners, measure, run, suites, report, cli). A bad flag ends in one
``twinseg: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from experiments.benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
