"""Run the whole study (stage 1 pretraining -> stage 2 segmentation) as one Ray Tune experiment.

    python experiments/grid.py [--grid smoke|paper|FILE] [--data-root DIR] [--output DIR] [--resume]
                               [--address ADDR] [--wandb offline|online|disabled] [--max-concurrent N]
                               [--no-report] [--num-cpus N] [--no-dashboard] [--dry-run]

Design (see also experiments/gridspec.py and experiments/trial.py):
* The grid file is validated and expanded into trials (with a dependency graph) before Ray starts;
  a malformed file is one line on stderr and exit 2.
* Pre-start checks, before Ray starts or any folder is written (`pre_start_problems`): the grid's
  per-trial problems (gridspec: image sizes, head / fusion fit, (source, backbone) pairs without
  weights), wandb credentials, the given data folders (layout only, nothing generated), every
  missing weight file when offline (with its fetch command), and, for a local start, whether each
  trial fits this machine (CPUs, GPUs counted by torch; --num-cpus replaces the CPU count). EVERY
  problem is printed, one `twinseg: error: <file>: <where>: <problem>; <fix>` line each on stderr,
  and the exit status is 2. With --address the cluster is only known once Ray is up: that check
  runs after the start (a warning there, the autoscaler may add nodes).
* `--dry-run`: the same checks, then the plan on stdout (one line per trial: id, stage, what it
  depends on, its resources; totals per stage; which cluster size was assumed) and the problems on
  stderr; exit 0 when there is none, 2 otherwise. It starts no Ray, creates no results folder and
  generates no dataset.
* ONE Tune experiment runs every trial. Its search algorithm is a small dependency-aware scheduler
  (`GridScheduler`, a Tune `Searcher`): whenever Tune asks for a trial, it hands out the next trial
  whose dependencies are done (the one with the longest estimated path to the end of the grid first:
  experiments/cost.py's estimates), up to `max_concurrent` at once. A stage-2 trial therefore starts as
  soon as ITS stage-1 trial is done (no barrier between stages), and every trial is a Tune trial
  (an actor with its own resources, listed in the Ray dashboard as `trial <id>`: the trainable's
  `__repr__`, experiments/trial.py `make_trainable`).
* A trial whose settings say `devices: N` (N > 1) is the driver of a Ray Train job of N workers
  (Lightning DDP, experiments/ray_ddp.py): the Tune trial reserves 0.01 CPU, each worker the
  trial's `resources`; the pre-start check counts N x resources (+ the driver).
* Each trial writes its run folder to `<results>/trials/<id>/`. `metrics.json` present = finished:
  finished trials are never rerun (also under `--resume`); a retried or resumed trial calls the run
  function on the same folder, which resumes from `checkpoints/last.ckpt`.
* Failures: Tune retries a trial `retries` times (FailureConfig.max_failures). A trial that still
  fails is `failed`; every trial depending on it is `skipped` ("dependency <id> failed: <error>").
* `summary.json` / `summary.csv` are rewritten atomically after every trial event.
* Local start: `ray.init` on loopback with the dashboard; Ray's token authentication stays on (Ray
  creates the token in ~/.ray/auth_token); the URL and where the token is are printed at the start
  and the end. `--address` joins an existing cluster instead.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import errno
import io
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python experiments/grid.py` puts experiments/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

from core.cli import fail, guard  # noqa: E402
from core.config import WANDB_MODES, check_wandb  # noqa: E402
from core.errors import ConfigError, DataError, StorageError, TwinsegError  # noqa: E402
from core.folder_lock import folder_lock  # noqa: E402
from experiments import gridspec  # noqa: E402
from experiments.ray_ddp import DRIVER_CPU  # noqa: E402
from experiments.trial import read_error, read_metrics, scalar_metrics  # noqa: E402

STATUSES = ("done", "failed", "skipped", "pending")
KEY_METRICS = {"pretrain": ("knn_acc", "final_loss"), "segment": ("mIoU", "aAcc")}
def csv_config_keys() -> tuple[str, ...]:
    """summary.csv's config columns: the stage-1 axes (declared once in gridspec), then stage-2 choices;
    values from the trial's labels first."""
    return ("evaluation", *gridspec.axis_names(), "head", "fusion", "mode", "epochs")


# ============================================================================ console
class Console:
    """One line per event, with a time stamp (rich when available, plain text otherwise)."""

    def __init__(self) -> None:
        try:
            from rich.console import Console as RichConsole

            self._rich = RichConsole(highlight=False, soft_wrap=True)
        except ImportError:  # pragma: no cover
            self._rich = None

    def __getstate__(self) -> dict:  # Tune pickles its searcher/callbacks (which hold the console)
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def line(self, msg: str, style: Optional[str] = None) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self._rich is not None:
            from rich.markup import escape

            text = f"[dim]{stamp}[/dim] " + (f"[{style}]{escape(msg)}[/{style}]" if style else escape(msg))
            self._rich.print(text)
        else:
            print(f"{stamp} {msg}", flush=True)
        sys.stdout.flush()


# ============================================================================ atomic files
from core.io import atomic_write_text as atomic_write  # noqa: E402


