"""The grid CLI: arguments, then every check before anything is written or started, then the plan (a dry
run) or the driver (experiments/engine/driver.py). `experiments/grid.py` is its entry point."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from core.cli import fail, guard
from core.config import WANDB_MODES
from core.errors import ConfigError, DataError, StorageError
from core.folder_lock import folder_lock
from experiments.engine.checks import local_cluster, pre_start_problems, report_problems
from experiments.engine.console import Console
from experiments.engine.driver import StopSignal, drive, install_stop_handlers
from experiments.engine.expand import build_grid
from experiments.engine.gridfile import DEFAULT_MAX_TRIALS, apply_overrides, read_yaml, resolve_grid
from experiments.engine.plan import plan_json, plan_text
from experiments.engine.ray_backend import job_working_dir_problem
from experiments.engine.results_folder import (check_output_folder, check_storage_from_driver, choose_results,
                                               mirror_remote, refuse_changed_resume)
from experiments.engine.spec import describe


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage block
        fail(f"{message} (see python experiments/grid.py --help)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="python experiments/grid.py", description="Run the twinseg study grid on Ray Tune.")
    p.add_argument("--grid", default=None, help="smoke (default), paper, or a grid YAML file")
    p.add_argument("--data-root", default=None, help="dataset folder for every trial (overrides data.root)")
    p.add_argument("--output", default=None,
                   help="results folder: a path or a URI (default <storage>/<grid>-<timestamp>/; with --storage a "
                        "relative path is a name under it)")
    p.add_argument("--storage", default=None,
                   help="where results folders go: a folder every node mounts or s3://bucket/prefix (default "
                        "results/, or the grid's storage:)")
    p.add_argument("--resume", action="store_true", help="continue --output DIR or the latest results/<grid>-* run")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (e.g. auto or HOST:6379)")
    p.add_argument("--wandb", default=None, choices=WANDB_MODES, help="wandb mode (default: the grid's, offline)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (overrides the grid)")
    p.add_argument("--max-trials", type=int, default=None,
                   help=f"refuse a grid of more trials (overrides the grid's max_trials; default "
                        f"{DEFAULT_MAX_TRIALS})")
    p.add_argument("--no-report", action="store_true", help="do not build report.md at the end")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray start (default: all)")
    p.add_argument("--no-dashboard", action="store_true", help="local start without the Ray dashboard")
    p.add_argument("--dry-run", action="store_true",
                   help="expand and check the grid, print the plan and EVERY problem, then stop: no Ray, no folder "
                        "written; exit 0 if nothing is wrong, 2 otherwise")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: print the plan as one JSON document on stdout ({\"trials\": [{id, stage, "
                        "depends_on, resources, config}], \"problems\": [one line each]}) instead of the text plan")
    a = p.parse_args(argv)
    if a.json and not a.dry_run:
        raise ConfigError("--json prints the plan of a dry run; add --dry-run (a run prints its progress as text)")
    if a.storage is not None:
        from core.storage import Storage

        Storage(a.storage)  # a bad URI is one line here
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
    path = resolve_grid(args.grid)
    doc = read_yaml(path)
    name = doc.get("name", path.stem) if isinstance(doc, dict) else path.stem
    return str(name)



@guard
def main(argv: Optional[list[str]] = None, *, run: Optional[Callable[..., dict]] = None) -> int:
    """The grid CLI. `run`: the run function of every trial (an `experiments.engine.runner.RunFunction`;
    default `experiments.engine.runner.run_stage`, the real runs); it is pickled with the Tune trainable,
    so Ray's worker processes must be able to import it or unpickle it by value."""
    args = parse_args(argv)
    if args.output and "://" not in args.output:
        check_output_folder(Path(args.output))
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    install_stop_handlers(None)  # before the results folder exists: a signal just ends the driver (exit 130/143)
    try:
        return _main(args, run)
    except StopSignal as e:
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


