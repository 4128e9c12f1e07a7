"""A benchmark row is a run config plus a measurement: this module builds the configs.

`plan(s)` turns `BenchSettings` into `BenchCase`s, each holding the `PretrainConfig` / `SegmentConfig` a real
run of that row would use, built as the CLIs and grid trials build theirs: a dict of the given fields, an
evaluation preset merged UNDER them (`core.evaluations.apply_evaluation`, as experiments/segment.py), then the
stage registry's `build_config` (`Cls.from_dict`, which also applies an SSL method's registry `defaults`).
Bench never loads weights (``source`` is ``random``: a step's speed does not depend on the values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from core.errors import ConfigError
from experiments.benchmarks.settings import DEFAULT_BACKBONES, SEGMENT, BenchSettings

CONFIG_PRECISION = {"32": "32", "bf16": "bf16-mixed"}  # bench's --precision -> the configs' precision
EPOCHS = 10  # the schedules' length (warmup 1 epoch): the timed steps sit in the warmup, as a run's first steps


@dataclass(frozen=True)
class BenchCase:
    """One thing to time: its task (an SSL method or ``segment``), its stage (core/stages.py), the mode
    (``model``: synthetic batches on the device; ``pipeline``: the run's loaders) and the run's config."""

    task: str
    stage: str
    mode: str
    config: Any  # PretrainConfig | SegmentConfig

    @property
    def evaluation(self) -> Optional[str]:
        return getattr(self.config, "evaluation", None)


def data_config(s: BenchSettings) -> dict:
    """The `data` section of every row: bench's image size and workers, the generated set (or --data-root)."""
    return {"root": s.data_root, "image_size": s.image_size, "num_workers": s.workers,
            "synthetic_n_train": max(96, 2 * s.batch_size), "synthetic_n_val": 16}


def _common(s: BenchSettings) -> dict:
    return {"batch_size": s.batch_size, "precision": CONFIG_PRECISION[s.precision], "device": s.device,
            "compile": s.compile, "seed": s.seed, "data": data_config(s)}


def pretrain_config(s: BenchSettings, method: str, backbone: str):
    """The `PretrainConfig` of a `method` row: bench's projector, batch and data; DINO's section from the
    --dino-* flags; everything else the method's recipe (registry `defaults`, then the field defaults)."""
    from core.stages import get_stage

    d = {"method": method, "backbone": backbone, "projector": tuple(s.projector), "epochs": EPOCHS,
         "warmup_epochs": 1, **_common(s)}
    if method == "dino":
        d["dino"] = {"out_dim": s.dino_out_dim, "local_crops": s.dino_local_crops}
    return get_stage("pretrain").build_config(d)


def default_seg_head(backbone: str) -> str:
    """setr_pup on a transformer, deeplabv3 on a CNN (bench's ``--seg-head auto`` without a preset)."""
    from core.models.registry import create_backbone

    return "setr_pup" if create_backbone(backbone).is_transformer else "deeplabv3"


def segment_config(s: BenchSettings, backbone: Optional[str], evaluation: Optional[str] = None):
    """The `SegmentConfig` of a segmentation row: `evaluation`'s preset under bench's explicit values
    (`backbone` None: the preset's; ``--seg-head auto``: the preset's head, else `default_seg_head`)."""
    from core.evaluations import apply_evaluation
    from core.stages import get_stage

    d = {"mode": "finetune", "source": "random", **_common(s)}
    if backbone is not None:
        d["backbone"] = backbone
    if s.seg_head != "auto":
        d["head"] = s.seg_head
    if s.seg_pipeline == "mmseg":  # paper.yaml: crop 512 of RandomResize 512 x 0.5-2.0
        d.update(train_pipeline="mmseg", crop_size=s.image_size, train_scale=s.image_size)
    if evaluation is not None:
        d = apply_evaluation(d, evaluation)
        d["source"] = "random"  # E5's DINO weights: not loaded (speed only)
    elif "head" not in d:
        d["head"] = default_seg_head(d["backbone"])
    return get_stage(SEGMENT).build_config(d)


def plan(s: BenchSettings) -> list[BenchCase]:
    """Every (backbone, task, mode) row of `s` in order: backbones outermost, then tasks (a segmentation
    task once per evaluation preset), then modes (`BenchSettings.validate` checks the task names)."""
    cases: list[BenchCase] = []
    for bb in s.backbones or DEFAULT_BACKBONES:
        for task in s.task_list():
            for m in s.modes:
                cases.extend(_task_cases(s, task, bb, m))
    if s.backbones is None and SEGMENT in s.task_list():  # the presets' own backbones, once each
        for ev in s.evaluations:
            cases.extend(BenchCase(SEGMENT, SEGMENT, m, segment_config(s, None, ev)) for m in s.modes)
    return cases


def _task_cases(s: BenchSettings, task: str, backbone: str, mode: str) -> list[BenchCase]:
    if task != SEGMENT:
        return [BenchCase(task, "pretrain", mode, pretrain_config(s, task, backbone))]
    if s.backbones is None and s.evaluations:
        return []  # preset rows use the preset's backbone (see `plan`)
    return [BenchCase(SEGMENT, SEGMENT, mode, segment_config(s, backbone, ev)) for ev in (s.evaluations or (None,))]


def check_case(case: BenchCase) -> None:
    """The row's backbone takes its inputs: every view size of an SSL method (DINO's local crops too), or the
    segmentation run's own pre-check (`core.runs.segment.preflight`: head, fusion, sizes). One ConfigError line."""
    cfg = case.config
    if case.stage == SEGMENT:
        from core.runs.segment import preflight

        preflight(cfg, devices=1)
        return
    from core.methods.registry import get_method
    from core.models.registry import create_backbone

    bb = create_backbone(cfg.backbone, image_size=cfg.data.image_size)
    for size in sorted(set(get_method(cfg.method).views(cfg, False).sizes)):
        try:
            bb.check_input_size(size, size)
        except ConfigError as e:
            if size == cfg.data.image_size:
                raise
            raise ConfigError(f"{case.task}'s {size} px views do not fit {cfg.backbone}: {e}; use another "
                              f"--image-size (or --dino-local-crops 0)") from None