# ============================================================================ state
class GridState:
    """Status of every trial; the single place that decides what may run next."""

    def __init__(self, spec: gridspec.GridSpec, results_dir: Path, created: str, console: Console,
                 group: str, wandb: str):
        self.spec = spec
        self.results_dir = results_dir
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
        for tid in self.order:
            m = read_metrics(self.trial_dir(tid))
            if m is not None:
                self.status[tid], self.metrics[tid] = "done", m
                self.reason[tid] = "finished earlier (metrics.json present); not rerun"
            else:
                self.status[tid], self.reason[tid] = "pending", ""
        self._priority = self._make_priority()

    # --------------------------------------------------------------- queries
    def trial_dir(self, tid: str) -> Path:
        return self.results_dir / "trials" / tid

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        return out

    def _make_priority(self) -> dict[str, tuple]:
        """Longest estimated path to the end of the grid first (critical-path list scheduling: a slow
        pretraining whose segmentation trials wait on it starts before quick independent trials), then
        the grid's order. A trial's estimate is experiments/cost.py's device time."""
        from experiments import cost

        est = {tid: cost.estimate_trial(self.trials[tid]).device_hours for tid in self.order}
        path: dict[str, float] = {}

        def longest(tid: str) -> float:  # the trial's time + its longest chain of dependants (a DAG)
            if tid not in path:
                path[tid] = est[tid] + max((longest(d) for d in self.dependants[tid]), default=0.0)
            return path[tid]

        return {tid: (-longest(tid), i) for i, tid in enumerate(self.order)}

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
            "dir": str(self.trial_dir(tid)),
            "ray_storage": str(self.results_dir / "ray"),  # Ray Train runs of devices > 1 trials
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
        m = read_metrics(self.trial_dir(tid))
        if not error and not completed and m is None:
            self.interrupted = True
            self.reason[tid] = "stopped before finishing; continue with --resume"
            self.console.line(f"stopped  {tid}: {self.reason[tid]}", "yellow")
            self.write_summary()
            return True
        if not error and m is not None:
            self.status[tid], self.reason[tid], self.metrics[tid] = "done", "", m
            secs = time.time() - self.started.get(tid, time.time())
            keys = KEY_METRICS[self.trials[tid].stage]
            shown = ", ".join(f"{k}={_fmt(m.get(k))}" for k in keys if k in m)
            self.console.line(f"done     {tid} in {secs:.0f}s" + (f": {shown}" if shown else ""), "green")
        else:
            why = read_error(self.trial_dir(tid)) or tune_error
            if not why:
                why = "finished without writing metrics.json" if not error else "the trial raised (see error.log)"
            self.status[tid], self.reason[tid] = "failed", why
            self.console.line(f"FAILED   {tid}: {why} (log: {self.trial_dir(tid) / 'error.log'})", "bold red")
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
            "updated": _now_iso(),
            "grid_file": "grid.yaml",
            "grid_sha256": self.grid_sha256 or None,
            "wandb_group": self.group,
            "dashboard": self.dashboard_url or None,
            "counts": self.counts(),
            "trials": entries,
        }
        try:
            atomic_write(self.results_dir / "summary.json", json.dumps(doc, indent=2, default=str) + "\n")
            atomic_write(self.results_dir / "summary.csv", summary_csv(entries))
        except OSError as e:  # disk full, folder gone: said once, the grid ends with one line (main)
            if self.write_error is None:
                self.write_error = e
                self.console.line(f"cannot write {self.results_dir / 'summary.json'} ({e.strerror or e}); "
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ============================================================================ Tune glue
def make_scheduler(state: GridState, max_concurrent: int):
    from ray.tune.search import Searcher

    class GridScheduler(Searcher):
        """Hands out trials in dependency order; never more than `max_concurrent` at once."""

        def __init__(self) -> None:
            super().__init__(metric=None, mode=None)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            if len(state.launched) >= max_concurrent:
                return None
            ready = state.ready()
            if not ready:
                # Nothing can start now: finished if nothing is left to hand out, else wait for the
                # running trials (their dependants become ready, or get skipped, when they end).
                return Searcher.FINISHED if not state.unlaunched_pending() else None
            tid = ready[0]
            state.launch(tid, trial_id)
            return {"trial": state.payload(tid)}

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            tid = state.tune_ids.get(trial_id)
            if tid is not None:
                state.finish(tid, error, completed=(result or {}).get("done_run") == 1)

        def save(self, checkpoint_path: str) -> None:  # state lives in the results folder
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

    return GridScheduler()


def make_console_callback(state: GridState, retries: int):
    from ray.tune import Callback

    class ConsoleCallback(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["id"]
            t = state.trials[tid]
            res = ", ".join(f"{k}={_fmt(v)}" for k, v in t.resources.items())
            running = len(state.launched)
            state.console.line(f"start    {tid} [{t.stage}; {res}; {running} running]", "cyan")
            state.write_summary()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("done_run") != 0 or "epoch" not in result:
                return
            tid = trial.config["trial"]["id"]
            skip = {"trial", "epoch", "done_run"}
            vals = [(k, v) for k, v in result.items() if k not in skip and isinstance(v, (int, float))
                    and not isinstance(v, bool) and not k.startswith(("time_", "timestamp", "training_iteration",
                                                                        "pid", "iterations", "date", "node", "hostname",
                                                                        "config", "timesteps", "episodes", "warmup"))]
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in vals[:4])
            state.console.line(f"  epoch {result['epoch']:>3} {tid}" + (f": {shown}" if shown else ""), "dim")

        def on_trial_recover(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["id"]
            why = read_error(state.trial_dir(tid)) or "error"
            n = int(trial.run_metadata.num_failures)
            state.console.line(f"retry    {tid} (attempt {n + 1} of {retries + 1}) after {why}; "
                               "it resumes from its last checkpoint", "yellow")

        def on_trial_error(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["id"]
            state.finish(tid, True, tune_error=_tune_error_line(trial))

        def on_trial_complete(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["id"]
            state.finish(tid, False, completed=(trial.last_result or {}).get("done_run") == 1)

    return ConsoleCallback()


def _tune_error_line(trial) -> Optional[str]:
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    try:
        if path and Path(path).is_file():
            lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
            return lines[-1][:400] if lines else None
    except OSError:
        pass
    return None


# ============================================================================ Ray start
def _token_hint() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "in $RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        where = f"in {os.environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        where = f"in {Path.home() / '.ray' / 'auth_token'}"
    return f"token auth on: the page asks for the token, stored {where} (print it with `ray get-auth-token`)"


def dashboard_line(url: str, auth_mode: Optional[str]) -> str:
    """The dashboard line printed at the start and the end (never prints the token itself)."""
    if not url:
        return "dashboard: not running (Ray started without it); progress is in this console and summary.json"
    if not url.startswith("http"):
        url = f"http://{url}"
    if (auth_mode or "").lower() == "token":
        return f"dashboard: {url} ({_token_hint()})"
    return (f"dashboard: {url} (WARNING: token authentication is disabled (RAY_AUTH_MODE={auth_mode}); "
            "unset RAY_AUTH_MODE to let Ray protect the dashboard)")


class RayStartError(TwinsegError):
    """Ray itself could not start (one line instead of Ray's traceback)."""

    exit_code = 1


class _QuietTune:
    """logging filter: drop Tune's own per-trial error tracebacks and end-of-run noise (this driver
    prints one line per trial event; the full traceback is in trials/<id>/error.log)."""

    DROP = ("Trial task failed for trial", "Trials did not complete", "Failed to fetch metrics",
            "save not implemented for Searcher")

    def filter(self, record) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        return not any(d in msg for d in self.DROP)


def quiet_tune_logs() -> None:
    import logging

    f = _QuietTune()
    for name in ("ray", ""):
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(x, _QuietTune) for x in h.filters):
                h.addFilter(f)


RAY_CONNECT_TIMEOUT_S = float(os.environ.get("TWINSEG_RAY_CONNECT_TIMEOUT", "60"))
"""Seconds a connection to a Ray cluster (`--address`) may take before the grid gives up with one line
(env TWINSEG_RAY_CONNECT_TIMEOUT); Ray's own client would retry for minutes."""


def probe_address(address: str, timeout: float) -> None:
    """A TCP connection to HOST:PORT of `--address` (ray://HOST:PORT too) within `timeout` seconds, or
    one ConfigError line. `auto` and other forms without a port are left to Ray (and its deadline)."""
    addr = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 10.0)):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else (e.strerror or type(e).__name__)
        raise ConfigError(f"--address {address}: cannot reach the Ray cluster ({why}); check the address "
                          "(ray status on the head node prints it) and that the port is open") from None


def with_deadline(fn: Callable[[], Any], timeout: float, message: str) -> Any:
    """`fn()` (in this thread: ray.init wants the main thread) watched by a timer: after `timeout`
    seconds without an answer the driver prints `message` as one line and exits 2 at once (a hung
    connection cannot be cancelled politely)."""

    def give_up() -> None:
        print(f"twinseg: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        timer.cancel()


def local_ray_init_kwargs(num_cpus: Optional[int], common: Optional[dict] = None) -> dict:
    """`ray.init` arguments for the grid's own local instance: a NEW instance (never joins a cluster
    started elsewhere) whose dashboard listens on loopback only (127.0.0.1, never 0.0.0.0)."""
    return dict(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", **(common or {}))


def start_ray(args, console: Console, env_vars: dict) -> str:
    import logging

    import ray

    common = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if args.address:
        probe_address(args.address, RAY_CONNECT_TIMEOUT_S)
        try:
            ctx = with_deadline(lambda: ray.init(address=args.address, runtime_env={"env_vars": env_vars}, **common),
                                RAY_CONNECT_TIMEOUT_S,
                                f"--address {args.address}: the Ray cluster did not answer within "
                                f"{RAY_CONNECT_TIMEOUT_S:.0f} s; check the address (ray status on the head node), "
                                "the network and the auth token")
        except TwinsegError:
            raise
        except Exception as e:  # noqa: BLE001 - any connection problem is a user error here
            raise ConfigError(f"--address {args.address}: cannot join the Ray cluster ({' '.join(str(e).split())[:300]}); "
                              "check the address (ray status on the head node) and the auth token") from None
        return getattr(ctx, "dashboard_url", "") or ""
    # A NEW local instance ("local": never silently join a cluster started by `ray start`), dashboard on
    # loopback only. Token authentication: Ray 2.60 turns it on for new local clusters (RAY_AUTH_MODE
    # unset) and creates the token in ~/.ray/auth_token. Do not set RAY_AUTH_MODE here: Ray caches
    # the mode at import, and only its own default path refreshes that cache.
    kw = local_ray_init_kwargs(args.num_cpus, common)

    def _init(include_dashboard: bool):
        try:
            return ray.init(include_dashboard=include_dashboard, **kw)
        except Exception as e:  # noqa: BLE001
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
            raise RayStartError(f"could not start a local Ray instance ({' '.join(str(e).split())[:300]}); "
                                "see the logs under /tmp/ray/session_latest/logs") from None

    if args.no_dashboard:
        _init(False)
        return ""
    try:
        ctx = _init(True)
    except RayStartError as e:  # missing dashboard dependencies and the like: go on without it
        console.line(f"dashboard: could not start ({str(e)[:200]}); continuing without it", "yellow")
        _init(False)
        return ""
    url = getattr(ctx, "dashboard_url", "") or ""
    if not url:
        console.line("dashboard: could not start (missing dashboard dependencies?); continuing without it", "yellow")
    return url


def trial_needs(resources: dict) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds at once: its resources, or for a Ray Train trial (workers N > 1)
    N x the per-worker resources plus the driver's DRIVER_CPU."""
    n = int(resources.get("workers", 1))
    if n > 1:
        return n * float(resources["cpu"]) + DRIVER_CPU, n * float(resources["gpu"])
    return float(resources["cpu"]), float(resources["gpu"])


def cluster_fit_problem(spec: gridspec.GridSpec, cpus: float, gpus: float) -> Optional[str]:
    """The first of `cluster_fit_problems`, or None."""
    found = cluster_fit_problems(spec, cpus, gpus)
    return found[0] if found else None


def cluster_fit_problems(spec: gridspec.GridSpec, cpus: float, gpus: float,
                         cluster: str = "the Ray cluster") -> list[str]:
    """Why trials can never start on a cluster of `cpus` / `gpus` (one line each, no file prefix;
    GPUs before CPUs). Trials with the same needs are reported once. `cluster`: how the lines name
    the cluster."""
    out: list[str] = []
    seen: set[tuple] = set()
    for t in spec.trials:
        key = "stage1" if t.stage == "pretrain" else "stage2"
        r = t.resources
        sig = (key, r["cpu"], r["gpu"], int(r.get("workers", 1)))
        if sig in seen:
            continue
        seen.add(sig)
        n = sig[3]
        need_cpu, need_gpu = trial_needs(r)
        if n > 1:
            if need_gpu > gpus:
                out.append(f"{key}: trial {t.id} runs devices={n} workers x {key}.resources.gpu={_fmt(r['gpu'])} = "
                           f"{_fmt(need_gpu)} GPU(s) but {cluster} has {_fmt(gpus)}; lower settings.devices "
                           "for it or run on a machine / cluster with more GPUs")
            if need_cpu > cpus:
                out.append(f"{key}: trial {t.id} runs devices={n} workers x {key}.resources.cpu={_fmt(r['cpu'])} "
                           f"(+{_fmt(DRIVER_CPU)} for its driver) = {_fmt(need_cpu)} CPU(s) but {cluster} has "
                           f"{_fmt(cpus)}; lower {key}.resources.cpu or settings.devices, or add CPUs (--num-cpus)")
            continue
        if need_gpu > gpus:
            out.append(f"{key}.resources.gpu={_fmt(r['gpu'])} but {cluster} has {_fmt(gpus)} GPU(s); "
                       "use --grid smoke (CPU) or run on a GPU machine / cluster")
        if need_cpu > cpus:
            out.append(f"{key}.resources.cpu={_fmt(r['cpu'])} but {cluster} has {_fmt(cpus)} CPU(s); "
                       f"lower {key}.resources.cpu or add CPUs (--num-cpus)")
    return out


def check_cluster_fits(spec: gridspec.GridSpec, strict: bool) -> None:
    import ray

    total = ray.cluster_resources()
    problem = cluster_fit_problem(spec, float(total.get("CPU", 0)), float(total.get("GPU", 0)))
    if problem:
        if strict:
            raise ConfigError(f"{spec.path.name}: {problem}")
        print(f"twinseg: warning: {problem} (waiting for the autoscaler)", file=sys.stderr)


# ============================================================================ data pre-checks
def _data_groups(spec: gridspec.GridSpec) -> dict[str, tuple[str, dict, list[str], str]]:
    """Distinct (stage, data section, segmentation train split) of the trials -> (stage, data, trial ids,
    train split)."""
    groups: dict[str, tuple[str, dict, list[str], str]] = {}
    for t in spec.trials:
        d = t.config.get("data") or {}
        split = str(t.config.get("train_split", "train"))
        key = json.dumps([t.stage, d, split], sort_keys=True)
        groups.setdefault(key, (t.stage, d, [], split))[2].append(t.id)
    return groups


def data_problems(spec: gridspec.GridSpec) -> list[gridspec.Problem]:
    """Given dataset folders (data.root) must exist and have the layout, split lists and listed
    files (no pixels read, nothing written): a wrong layout is reported here, once, before any
    trial starts, instead of failing every trial. Generated datasets (root null) are made at the start."""
    from core.config import DataConfig

    out: list[gridspec.Problem] = []
    for stage, d, ids, split in _data_groups(spec).values():
        root = d.get("root")
        if root is None:
            continue
        if not Path(root).exists():
            what = ("does not exist; pass --data-root DIR pointing to the folder that holds VOCdevkit/ "
                    "(or set data.root in the grid file)")
        else:
            from core.data.module import validate_data

            try:
                validate_data(DataConfig.from_dict(d), stage, train_split=split)
                continue
            except TwinsegError as e:
                what = " ".join(str(e).split())
        _add_problem(out, gridspec.Problem(spec.path.name, f"data.root={root}", what, list(ids)))
    return out


def prepare_data(spec: gridspec.GridSpec, console: Console) -> None:
    """Generate the synthetic dataset ONCE, before trials start (so that concurrent trials never
    race to generate it). Given folders were checked by `data_problems`."""
    from core.config import DataConfig

    for _stage, d, _ids, _split in _data_groups(spec).values():
        if d.get("root") is not None:
            continue
        try:
            from core.data.synthetic import default_voc_root
        except ImportError:
            continue  # the runs generate it themselves
        path = default_voc_root(DataConfig.from_dict(d))
        console.line(f"data     generated dataset ready at {path}", "dim")


def weight_problems(spec: gridspec.GridSpec, weights_dir=None, online: Optional[bool] = None) -> list[gridspec.Problem]:
    """Named weight sources (imagenet, dino, ...) must be in the weights folder when offline: one
    problem per missing file (path, URL, pre-fetch command, the trials that need it), all of them
    at once. Online, the trials download what is missing. (A pair without any weights is a grid
    problem: gridspec.weights_refusal.)"""
    from core.errors import WeightsError
    from core.weights import WEIGHT_SPECS, _resolve, is_online

    if is_online(online):
        return []
    needs: dict[tuple[str, str], list[str]] = {}
    for t in spec.trials:
        key = (str(t.config.get("source", "random")), str(t.config.get("backbone", "")))
        if key in WEIGHT_SPECS:
            needs.setdefault(key, []).append(t.id)
    out: list[gridspec.Problem] = []
    for (source, backbone), ids in needs.items():
        try:  # offline: the file is there, or the weights module's own one-line error says how to get it
            _resolve(WEIGHT_SPECS[(source, backbone)], weights_dir, False)
        except WeightsError as e:
            out.append(gridspec.Problem(spec.path.name, f"source={source} backbone={backbone}", str(e), ids))
    return out


def _add_problem(out: list[gridspec.Problem], pr: gridspec.Problem) -> None:
    """Append `pr`, or add its trials to an earlier problem with the same place and message."""
    for q in out:
        if (q.fname, q.where, q.what) == (pr.fname, pr.where, pr.what):
            q.trials += [t for t in pr.trials if t not in q.trials]
            return
    out.append(pr)


# ============================================================================ pre-start checks, plan
def available_cpus() -> int:
    """CPUs this process may use (the affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_gpu_count() -> int:
    """GPUs torch sees here (CUDA_VISIBLE_DEVICES applies); 0 when torch or CUDA is missing. torch
    is loaded anyway by the grid's model checks; no CUDA context is created."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no driver, broken install: no GPU for the check
        return 0


@dataclass
class ClusterSize:
    cpus: float
    gpus: float
    name: str  # how a problem line names it ("... but <name> has 0 GPU(s)")
    text: str  # the plan's description (how it was counted)


def local_cluster(args) -> Optional[ClusterSize]:
    """The cluster a local start gets (this machine; --num-cpus replaces the CPU count), or None
    with --address (known only once Ray is up)."""
    if args.address:
        return None
    gpus = local_gpu_count()
    if args.num_cpus is not None:
        cpus, how = args.num_cpus, "--num-cpus"
    else:
        cpus, how = available_cpus(), "the CPUs this process may use"
    return ClusterSize(float(cpus), float(gpus), "this machine (local start)",
                       f"this machine (local start): {cpus} CPU(s) ({how}), {gpus} GPU(s) (torch.cuda.device_count)")


def pre_start_problems(spec: gridspec.GridSpec, cluster: Optional[ClusterSize]) -> list[str]:
    """Every problem found before the start, one line each (`<file>: <where>: <problem>; <fix>`):
    the grid's per-trial problems, wandb, data folders, missing weight files, cluster fit."""
    lines = [p.line for p in spec.problems]
    try:
        check_wandb(spec.wandb)
    except ConfigError as e:
        lines.append(str(e))
    lines += [p.line for p in data_problems(spec)]
    lines += [p.line for p in weight_problems(spec)]
    lines += [p.line for p in checkpoint_problems(spec)]
    if cluster is not None:
        lines += [f"{spec.path.name}: {m}" for m in cluster_fit_problems(spec, cluster.cpus, cluster.gpus, cluster.name)]
    return [" ".join(ln.split()) for ln in lines]


def report_problems(lines: list[str]) -> int:
    """Each problem as one `twinseg: error:` line on stderr; the exit status (0 none, 2 some)."""
    for ln in lines:
        print(f"twinseg: error: {ln}", file=sys.stderr)
    sys.stderr.flush()
    return 2 if lines else 0


def _res_text(r: dict) -> str:
    n = int(r.get("workers", 1))
    base = f"{_fmt(r['cpu'])} CPU, {_fmt(r['gpu'])} GPU"
    return f"{n} workers x ({base}) + {_fmt(DRIVER_CPU)} CPU driver" if n > 1 else base


def plan_text(spec: gridspec.GridSpec, cluster: Optional[ClusterSize], results_dir: Optional[Path],
              resuming: bool = False, address: Optional[str] = None) -> str:
    """The plan of a dry run: the grid, the assumed cluster, the data and weights, one line per
    trial (id, stage, dependency, resources; `!` marks a trial named by a problem) and the totals."""
    from core.weights import default_weights_dir, is_online

    flagged = {tid for p in spec.problems for tid in p.trials}
    out = [f"plan     {gridspec.describe(spec)}; at most {spec.max_concurrent} at once, "
           f"{spec.retries} retr{'y' if spec.retries == 1 else 'ies'} per trial"]
    if cluster is not None:
        out.append(f"cluster  assumed: {cluster.text}")
    else:
        out.append(f"cluster  --address {address}: its size is known only once Ray is up, so the fit is checked at "
                   "the start (not by this dry run)")
    roots = sorted({str((t.config.get("data") or {}).get("root")) for t in spec.trials})
    data = ", ".join("generated dataset (made at the start, under data/)" if r == "None" else f"{r} (layout checked)"
                     for r in roots)
    out.append(f"data     {data}")
    wdir = default_weights_dir()
    out.append(f"weights  {wdir} " + ("(online: the trials download missing files)" if is_online()
                                      else "(offline: every file must be there before the start)"))
    if results_dir is not None:
        out.append(f"results  {results_dir} ({'resuming; ' if resuming else ''}not written by a dry run)")
    out.append("")
    wid = max([len(t.id) for t in spec.trials] + [2])
    dw = max([len(", ".join(t.depends_on) or "-") for t in spec.trials] + [10])
    out.append(f"  {'id':<{wid}}  {'stage':<8}  {'depends on':<{dw}}  resources")
    for t in spec.trials:
        mark = "!" if t.id in flagged else " "
        dep = ", ".join(t.depends_on) or "-"
        out.append(f"{mark} {t.id:<{wid}}  {t.stage:<8}  {dep:<{dw}}  {_res_text(t.resources)}")
    out.append("")
    for stage in ("pretrain", "segment"):
        ts = spec.stage(stage)
        if not ts:
            continue
        needs = [trial_needs(t.resources) for t in ts]
        cpu, gpu = sum(n[0] for n in needs), sum(n[1] for n in needs)
        big = max(needs)
        out.append(f"totals   {stage:<8} {len(ts)} trial(s); requests {_fmt(cpu)} CPU and {_fmt(gpu)} GPU in all "
                   f"(largest trial {_fmt(big[0])} CPU, {_fmt(big[1])} GPU)")
    out.append(f"totals   all      {len(spec.trials)} trial(s), {len(flagged)} marked ! (named by a problem)")
    if spec.left_out:
        n_pre = sum(1 for t in spec.left_out if not t.startswith("seg-"))
        out.append(f"left out {n_pre} pretraining + {len(spec.left_out) - n_pre} segmentation trial(s) whose (source, "
                   "backbone) pair has no weights (see the problems)")
    return "\n".join(out)


def _absolute_data_root(raw: dict) -> None:
    """Relative data roots are resolved against the current folder (trials run elsewhere)."""
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str) and data["root"]:
        data["root"] = str(Path(data["root"]).expanduser().resolve())


# ============================================================================ results folder
def _latest_results(base: Path, name: str) -> Optional[Path]:
    cands = sorted(p for p in base.glob(f"{name}-*") if p.is_dir() and (p / "grid.yaml").is_file())
    return cands[-1] if cands else None


def choose_results_dir(args, name: str) -> tuple[Path, bool]:
    """(results folder, resuming?)."""
    base = Path("results")
    if args.resume:
        if args.output:
            out = Path(args.output).expanduser()
            if not (out / "grid.yaml").is_file():
                raise ConfigError(f"--resume --output {out}: no grid.yaml there (not a grid results folder); "
                                  "pass the folder of an earlier run or drop --resume to start a new one")
            return out.resolve(), True
        out = _latest_results(base, name)
        if out is None:
            raise ConfigError(f"--resume: no earlier {base / (name + '-*')} folder to continue; run without --resume "
                              "first, or pass --output DIR")
        return out.resolve(), True
    if args.output:
        out = Path(args.output).expanduser()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output {out} is a file; pass a folder")
        if (out / "summary.json").exists() or (out / "grid.yaml").exists():
            raise ConfigError(f"--output {out} already holds a grid run; add --resume to continue it, or choose a new folder")
        return out.resolve(), False
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = base / f"{name}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = base / f"{name}-{stamp}-{n}"
    return out.resolve(), False


# ============================================================================ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage block
        fail(f"{message} (see python experiments/grid.py --help)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="python experiments/grid.py", description="Run the twinseg study grid on Ray Tune.")
    p.add_argument("--grid", default=None, help="smoke (default), paper, or a grid YAML file")
    p.add_argument("--data-root", default=None, help="dataset folder for every trial (overrides data.root)")
    p.add_argument("--output", default=None, help="results folder (default results/<grid>-<timestamp>/)")
    p.add_argument("--resume", action="store_true", help="continue --output DIR or the latest results/<grid>-* run")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (e.g. auto or HOST:6379)")
    p.add_argument("--wandb", default=None, choices=WANDB_MODES, help="wandb mode (default: the grid's, offline)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (overrides the grid)")
    p.add_argument("--max-trials", type=int, default=None,
                   help=f"refuse a grid of more trials (overrides the grid's max_trials; default "
                        f"{gridspec.DEFAULT_MAX_TRIALS})")
    p.add_argument("--no-report", action="store_true", help="do not build report.md at the end")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray start (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="local start without the Ray dashboard")
    p.add_argument("--dry-run", action="store_true",
                   help="expand and check the grid, print the plan and EVERY problem, then stop: no Ray, no folder "
                        "written; exit 0 if nothing is wrong, 2 otherwise")
    a = p.parse_args(argv)
    if a.max_concurrent is not None and a.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {a.max_concurrent} must be >= 1")
    if a.max_trials is not None and a.max_trials < 1:
        raise ConfigError(f"--max-trials {a.max_trials} must be >= 1")
    if a.num_cpus is not None and a.num_cpus < 1:
        raise ConfigError(f"--num-cpus {a.num_cpus} must be >= 1")
    if a.address and a.num_cpus is not None:
        raise ConfigError("--num-cpus is for a local start; drop it with --address (the cluster has its own CPUs)")
    if a.data_root is not None:
        root = Path(a.data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-root {a.data_root} is not a folder; pass the folder that holds VOCdevkit/")
        a.data_root = str(root.resolve())
    return a


def _grid_name_hint(args) -> str:
    """Name of the grid for --resume without --output: the --grid's name (default smoke)."""
    path = gridspec.resolve_grid(args.grid)
    doc = gridspec.read_yaml(path)
    name = doc.get("name", path.stem) if isinstance(doc, dict) else path.stem
    return str(name)


SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/opt", "/proc",
                  "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/usr/local", "/usr/bin", "/usr/lib")
"""Folders a grid never writes into as `--output` (nor below /dev, /proc, /sys); $HOME itself too."""


def check_output_folder(path: Path, flag: str = "--output") -> None:
    """Refuse / , system folders and $HOME itself as a results folder (one line): a grid writes
    grid.yaml, summary.*, report.md, tables/, figures/, trials/ and ray/ straight into it."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    try:
        real = p.resolve()
    except OSError:
        real = p
    home = Path(os.path.abspath(Path.home()))
    for cand in {p, real}:
        parts = cand.parts
        system = str(cand) in SYSTEM_FOLDERS or (len(parts) > 1 and parts[1] in ("dev", "proc", "sys"))
        if system or cand == home or cand == home.resolve():
            what = "your home folder" if cand in (home, home.resolve()) else "a system folder"
            raise ConfigError(f"{flag} {path}: {cand} is {what}; a grid writes its results folder straight into "
                              f"{flag}, so pass a new folder (e.g. results/mygrid)")


def file_sha256(path: Path) -> str:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def recorded_trials(results_dir: Path) -> dict[str, dict]:
    """trial id -> config the results folder recorded: summary.json's trials, overridden by each
    started trial's own trials/<id>/trial.json (what it actually ran with)."""
    out: dict[str, dict] = {}
    try:
        doc = json.loads((results_dir / "summary.json").read_text())
        for t in doc.get("trials", []):
            if isinstance(t, dict) and "id" in t and isinstance(t.get("config"), dict):
                out[str(t["id"])] = t["config"]
    except (OSError, ValueError):
        pass
    for f in (results_dir / "trials").glob("*/trial.json"):
        try:
            t = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(t, dict) and isinstance(t.get("config"), dict):
            out[f.parent.name] = t["config"]
    return out


def resume_changes(spec: gridspec.GridSpec, results_dir: Path) -> Optional[str]:
    """Why `spec` may not continue `results_dir` (one line), or None. A resume keeps every finished
    trial, so each trial the folder recorded must come back with the same config: a changed or removed
    trial is refused; trials the grid ADDS are allowed (they simply run)."""
    old = recorded_trials(results_dir)
    if not old:
        return None
    new = {t.id: json.loads(json.dumps(t.config, default=str)) for t in spec.trials}
    removed = [tid for tid in old if tid not in new and tid not in spec.left_out]
    changed = []
    sections = set(gridspec.method_sections())
    for tid, cfg in old.items():
        if tid in new and new[tid] != cfg:
            a, b = _flat(cfg), _flat(new[tid])
            # another SSL method's section (e.g. dino.* of a Barlow Twins trial) does not affect the trial
            mine = str(cfg.get("method", ""))
            keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>")
                          and not (k.split(".", 1)[0] in sections and k.split(".", 1)[0] != mine))
            if keys:
                changed.append((tid, keys, a, b))
    if not changed and not removed:
        return None
    parts = []
    if changed:
        tid, keys, a, b = changed[0]
        shown = ", ".join(f"{k} {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}" for k in keys[:3])
        more = f" (+{len(keys) - 3} more fields)" if len(keys) > 3 else ""
        others = f"; {len(changed) - 1} more trial(s) changed" if len(changed) > 1 else ""
        parts.append(f"trial {tid} changed: {shown}{more}{others}")
    if removed:
        parts.append(f"{len(removed)} trial(s) removed ({', '.join(removed[:3])}{'...' if len(removed) > 3 else ''})")
    return "; ".join(parts)


def _short(v: Any, n: int = 40) -> str:
    t = json.dumps(v, default=str)
    return t if len(t) <= n else t[: n - 3] + "..."


def checkpoint_problems(spec: gridspec.GridSpec) -> list[gridspec.Problem]:
    """A `checkpoint:PATH` source the grid does not produce itself must be an existing FILE (a folder
    or a missing path would fail every attempt of the trial): one problem per path."""
    out: list[gridspec.Problem] = []
    for t in spec.trials:
        src = str(t.config.get("source", ""))
        if not src.startswith("checkpoint:") or any(f"/{d}/backbone.pt" in src for d in t.depends_on):
            continue
        path = Path(src[len("checkpoint:"):].strip()).expanduser()
        if path.is_dir():
            what = (f"is a folder, not a weights file; point checkpoint: at the file inside it (e.g. "
                    f"{path / 'backbone.pt'})")
        elif not path.exists():
            what = "does not exist; check the path (a run folder's backbone.pt, or a .pth / .safetensors file)"
        else:
            continue
        _add_problem(out, gridspec.Problem(spec.path.name, f"source=checkpoint:{path}", what, [t.id]))
    return out


class _Stop(KeyboardInterrupt):
    """Raised in the driver's main thread by SIGTERM / SIGINT (see `install_stop_handlers`)."""


def install_stop_handlers(state: Optional["GridState"] = None) -> None:
    """SIGTERM and SIGINT stop the grid cleanly: the first one raises `_Stop` in the main thread (Tune's
    loop ends, Ray is shut down, summary.json marks the unfinished trials "interrupted ..."), a second
    one writes the summary and exits at once. Installed again after `ray.init` (Ray's own C-level
    SIGTERM handler would abort the driver with a core dump, exit 134)."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - tests call main in threads
        return

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if state is not None and state.signal_name:
            state.mark_interrupted()
            state.write_summary()
            print(f"twinseg: error: second {name}: stopped at once; continue with python experiments/grid.py "
                  f"--resume --output {state.results_dir}", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if state is not None:
            state.signal_name = name
            state.interrupted = True
            state.console.line(f"{name} received: stopping the running trials (again: stop at once)", "yellow")
        raise _Stop(name)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours stops the grid; Tune's would wait for every trial
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


@guard
def main(argv: Optional[list[str]] = None, *, run: Optional[Callable[..., dict]] = None) -> int:
    """The grid CLI. `run`: the run function of every trial (an `experiments.trial.RunFunction`;
    default `experiments.trial.run_stage`, the real runs); it is pickled with the Tune trainable, so
    Ray's worker processes must be able to import it or unpickle it by value."""
    args = parse_args(argv)
    if args.output:
        check_output_folder(Path(args.output))
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    install_stop_handlers(None)  # before the results folder exists: a signal just ends the driver (exit 130/143)
    try:
        return _main(args, run)
    except _Stop as e:
        signum = signal.Signals[str(e)] if str(e) in signal.Signals.__members__ else signal.SIGINT
        print(f"twinseg: error: interrupted ({signum.name}) before any trial started; rerun the same command",
              file=sys.stderr, flush=True)
        return 128 + int(signum)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise StorageError(f"cannot write {e.filename or 'the results folder'} ({e.strerror}); free space (or "
                               "choose another --output) and continue with --resume") from None
        raise
    finally:  # an in-process caller (tests) gets its own handlers back
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)


def _main(args, run: Optional[Callable[..., dict]]) -> int:
    console = Console()
    overrides = {"data_root": args.data_root, "wandb": args.wandb, "max_concurrent": args.max_concurrent,
                 "max_trials": args.max_trials}

    # ---- resolve and validate everything before anything is written or started
    new_grid_yaml: Optional[dict] = None
    if args.resume:
        results_dir, resuming = choose_results_dir(args, _grid_name_hint(args))
        grid_path = results_dir / "grid.yaml"
        if args.grid:  # a given grid file must agree with what the folder ran (only additions allowed)
            grid_path = gridspec.resolve_grid(args.grid)
            new_grid_yaml = gridspec.read_yaml(grid_path)
    else:
        grid_path = gridspec.resolve_grid(args.grid)
        results_dir, resuming = None, False
    doc = new_grid_yaml if new_grid_yaml is not None else gridspec.read_yaml(grid_path)
    doc = gridspec.apply_overrides(doc, overrides)
    _absolute_data_root(doc)
    if not resuming:
        probe = gridspec.build_grid(doc, grid_path, None, check_models=False, collect=True)
        results_dir, resuming = choose_results_dir(args, probe.name)
        check_output_folder(results_dir)
    spec = gridspec.build_grid(doc, grid_path, None, trials_root=results_dir / "trials", collect=True)
    if resuming:
        why = resume_changes(spec, results_dir)
        if why:
            given = f"--grid {args.grid}" if args.grid else f"the stored {results_dir / 'grid.yaml'}"
            try:
                ran = json.loads((results_dir / "summary.json").read_text()).get("grid_sha256")
            except (OSError, ValueError, AttributeError):
                ran = None
            if not args.grid and ran and ran == file_sha256(results_dir / "grid.yaml"):
                raise ConfigError(f"--resume: the grid of {results_dir} is unchanged but its trials' configs are not "
                                  f"(the code's defaults changed since it ran): {why}; a resume keeps the finished "
                                  "trials, so their configs must stay: run the code it ran with, or start a new "
                                  "--output")
            raise ConfigError(f"--resume: {given} differs from what {results_dir} ran: {why}; a resume keeps the "
                              "finished trials, so only ADDING trials is allowed: restore the grid, or start a "
                              "new --output")
    cluster = local_cluster(args)
    problems = pre_start_problems(spec, cluster)  # every problem at once; nothing written or started yet
    from experiments import cost

    estimate = cost.estimate_grid(spec)
    if args.dry_run:
        print(plan_text(spec, cluster, results_dir, resuming, args.address))
        print(estimate.text())
        print(f"dry run: {len(problems)} problem(s) (on stderr); nothing written, Ray not started" if problems else
              "dry run: no problem found; nothing written, Ray not started. Run the same command without --dry-run")
        sys.stdout.flush()
        return report_problems(problems)
    if problems:
        code = report_problems(problems)
        console.line(f"{len(problems)} problem(s): nothing started, nothing written; the plan: the same command "
                     "with --dry-run", "bold red")
        return code
    console.line(f"grid     {gridspec.describe(spec)}", "bold")
    console.line(estimate.short())

    # ---- results folder: one driver at a time (a second one, or a --resume while this runs, is refused)
    with folder_lock(results_dir, "grid driver"):
        return _drive(args, spec, grid_path, results_dir, resuming, new_grid_yaml is not None, console, run)


def _drive(args, spec: gridspec.GridSpec, grid_path: Path, results_dir: Path, resuming: bool, regrid: bool,
           console: Console, run: Optional[Callable[..., dict]]) -> int:
    if resuming:  # temp files of a driver killed mid-write (the targets themselves are always whole)
        for stale in results_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    created = _now_iso()
    if resuming:
        try:
            created = json.loads((results_dir / "summary.json").read_text()).get("created") or created
        except (OSError, ValueError):
            pass
    if not resuming or regrid:
        import yaml

        atomic_write(results_dir / "grid.yaml", f"# effective grid (from {grid_path}, CLI overrides applied)\n"
                     + yaml.safe_dump(spec.raw, sort_keys=False))
    prepare_data(spec, console)
    (results_dir / "trials").mkdir(exist_ok=True)
    group = results_dir.name
    state = GridState(spec, results_dir, created, console, group=group, wandb=spec.wandb)
    install_stop_handlers(state)
    state.write_summary()
    n_done = state.counts()["done"]
    console.line(f"results  {results_dir}" + (f" (resuming: {n_done} trial(s) already done)" if resuming else ""))

    try:
        if state.unlaunched_pending():
            run_on_ray(args, spec, state, console, run=run)
        else:
            console.line("nothing to run: every trial is already finished")
    except _Stop:
        state.interrupted = True
        state.mark_interrupted()

    # ---- end
    state.write_summary()
    c = state.counts()
    console.line(f"summary  {c['done']} done, {c['failed']} failed, {c['skipped']} skipped, {c['pending']} pending "
                 f"-> {results_dir / 'summary.json'}", "bold")
    if not args.no_report and not state.signal_name:
        build_report(results_dir, console)
    if state.ray_started:
        line = dashboard_line(state.dashboard_url, os.environ.get("RAY_AUTH_MODE"))
        if state.dashboard_url and not args.address:
            line = line.replace("dashboard: ", "dashboard (used by this run; stopped with it): ", 1)
        console.line(line)
    resume_cmd = f"python experiments/grid.py --resume --output {results_dir}"
    if state.write_error is not None:
        e = state.write_error
        print(f"twinseg: error: cannot write {e.filename or results_dir / 'summary.json'} ({e.strerror or e}); "
              f"free space and continue with {resume_cmd}", file=sys.stderr)
        return 1
    if c["pending"]:
        why = f"interrupted by {state.signal_name}" if state.signal_name else "interrupted"
        print(f"twinseg: error: grid {why} with {c['pending']} trial(s) not finished; continue with {resume_cmd}",
              file=sys.stderr)
        if state.signal_name:
            return 128 + int(signal.Signals[state.signal_name])
        return 130 if state.interrupted else 1
    if c["failed"] or c["skipped"]:
        bad = [t for t in state.order if state.status[t] in ("failed", "skipped")]
        print(f"twinseg: error: {c['failed']} trial(s) failed and {c['skipped']} skipped ({', '.join(bad[:5])}"
              f"{'...' if len(bad) > 5 else ''}); see {results_dir / 'summary.json'}", file=sys.stderr)
        return 1
    return 0


def run_on_ray(args, spec: gridspec.GridSpec, state: GridState, console: Console,
               run: Optional[Callable[..., dict]] = None) -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune creates one pending trial at a time for custom searchers; allow max_concurrent at once.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(spec.max_concurrent))
    os.environ["WANDB_SILENT"] = "true"
    # Trials import experiments.trial: make the repo importable in Ray workers.
    pp = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([pp] if pp else []))
    env_vars = {"PYTHONPATH": os.environ["PYTHONPATH"], "WANDB_SILENT": "true"}
    # Project settings (e.g. the data cache) reach the workers of a joined cluster too; secrets
    # (e.g. WANDB_API_KEY) are never put into the Ray job config: cluster nodes log in themselves.
    for k, v in os.environ.items():
        if k.startswith("TWINSEG_"):
            env_vars[k] = v

    import ray
    from ray import tune

    from experiments.trial import make_trainable

    try:
        url = start_ray(args, console, env_vars)
    finally:
        install_stop_handlers(state)  # ray.init replaced SIGTERM's handler with its own (abort, exit 134)
    quiet_tune_logs()
    state.dashboard_url = url
    state.ray_started = True
    try:
        auth = os.environ.get("RAY_AUTH_MODE")
        console.line(dashboard_line(url, auth), "bold")
        check_cluster_fits(spec, strict=not args.address)
        state.write_summary()

        def resources(config: dict) -> dict:
            r = config["trial"]["resources"]
            if int(r.get("workers", 1)) > 1:  # the driver of a Ray Train job: its workers reserve the rest
                return {"cpu": DRIVER_CPU, "gpu": 0}
            return {"cpu": r["cpu"], "gpu": r["gpu"]}

        # one actor per trial, named `trial <id>` in the dashboard's actor list and in log prefixes
        trainable = make_trainable(run, resources=resources)
        name_of = lambda trial: trial.config["trial"]["id"]  # noqa: E731
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_scheduler(state, spec.max_concurrent),
                num_samples=-1,
                reuse_actors=False,
                trial_name_creator=name_of,
                trial_dirname_creator=name_of,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(state.results_dir / "ray"),
                failure_config=tune.FailureConfig(max_failures=spec.retries),
                callbacks=[make_console_callback(state, spec.retries)],
                verbose=0,
                log_to_file=True,
            ),
        )
        try:
            tuner.fit()
        except KeyboardInterrupt:  # our _Stop (SIGTERM / SIGINT) or a plain Ctrl-C
            state.interrupted = True
        if state.launched:
            state.interrupted = True
        if state.launched or state.unlaunched_pending():
            state.mark_interrupted()
    finally:
        state.write_summary()
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass


def build_report(results_dir: Path, console: Console) -> None:
    try:
        from analysis.report import build_report as _build
    except ImportError:
        console.line("report: analysis.report is not available; run python analysis/report.py "
                     f"{results_dir} later", "yellow")
        return
    try:
        out = _build(results_dir)
    except TwinsegError as e:
        console.line(f"report: not built ({e})", "yellow")
        return
    except Exception as e:  # noqa: BLE001 - the results stay valid; say why in one line
        console.line(f"report: not built ({type(e).__name__}: {' '.join(str(e).split())[:300]})", "yellow")
        return
    path = Path(out) if isinstance(out, (str, Path)) else results_dir / "report.md"
    if path.is_dir():
        path = path / "report.md"
    console.line(f"report: {path}", "bold")


if __name__ == "__main__":
    sys.exit(main())
