"""What one `experiments/bench.py` call measures: `BenchSettings` (the flags), checked cheaply first.

Task names are read from the registries, never listed here: every registered SSL method
(`core.methods.registry.ssl_methods()`) is a pretraining task, ``segment`` the segmentation task, whose rows
may start from an evaluation preset (`core.evaluations`). This module imports no torch at import time, so a
bad flag is reported before the heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.errors import ConfigError

SEGMENT = "segment"  # the segmentation task (stage `segment` of core/stages.py)
SUITES = ("gpu", "loader")
MODES = ("model", "pipeline")
PRECISIONS = ("32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_BACKBONES = ("vit_nano_patch8", "resnet_tiny")
LAMBD = 0.0051  # Barlow Twins' lambda of the twinseg / lightly loss agreement check


def ssl_method_names() -> tuple[str, ...]:
    """The registered SSL methods (core/methods/registry.py), in registry order."""
    from core.methods.registry import ssl_methods

    return tuple(ssl_methods())


def task_names() -> tuple[str, ...]:
    """Every task bench can time: each registered SSL method, then ``segment``."""
    return ssl_method_names() + (SEGMENT,)


def evaluation_name(name: str) -> str:
    """An evaluation preset's name whatever its case (``e2`` -> ``E2``); ConfigError naming the presets."""
    from core.evaluations import EVALUATIONS

    found = {k.lower(): k for k in EVALUATIONS}.get(str(name).lower())
    if found is None:
        raise ConfigError(f"--evaluation {name!r} is not known; choose one of: {', '.join(EVALUATIONS)}")
    return found


@dataclass(frozen=True)
class BenchSettings:
    #: backbones of every row; None: `DEFAULT_BACKBONES`, and each evaluation preset's own backbone
    backbones: Optional[tuple[str, ...]] = None
    tasks: Optional[tuple[str, ...]] = None  # SSL method names and/or "segment"; None: all of `task_names()`
    evaluations: tuple[str, ...] = ()  # segment rows start from these presets (core/evaluations.py)
    modes: tuple[str, ...] = MODES
    image_size: int = 64
    batch_size: int = 16
    precision: str = "32"
    device: str = "auto"
    channels_last: bool = True  # CNNs only (the training methods always use it; --no-channels-last for A/B)
    compile: bool = False
    warmup: int = 2
    iters: int = 2
    repeats: int = 3
    workers: int = 2
    projector: tuple[int, ...] = (512, 512, 512)
    dino_out_dim: int = 1024
    dino_local_crops: int = 2
    seg_head: str = "auto"  # auto: the evaluation preset's head, else setr_pup (ViT / Swin) or deeplabv3 (CNN)
    seg_pipeline: str = "simple"  # segmentation train pipeline of the `pipeline` mode: simple | mmseg (paper.yaml)
    lightly: bool = True
    data_root: Optional[str] = None
    seed: int = 0
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default, one per core)

    def task_list(self) -> tuple[str, ...]:
        return task_names() if self.tasks is None else self.tasks

    def validate(self) -> None:
        """Cheap checks first (no heavy import), then names against the registries."""
        self.validate_numbers()
        from core.models.heads import check_head_name
        from core.models.registry import check_backbone_name

        for b in self.backbones or ():
            check_backbone_name("--backbone", b)
        known = task_names()
        for t in self.task_list():
            if t not in known:
                raise ConfigError(f"--tasks {t!r} is not known; choose from: {', '.join(known)}")
        for e in self.evaluations:
            if evaluation_name(e) != e:
                raise ConfigError(f"--evaluation {e!r}: write it as {evaluation_name(e)!r}")
        if self.seg_head != "auto":
            check_head_name("--seg-head", self.seg_head)
        from core.data.transforms import SEG_TRAIN_PIPELINES

        if self.seg_pipeline not in SEG_TRAIN_PIPELINES:
            raise ConfigError(f"--seg-pipeline {self.seg_pipeline!r} is not known; choose from: "
                              f"{', '.join(SEG_TRAIN_PIPELINES)}")
        self.validate_device()

    def validate_device(self) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA GPU is visible; use --device auto or cpu")

    def validate_numbers(self) -> None:
        if self.backbones is not None and not self.backbones:
            raise ConfigError("--backbone needs at least one backbone name, e.g. --backbone resnet_tiny")
        if self.tasks is not None and not self.tasks:
            raise ConfigError("--tasks needs at least one task, e.g. --tasks barlow_twins")
        for m in self.modes:
            if m not in MODES:
                raise ConfigError(f"--mode {m!r} is not known; choose from: model, pipeline, both")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not allowed; choose 32 or bf16")
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device!r} is not allowed; choose auto, cpu or cuda")
        if not 16 <= self.image_size <= 4096:
            raise ConfigError(f"--image-size {self.image_size} must be between 16 and 4096")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size {self.batch_size} must be >= 2 (Barlow Twins and BatchNorm "
                              f"normalise over the batch)")
        for name, v, lo in (("--warmup", self.warmup, 0), ("--iters", self.iters, 1), ("--repeats", self.repeats, 1),
                            ("--workers", self.workers, 0), ("--dino-out-dim", self.dino_out_dim, 1),
                            ("--dino-local-crops", self.dino_local_crops, 0),
                            ("--threads", 1 if self.threads is None else self.threads, 1)):
            if v < lo:
                raise ConfigError(f"{name} {v} must be >= {lo}")
        self.validate_projector()
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise ConfigError(f"--data-root {self.data_root} is not a folder; point it at a folder holding "
                              f"VOCdevkit/VOC2012 or leave it out to use the generated dataset")

    def validate_projector(self) -> None:
        text = "-".join(map(str, self.projector))
        if not self.projector or any(w <= 0 for w in self.projector):
            raise ConfigError(f"--projector {text} must list positive widths, e.g. 8192-8192-8192")
        bt = self.tasks is None or "barlow_twins" in self.tasks
        if self.lightly and bt and (len(self.projector) != 3 or self.projector[0] != self.projector[1]):
            raise ConfigError(f"--projector {text}: lightly's BarlowTwinsProjectionHead has exactly 3 layers "
                              f"(hidden, hidden, out); use e.g. 2048-2048-2048 or pass --no-lightly")
