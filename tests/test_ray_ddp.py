"""Grid trials on several devices: Ray Train (TorchTrainer) + Lightning DDP,
experiments/engine/ray_ddp.py.

The end-to-end test runs real 2-worker CPU jobs (gloo) through experiments/grid.py on the tiny
generated data, in ONE Ray start (each Ray Train run costs ~45 s of process start-up and imports on
2 cores): a DDP pretraining trial that fails once mid-training and resumes from
checkpoints/last.ckpt on the retry, and, at the same time, a standalone DDP segmentation trial. The
grid runs through tests/fake_grid.py --real: the real run functions, wrapped by tests/fakes.py
`WithFaults` to inject the fault (a Lightning callback) into the pretraining trial's workers.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
FAKE_GRID = REPO / "tests" / "fake_grid.py"

PT = "pt-vit_nano_patch8-random-bt-l0.0051-s0"
SEG = "seg-E2-vit_nano_patch8-random-s0"
N_SSL = 8  # data.synthetic_n_train: the SSL images (VOC train split of the generated set)
BATCH = 2  # per worker
EPOCHS = 2

DDP_GRID = {
    "name": "ddp",
    "wandb": "disabled",
    "max_concurrent": 2,  # both trials at once: 2 x (2 x 0.45 + 0.01 driver) CPUs fit --num-cpus 2
    "retries": 1,
    "data": {"image_size": 32, "synthetic_n_train": N_SSL, "synthetic_n_val": 4},
    "stage1": {
        "resources": {"cpu": 0.45, "gpu": 0},  # per worker
        "settings": {"device": "cpu", "epochs": EPOCHS, "batch_size": BATCH, "projector": [32, 32], "knn_k": 2,
                     "devices": 2},
        "axes": {"backbone": ["vit_nano_patch8"], "lambd": [0.0051], "method": ["barlow_twins"]},
    },
    "stage2": {
        "resources": {"cpu": 0.45, "gpu": 0},
        "settings": {"device": "cpu", "epochs": 1, "batch_size": 2, "devices": 2},
        "evaluations": [{"evaluation": "E2", "from": "none",
                         "settings": {"backbone": "vit_nano_patch8", "source": "random"}}],
    },
}


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _payload(tmp_path: Path, **over) -> dict:
    p = {"id": PT, "stage": "pretrain", "config": {"devices": 2, "device": "cpu"}, "depends_on": [],
         "resources": {"cpu": 1.0, "gpu": 0.0, "workers": 2}, "dir": str(tmp_path / "trials" / PT),
         "ray_storage": str(tmp_path / "ray"), "wandb": "disabled", "group": "g", "cwd": str(tmp_path)}
    p.update(over)
    return p


# ----------------------------------------------------------------------------- no Ray needed
def test_finished_ddp_trial_is_never_rerun(tmp_path, monkeypatch):
    """The DDP trainable on a finished trial folder returns its metrics.json without starting a
    Ray Train run (no Ray, no worker: TorchTrainer would raise here)."""
    import ray.train.torch

    from experiments.engine import ray_ddp
    from experiments.engine.trial import run_payload

    def boom(*a, **k):
        raise AssertionError("a finished trial must not start a Ray Train run")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", boom)
    payload = _payload(tmp_path)
    out = Path(payload["dir"])
    out.mkdir(parents=True)
    done = {"stage": "pretrain", "knn_acc": 12.5, "workers": 2}
    (out / "metrics.json").write_text(json.dumps(done))
    mtime = (out / "metrics.json").stat().st_mtime_ns
    assert ray_ddp.run_ddp(payload) == done
    assert run_payload(payload) == done
    assert (out / "metrics.json").stat().st_mtime_ns == mtime
    assert not (out / "trial.json").exists() and not (tmp_path / "ray").exists()


def test_scaling_storage_and_root_cause(tmp_path):
    from ray.train import WorkerGroupError

    from core.errors import ConfigError
    from experiments.engine import ray_ddp

    p = _payload(tmp_path, config={"devices": 4}, resources={"cpu": 8, "gpu": 1, "workers": 4})
    assert ray_ddp.workers(p) == 4
    assert ray_ddp.scaling(p) == {"num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 8.0, "GPU": 1.0}}
    cpu = _payload(tmp_path, resources={"cpu": 0.5, "gpu": 0, "workers": 2})
    assert ray_ddp.scaling(cpu) == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 0.5}}
    assert ray_ddp.workers(_payload(tmp_path, config={})) == 1
    assert ray_ddp.storage(p) == (str((tmp_path / "ray").resolve()), f"train-{PT}")
    no_ray = _payload(tmp_path)
    no_ray.pop("ray_storage")
    assert ray_ddp.storage(no_ray) == (str((tmp_path / "trials" / PT / ".ray_train").resolve()), f"train-{PT}")
    # a user error on one rank wins over the other rank's broken-connection error
    err = WorkerGroupError("x", {0: RuntimeError("gloo: connection closed"), 1: ConfigError("bad value")})
    assert isinstance(ray_ddp.root_cause(err), ConfigError)
    err = WorkerGroupError("x", {1: RuntimeError("second"), 0: RuntimeError("first")})
    assert str(ray_ddp.root_cause(err)) == "first"
    plain = ValueError("v")
    assert ray_ddp.root_cause(plain) is plain


# ----------------------------------------------------------------------------- end to end (Ray Train on CPU)
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_grid_ddp_trials_on_two_cpu_workers(tmp_path):
    doc = json.loads(json.dumps(DDP_GRID))
    grid = tmp_path / "ddp.yaml"
    grid.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(FAKE_GRID), "--real", "--fail-at-epoch", f"{PT}:1", "--",
                        "--grid", str(grid), "--output", str(out), "--num-cpus", "2", "--no-dashboard", "--no-report"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1440, env=_env())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    s = {t["id"]: t for t in json.loads((out / "summary.json").read_text())["trials"]}
    assert s[PT]["status"] == "done" and s[SEG]["status"] == "done", s
    assert s[PT]["resources"] == {"cpu": 0.45, "gpu": 0.0, "workers": 2}
    assert f"start    {PT} [pretrain; cpu=0.45, gpu=0, workers=2" in r.stdout
    assert f"epoch   2 {PT}" in r.stdout  # rank 0's per-epoch report reached Tune (TuneReportCallback)

    pt = out / "trials" / PT
    m = json.loads((pt / "metrics.json").read_text())
    # accounting counts both workers: CPU seconds of every rank, summed
    assert m["workers"] == 2 and m["device"].startswith("2x cpu")
    per = m["device_seconds_per_worker"]
    assert len(per) == 2 and all(v > 0 for v in per)
    assert m["device_seconds"] == pytest.approx(sum(per), abs=0.01)
    # batch_size is PER WORKER: each epoch = N_SSL images / (2 workers x BATCH) optimizer steps, and
    # every step trains 2 x BATCH images
    steps_per_epoch = N_SSL // (2 * BATCH)
    assert m["train_images"] == EPOCHS * steps_per_epoch * 2 * BATCH == EPOCHS * N_SSL
    with open(pt / "history.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    assert max(int(row["step"]) for row in hist) + 1 == EPOCHS * steps_per_epoch
    # the one-off fault (both ranks, start of epoch 1) was retried and RESUMED from last.ckpt:
    # two attempts logged (one CSV log each, rank 0 only), epoch 0 trained once, both epochs in history
    assert (pt / ".fault_epoch_injected.rank0").is_file() and (pt / ".fault_epoch_injected.rank1").is_file()
    assert sorted(p.name for p in (pt / "logs").iterdir()) == ["version_0", "version_1"]
    assert sorted({int(row["epoch"]) for row in hist if row.get("val/knn_acc")}) == [0, 1]
    with open(pt / "logs" / "version_1" / "metrics.csv", newline="") as f:
        assert {int(row["epoch"]) for row in csv.DictReader(f) if row.get("epoch")} == {1}
    assert "injected one-off fault" in (pt / "error.log").read_text() and not (pt / "error.txt").exists()
    assert m["final_loss"] is not None and m["cc_diag_mean"] is not None and (pt / "backbone.pt").is_file()
    # Ray Train's own storage sits in the grid's ray/ folder, not in the run folder or ~/ray_results
    assert (out / "ray" / f"train-{PT}").is_dir()
    assert not any(p.name.startswith(("checkpoint_", "train-")) for p in pt.iterdir())

    seg = out / "trials" / SEG
    ms = json.loads((seg / "metrics.json").read_text())
    assert ms["workers"] == 2 and len(ms["device_seconds_per_worker"]) == 2 and ms["source"] == "random"
    assert 0.0 <= ms["mIoU"] <= 100.0 and len(ms["IoU"]) == 21 and (seg / "model.pt").is_file()
    # one epoch over the 8 training images: each rank trains its half (2 steps of 2), counted for both
    assert ms["train_images"] == 8
    assert [p.name for p in (seg / "logs").iterdir()] == ["version_0"]

