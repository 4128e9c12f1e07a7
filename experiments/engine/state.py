"""The grid's state: the status of every trial (the single place that decides what may run next), and
summary.json / summary.csv, rewritten atomically after every trial event. A trial whose run folder holds
metrics.json is done (also at a resume: never rerun). On an object store (results_folder.Results.remote)
a trial's result and error line are read from its folder there, and the summary is uploaded after each
write (under the driver's claim of the results folder: a newer driver's claim stops this one)."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Optional

from core.errors import StorageError
from core.io import atomic_write_text
from core.storage import Storage
from core.stages import get_stage
from experiments.engine.axes import axis_names
from experiments.engine.console import Console, fmt, now_iso
from experiments.engine.results_folder import file_sha256, results_for
from experiments.engine.scheduler import critical_path_priority
from experiments.engine.spec import GridSpec
from experiments.engine.trial import ERROR_FILE, read_error, read_metrics, scalar_metrics

STATUSES = ("done", "failed", "skipped", "pending")


def csv_config_keys() -> tuple[str, ...]:
    """summary.csv's config columns: the stage-1 axes (declared once in engine/axes.py), then stage-2 choices;
    values from the trial's labels first."""
    return ("evaluation", *axis_names(), "head", "fusion", "mode", "epochs")


class GridState:
    """Status of every trial; the single place that decides what may run next."""

    def __init__(self, spec: GridSpec, results_dir: Path, created: str, console: Console,
                 group: str, wandb: str, results=None, driver_token: Optional[str] = None):
        self.spec = spec
        self.results_dir = results_dir  # the driver's local folder (the results folder itself on a folder storage)
        self.results = results if results is not None else results_for(Storage(results_dir))
        self.driver_token = driver_token
        self.created = created
        self.console = console
        self.group = group
        self.wandb = wandb
        self.trials = spec.by_id()
        self.order = [t.id for t in spec.trials]
        self.dependants = spec.dependants()
        self.status: dict[str, str] = {}
        self.reason: dict[str, str] = {}
        self.metrics: dict[str, dict] = {}
        self.launched: set[str] = set()  # handed to Tune during this driver run and not finished
        self.tune_ids: dict[str, str] = {}  # Tune trial_id -> our id
        self.started: dict[str, float] = {}
        self.dashboard_url = ""
        self.interrupted = False
        self.signal_name = ""  # "SIGTERM" / "SIGINT" when a signal stopped the grid
        self.grid_sha256 = file_sha256(results_dir / "grid.yaml")  # tells a grid edit from a code change
        self.write_error: Optional[OSError] = None  # the first failed summary write (disk full ...)
        self.ray_started = False
        listed = set(self.results.storage.list("trials")) if self.results.remote else set()
        for tid in self.order:
            m = self.trial_metrics(tid) if not self.results.remote or f"{tid}/metrics.json" in listed else None
            if m is not None:
                self.status[tid], self.metrics[tid] = "done", m
                self.reason[tid] = "finished earlier (metrics.json present); not rerun"
            else:
                self.status[tid], self.reason[tid] = "pending", ""
        self._priority = critical_path_priority(spec)

    # --------------------------------------------------------------- queries
    def trial_dir(self, tid: str) -> Path:
        return self.results_dir / "trials" / tid

    @property
    def where(self) -> str:
        """The results folder as the user names it (a path or a URI)."""
        return self.results.where

    def where_of(self, *parts: str) -> str:
        """A file of the results folder as the user names it."""
        return self.results.storage.join(*parts)

    def trial_metrics(self, tid: str) -> Optional[dict]:
        """The trial's result (metrics.json in its folder on the results storage), or None."""
        if not self.results.remote:
            return read_metrics(self.trial_dir(tid))
        try:
            return self.results.storage.child("trials", tid).read_metrics()
        except StorageError as e:
            self.console.line(f"cannot read the result of {tid}: {e}", "bold red")
            return None

    def trial_error(self, tid: str) -> Optional[str]:
        """The one-line error the trial's last attempt recorded (error.txt), or None."""
        if not self.results.remote:
            return read_error(self.trial_dir(tid))
        try:
            return " ".join(self.results.storage.read_text(f"trials/{tid}/{ERROR_FILE}").split()) or None
        except (FileNotFoundError, StorageError, UnicodeDecodeError):
            return None

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        return out

    def ready(self) -> list[str]:
        out = []
        for tid in self.order:
            if self.status[tid] != "pending" or tid in self.launched:
                continue
            if all(self.status[d] == "done" for d in self.trials[tid].depends_on):
                out.append(tid)
        return sorted(out, key=self._priority.__getitem__)

    def unlaunched_pending(self) -> list[str]:
        return [t for t in self.order if self.status[t] == "pending" and t not in self.launched]

    # --------------------------------------------------------------- transitions
    def payload(self, tid: str) -> dict:
        t = self.trials[tid]
        return {
            "id": tid,
            "stage": t.stage,
            "config": t.config,
            "depends_on": list(t.depends_on),
            "resources": dict(t.resources),
            "dir": str(self.results.trials_root / tid),
            "ray_storage": str(self.results_dir / "ray"),  # Ray Train runs of devices > 1 trials
            "storage": self.results.storage.join() if self.results.remote else None,
            "trials_root": str(self.results.trials_root),
            "wandb": self.wandb,
            "group": self.group,
            "cwd": os.getcwd(),
        }

    def launch(self, tid: str, tune_id: str) -> None:
        self.launched.add(tid)
        self.tune_ids[tune_id] = tid
        self.started[tid] = time.time()

    def finish(self, tid: str, error: bool, completed: bool = True, tune_error: Optional[str] = None) -> bool:
        """Record the end of a launched trial; False if it was already recorded (idempotent).

        `completed`: the trainable returned normally (its last report has done_run=1); a trial Tune
        stopped without error (Ctrl-C) stays pending, to be resumed with --resume."""
        if tid not in self.launched:
            return False
        self.launched.discard(tid)
        m = self.trial_metrics(tid)
        if not error and not completed and m is None:
            self.interrupted = True
            self.reason[tid] = "stopped before finishing; continue with --resume"
            self.console.line(f"stopped  {tid}: {self.reason[tid]}", "yellow")
            self.write_summary()
            return True
        if not error and m is not None:
            self.status[tid], self.reason[tid], self.metrics[tid] = "done", "", m
            secs = time.time() - self.started.get(tid, time.time())
            keys = get_stage(self.trials[tid].stage).key_metrics
            shown = ", ".join(f"{k}={fmt(m.get(k))}" for k in keys if k in m)
            self.console.line(f"done     {tid} in {secs:.0f}s" + (f": {shown}" if shown else ""), "green")
        else:
            why = self.trial_error(tid) or tune_error
            if not why:
                why = "finished without writing metrics.json" if not error else "the trial raised (see error.log)"
            self.status[tid], self.reason[tid] = "failed", why
            self.console.line(f"FAILED   {tid}: {why} (log: {self.where_of('trials', tid, 'error.log')})", "bold red")
            self._skip_dependants(tid, f"dependency {tid} failed: {why}")
        self.write_summary()
        return True

    def _skip_dependants(self, tid: str, reason: str) -> None:
        for d in self.dependants.get(tid, []):
            if self.status[d] == "pending" and d not in self.launched:
                self.status[d], self.reason[d] = "skipped", reason
                self.console.line(f"skipped  {d}: {reason}", "yellow")
                self._skip_dependants(d, reason)

    def mark_interrupted(self) -> None:
        for tid in self.order:
            if self.status[tid] == "pending":
                self.reason[tid] = ("interrupted while running; continue with --resume" if tid in self.launched
                                    else "interrupted before it started; continue with --resume")
        self.launched.clear()

    # --------------------------------------------------------------- summary
    def entries(self) -> list[dict]:
        out = []
        for tid in self.order:
            t = self.trials[tid]
            out.append({
                "id": tid,
                "stage": t.stage,
                "status": self.status[tid],
                "reason": self.reason.get(tid, ""),
                "depends_on": list(t.depends_on),
                "config": t.config,
                "metrics": self.metrics.get(tid, {}),
                "dir": f"trials/{tid}",
                "resources": t.resources,
                "labels": t.labels,
            })
        return out

    def write_summary(self) -> None:
        entries = self.entries()
        doc = {
            "grid": self.spec.name,
            "created": self.created,
            "updated": now_iso(),
            "grid_file": "grid.yaml",
            "grid_sha256": self.grid_sha256 or None,
            "wandb_group": self.group,
            "dashboard": self.dashboard_url or None,
            "counts": self.counts(),
            "trials": entries,
        }
        try:
            atomic_write_text(self.results_dir / "summary.json", json.dumps(doc, indent=2, default=str) + "\n")
            atomic_write_text(self.results_dir / "summary.csv", summary_csv(entries))
            if self.results.remote:
                if self.driver_token is not None:
                    self.results.storage.check_attempt("", self.driver_token)
                self.results.upload("summary.json", "summary.csv")
        except (OSError, StorageError) as e:  # disk full, folder gone: said once, the grid ends with one line
            if self.write_error is None:
                self.write_error = e
                self.console.line(f"cannot write {self.where_of('summary.json')} ({getattr(e, 'strerror', None) or e}); "
                                  "the trials go on, the summary is stale", "bold red")


def summary_csv(entries: list[dict]) -> str:
    config_keys = csv_config_keys()
    metric_keys: list[str] = []
    for e in entries:
        for k in scalar_metrics(e["metrics"]):
            if k not in metric_keys and k not in config_keys:
                metric_keys.append(k)
    cols = ["id", "stage", "status", "reason", "depends_on", "dir", *config_keys, *metric_keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for e in entries:
        row = {k: e.get(k, "") for k in ("id", "stage", "status", "reason", "dir")}
        row["depends_on"] = ";".join(e["depends_on"])
        for k in config_keys:
            v = (e.get("labels") or {}).get(k)
            if v is None:
                v = e["metrics"].get(k, e["config"].get(k, ""))
            row[k] = "" if v is None else v
        row.update(scalar_metrics(e["metrics"]))
        w.writerow(row)
    return buf.getvalue()
