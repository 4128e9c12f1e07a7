"""Test entry point of experiments/grid.py with test doubles (tests/fakes.py) as the trials' run function.

    python tests/fake_grid.py [--real] [--sleep S] [--fail-once ID]... [--fail-always ID]...
                              [--fail-at-epoch ID:E]... [--actors FILE] -- <experiments/grid.py arguments>

--real          the real run functions (experiments.engine.runner.run_stage) instead of tests/fakes.py FakeRun;
--sleep S       fake runs take S seconds;
--fail-once / --fail-always / --fail-at-epoch   faults injected by trial id (tests/fakes.py WithFaults);
--actors FILE   just before the grid stops Ray, write the actors of the Ray it started (ray.util.state.list_actors
                at that Ray's own dashboard URL, detail: class_name, repr_name, state) to FILE as JSON
                (needs the dashboard: its state API).

The grid itself (`experiments.engine.cli.main(argv, run=...)`) is the production code path, unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import fakes  # noqa: E402


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        own, grid_argv = argv[:i], argv[i + 1:]
    else:
        own, grid_argv = [], argv
    p = argparse.ArgumentParser(prog="python tests/fake_grid.py")
    p.add_argument("--real", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--fail-once", action="append", default=[])
    p.add_argument("--fail-always", action="append", default=[])
    p.add_argument("--fail-at-epoch", action="append", default=[], metavar="ID:E")
    p.add_argument("--actors", default=None)
    return p.parse_args(own), grid_argv


ACTORS_DEADLINE_S = 300.0
"""Bound on listing the actors (answers within seconds; a loaded machine may keep Ray's GCS busy longer)."""


def list_own_actors(dashboard: str, deadline_s: float = ACTORS_DEADLINE_S) -> list[dict]:
    """The actors of THIS grid's Ray (its dashboard's state API at `dashboard`, never an address found by
    looking for running instances: other Ray instances may run on the machine), once it answers: each
    try waits on Ray's own reply (its RPC timeout = the time left), a failed try is repeated until
    `deadline_s`."""
    import os
    import time

    from ray.util.state import list_actors

    url = dashboard if "://" in dashboard else f"http://{dashboard}"
    end = time.monotonic() + deadline_s
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:  # Ray's client lets these override an explicit address
        while True:
            left = end - time.monotonic()
            try:
                actors = list_actors(address=url, detail=True, limit=1000, timeout=max(int(left), 1),
                                     raise_on_missing_output=False)
                return [{"class_name": x.class_name, "repr_name": x.repr_name, "state": x.state} for x in actors]
            except Exception:  # noqa: BLE001 - not ready yet (connection refused, GCS busy): ask again
                if time.monotonic() + 1 >= end:
                    raise
                time.sleep(1)  # between tries of a bounded poll
    finally:
        os.environ.update(saved)


def record_actors_before_shutdown(path: Path) -> None:
    """Wrap ray.init (to learn the dashboard of the Ray the grid starts) and ray.shutdown (the grid calls
    it when the Tune run ends) to save that Ray's actor list first."""
    import ray

    init, shutdown = ray.init, ray.shutdown
    seen: dict = {}

    def recording_init(*a, **k):
        ctx = init(*a, **k)
        seen["dashboard"] = getattr(ctx, "dashboard_url", "") or ""
        return ctx

    def recording_shutdown(*a, **k):
        try:
            if ray.is_initialized():
                if not seen.get("dashboard"):
                    raise RuntimeError("the grid's Ray has no dashboard (its state API lists the actors)")
                path.write_text(json.dumps(list_own_actors(seen["dashboard"]), indent=2))
        except Exception as e:  # noqa: BLE001 - the test reads the reason
            path.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return shutdown(*a, **k)

    ray.init, ray.shutdown = recording_init, recording_shutdown


def main(argv: list[str]) -> int:
    opts, grid_argv = parse(argv)
    import ray.cloudpickle

    from experiments.engine import cli
    from experiments.engine.runner import run_stage

    ray.cloudpickle.register_pickle_by_value(fakes)  # Ray's workers cannot import tests/fakes.py
    run = run_stage if opts.real else fakes.FakeRun(opts.sleep)
    at_epoch = dict(item.rsplit(":", 1) for item in opts.fail_at_epoch)
    if opts.fail_once or opts.fail_always or at_epoch:
        run = fakes.WithFaults(run, once=opts.fail_once, always=opts.fail_always, at_epoch=at_epoch)
    if opts.actors:
        record_actors_before_shutdown(Path(opts.actors))
    return cli.main(grid_argv, run=run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
