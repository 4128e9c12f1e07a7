"""The Ray Tune trainable of the grid: one trial = one `run_pretrain` / `run_segment` run folder.

`make_trainable(run)` builds the Tune trainable (a function trainable class, `GridTrial`) that
experiments/grid.py hands to `tune.with_resources`. Each trial receives `config = {"trial": payload}`
where the payload (built by experiments/grid.py) holds the trial id, stage, the validated config
dict, the trial folder, the wandb mode and group, and the driver's working directory. The run folder
is `<results>/trials/<id>/`, NOT Ray's trial folder, so that:
  * a finished trial (metrics.json present, `core.io.read_metrics`) is never rerun, even by
    a retry or a new driver;
  * a retry after a failure (Ray Tune `max_failures`) or a `--resume` after a kill calls the same
    run function on the same folder, which resumes from `checkpoints/last.ckpt`.
On failure the trainable writes `error.txt` (one line: `<Type>: <message>`) in the trial folder and
re-raises, so Ray records the error, retries the trial (`retries:` -> Tune's FailureConfig.max_failures)
and the grid can report why dependants were skipped. Retries are for crashes: a DETERMINISTIC failure
(`NOT_RETRIED`: `core.errors.NonFiniteError`, a divergence, and the user errors ConfigError /
DataError / WeightsError) would fail again the same way, so the trainable records it the same way
but returns normally with `failed` in its last report: Tune counts no failure, and the grid marks
the trial failed with that one line as the reason.

The run function (`RunFunction`, default `run_stage`) is a parameter: a trial calls
    run(stage, config, out_dir, *, progress, wandb_group, name, report=None, callbacks=(), ddp=None) -> dict
with the trial's config DICT; `run_stage` validates it into a `PretrainConfig` / `SegmentConfig` and
calls `core.runs.pretrain.run_pretrain` / `core.runs.segment.run_segment`. `report(epoch, metrics)`
forwards per-epoch metrics to Tune (`run_stage` calls it from a Lightning callback on rank 0), so the
Ray dashboard / Tune state show progress; the final metrics are reported once at the end.

In the Ray dashboard (actor list, task names) and in log prefixes each trial's actor is named
`trial <id>` (`GridTrial.__repr__`: Ray shows a custom `__repr__` of an actor as its repr name).

A trial whose config says `devices: N` (N > 1) runs as a Ray Train job with N workers (Lightning
DDP, experiments/ray_ddp.py): this trainable is then only its driver; each worker calls the same
run function with `ddp=`. Same folder, same contract.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from core.errors import ConfigError, DataError, NonFiniteError, WeightsError
from core.io import atomic_write_text as _atomic_write
from core.io import read_metrics  # the ONE definition of a finished run folder (grid.py imports it here)

ERROR_FILE = "error.txt"
TRIAL_FILE = "trial.json"
TRAINABLE_NAME = "grid_trial"

NOT_RETRIED = (NonFiniteError, ConfigError, DataError, WeightsError)
"""Deterministic failures: the same config fails the same way again, so Tune must not retry them."""


class DeterministicFailure(Exception):
    """`run_payload` raises it (instead of the original error, already recorded in error.txt) for a
    `NOT_RETRIED` error; the trainable turns it into a normal end with `failed` in its report."""


RunFunction = Callable[..., dict]
"""run(stage, config: dict, out_dir: Path, *, progress, wandb_group, name, report=None, callbacks=(),
ddp=None) -> metrics dict (see the module docstring)."""


# ----------------------------------------------------------------------------- helpers

def read_error(trial_dir: Path) -> Optional[str]:
    try:
        line = (Path(trial_dir) / ERROR_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return " ".join(line.split()) or None


def one_line_error(e: BaseException, limit: int = 400) -> str:
    msg = " ".join(str(e).split())
    line = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def scalar_metrics(m: dict) -> dict:
    """Finite numeric metrics only (what Tune can show as columns)."""
    out = {}
    for k, v in (m or {}).items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[str(k)] = v
    return out


def trial_label(config: Any) -> str:
    """`trial <id>` for a Tune config `{"trial": payload}` (the actor's name in the dashboard)."""
    try:
        return f"trial {config['trial']['id']}"
    except (KeyError, TypeError):
        return TRAINABLE_NAME


# ----------------------------------------------------------------------------- the real run
def build_config(stage: str, d: dict):
    """The validated config object of a trial (`PretrainConfig` / `SegmentConfig`)."""
    from core.config import PretrainConfig, SegmentConfig

    return (PretrainConfig if stage == "pretrain" else SegmentConfig).from_dict(d)


def stage_function(stage: str) -> Callable[..., dict]:
    """`core.runs.pretrain.run_pretrain` or `core.runs.segment.run_segment`."""
    if stage == "pretrain":
        from core.runs.pretrain import run_pretrain

        return run_pretrain
    from core.runs.segment import run_segment

    return run_segment


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


# ----------------------------------------------------------------------------- Tune reporting
class TuneEpochReporter:
    """`report(epoch, metrics)`: forwards per-epoch scalar metrics to Tune; never breaks a run."""

    def __init__(self, tid: str):
        self.tid = tid

    def __call__(self, epoch: int, metrics: dict) -> None:
        try:
            from ray import tune

            tune.report({"trial": self.tid, "epoch": int(epoch), "done_run": 0, **scalar_metrics(metrics)})
        except Exception:  # e.g. outside a Tune session
            pass


# ----------------------------------------------------------------------------- one trial
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


def run_payload(payload: dict, run: Optional[RunFunction] = None, report_epochs: bool = True) -> dict:
    """Run one trial described by `payload` with `run` (default `run_stage`); plain Python,
    Tune-independent for tests.

    devices > 1: the run is a Ray Train job (experiments/ray_ddp.py; needs the grid's Ray) whose
    workers call `run`."""
    run = run or run_stage
    tid = payload["id"]
    stage = payload["stage"]
    out = Path(payload["dir"])
    out.mkdir(parents=True, exist_ok=True)
    done = read_metrics(out)
    if done is not None:  # finished earlier (another attempt or an earlier driver): never rerun
        return done
    _atomic_write(out / TRIAL_FILE, json.dumps(
        {k: payload[k] for k in ("id", "stage", "depends_on", "config", "resources") if k in payload}, indent=2))
    setup_trial_env(payload, out)
    try:
        (out / ERROR_FILE).unlink(missing_ok=True)
        from experiments import ray_ddp

        if ray_ddp.workers(payload) > 1:
            metrics = ray_ddp.run_ddp(payload, run=run) or {}
        else:
            metrics = run(stage, payload["config"], out, progress=False, wandb_group=payload.get("group"), name=tid,
                          report=TuneEpochReporter(tid) if report_epochs else None)
        if read_metrics(out) is None:
            raise RuntimeError(f"the {stage} run returned without writing {out / 'metrics.json'}")
        metrics = read_metrics(out) or metrics
    except BaseException as e:
        line = one_line_error(e)
        try:
            _atomic_write(out / ERROR_FILE, line + "\n")
            with open(out / "error.log", "a", encoding="utf-8") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}\n")
        except OSError:
            pass
        if isinstance(e, NOT_RETRIED):
            raise DeterministicFailure(line) from e
        raise
    return metrics


