"""The one run skeleton shared by pretraining and segmentation: validate, build, resume, fit,
evaluate, write.

`execute(stage_run, out_dir, ...)` drives a `StageRun` (core/runs/pretrain.py `PretrainRun`,
core/runs/segment.py `SegmentRun`) through the same steps, so the rules of a run folder live here:

1. finished (`read_metrics`: metrics.json readable) -> its metrics, nothing trained;
2. an unfinished folder holding another config is refused (mixing two runs);
3. `build()`: data, model and weights are built and checked (one-line TwinsegError) BEFORE any
   file is written;
4. config.json, `before_fit()` (e.g. the "before" evaluation), loggers (CSV + wandb), the Trainer;
5. `trainer.fit`, resuming from checkpoints/last.ckpt when present;
6. `on_every_rank_after_fit()` (collective calls allowed); then rank 0 only: `after_fit()` evaluates and writes the stage's artifact (backbone.pt / model.pt),
   history.csv, then LAST and atomically metrics.json, checked against core/runs/metrics_schema.py;
7. on any failure the artifact is removed (checkpoints stay for resume): nothing that could pass
   for a result survives.

`ddp` (`core.runs.common.ExternalDDP`) makes this call one rank of an externally launched DDP job:
every rank builds and fits, only global rank 0 writes files, the other ranks return {}.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from core.errors import ConfigError
from core.runs import metrics_schema
from core.runs.common import (
    CONFIG_FILE,
    METRICS_FILE,
    ExternalDDP,
    _jsonable,
    atomic_write_json,
    finish_wandb,
    last_checkpoint,
    make_loggers,
    make_trainer,
    read_metrics,
    resolve_accelerator,
    write_history,
)


class StageRun:
    """One stage's part of a run. Subclasses set `stage`, `artifact`, `summary_keys` and implement
    the hooks; `self.cfg` is the validated config, `self.ddp` the DDP hook (None: one process)."""

    stage: str = ""
    artifact: str = ""  # the file a finished run exports (removed if the run fails)
    summary_keys: tuple[str, ...] = ()  # metrics copied to the wandb run summary as final/<key>

    def __init__(self, cfg, ddp: Optional[ExternalDDP] = None):
        self.cfg = cfg
        self.ddp = ddp

    def resolve_device(self) -> None:
        """`self.accelerator` ("cpu" | "gpu") and `self.device` (where evaluations outside fit run)."""
        if self.ddp is None:  # device=cuda without a GPU: ConfigError before anything is written
            self.accelerator, _ = resolve_accelerator(self.cfg.device, self.cfg.devices)
            self.device = torch.device("cuda" if self.accelerator == "gpu" else "cpu")
        else:  # one device per rank, chosen by the launcher
            self.accelerator, self.device = self.ddp.accelerator, torch.device(self.ddp.device)

    @property
    def is_writer(self) -> bool:
        return self.ddp is None or self.ddp.is_rank_zero

    # ------------------------------------------------------------------ hooks
    def build(self) -> None:
        """Build and check data, model and weights; raise one-line errors; write nothing."""
        raise NotImplementedError

    def before_fit(self) -> None:
        """After config.json is written, before training (e.g. evaluate the initial backbone)."""

    def module(self):
        """The LightningModule to fit."""
        raise NotImplementedError

    def fit_kwargs(self, trainer) -> dict:
        """Dataloaders for `trainer.fit`."""
        raise NotImplementedError

    def callbacks(self, out_dir: Path) -> list:
        """The stage's diagnostic callbacks."""
        return []

    def trainer_limits(self) -> dict:
        """How long to train: `make_trainer`'s max_epochs / max_steps / val_every_steps."""
        return {"max_epochs": self.cfg.epochs}

    def on_every_rank_after_fit(self, trainer) -> None:
        """Every rank, after training (collective calls allowed, e.g. a last validation pass)."""

    def after_fit(self, trainer, out_dir: Path) -> dict:
        """Rank 0 alone (no collective call), after training: evaluate, write the artifact; return the stage's metrics."""
        raise NotImplementedError

    def extra_metric_keys(self) -> Iterable[str]:
        """Keys beyond the stage's schema this run may write (an SSL method's `result_keys`)."""
        return ()

    def default_name(self, out_dir: Path) -> str:
        return out_dir.name


def check_same_config(out_dir: Path, cfg) -> None:
    """Resuming into a folder that holds another configuration would mix two runs: refuse."""
    p = out_dir / CONFIG_FILE
    if p.is_file() and last_checkpoint(out_dir) is not None:
        try:
            old = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return
        new = cfg.to_dict()
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(
                f"{out_dir} holds an unfinished run with a different config (fields {', '.join(diff)}); "
                f"use another output folder or delete {out_dir}"
            )


def execute(run: StageRun, out_dir, *, progress: bool = True, wandb_group: Optional[str] = None,
            callbacks: Iterable = (), name: Optional[str] = None) -> dict:
    """Run `run` into `out_dir` (see the module docstring); returns the metrics (== metrics.json)."""
    import lightning.pytorch as pl

    from core.accounting import AccountingCallback

    out_dir = Path(out_dir)
    done = read_metrics(out_dir)
    if done is not None:
        return done
    cfg = run.cfg
    check_same_config(out_dir, cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run.resolve_device()
    run.build()
    # Only now, with data, model and weights known good, does the run folder appear.
    out_dir.mkdir(parents=True, exist_ok=True)
    if run.is_writer:
        atomic_write_json(out_dir / CONFIG_FILE, cfg.to_dict())
    artifact = out_dir / run.artifact
    loggers: list = []
    try:
        run.before_fit()
        loggers = make_loggers(out_dir, cfg.wandb, wandb_group, name or run.default_name(out_dir), cfg.to_dict())
        accounting = AccountingCallback()
        trainer = make_trainer(out_dir=out_dir, device=cfg.device, devices=cfg.devices, precision=cfg.precision,
                               loggers=loggers, progress=progress, ddp=run.ddp,
                               callbacks=[accounting, *run.callbacks(out_dir), *callbacks], **run.trainer_limits())
        resume = last_checkpoint(out_dir)
        if resume is not None:  # Lightning warns that the checkpoint folder it resumes from is not empty
            warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")
        trainer.fit(run.module(), ckpt_path=str(resume) if resume else None, **run.fit_kwargs(trainer))
        if trainer.interrupted:
            raise KeyboardInterrupt
        run.on_every_rank_after_fit(trainer)
        if not trainer.is_global_zero:  # ranks other than 0 write nothing
            return {}
        metrics: dict[str, Any] = {"stage": run.stage, **run.after_fit(trainer, out_dir), **accounting.summary()}
        write_history(out_dir)
        metrics_schema.check(run.stage, metrics, run.extra_metric_keys())
        _wandb_summary(loggers, {k: metrics.get(k) for k in run.summary_keys})
        atomic_write_json(out_dir / METRICS_FILE, metrics)
        return _jsonable(metrics)  # exactly what metrics.json holds (NaN -> None)
    except BaseException:
        if run.is_writer:  # nothing that could pass for a result survives (checkpoints stay for resume)
            artifact.unlink(missing_ok=True)
        raise
    finally:
        finish_wandb(loggers)


def _wandb_summary(loggers: list, values: dict) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and values:
            try:
                lg.experiment.summary.update({f"final/{k}": v for k, v in values.items()})
            except Exception as e:  # noqa: BLE001 - logging never fails a finished run, but says so
                warnings.warn(f"wandb: writing the final summary failed ({type(e).__name__}: {e}); "
                              "metrics.json is complete", RuntimeWarning, stacklevel=2)
