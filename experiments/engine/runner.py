"""What one trial (or one DDP rank of it) runs: the run function and its process settings. Shared by
the Tune trainable (experiments/engine/trial.py) and the Ray Train workers (experiments/engine/ray_ddp.py),
which import this module and never each other's.

The run function (`RunFunction`, default `run_stage`) is a parameter of the grid: a trial calls
    run(stage, config, out_dir, *, progress, wandb_group, name, report=None, callbacks=(), ddp=None) -> dict
with the trial's config DICT; `run_stage` validates it into the stage's config (`core.stages`:
`PretrainConfig` / `SegmentConfig`) and calls its core run function (`run_pretrain` / `run_segment`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional

from core.stages import get_stage
from experiments.engine.spec import resolved_config

RunFunction = Callable[..., dict]
"""run(stage, config: dict, out_dir: Path, *, progress, wandb_group, name, report=None, callbacks=(),
ddp=None) -> metrics dict (see the module docstring)."""


def build_config(stage: str, d: dict):
    """The validated config object of a trial (its stage's config class: `core.stages`)."""
    return get_stage(stage).build_config(d)


def stage_function(stage: str) -> Callable[..., dict]:
    """The stage's core run function (`core.runs.pretrain.run_pretrain` / `core.runs.segment.run_segment`)."""
    return get_stage(stage).run_function()


def run_stage(stage: str, config: dict, out_dir: Path, *, report: Optional[Callable[[int, dict], None]] = None,
              callbacks=(), **kwargs) -> dict:
    """The grid's default `RunFunction`: the stage's core run function on `out_dir`; `report` is called
    at the end of every training epoch on rank 0 (a Lightning callback); `kwargs` (progress,
    wandb_group, name, ddp) go to the run function as they are."""
    cbs = list(callbacks)
    if report is not None:
        cbs.append(epoch_report_callback(report))
    return stage_function(stage)(build_config(stage, config), out_dir, callbacks=cbs, **kwargs)


def epoch_report_callback(report: Callable[[int, dict], None]):
    """A Lightning callback calling `report(epoch, scalars)` after each training epoch (rank 0 only)."""
    import lightning.pytorch as pl

    class EpochReport(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if getattr(trainer, "global_rank", 0) != 0 or getattr(trainer, "sanity_checking", False):
                return
            report(trainer.current_epoch + 1, epoch_scalars(trainer))

    return EpochReport()


def epoch_scalars(trainer) -> dict:
    """The Trainer's finite scalar callback metrics, '/' replaced by '_' (Tune column names)."""
    vals = {}
    for k, v in dict(trainer.callback_metrics).items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            vals[str(k).replace("/", "_")] = f
    return vals


def results_root(payload: dict) -> Path:
    """The folder holding the trial's `trials/` folder (the results folder, or on an object store the
    node-local scratch root): what the relative references between trials are resolved against."""
    if payload.get("trials_root"):
        return Path(payload["trials_root"]).parent
    return Path(payload["dir"]).parent.parent


def trial_config(payload: dict) -> dict:
    """The config dict the run function gets: the trial's config with its dependency's source
    (`checkpoint:trials/<dep>/backbone.pt`, relative to the results folder) made absolute where this
    attempt runs (experiments/engine/spec.py `resolved_config`)."""
    return resolved_config(payload["config"], results_root(payload))


def setup_trial_env(payload: dict, out: Path) -> None:
    """Process settings of a trial (its own process, or each DDP worker): wandb one run per trial,
    grouped by the grid run, never prompting (offline needs no key); the driver's working folder
    (relative caches data/, weights/ as for a single run)."""
    mode = payload.get("wandb", "offline")
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("WANDB_DIR", str(out))
    os.environ.setdefault("WANDB_CONSOLE", "off")
    if payload.get("cwd"):
        try:
            os.chdir(payload["cwd"])
        except OSError:
            pass
