"""experiments/grid.py end to end on CPU through Ray Tune, with fast fake runs.

The grid runs through tests/fake_grid.py, which calls `experiments.engine.cli.main(argv, run=...)` with a
test double from tests/fakes.py as every trial's run function: `FakeRun` writes the same run folder as
run_pretrain / run_segment (metrics.json last) and logs each call to calls.log, so reruns can be
counted; `WithFaults` injects failures by trial id. The same grids run the real functions through
experiments/grid.py itself (the lead's end-to-end check). CLI errors go to experiments/grid.py directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GRID = REPO / "experiments" / "grid.py"
FAKE_GRID = REPO / "tests" / "fake_grid.py"  # experiments.engine.cli.main with tests/fakes.py run functions

VIT = "pt-vit_nano_patch8-random-bt-l0.0051-s0"
RES = "pt-resnet_tiny-random-bt-l0.0051-s0"
E1 = f"seg-E1-from-{RES}"
E2 = f"seg-E2-from-{VIT}"

TINY = {
    "name": "tiny",
    "wandb": "disabled",
    "max_concurrent": 2,
    "retries": 1,
    "data": {"image_size": 32, "synthetic_n_train": 8, "synthetic_n_val": 4},
    "stage1": {
        "resources": {"cpu": 1, "gpu": 0},
        "settings": {"device": "cpu", "epochs": 1, "batch_size": 4, "projector": [32, 32], "knn_k": 2},
        "axes": {"backbone": ["vit_nano_patch8", "resnet_tiny"], "lambd": [0.0051], "method": ["barlow_twins"]},
    },
    "stage2": {
        "resources": {"cpu": 1, "gpu": 0},
        "settings": {"device": "cpu", "epochs": 1, "batch_size": 4},
        "evaluations": [
            {"evaluation": "E1", "from": {"backbone": "resnet_tiny"}},
            {"evaluation": "E2", "from": {"backbone": "vit_nano_patch8"}},
        ],
    },
}


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _grid_file(tmp_path: Path, **changes) -> Path:
    doc = json.loads(json.dumps(TINY))
    doc.update(changes)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _cmd(*args, fake=None) -> list[str]:
    """experiments/grid.py ARGS, or with `fake` (a list of tests/fake_grid.py options, [] for plain
    fake runs) tests/fake_grid.py FAKE -- ARGS."""
    if fake is None:
        return [sys.executable, str(GRID), *args]
    return [sys.executable, str(FAKE_GRID), *fake, "--", *args]


def _run(args, env, cwd, timeout=400, fake=None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args, fake=fake), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {t["id"]: t for t in s["trials"]}


# ----------------------------------------------------------------------------- CLI errors (no Ray)
@pytest.mark.parametrize("args,fragment", [
    (["--grid", "nope"], "--grid nope: unknown grid"),
    (["--grid", "/nonexistent/grid.yaml"], "no such grid file"),
    (["--max-concurrent", "0"], "--max-concurrent 0 must be >= 1"),
    (["--max-trials", "0"], "--max-trials 0 must be >= 1"),
    (["--max-trials", "many"], "--max-trials: invalid int value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--wandb", "maybe"], "invalid choice"),
    (["--data-root", "/nonexistent/voc"], "--data-root /nonexistent/voc is not a folder"),
    (["--resume", "--output", "EMPTY"], "no grid.yaml there"),
    (["--grid", "BAD"], "bad.yaml: stage1.axes.lambd[1]=-0.1 must be >= 0"),
])
def test_cli_errors_exit_2_one_line(tmp_path, args, fragment):
    (tmp_path / "EMPTY").mkdir()
    doc = json.loads(json.dumps(TINY))
    doc["stage1"]["axes"]["lambd"] = [0.0051, -0.1]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    args = [str(tmp_path / "bad.yaml") if a == "BAD" else str(tmp_path / "EMPTY") if a == "EMPTY" else a for a in args]
    r = _run(args, _env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("twinseg: error: "), r.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "results").exists()  # nothing written that could pass for a result


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_grid_retry_failure_skip_and_summary(tmp_path):
    """One grid: a trial that fails once is retried and succeeds; a trial that always fails is
    `failed` and its dependant `skipped` with the reason; summary.json/csv written; exit 1."""
    grid = _grid_file(tmp_path)
    out = tmp_path / "out"
    r = _run(["--grid", str(grid), "--output", str(out), "--num-cpus", "2", "--no-dashboard", "--no-report"],
             _env(), cwd=tmp_path, fake=["--fail-once", VIT, "--fail-always", RES])
    assert r.returncode == 1, r.stdout + r.stderr
    s = _summary(out)
    assert s[VIT]["status"] == "done" and s[E2]["status"] == "done"
    assert (out / "trials" / VIT / ".fault_injected").exists()  # it did fail once ...
    assert (out / "trials" / VIT / "calls.log").read_text().split() == ["start"]  # ... then ran once
    assert s[RES]["status"] == "failed" and "injected permanent fault" in s[RES]["reason"]
    assert s[E1]["status"] == "skipped"
    assert s[E1]["reason"].startswith(f"dependency {RES} failed: RuntimeError: injected permanent fault")
    assert not (out / "trials" / E1 / "metrics.json").exists()
    # stage-2 trial consumed the stage-1 checkpoint of ITS dependency
    assert s[E2]["depends_on"] == [VIT]
    assert s[E2]["config"]["source"] == f"checkpoint:trials/{VIT}/backbone.pt"  # relative to the results folder
    ran = json.loads((out / "trials" / E2 / "config.json").read_text())  # what the run got: made absolute
    assert ran["source"] == f"checkpoint:{(out / 'trials' / VIT / 'backbone.pt').resolve().as_posix()}"
    assert s[E2]["metrics"]["mIoU"] == 30.0 and s[E2]["dir"] == f"trials/{E2}"
    assert (out / "grid.yaml").is_file() and (out / "trials" / E2 / "trial.json").is_file()
    csv = (out / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("id,stage,status,reason,depends_on,dir") and len(csv) == 5
    assert "retry" in r.stdout and f"skipped  {E1}" in r.stdout
    assert "dashboard: not running" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("twinseg: error: 1 trial(s) failed and 1 skipped")
    assert "Traceback" not in r.stdout


SECRET = "secret-xyz-do-not-store"
SECRET_S3 = "s3-secret-key-do-not-store"


def _comparable(out: Path) -> dict:
    """summary.json without what legitimately differs between two results folders (timestamps, paths)."""
    s = json.loads((out / "summary.json").read_text().replace(out.resolve().as_posix(), "<OUT>"))
    return {t["id"]: {"stage": t["stage"], "status": t["status"], "depends_on": t["depends_on"],
                      "config": t["config"], "metrics": t.get("metrics"), "dir": t["dir"]} for t in s["trials"]}


def _finished(out: Path) -> dict[str, int]:
    """trial id -> metrics.json mtime for every finished trial folder."""
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*/metrics.json")}


def _calls(out: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in (out / "trials").glob("*/calls.log")}


def _kill_when(args, env, cwd: Path, log: Path, done, fake) -> None:
    """Start the driver, SIGKILL it (and everything in its session) once `done()` is true."""
    with open(log, "w") as f:
        p = subprocess.Popen(_cmd(*args, fake=fake), env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        deadline = time.time() + 300
        try:
            while not done():
                assert p.poll() is None, log.read_text()
                assert time.time() < deadline, "no trial finished in time"
                time.sleep(0.2)
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_driver_killed_twice_matches_uninterrupted(tmp_path):
    """Fault injection: the same grid run (a) uninterrupted and (b) SIGKILLed
    twice at different points and resumed each time ends in the same summary.json (ids, statuses,
    configs, metrics), no finished trial is rerun, summaries are always whole (atomic writes) and
    no secret from the environment reaches the results folder.
    The uninterrupted run also starts the Ray dashboard (127.0.0.1, token auth): its state API lists
    every trial's actor under the repr name `trial <id>`."""
    grid = _grid_file(tmp_path, max_concurrent=1)
    env = _env(WANDB_API_KEY=SECRET, AWS_ACCESS_KEY_ID="AKIDTEST", AWS_SECRET_ACCESS_KEY=SECRET_S3)
    fake = ["--sleep", "2"]
    common = ["--num-cpus", "2", "--no-dashboard", "--no-report"]

    ref = tmp_path / "ref"  # (a) uninterrupted, with the dashboard
    actors = tmp_path / "actors.json"
    r = _run(["--grid", str(grid), "--output", str(ref), "--num-cpus", "2", "--no-report"], env, cwd=tmp_path,
             fake=[*fake, "--actors", str(actors)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dashboard: http://127.0.0.1:" in r.stdout and "token auth on" in r.stdout, r.stdout
    # the dashboard names each trial's actor after the trial (ray.util.state.list_actors, repr_name)
    listed = json.loads(actors.read_text())
    assert isinstance(listed, list), listed
    trial_actors = [a for a in listed if a["class_name"] == "grid_trial"]
    assert {a["repr_name"] for a in trial_actors} == {f"trial {t}" for t in _summary(ref)}, listed

    out = tmp_path / "out"  # (b) killed twice
    _kill_when(["--grid", str(grid), "--output", str(out), *common], env, tmp_path, tmp_path / "first.log",
               lambda: (out / "trials" / VIT / "metrics.json").exists(), fake)  # the vit run unblocks E2: it goes first
    s = _summary(out)  # whole JSON after a SIGKILL
    assert s[VIT]["status"] in ("done", "pending")  # summary may be a step behind the kill
    assert any(t["status"] == "pending" for t in s.values())
    before1, calls1 = _finished(out), _calls(out)
    assert VIT in before1 and len(before1) < 4

    resume = ["--resume", "--output", str(out), *common]
    _kill_when(resume, env, tmp_path, tmp_path / "second.log", lambda: len(_finished(out)) > len(before1), fake)
    _summary(out)
    before2, calls2 = _finished(out), _calls(out)
    assert len(before2) > len(before1)

    r = _run(resume, env, cwd=tmp_path, fake=fake)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "already done" in r.stdout

    # same outcome as the uninterrupted run
    assert _comparable(out) == _comparable(ref)
    assert all(t["status"] == "done" for t in _summary(out).values())
    # no finished trial was rerun: metrics.json untouched, no new call logged
    after, calls = _finished(out), _calls(out)
    for tid, mtime in before2.items():
        assert after[tid] == mtime, f"{tid} rewritten after it had finished"
        assert calls[tid] == calls2[tid], f"{tid} called again after it had finished"
    for tid in before1:
        assert calls[tid] == calls1[tid] == "start\n"
    for tid, log in calls.items():  # an interrupted trial resumes (from its checkpoint), never restarts twice
        assert log.split().count("start") == 1, (tid, log)
    # atomic writes: no temp file left behind, every JSON whole
    for root in (ref, out):
        assert not list(root.rglob("*.tmp")), list(root.rglob("*.tmp"))
        for f in [root / "summary.json", *root.glob("trials/*/*.json")]:  # ray/ holds Tune's own (pickle) files
            json.loads(f.read_text())
    # no secret from the environment in any file of either results folder
    for root in (ref, out):
        for f in root.rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes() and SECRET_S3.encode() not in f.read_bytes(), f
    # a further --resume has nothing to do and does not start Ray
    r2 = _run(["--resume", "--output", str(out), "--no-report"], env, cwd=tmp_path, timeout=120, fake=fake)
    assert r2.returncode == 0 and "nothing to run" in r2.stdout, r2.stdout + r2.stderr


def test_tune_state_pickled_into_the_results_folder_holds_no_secret(tmp_path, monkeypatch):
    """Tune pickles its search algorithm and callbacks into <results>/ray/tune-*/tuner.pkl; they serve
    the driver's GridState, whose results storage reads the environment (wandb key, S3 credentials):
    none of it may reach that file. The Ray job's env vars carry no secret either."""
    sys.path.insert(0, str(REPO))
    import ray.cloudpickle

    from experiments.engine.console import Console
    from experiments.engine.driver import make_tuner
    from experiments.engine.expand import load_grid
    from experiments.engine.ray_backend import worker_env
    from experiments.engine.results_folder import results_for
    from experiments.engine.state import GridState
    from core.storage import Storage

    for k, v in {"WANDB_API_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIDSECRETID", "AWS_SECRET_ACCESS_KEY": SECRET_S3,
                 "TWINSEG_UPLOAD_TOKEN": SECRET}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    (out / "trials").mkdir(parents=True)
    results = results_for(Storage(out))
    spec = load_grid(_grid_file(tmp_path))
    state = GridState(spec, out, "now", Console(), group="g", wandb="disabled", results=results)
    assert SECRET_S3.encode() in ray.cloudpickle.dumps(state)  # what must not travel with Tune's state
    tuner = make_tuner(spec, state, run=None)
    blob = ray.cloudpickle.dumps(tuner._local_tuner.__getstate__())  # what tuner.pkl holds
    assert SECRET.encode() not in blob and SECRET_S3.encode() not in blob
    searcher = ray.cloudpickle.loads(ray.cloudpickle.dumps(tuner._local_tuner._tune_config.search_alg))
    assert searcher._state is None  # unpickled without the driver's state
    env_vars = worker_env(1)
    assert SECRET not in json.dumps(env_vars) and "TWINSEG_UPLOAD_TOKEN" not in env_vars


def test_trial_actor_repr_is_the_trial_id():
    """The trainable's __repr__ (Ray's repr name of the actor: dashboard actor list, log prefixes)."""
    sys.path.insert(0, str(REPO))
    from ray.tune.trainable import FunctionTrainable

    from experiments.engine.trial import make_trainable

    cls = make_trainable(resources=lambda config: {"cpu": 1, "gpu": 0})
    assert issubclass(cls, FunctionTrainable) and cls.__name__ == "grid_trial"
    actor = cls.__new__(cls)  # no Ray: only the naming
    actor.config = {"trial": {"id": VIT, "stage": "pretrain"}}
    assert repr(actor) == f"trial {VIT}"
    assert cls.default_resource_request({"trial": {}}) is not None


def test_dashboard_line_never_prints_the_token(monkeypatch):
    sys.path.insert(0, str(REPO))
    from experiments.engine.ray_backend import dashboard_line

    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-token-value")
    line = dashboard_line("127.0.0.1:8265", "token")
    assert line.startswith("dashboard: http://127.0.0.1:8265 (token auth on")
    assert "s3cret" not in line and "$RAY_AUTH_TOKEN" in line
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert "auth_token" in dashboard_line("127.0.0.1:8265", "token")
    assert "WARNING" in dashboard_line("127.0.0.1:8265", "disabled")
    assert "not running" in dashboard_line("", "token")
