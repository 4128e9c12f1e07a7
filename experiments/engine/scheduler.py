"""Scheduling the grid on Ray Tune: `GridScheduler` (a Tune `Searcher`) hands out the next trial whose
dependencies are done, the one with the longest estimated path to the end of the grid first, up to
`max_concurrent` at once; `ConsoleCallback` turns Tune's trial events into console lines and state
transitions (experiments/engine/state.py). The `start` line of an attempt comes with its first report,
which names the node it runs on (experiments/engine/trial.py).

Both hold the driver's `GridState` as an attribute that is never pickled (`_DriverOnly`): Tune pickles
its search algorithm and callbacks into `<results>/ray/tune-*/tuner.pkl`, and the state reaches the
results storage, whose settings come from the driver's environment (credentials included). The grid
never restores Tune from that file (a resume reads the results folder), so nothing is lost."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from experiments.engine.console import fmt
from experiments.engine.spec import GridSpec

if TYPE_CHECKING:  # pragma: no cover
    from experiments.engine.state import GridState


def critical_path_priority(spec: GridSpec) -> dict[str, tuple]:
    """Longest estimated path to the end of the grid first (critical-path list scheduling: a slow
    pretraining whose segmentation trials wait on it starts before quick independent trials), then
    the grid's order. A trial's estimate is experiments/engine/cost.py's device time."""
    from experiments.engine import cost

    order = [t.id for t in spec.trials]
    trials, dependants = spec.by_id(), spec.dependants()
    est = {tid: cost.estimate_trial(trials[tid]).device_hours for tid in order}
    path: dict[str, float] = {}

    def longest(tid: str) -> float:  # the trial's time + its longest chain of dependants (a DAG)
        if tid not in path:
            path[tid] = est[tid] + max((longest(d) for d in dependants[tid]), default=0.0)
        return path[tid]

    return {tid: (-longest(tid), i) for i, tid in enumerate(order)}


class _DriverOnly:
    """Mixin: the `_state` attribute (the driver's GridState) is left out when the object is pickled."""

    _state: Optional["GridState"] = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_state"}


def make_scheduler(state: "GridState", max_concurrent: int):
    from ray.tune.search import Searcher

    class GridScheduler(_DriverOnly, Searcher):
        """Hands out trials in dependency order; never more than `max_concurrent` at once."""

        def __init__(self, state: "GridState") -> None:  # an argument, not a closure cell: never pickled
            super().__init__(metric=None, mode=None)
            self._state = state

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            if len(self._state.launched) >= max_concurrent:
                return None
            ready = self._state.ready()
            if not ready:
                # Nothing can start now: finished if nothing is left to hand out, else wait for the
                # running trials (their dependants become ready, or get skipped, when they end).
                return Searcher.FINISHED if not self._state.unlaunched_pending() else None
            tid = ready[0]
            self._state.launch(tid, trial_id)
            return {"trial": self._state.payload(tid)}

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            tid = self._state.tune_ids.get(trial_id)
            if tid is not None:
                self._state.finish(tid, error, completed=(result or {}).get("done_run") == 1)

        def save(self, checkpoint_path: str) -> None:  # state lives in the results folder
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

    return GridScheduler(state)


def make_console_callback(state: "GridState", retries: int):
    from ray.tune import Callback

    class ConsoleCallback(_DriverOnly, Callback):
        def __init__(self, state: "GridState") -> None:
            self._state = state

        def on_trial_start(self, iteration, trials, trial, **info):
            self._state.write_summary()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("done_run") == 0 and "attempt_hostname" in result:  # an attempt's first report
                tid = trial.config["trial"]["id"]
                t = self._state.trials[tid]
                res = ", ".join(f"{k}={fmt(v)}" for k, v in t.resources.items())
                node = (f"{result.get('attempt_hostname')} {result.get('attempt_ip') or ''} node "
                        f"{str(result.get('attempt_node_id') or '?')[:12]}, {result.get('attempt_device')}")
                running = len(self._state.launched)
                self._state.console.line(f"start    {tid} [{t.stage}; {res}; {running} running] on {node}", "cyan")
                return
            if result.get("done_run") != 0 or "epoch" not in result:
                return
            tid = trial.config["trial"]["id"]
            skip = {"trial", "epoch", "done_run"}
            vals = [(k, v) for k, v in result.items() if k not in skip and isinstance(v, (int, float))
                    and not isinstance(v, bool) and not k.startswith(("time_", "timestamp", "training_iteration",
                                                                        "pid", "iterations", "date", "node", "hostname",
                                                                        "attempt_",
                                                                        "config", "timesteps", "episodes", "warmup"))]
            shown = ", ".join(f"{k}={fmt(v)}" for k, v in vals[:4])
            self._state.console.line(f"  epoch {result['epoch']:>3} {tid}" + (f": {shown}" if shown else ""), "dim")

        def on_trial_recover(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["id"]
            why = self._state.trial_error(tid) or "error"
            n = int(trial.run_metadata.num_failures)
            self._state.console.line(f"retry    {tid} (attempt {n + 1} of {retries + 1}) after {why}; "
                                     "it resumes from its last checkpoint", "yellow")

        def on_trial_error(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["id"]
            self._state.finish(tid, True, tune_error=_tune_error_line(trial))

        def on_trial_complete(self, iteration, trials, trial, **info):
            tid = trial.config["trial"]["id"]
            self._state.finish(tid, False, completed=(trial.last_result or {}).get("done_run") == 1)

    return ConsoleCallback(state)


def _tune_error_line(trial) -> Optional[str]:
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    try:
        if path and Path(path).is_file():
            lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
            return lines[-1][:400] if lines else None
    except OSError:
        pass
    return None
