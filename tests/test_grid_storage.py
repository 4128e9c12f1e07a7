"""The grid's results storage (`--storage`, the grid's `storage:` key; experiments/engine/results_folder.py)
on one machine: every bad value is one line and exit 2 before anything runs, an object store's problems
(missing credentials, unreachable endpoint, missing bucket) are found from the driver before Ray starts,
a dry run names and checks the storage, and a grid of fake trials on a real S3 server (tests/s3_server.py)
persists every trial folder there (metrics.json included), resumes from it and writes its summary there.
The two-node cases are in tests/test_grid_cluster.py."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from core.storage import Storage
from experiments.engine import cli
from tests.s3_server import closed_port
from tests.test_grid import FAKE_GRID
from tests.test_grid import _grid_file as _grid
from tests.test_grid_reliability import env  # noqa: F401 - the fixture extended below

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def senv(env, tmp_path, monkeypatch):
    """test_grid_reliability's `env` (fresh cwd, offline, no GPU, `import ray` fails), a scratch root and
    no AWS settings or credentials file."""
    monkeypatch.setenv("TWINSEG_SCRATCH", str(tmp_path / "scratch"))
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    return env


def _one_line_exit_2(capsys, argv) -> str:
    code = _main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("twinseg: error: "), err
    return err[0]


def _main(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize("storage, fragment", [
    ("ftp://host/x", "unsupported scheme 'ftp://'"),
    ("s3://", "names no bucket"),
    ("s3://Bad_Bucket/x", "not a valid bucket name"),
    ("", "empty storage URI"),
])
def test_bad_storage_flag_is_one_line(senv, capsys, storage, fragment):
    line = _one_line_exit_2(capsys, ["--grid", str(_grid(senv)), "--storage", storage, "--dry-run"])
    assert fragment in line


@pytest.mark.parametrize("value, fragment", [
    (5, "storage: 5 must be a path or a URI"),
    ("gopher://x", "unsupported scheme 'gopher://'"),
])
def test_bad_storage_key_is_one_line(senv, capsys, value, fragment):
    line = _one_line_exit_2(capsys, ["--grid", str(_grid(senv, storage=value)), "--dry-run"])
    assert fragment in line


def test_absolute_output_under_an_object_store_is_refused(senv, capsys):
    line = _one_line_exit_2(capsys, ["--grid", str(_grid(senv)), "--storage", "s3://bucket/x", "--output",
                                     str(senv / "abs"), "--dry-run"])
    assert "an absolute path with the storage s3://bucket/x" in line


def test_missing_credentials_found_before_anything_runs(senv, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    env_file = _grid(senv)
    code = _main(["--grid", str(env_file), "--storage", "s3://twinseg-test/x"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert any("no S3 credentials for s3://twinseg-test/x" in ln for ln in err), err
    assert not (senv / "results").exists() and not (senv / "data").exists()


def test_unreachable_endpoint_and_missing_bucket_are_one_line_each(senv, capsys, monkeypatch, s3):
    for k, v in s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}").items():
        monkeypatch.setenv(k, v)
    code = _main(["--grid", str(_grid(senv)), "--storage", f"s3://{s3.bucket}/x"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "twinseg: error:" in ln]
    assert code == 2 and len(err) == 1 and "cannot reach the object store" in err[0], err
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    code = _main(["--grid", str(_grid(senv)), "--storage", "s3://no-such-bucket-here/x"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "twinseg: error:" in ln]
    assert code == 2 and len(err) == 1 and "bucket 'no-such-bucket-here' does not exist" in err[0], err


def test_dry_run_names_and_checks_the_storage(senv, capsys, monkeypatch, s3):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3.bucket}/dry-{uuid.uuid4().hex[:6]}"
    assert _main(["--grid", str(_grid(senv)), "--storage", uri, "--output", "run1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"storage  {uri}/run1 (an object store: checked from this driver" in out
    assert Storage(uri, env=s3.env()).list("") == []  # the check's probe is gone, nothing written
    # a folder storage: a relative --output lies under it; nothing created by a dry run
    assert _main(["--grid", str(_grid(senv)), "--storage", str(senv / "shared"), "--output", "run1", "--dry-run"]) == 0
    assert f"storage  {senv / 'shared' / 'run1'} (a folder" in capsys.readouterr().out
    assert not (senv / "shared").exists()


def _fake_grid(args, env_vars, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAKE_GRID), "--", *args], env=env_vars, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_fake_grid_on_s3_persists_every_trial_and_resumes(tmp_path, s3):
    """Local Ray, fake trials, results on the S3 server: every trial folder lands there with metrics.json;
    the summary and grid.yaml too; a trial that failed once resumes from what its first attempt persisted;
    --resume from the storage reruns nothing."""
    import os

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    grid = _grid(cwd)
    uri = f"s3://{s3.bucket}/fake-{uuid.uuid4().hex[:6]}"
    env_vars = {**os.environ, **s3.env(), "WANDB_MODE": "disabled", "TWINSEG_SCRATCH": str(tmp_path / "scratch"),
                "TWINSEG_DATA_DIR": str(tmp_path / "data")}
    env_vars.pop("RAY_ADDRESS", None)
    vit = "pt-vit_nano_patch8-random-bt-l0.0051-s0"
    r = subprocess.run([sys.executable, str(FAKE_GRID), "--fail-once", vit, "--", "--grid", str(grid), "--storage",
                        uri, "--output", "run", "--no-report", "--num-cpus", "2"],
                       env=env_vars, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    store = Storage(f"{uri}/run", env=s3.env())
    summary = store.read_json("summary.json")
    assert summary["counts"]["done"] == 4 and store.exists("grid.yaml")
    for t in summary["trials"]:
        run = store.child("trials", t["id"])
        assert run.read_metrics() is not None, t["id"]
        attempts = run.read_json("trial.json")["attempts"]
        assert len(attempts) == (2 if t["id"] == vit else 1)
        assert all(a["hostname"] and a["node_id"] and a["device"].startswith("cpu") for a in attempts)
    # the first attempt failed (its fault flag and error went to storage); the retry, in a fresh scratch
    # folder filled from storage, found the flag and ran once
    assert store.child("trials", vit).exists(".fault_injected")
    assert store.child("trials", vit).read_text("calls.log").split() == ["start"]
    assert "on " in next(ln for ln in r.stdout.splitlines() if " start " in f" {ln} " or "start    " in ln)
    r2 = _fake_grid(["--resume", "--storage", uri, "--output", "run", "--no-report", "--num-cpus", "2"], env_vars, cwd)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "nothing to run: every trial is already finished" in r2.stdout
    # the S3 credentials reach no results file: neither on the storage nor in the driver's local copy
    # (Ray Tune's own state, ray/tune-*/tuner.pkl, lies there)
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"].encode()
    assert not [f for f in store.list("") if secret in store.read_bytes(f)]
    local = [f for f in (tmp_path / "scratch").rglob("*") if f.is_file()]
    assert any(f.name == "tuner.pkl" for f in local) and not [f for f in local if secret in f.read_bytes()]
