"""The grid on a real two-node Ray cluster without a shared disk (tests/ray_cluster.py: the worker node has
its own tmpfs over the results path), with the real runs on tiny sizes, one cluster for the module:

* results on an S3 server (`--storage s3://...`, tests/s3_server.py): 2 pretraining + 2 segmentation
  trials end done, every metrics.json is on the server, `analysis/report.py s3://...` writes the report;
* the same grid with a plain local `--output` (private to each node) is refused by the storage check on
  every node before any trial starts;
* the same grid submitted as a Ray Job (`ray job submit --working-dir <a copy of the source> -- python
  experiments/grid.py ... --address auto --storage s3://...`, the README's command) ends 4/4 done on the
  storage;
* a lost node: the worker's raylet is killed by pid once its pretraining trial's first checkpoint is on
  storage; Tune retries the trial on the head, which resumes from that checkpoint (the retry's history
  starts at a later epoch), and the grid ends 4/4 done with the trial set of an uninterrupted run.
The node-loss case ends the worker node, so it runs last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from core.storage import Storage
from tests.ray_cluster import ray_cli, two_node_cluster
from tests.test_grid import E1, E2, RES, TINY, VIT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parent.parent
GRID = REPO / "experiments" / "grid.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    root = tmp_path_factory.mktemp("cluster")
    with two_node_cluster(root, private_path=root / "private", num_cpus=1, worker_cpus=1,
                          node_env=s3.env()) as c:
        yield c


def _grid(where: Path, pretrain_epochs: int = 1) -> Path:
    doc = json.loads(json.dumps(TINY))
    doc["stage1"]["settings"]["epochs"] = pretrain_epochs
    p = where / f"tiny-{pretrain_epochs}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _driver(cluster, s3, tmp: Path, *args, timeout: float = 900) -> subprocess.Popen:
    env = cluster.driver_env(**s3.env(), WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
                             TWINSEG_DATA_DIR=str(tmp / "data"),
                             TWINSEG_SCRATCH=str(cluster.private_path / "scratch"))
    return subprocess.Popen([sys.executable, str(GRID), *args, "--address", cluster.address], env=env, cwd=str(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_s3_grid_on_two_nodes_and_the_report(cluster, s3, tmp_path):
    uri = f"s3://{s3.bucket}/cluster-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    code, out, err = _finish(_driver(cluster, s3, tmp_path, "--grid", str(_grid(tmp_path)), "--storage", uri,
                                     "--output", "run", "--no-report"))
    elapsed = time.monotonic() - t0
    assert code == 0, out[-4000:] + err[-4000:]
    store = Storage(f"{uri}/run", env=s3.env())
    summary = store.read_json("summary.json")
    assert summary["counts"] == {"done": 4, "failed": 0, "skipped": 0, "pending": 0}, summary["counts"]
    nodes = set()
    for t in summary["trials"]:
        run = store.child("trials", t["id"])
        assert run.read_metrics() is not None, t["id"]
        nodes |= {a["node_id"] for a in run.read_json("trial.json")["attempts"]}
    assert nodes <= {cluster.head.node_id, cluster.worker.node_id}
    starts = [ln for ln in out.splitlines() if "start    " in ln]
    assert len(starts) == 4 and all(" node " in ln for ln in starts), out
    r = subprocess.run([sys.executable, str(REPO / "analysis" / "report.py"), f"{uri}/run"], cwd=str(tmp_path),
                       env={**os.environ, **s3.env()}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# " in store.read_text("report.md") and store.list("figures")
    print(f"two-node S3 grid: {elapsed:.0f} s; nodes used: {len(nodes)}")


def test_a_local_output_not_on_every_node_is_refused_before_any_trial(cluster, s3, tmp_path):
    out_dir = cluster.private_path / f"local-{uuid.uuid4().hex[:6]}"
    code, out, err = _finish(_driver(cluster, s3, tmp_path, "--grid", str(_grid(tmp_path)), "--output",
                                     str(out_dir), "--no-report"), timeout=300)
    lines = [ln for ln in err.splitlines() if ln.startswith("twinseg: error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert f"results folder {out_dir} is not visible from node " in lines[0]
    assert "use a folder every node mounts, or --storage s3://..." in lines[0]
    assert "start    " not in out
    assert not list((out_dir / "trials").glob("*/*"))  # nothing started


def test_the_grid_submitted_as_a_ray_job(cluster, s3, tmp_path):
    """`ray job submit --working-dir DIR -- python experiments/grid.py ...`: the job's driver runs on the head
    in an unpacked copy of DIR (the source only: no .venv, results or data), joins the cluster (`--address
    auto`: the job's own), and writes the results to the object store (the nodes' AWS_* environment)."""
    work = tmp_path / "job"
    for d in ("core", "experiments", "analysis"):
        shutil.copytree(REPO / d, work / d, ignore=shutil.ignore_patterns("__pycache__"))
    grid = _grid(work)
    uri = f"s3://{s3.bucket}/job-{uuid.uuid4().hex[:6]}"
    job_env = {"WANDB_MODE": "disabled", "TWINSEG_DATA_DIR": str(tmp_path / "data"),
               "TWINSEG_SCRATCH": str(cluster.private_path / "scratch")}
    cmd = [ray_cli(), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(work),
           "--runtime-env-json", json.dumps({"env_vars": job_env}), "--",
           "python", "experiments/grid.py", "--grid", grid.name, "--address", "auto", "--storage", uri,
           "--output", "run", "--no-report"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=str(tmp_path), env=cluster.driver_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "succeeded" in r.stdout
    store = Storage(f"{uri}/run", env=s3.env())
    summary = store.read_json("summary.json")
    assert summary["counts"] == {"done": 4, "failed": 0, "skipped": 0, "pending": 0}, summary["counts"]
    assert all(store.child("trials", t["id"]).read_metrics() is not None for t in summary["trials"])
    print(f"the grid as a Ray Job: {time.monotonic() - t0:.0f} s")


def test_a_lost_node_retries_on_the_other_and_resumes_from_storage(cluster, s3, tmp_path):
    uri = f"s3://{s3.bucket}/lost-{uuid.uuid4().hex[:6]}"
    store = Storage(f"{uri}/run", env=s3.env())
    proc = _driver(cluster, s3, tmp_path, "--grid", str(_grid(tmp_path, pretrain_epochs=8)), "--storage", uri,
                   "--output", "run", "--no-report")
    killed, deadline = None, time.monotonic() + 600
    try:
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            for tid in (VIT, RES):
                run = store.child("trials", tid)
                if run.exists("checkpoints/last.ckpt") and run.exists("trial.json"):
                    last = run.read_json("trial.json")["attempts"][-1]
                    if last["node_id"] == cluster.worker.node_id and run.read_metrics() is None:
                        os.kill(cluster.worker.raylet_pid(), signal.SIGKILL)
                        killed = tid
                        break
            time.sleep(0.2)  # poll interval of the storage, not a wait for a fixed duration
        code, out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "no pretraining checkpoint from the worker node appeared on storage"
    assert code == 0, out[-4000:] + err[-4000:]
    summary = store.read_json("summary.json")
    assert summary["counts"] == {"done": 4, "failed": 0, "skipped": 0, "pending": 0}
    # the trial set and statuses of an uninterrupted run of this grid
    assert {t["id"]: t["status"] for t in summary["trials"]} == {tid: "done" for tid in (VIT, RES, E1, E2)}
    run = store.child("trials", killed)
    attempts = run.read_json("trial.json")["attempts"]
    assert [a["node_id"] for a in attempts][:1] == [cluster.worker.node_id]
    assert attempts[-1]["node_id"] == cluster.head.node_id and len(attempts) >= 2
    logs = sorted(f for f in run.list("logs") if f.endswith("metrics.csv"))
    assert len(logs) >= 2, logs
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(run.read_text(f"logs/{logs[-1]}"))))
    first_epoch = min(int(float(r["epoch"])) for r in rows if r.get("epoch"))
    assert first_epoch >= 1, rows[:3]  # the retry resumed from the persisted checkpoint, not from epoch 0
