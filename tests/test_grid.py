"""experiments/grid.py end to end on CPU through Ray Tune, with fast fake runs (TWINSEG_FAKE_RUNS=1).

The fake runs (experiments/trial.py `fake_run`) write the same run folder as run_pretrain /
run_segment (metrics.json last) and log each call to calls.log, so reruns can be counted. The same
grids run the real functions when TWINSEG_FAKE_RUNS is not set (the lead's end-to-end check).
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
    for k in ("TWINSEG_FAULT_ONCE", "TWINSEG_FAULT_ALWAYS", "TWINSEG_FAKE_SLEEP", "RAY_ADDRESS"):
        env.pop(k, None)
    env.update({"TWINSEG_FAKE_RUNS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _grid_file(tmp_path: Path, **changes) -> Path:
    doc = json.loads(json.dumps(TINY))
    doc.update(changes)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _cmd(*args) -> list[str]:
    return [sys.executable, str(GRID), *args]


def _run(args, env, cwd, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {t["id"]: t for t in s["trials"]}


# ----------------------------------------------------------------------------- CLI errors (no Ray)
@pytest.mark.parametrize("args,fragment", [
    (["--grid", "nope"], "--grid nope: unknown grid"),
    (["--grid", "/nonexistent/grid.yaml"], "no such grid file"),
    (["--max-concurrent", "0"], "--max-concurrent 0 must be >= 1"),
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
    env = _env(TWINSEG_FAULT_ONCE=VIT, TWINSEG_FAULT_ALWAYS=RES)
    r = _run(["--grid", str(grid), "--output", str(out), "--num-cpus", "2", "--no-dashboard", "--no-report"],
             env, cwd=tmp_path)
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
    assert s[E2]["config"]["source"] == f"checkpoint:{(out / 'trials' / VIT / 'backbone.pt').resolve().as_posix()}"
    assert s[E2]["metrics"]["mIoU"] == 30.0 and s[E2]["dir"] == f"trials/{E2}"
    assert (out / "grid.yaml").is_file() and (out / "trials" / E2 / "trial.json").is_file()
    csv = (out / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("id,stage,status,reason,depends_on,dir") and len(csv) == 5
    assert "retry" in r.stdout and f"skipped  {E1}" in r.stdout
    assert "dashboard: not running" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("twinseg: error: 1 trial(s) failed and 1 skipped")
    assert "Traceback" not in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_after_driver_killed(tmp_path):
    grid = _grid_file(tmp_path, max_concurrent=1)
    out = tmp_path / "out"
    env = _env(TWINSEG_FAKE_SLEEP="3")
    args = ["--grid", str(grid), "--output", str(out), "--num-cpus", "2", "--no-dashboard", "--no-report"]
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(_cmd(*args), env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    first = out / "trials" / VIT / "metrics.json"  # the vit run unblocks E2: it goes first
    deadline = time.time() + 300
    try:
        while not first.exists():
            assert p.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.5)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and everything it started in its session
        p.wait()
        log.close()
    time.sleep(2)
    mtime = first.stat().st_mtime_ns
    s = _summary(out)
    assert s[VIT]["status"] in ("done", "pending")  # summary may be a step behind the kill
    assert any(t["status"] == "pending" for t in s.values())

    r = _run(["--resume", "--output", str(out), "--num-cpus", "2", "--no-dashboard", "--no-report"], env,
             cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    s = _summary(out)
    assert all(t["status"] == "done" for t in s.values()), s
    assert first.stat().st_mtime_ns == mtime  # finished trial not rerun
    assert (out / "trials" / VIT / "calls.log").read_text().split() == ["start"]
    assert "resuming: 1 trial(s) already done" in r.stdout or "already done" in r.stdout
    for tid in (RES, E1, E2):
        calls = (out / "trials" / tid / "calls.log").read_text().split()
        assert calls[-1] in ("start", "resume") and calls.count("start") <= 1 + calls.count("resume")
    # a second --resume has nothing to do and does not start Ray
    r2 = _run(["--resume", "--output", str(out), "--no-report"], env, cwd=tmp_path, timeout=120)
    assert r2.returncode == 0 and "nothing to run" in r2.stdout, r2.stdout + r2.stderr


def test_dashboard_line_never_prints_the_token(monkeypatch):
    sys.path.insert(0, str(REPO))
    from experiments.grid import dashboard_line

    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-token-value")
    line = dashboard_line("127.0.0.1:8265", "token")
    assert line.startswith("dashboard: http://127.0.0.1:8265 (token auth on")
    assert "s3cret" not in line and "$RAY_AUTH_TOKEN" in line
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert "auth_token" in dashboard_line("127.0.0.1:8265", "token")
    assert "WARNING" in dashboard_line("127.0.0.1:8265", "disabled")
    assert "not running" in dashboard_line("", "token")
