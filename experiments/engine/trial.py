"""The Ray Tune trainable of the grid: one trial = one `run_pretrain` / `run_segment` run folder.

`make_trainable(run)` builds the Tune trainable (a function trainable class, `GridTrial`) that
the driver (experiments/engine/driver.py) hands to Tune. Each trial receives `config = {"trial": payload}`
where the payload (built by experiments/engine/state.py) holds the trial id, stage, the validated config
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

The run function (`RunFunction`, default `run_stage`: experiments/engine/runner.py) is a parameter;
`report(epoch, metrics)` forwards per-epoch metrics to Tune (`run_stage` calls it from a Lightning
callback on rank 0), so the Ray dashboard / Tune state show progress; the final metrics are reported
once at the end. The trainable is pickled by reference to this module: Ray's workers import it
(`experiments.engine.trial`, the repo is on their PYTHONPATH).

Storage (experiments/engine/results_folder.py): on a folder storage (the default results/) the run folder
IS the trial's folder in the results folder, as described above. On an object store (`payload["storage"]`)
an attempt works in node-local scratch (`payload["dir"]`, the same path on every node): it claims the
trial's folder on storage (`core.storage` attempt token: a superseded attempt stops writing there),
replaces its scratch with the folder on storage (`fetch_run`: a retry on ANOTHER node resumes from the
last persisted checkpoint), fetches its dependencies' files its config points at (a stage-2 trial's
backbone.pt), and persists the run folder at every checkpoint save (`RunPersister`, in the background,
off the training loop), then its artifacts and metrics.json LAST at the end; on failure its error.txt /
error.log too, so that the driver reads why.

Every attempt is recorded (`attempts` in trial.json, and in accounting.json once the run wrote one):
its start time, the node (hostname, IP, Ray node id) and the device name; the first report of an
attempt carries the node, which the driver's `start` line shows.

In the Ray dashboard (actor list, task names) and in log prefixes each trial's actor is named
`trial <id>` (`GridTrial.__repr__`: Ray shows a custom `__repr__` of an actor as its repr name).

A trial whose config says `devices: N` (N > 1) runs as a Ray Train job with N workers (Lightning
DDP, experiments/engine/ray_ddp.py): this trainable is then only its driver; each worker calls the same
run function with `ddp=`. Same folder, same contract.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from core.errors import ConfigError, DataError, NonFiniteError, WeightsError
from core.io import atomic_write_text as _atomic_write
from core.io import read_metrics  # the ONE definition of a finished run folder (the grid imports it here)
from experiments.engine import ray_ddp
from experiments.engine.runner import RunFunction, results_root, run_stage, setup_trial_env, trial_config
from experiments.engine.spec import TRIALS_DIR, source_dependency

ERROR_FILE = "error.txt"
ACCOUNTING_FILE = "accounting.json"
TRIAL_FILE = "trial.json"
TRAINABLE_NAME = "grid_trial"

NOT_RETRIED = (NonFiniteError, ConfigError, DataError, WeightsError)
"""Deterministic failures: the same config fails the same way again, so Tune must not retry them."""


class DeterministicFailure(Exception):
    """`run_payload` raises it (instead of the original error, already recorded in error.txt) for a
    `NOT_RETRIED` error; the trainable turns it into a normal end with `failed` in its report."""


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


# ----------------------------------------------------------------------------- where an attempt runs
def device_name(config: dict) -> str:
    """The device this attempt trains on: the CUDA device's name, else `cpu (<processor>)`."""
    import platform

    try:
        import torch

        if str(config.get("device", "auto")) != "cpu" and torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 - informative only
        pass
    return f"cpu ({platform.processor() or platform.machine()})"


def attempt_record(payload: dict) -> dict:
    """This attempt: start time, node (hostname, IP, Ray node id) and device name."""
    from experiments.engine.ray_backend import node_identity

    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **node_identity(),
            "device": device_name(payload.get("config") or {})}


def _read_json(path: Path) -> Optional[dict]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def record_attempt(payload: dict, out: Path, attempt: dict) -> list[dict]:
    """Write trial.json with this attempt appended to the ones recorded before; returns every attempt."""
    before = (_read_json(out / TRIAL_FILE) or {}).get("attempts")
    attempts = [a for a in before if isinstance(a, dict)] if isinstance(before, list) else []
    attempts.append({"attempt": len(attempts) + 1, **attempt})
    doc = {k: payload[k] for k in ("id", "stage", "depends_on", "config", "resources") if k in payload}
    _atomic_write(out / TRIAL_FILE, json.dumps({**doc, "attempts": attempts}, indent=2))
    return attempts


def _accounting_attempts(out: Path, attempts: list[dict]) -> None:
    """Copy the attempts into accounting.json (the run rewrites that file; this runs after it)."""
    acc = _read_json(out / ACCOUNTING_FILE)
    if acc is not None and acc.get("attempts") != attempts:
        _atomic_write(out / ACCOUNTING_FILE, json.dumps({**acc, "attempts": attempts}, indent=2))


