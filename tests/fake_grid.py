"""Test entry point of experiments/grid.py with test doubles (tests/fakes.py) as the trials' run function.

    python tests/fake_grid.py [--real] [--sleep S] [--fail-once ID]... [--fail-always ID]...
                              [--fail-at-epoch ID:E]... [--actors FILE] -- <experiments/grid.py arguments>

--real          the real run functions (experiments.engine.runner.run_stage) instead of tests/fakes.py FakeRun;
--sleep S       fake runs take S seconds;
--fail-once / --fail-always / --fail-at-epoch   faults injected by trial id (tests/fakes.py WithFaults);
--actors FILE   just before the grid stops Ray, write the cluster's actors (ray.util.state.list_actors,
                detail: class_name, repr_name, state) to FILE as JSON (needs the dashboard: its state API).

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


def record_actors_before_shutdown(path: Path) -> None:
    """Wrap ray.shutdown (the grid calls it when the Tune run ends) to save the actor list first."""
    import ray

    shutdown = ray.shutdown

    def recording_shutdown(*a, **k):
        try:
            if ray.is_initialized():
                from ray.util.state import list_actors

                actors = list_actors(detail=True, limit=1000, raise_on_missing_output=False)
                rows = [{"class_name": x.class_name, "repr_name": x.repr_name, "state": x.state} for x in actors]
                path.write_text(json.dumps(rows, indent=2))
        except Exception as e:  # noqa: BLE001 - the test reads the reason
            path.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return shutdown(*a, **k)

    ray.shutdown = recording_shutdown


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