# ----------------------------------------------------------------------------- the trainable
def make_trainable(run: Optional[RunFunction] = None, resources: Optional[Callable[[dict], dict]] = None):
    """The grid's Ray Tune trainable: a function trainable class (`ray.tune.trainable.wrap_function`)
    running `run_payload(config["trial"], run)` and reporting the final metrics, with
    `tune.with_resources(..., resources)` applied when `resources` is given.

    Its actors are named `trial <id>`: `__repr__` is the repr name Ray shows in the dashboard's actor
    list and in log prefixes (the class itself is `grid_trial`). `run`: the run function of every
    trial (default `run_stage`, the real runs); it is pickled with the trainable, so Ray's worker
    processes must be able to import it or unpickle it by value."""
    from ray import tune
    from ray.tune.trainable import wrap_function

    def grid_trial(config: dict) -> None:
        payload = config["trial"]
        try:
            metrics = run_payload(payload, run=run)
        except DeterministicFailure as e:  # recorded in error.txt; ends normally so that Tune does not retry
            tune.report({"trial": payload["id"], "done_run": 1, "failed": str(e)})
            return
        tune.report({"trial": payload["id"], "done_run": 1, **scalar_metrics(metrics)})

    class GridTrial(wrap_function(grid_trial, name=TRAINABLE_NAME)):  # type: ignore[misc]
        def __repr__(self) -> str:
            return trial_label(getattr(self, "config", None))

    cls = tune.with_resources(GridTrial, resources=resources) if resources is not None else GridTrial
    cls.__name__ = cls.__qualname__ = TRAINABLE_NAME  # the class column of the dashboard / Tune's trainable name
    return cls