# ----------------------------------------------------------------------------- storage
def persist_on_checkpoint(persister, checkpoint: Path):
    """A Lightning callback calling `persister.save()` after each checkpoint save. It is a `Checkpoint`
    callback, so Lightning runs it after the ModelCheckpoint that writes `checkpoint` (checkpoint
    callbacks go last, in their order) in the hooks where that one saves."""
    from lightning.pytorch.callbacks import Checkpoint

    class PersistOnCheckpoint(Checkpoint):
        def __init__(self) -> None:
            self.seen: Optional[tuple] = None

        def _after_save(self, trainer) -> None:
            if getattr(trainer, "global_rank", 0) != 0:
                return
            try:
                st = checkpoint.stat()
            except OSError:
                return
            if (st.st_mtime_ns, st.st_size) != self.seen:
                self.seen = (st.st_mtime_ns, st.st_size)
                persister.save()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self._after_save(trainer)

        def on_validation_end(self, trainer, pl_module) -> None:
            self._after_save(trainer)

    return PersistOnCheckpoint()


def fetch_inputs(payload: dict, out: Path):
    """On an object store: claim the trial's folder there, replace the node-local scratch `out` with it
    (resume), and fetch the files of its dependencies its config's `checkpoint:` source points at.
    Returns (the trial's storage folder, the attempt's token)."""
    from core.storage import Storage

    root = Storage(payload["storage"])
    store = root.child("trials", payload["id"])
    token = store.claim(owner=f"trial {payload['id']}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    store.fetch_run("", out)
    dep = source_dependency((payload.get("config") or {}).get("source"))
    if dep is not None and dep[0] in payload.get("depends_on", []):
        rel = f"{TRIALS_DIR}/{dep[0]}/{dep[1]}"
        root.download_file(rel, results_root(payload) / rel)
    return store, token


# ----------------------------------------------------------------------------- one trial
def run_payload(payload: dict, run: Optional[RunFunction] = None, report_epochs: bool = True,
                attempt: Optional[dict] = None) -> dict:
    """Run one trial described by `payload` with `run` (default `run_stage`); plain Python,
    Tune-independent for tests. `attempt`: where it runs (`attempt_record`, default: here and now).

    devices > 1: the run is a Ray Train job (experiments/engine/ray_ddp.py; needs the grid's Ray) whose
    workers call `run`. On an object store (`payload["storage"]`) the folder travels (module docstring)."""
    run = run or run_stage
    tid = payload["id"]
    stage = payload["stage"]
    out = Path(payload["dir"])
    store = token = persister = None
    if payload.get("storage"):
        from core.storage import RunPersister, Storage

        done = Storage(payload["storage"]).child("trials", tid).read_metrics()
        if done is not None:  # finished earlier (another attempt or an earlier driver): never rerun
            return done
        store, token = fetch_inputs(payload, out)
        persister = RunPersister(store, out, token=token)
    else:
        out.mkdir(parents=True, exist_ok=True)
        done = read_metrics(out)
        if done is not None:  # finished earlier (another attempt or an earlier driver): never rerun
            return done
    attempts = record_attempt(payload, out, attempt or attempt_record(payload))
    setup_trial_env(payload, out)
    try:
        (out / ERROR_FILE).unlink(missing_ok=True)
        if ray_ddp.workers(payload) > 1:
            metrics = ray_ddp.run_ddp(payload, run=run) or {}
        else:
            extra = {}
            if persister is not None:
                from core.runs.common import CHECKPOINT_DIR, LAST_CKPT

                extra["callbacks"] = [persist_on_checkpoint(persister, out / CHECKPOINT_DIR / LAST_CKPT)]
            metrics = run(stage, trial_config(payload), out, progress=False, wandb_group=payload.get("group"), name=tid,
                          report=TuneEpochReporter(tid) if report_epochs else None, **extra)
        if read_metrics(out) is None:
            raise RuntimeError(f"the {stage} run returned without writing {out / 'metrics.json'}")
        metrics = read_metrics(out) or metrics
        _accounting_attempts(out, attempts)
        if persister is not None:
            persister.finish()  # artifacts, then metrics.json LAST
    except BaseException as e:
        line = one_line_error(e)
        try:
            _atomic_write(out / ERROR_FILE, line + "\n")
            with open(out / "error.log", "a", encoding="utf-8") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}\n")
        except OSError:
            pass
        if store is not None:  # the driver reads why from storage; the checkpoint is there for a retry
            try:
                _accounting_attempts(out, attempts)
                persister.wait()
            except BaseException:  # noqa: BLE001 - the original error is the one to report
                pass
            try:
                store.persist_run(out, token=token)
            except Exception:  # noqa: BLE001 - e.g. superseded by another attempt
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
        attempt = attempt_record(payload)
        tune.report({"trial": payload["id"], "done_run": 0, **{f"attempt_{k}": v for k, v in attempt.items()
                                                                if k in ("hostname", "ip", "node_id", "device")}})
        try:
            metrics = run_payload(payload, run=run, attempt=attempt)
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