def resolve(args):
    """(grid spec, grid file, results (results_folder.Results), resuming?, regrid?): everything resolved
    and validated before anything is written or started; `regrid`: --resume with a --grid (only additions
    allowed)."""
    overrides = {"data_root": args.data_root, "wandb": args.wandb, "max_concurrent": args.max_concurrent,
                 "max_trials": args.max_trials}
    new_grid_yaml: Optional[dict] = None
    if args.resume:
        results, resuming = choose_results(args, _grid_name_hint(args))
        if results.remote:  # grid.yaml, summary.json and the trial.json files, to compare with
            mirror_remote(results)
        grid_path = results.local / "grid.yaml"
        if args.grid:  # a given grid file must agree with what the folder ran (only additions allowed)
            grid_path = resolve_grid(args.grid)
            new_grid_yaml = read_yaml(grid_path)
    else:
        grid_path = resolve_grid(args.grid)
        results, resuming = None, False
    doc = new_grid_yaml if new_grid_yaml is not None else read_yaml(grid_path)
    doc = apply_overrides(doc, overrides)
    _absolute_data_root(doc)
    if not resuming:
        probe = build_grid(doc, grid_path, None, check_models=False, collect=True)
        results, resuming = choose_results(args, probe.name, doc)
        if not results.remote:
            check_output_folder(results.local)
            problem = job_working_dir_problem(results.local)
            if problem:
                raise ConfigError(problem)
    spec = build_grid(doc, grid_path, None, collect=True)
    if resuming:
        refuse_changed_resume(spec, results.local, args.grid)
    return spec, grid_path, results, resuming, new_grid_yaml is not None


def _main(args, run: Optional[Callable[..., dict]]) -> int:
    console = Console()
    spec, grid_path, results, resuming, regrid = resolve(args)
    results_dir = results.local if not results.remote else results.where
    cluster = local_cluster(args)
    problems = pre_start_problems(spec, cluster)  # every problem at once; nothing written or started yet
    problems += check_storage_from_driver(spec, results, dry_run=args.dry_run)
    from experiments.engine import cost

    estimate = cost.estimate_grid(spec)
    if args.dry_run and args.json:  # the JSON document alone on stdout; its problems list replaces stderr's lines
        print(plan_json(spec, problems))
        sys.stdout.flush()
        return 2 if problems else 0
    if args.dry_run:
        print(plan_text(spec, cluster, results_dir, resuming, args.address))
        print(estimate.text())
        print(f"storage  {results.where} (" + ("an object store: checked from this driver; every node is checked "
              "when Ray is up" if results.remote else "a folder: with --address every node must mount it") + ")")
        print(f"dry run: {len(problems)} problem(s) (on stderr); nothing written, Ray not started" if problems else
              "dry run: no problem found; nothing written, Ray not started. Run the same command without --dry-run")
        sys.stdout.flush()
        return report_problems(problems)
    if problems:
        code = report_problems(problems)
        console.line(f"{len(problems)} problem(s): nothing started, nothing written; the plan: the same command "
                     "with --dry-run", "bold red")
        return code
    console.line(f"grid     {describe(spec)}", "bold")
    console.line(estimate.short())

    # ---- results folder: one driver at a time (a second one, or a --resume while this runs, is refused)
    with folder_lock(results.local, "grid driver"):
        return drive(args, spec, grid_path, results, resuming, regrid, console, run)


def _absolute_data_root(raw: dict) -> None:
    """Relative data roots (data.root, stage2.datasets.<name>.data.root) are resolved against the current
    folder (trials run elsewhere)."""
    s2 = raw.get("stage2")
    extra = s2.get("datasets") if isinstance(s2, dict) else None  # each stage-2 dataset's own data.root
    blocks = [raw] + [b for b in (extra.values() if isinstance(extra, dict) else []) if isinstance(b, dict)]
    for block in blocks:
        data = block.get("data")
        if isinstance(data, dict) and isinstance(data.get("root"), str) and data["root"]:
            data["root"] = str(Path(data["root"]).expanduser().resolve())
