"""The stage registry: the study's two stages, each declared once.

A stage is one kind of run: self-supervised pretraining (stage 1, `pretrain`) and segmentation
fine-tuning / evaluation (stage 2, `segment`). Its `StageSpec` says everything the rest of the code
needs to know about it:

- `name`: the value of `stage` in metrics.json, trial.json and summary.json;
- `grid_key`: the block of a grid file that declares its trials (`stage1` / `stage2`);
- `label`: how reports and consoles title it;
- `config_class()` / `run_function()`: its typed config (`PretrainConfig` / `SegmentConfig`) and its
  core run function (`run_pretrain` / `run_segment`), imported on first use so that reading the
  registry stays cheap (the report and the grid driver read it before torch is imported);
- `artifact`: the file a finished run leaves for later stages (`backbone.pt`, `model.pt`);
- `key_metrics`: the values the console and summary.csv show for a finished trial;
- `result_keys()`: every metrics.json key a run of the stage may write (core/runs/metrics_schema.py);
- `trains_on_masks`: whether training reads segmentation masks (the pre-start data check);
- `depends_on_stage`: the stage whose artifacts this one may start from (None for stage 1);
- `trains_on_ssl_images`: whether training reads the unlabelled SSL images (`data.ssl_root`, or the
  VOC split `data.ssl_split`): the pre-start data check lists them, the cost estimate counts them;
- `train_split_field`: the config field (dotted for a section's) naming the split it trains on;
- `iterations_field`: the config field that, when set, budgets training in optimiser steps instead of
  epochs (images = steps x batch_size x workers), or None;
- `head_params(config dict)`: parameters trained besides the backbone's (the checkpoint size of the
  cost estimate);
- `describe_keys`: the config / metric keys the report names a trial by (`name=` shows `name=value`;
  empty: the label of its pretraining variant, read from the grid's labels); `markers`: keys only its runs carry, how the report
  recognises a run folder written without a `stage` field (later stages are tried first).

The grid, the trial, the cost estimate, `core.data.module.validate_data`, the report and bench read
these entries; no other module compares stage names. `stages()` is ordered by `order`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from core.errors import ConfigError


def _pretrain_config() -> type:
    from core.config import PretrainConfig

    return PretrainConfig


def _segment_config() -> type:
    from core.config import SegmentConfig

    return SegmentConfig


def _pretrain_run() -> Callable[..., dict]:
    from core.runs.pretrain import run_pretrain

    return run_pretrain


def _segment_run() -> Callable[..., dict]:
    from core.runs.segment import run_segment

    return run_segment


def _projector_params(cfg: dict) -> int:
    """Weights of the SSL projector MLP (`projector` widths; biases and norms left out)."""
    dims = [int(d) for d in (cfg.get("projector") or [])]
    return sum(a * b for a, b in zip(dims, dims[1:]))


def _no_head_params(cfg: dict) -> int:
    """The segmentation head is not counted by the cost estimate (small next to the backbone)."""
    return 0


@dataclass(frozen=True)
class StageSpec:
    name: str  # metrics.json / trial.json `stage`
    grid_key: str  # the grid file's block of this stage's trials
    label: str  # report and console title
    order: int  # 1 = first stage; a stage may depend on earlier ones only
    artifact: str  # the file a finished run leaves (the input of a later stage)
    key_metrics: tuple[str, ...]  # console / summary.csv values of a finished trial
    trains_on_masks: bool  # training reads segmentation masks (pre-start data check)
    config_class: Callable[[], type]
    run_function: Callable[[], Callable[..., dict]]
    depends_on_stage: Optional[str] = None
    trains_on_ssl_images: bool = False  # training reads data.ssl_root / the VOC split data.ssl_split
    train_split_field: str = "train_split"  # config field (dotted in a section) naming the training split
    iterations_field: Optional[str] = None  # config field budgeting training in steps when set
    head_params: Callable[[dict], int] = _no_head_params  # trained params besides the backbone's
    describe_keys: tuple[str, ...] = ()  # report: keys naming a trial (empty: its pretraining variant's label)
    markers: tuple[str, ...] = ()  # report: config / metric keys only its runs carry (folders without `stage`)

    def train_split(self, cfg: dict) -> str:
        """The split a trial's config dict trains on (`train` when the field is unset)."""
        v: Any = cfg
        for k in self.train_split_field.split("."):
            v = v.get(k) if isinstance(v, dict) else None
        return "train" if v is None else str(v)

    def build_config(self, d: dict) -> Any:
        """The validated config object of a trial from its config dict (`Cls.from_dict`)."""
        return self.config_class().from_dict(d)

    def result_keys(self) -> dict[str, str]:
        """Every metrics.json key a run of this stage may write, with its description."""
        from core.runs import metrics_schema

        return metrics_schema.keys(self.name)


PRETRAIN = StageSpec(
    name="pretrain", grid_key="stage1", label="Pretraining", order=1, artifact="backbone.pt",
    key_metrics=("knn_acc", "final_loss"), trains_on_masks=False,
    config_class=_pretrain_config, run_function=_pretrain_run,
    trains_on_ssl_images=True, train_split_field="data.ssl_split", head_params=_projector_params,
    markers=("method", "knn_acc"))

SEGMENT = StageSpec(
    name="segment", grid_key="stage2", label="Segmentation", order=2, artifact="model.pt",
    key_metrics=("mIoU", "aAcc"), trains_on_masks=True,
    config_class=_segment_config, run_function=_segment_run, depends_on_stage="pretrain",
    train_split_field="train_split", iterations_field="max_iters",
    describe_keys=("evaluation", "backbone", "head", "fusion="), markers=("evaluation", "head", "mIoU"))

_STAGES: dict[str, StageSpec] = {s.name: s for s in sorted((PRETRAIN, SEGMENT), key=lambda s: s.order)}


def stages() -> dict[str, StageSpec]:
    """Every stage by name, in order (stage 1 first)."""
    return dict(_STAGES)


def get_stage(name: str) -> StageSpec:
    """The stage called `name`; ConfigError (one line) naming the allowed ones otherwise."""
    try:
        return _STAGES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"stage={name!r} is not known; choose one of: {', '.join(_STAGES)}") from None


def stages_of(stage: str) -> tuple[StageSpec, ...]:
    """The stages `stage` names: one, or every stage for "both" (the data check of a whole study)."""
    return tuple(_STAGES.values()) if stage == "both" else (get_stage(stage),)


def by_grid_key(key: str) -> StageSpec:
    """The stage whose trials a grid file declares under `key` (`stage1` / `stage2`)."""
    for s in _STAGES.values():
        if s.grid_key == key:
            return s
    raise ConfigError(f"grid block {key!r} is not known; choose one of: "
                      f"{', '.join(s.grid_key for s in _STAGES.values())}")
