"""Driving a checked grid: the results folder written (grid.yaml, summary.*), the generated dataset made
once, ONE Tune experiment of every trial (experiments/engine/scheduler.py) on Ray
(experiments/engine/ray_backend.py), SIGTERM / SIGINT turned into a clean stop, and the end: summary,
report, dashboard line, exit status."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from core.errors import TwinsegError
from core.io import atomic_write_text
from experiments.engine.checks import prepare_data
from experiments.engine.console import Console, now_iso
from experiments.engine.ray_backend import (check_cluster_fits, check_storage_on_nodes, dashboard_line,
                                            quiet_tune_logs, start_ray, worker_env)
from experiments.engine.ray_ddp import DRIVER_CPU
from experiments.engine.results_folder import Results
from experiments.engine.scheduler import make_console_callback, make_scheduler
from experiments.engine.spec import GridSpec
from experiments.engine.state import GridState


class StopSignal(KeyboardInterrupt):
    """Raised in the driver's main thread by SIGTERM / SIGINT (see `install_stop_handlers`)."""


def install_stop_handlers(state: Optional["GridState"] = None) -> None:
    """SIGTERM and SIGINT stop the grid cleanly: the first one raises `StopSignal` in the main thread (Tune's
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
                  f"--resume --output {state.where}", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if state is not None:
            state.signal_name = name
            state.interrupted = True
            state.console.line(f"{name} received: stopping the running trials (again: stop at once)", "yellow")
        raise StopSignal(name)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours stops the grid; Tune's would wait for every trial
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)



def drive(args, spec: GridSpec, grid_path: Path, results: Results, resuming: bool, regrid: bool,
          console: Console, run: Optional[Callable[..., dict]]) -> int:
    """Run the checked grid in `results` (the caller holds the folder lock of its local folder; on an
    object store the driver also claims the results folder: a newer driver's claim stops this one at its
    next summary write); the exit status."""
    results_dir = results.local
    if resuming:  # temp files of a driver killed mid-write (the targets themselves are always whole)
        for stale in results_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    created = now_iso()
    if resuming:
        try:
            created = json.loads((results_dir / "summary.json").read_text()).get("created") or created
        except (OSError, ValueError):
            pass
    token = results.storage.claim(owner="grid driver") if results.remote else None
    if not resuming or regrid:
        import yaml

        atomic_write_text(results_dir / "grid.yaml", f"# effective grid (from {grid_path}, CLI overrides applied)\n"
                          + yaml.safe_dump(spec.raw, sort_keys=False))
        results.upload("grid.yaml")
    prepare_data(spec, console)
    (results_dir / "trials").mkdir(exist_ok=True)
    group = results.where.rstrip("/").rsplit("/", 1)[-1]
    state = GridState(spec, results_dir, created, console, group=group, wandb=spec.wandb, results=results,
                      driver_token=token)
    install_stop_handlers(state)
    state.write_summary()
    n_done = state.counts()["done"]
    console.line(f"results  {results.where}" + (f" (resuming: {n_done} trial(s) already done)" if resuming else ""))

    try:
        if state.unlaunched_pending():
            run_on_ray(args, spec, state, console, run=run)
        else:
            console.line("nothing to run: every trial is already finished")
    except StopSignal:
        state.interrupted = True
        state.mark_interrupted()
    return finish(args, state, console)


def finish(args, state: GridState, console: Console) -> int:
    """The end of a driver run: summary, report, dashboard line, and the exit status (0 all done, 1 a
    trial failed or was skipped or the summary could not be written, 128 + signal / 130 interrupted)."""
    results_dir = state.where
    state.write_summary()
    c = state.counts()
    console.line(f"summary  {c['done']} done, {c['failed']} failed, {c['skipped']} skipped, {c['pending']} pending "
                 f"-> {state.where_of('summary.json')}", "bold")
    if not args.no_report and not state.signal_name:
        build_report(state.results.storage.join() if state.results.remote else state.results_dir, console)
    if state.ray_started:
        line = dashboard_line(state.dashboard_url, os.environ.get("RAY_AUTH_MODE"))
        if state.dashboard_url and not args.address:
            line = line.replace("dashboard: ", "dashboard (used by this run; stopped with it): ", 1)
        console.line(line)
    resume_cmd = f"python experiments/grid.py --resume --output {results_dir}"
    if state.write_error is not None:
        e = state.write_error
        print(f"twinseg: error: cannot write {getattr(e, 'filename', None) or state.where_of('summary.json')} "
              f"({getattr(e, 'strerror', None) or e}); "
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
              f"{'...' if len(bad) > 5 else ''}); see {state.where_of('summary.json')}", file=sys.stderr)
        return 1
    return 0


def trial_resources(config: dict) -> dict:
    """What a trial's Tune actor reserves: its resources, or only `DRIVER_CPU` for the driver of a Ray
    Train job (its workers reserve the rest)."""
    r = config["trial"]["resources"]
    if int(r.get("workers", 1)) > 1:
        return {"cpu": DRIVER_CPU, "gpu": 0}
    return {"cpu": r["cpu"], "gpu": r["gpu"]}


def run_on_ray(args, spec: GridSpec, state: GridState, console: Console,
               run: Optional[Callable[..., dict]] = None) -> None:
    """Start (or join) Ray and run every pending trial as ONE Tune experiment; Ray is shut down at the end."""
    env_vars = worker_env(spec.max_concurrent)

    import ray

    try:
        url = start_ray(args, console, env_vars)
    finally:
        install_stop_handlers(state)  # ray.init replaced SIGTERM's handler with its own (abort, exit 134)
    quiet_tune_logs()
    state.dashboard_url = url
    state.ray_started = True
    try:
        console.line(dashboard_line(url, os.environ.get("RAY_AUTH_MODE")), "bold")
        check_cluster_fits(spec, strict=not args.address)
        if args.address:  # every node must see the results folder before any trial starts
            check_storage_on_nodes(state.results)
        state.write_summary()
        try:
            make_tuner(spec, state, run).fit()
        except KeyboardInterrupt:  # our StopSignal (SIGTERM / SIGINT) or a plain Ctrl-C
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


def make_tuner(spec: GridSpec, state: GridState, run: Optional[Callable[..., dict]]):
    """The Tune experiment: one actor per trial, named `trial <id>` in the dashboard's actor list and in
    log prefixes; trials handed out by the grid's scheduler; Tune's folder under <results>/ray/."""
    from ray import tune

    from experiments.engine.trial import make_trainable

    trainable = make_trainable(run, resources=trial_resources)
    name_of = lambda trial: trial.config["trial"]["id"]  # noqa: E731
    return tune.Tuner(
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


def build_report(results_dir, console: Console) -> None:
    """report.md of the results folder `results_dir` (a path, or a URI: built in a local copy and uploaded,
    `core.storage.build_on_storage`)."""
    try:
        from analysis.report import build_report as _build
    except ImportError:
        console.line("report: analysis.report is not available; run python analysis/report.py "
                     f"{results_dir} later", "yellow")
        return
    remote = isinstance(results_dir, str) and "://" in results_dir
    try:
        if remote:
            from core.storage import Storage, build_on_storage

            out = build_on_storage(Storage(results_dir), _build)
        else:
            out = _build(results_dir)
    except TwinsegError as e:
        console.line(f"report: not built ({e})", "yellow")
        return
    except Exception as e:  # noqa: BLE001 - the results stay valid; say why in one line
        console.line(f"report: not built ({type(e).__name__}: {' '.join(str(e).split())[:300]})", "yellow")
        return
    if remote:
        console.line(f"report: {out}", "bold")
        return
    path = Path(out) if isinstance(out, (str, Path)) else results_dir / "report.md"
    if path.is_dir():
        path = path / "report.md"
    console.line(f"report: {path}", "bold")
