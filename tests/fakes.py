"""Test doubles for the grid's run functions (`experiments.engine.runner.RunFunction`), used through
tests/fake_grid.py by tests/test_grid.py and tests/test_ray_ddp.py. Production code has no switch for
them: experiments.engine.cli `main(argv, run=...)` takes the run function of every trial.

* `FakeRun(sleep)`: a fast stand-in for run_pretrain / run_segment (no torch, no Lightning, no data):
  same run folder files, metrics.json written last and atomically; appends `start` / `resume` to
  `calls.log` on every call so tests can count reruns.
* `WithFaults(run, once=, always=, at_epoch=)`: wraps a run function (fake or real) and injects
  faults by trial id (the run's `name=`):
    once      the trial raises once (flag file `.fault_injected` in its folder), then works;
    always    the trial always raises;
    at_epoch  {id: E}: a Lightning callback raises once at the start of training epoch E (after epoch
              E-1's checkpoint), on every DDP rank (flag `.fault_epoch_injected.rank<R>`); a retry then
              resumes from checkpoints/last.ckpt. Real runs only (the fake has no Lightning trainer).

Both are plain picklable objects: fake_grid.py registers this module for pickling by value, so Ray's
worker processes need not import it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from core.io import atomic_write_text
from core.stages import PRETRAIN, SEGMENT, get_stage


class FakeRun:
    """A RunFunction writing the files of a run folder in `sleep` seconds (spread over the epochs)."""

    def __init__(self, sleep: float = 0.0):
        self.sleep = float(sleep)

    def __call__(self, stage: str, config: dict, out_dir, *, progress: bool = True, wandb_group=None, name=None,
                 report: Optional[Callable[[int, dict], None]] = None, callbacks=(), ddp=None) -> dict:
        out = Path(out_dir)  # never a finished folder: run_payload returns its metrics.json before calling us
        ckpt = out / "checkpoints" / "last.ckpt"
        with open(out / "calls.log", "a") as f:
            f.write(("resume" if ckpt.exists() else "start") + "\n")
        d = dict(config)
        if get_stage(stage).depends_on_stage and str(d.get("source", "")).startswith("checkpoint:"):
            src = Path(str(d["source"])[len("checkpoint:"):])
            if not src.is_file():
                raise FileNotFoundError(f"source checkpoint {src} does not exist")
        atomic_write_text(out / "config.json", json.dumps(d, indent=2))
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
        epochs = int(d.get("epochs", 1))
        rows = ["epoch,loss"]
        for e in range(epochs):
            time.sleep(self.sleep / max(epochs, 1))
            rows.append(f"{e},{1.0 / (e + 1):.4f}")
            atomic_write_text(ckpt, json.dumps({"epoch": e}))
            if report is not None:
                report(e + 1, {"loss": 1.0 / (e + 1)})
        atomic_write_text(out / "history.csv", "\n".join(rows) + "\n")
        m = FAKE_METRICS[stage](self, d, out, epochs)
        atomic_write_text(out / "metrics.json", json.dumps(m, indent=2))
        return m


def _pretrain_metrics(run: FakeRun, d: dict, out: Path, epochs: int) -> dict:
    """backbone.pt (the artifact stage 2 consumes) and a pretraining metrics.json."""
    atomic_write_text(out / PRETRAIN.artifact, json.dumps({"arch": d["backbone"]}))
    lambd = d["lambd"] if "lambd" in d else (d.get(d["method"]) or {}).get("lambd", 0.0)  # flat or per method
    return {"stage": PRETRAIN.name, "method": d["method"], "backbone": d["backbone"], "source": d["source"],
            "lambd": lambd, "seed": d["seed"], "knn_acc": 50.0 + 100 * lambd, "knn_acc_init": 20.0,
            "final_loss": 1.0 / epochs, "epochs": epochs, "wall_time_s": run.sleep, "device": "cpu",
            "backbone_path": str(out / PRETRAIN.artifact)}


def _segment_metrics(run: FakeRun, d: dict, out: Path, epochs: int) -> dict:
    """A segmentation metrics.json (no model.pt: nothing consumes it)."""
    return {"stage": SEGMENT.name, "evaluation": d.get("evaluation"), "backbone": d["backbone"],
            "head": d["head"], "fusion": d["fusion"], "source": d["source"], "mode": d["mode"],
            "seed": d["seed"], "mIoU": 30.0, "aAcc": 80.0, "mAcc": 40.0, "IoU": [30.0] * 21,
            "wall_time_s": run.sleep, "device": "cpu"}


FAKE_METRICS = {PRETRAIN.name: _pretrain_metrics, SEGMENT.name: _segment_metrics}
"""The fake run's files of each stage, by stage name."""


class WithFaults:
    """A RunFunction calling `run` with faults injected by trial id (see the module docstring)."""

    def __init__(self, run: Callable[..., dict], once=(), always=(), at_epoch: Optional[dict] = None):
        self.run = run
        self.once, self.always = set(once), set(always)
        self.at_epoch = {str(k): int(v) for k, v in (at_epoch or {}).items()}

    def __call__(self, stage: str, config: dict, out_dir, *, name=None, callbacks=(), **kwargs) -> dict:
        out = Path(out_dir)
        if name in self.always:
            raise RuntimeError(f"injected permanent fault in {name}")
        if name in self.once:
            flag = out / ".fault_injected"
            if not flag.exists():
                flag.write_text("1")
                raise RuntimeError(f"injected one-off fault in {name}")
        cbs = list(callbacks)
        if name in self.at_epoch:
            cbs.append(epoch_fault(name, out, self.at_epoch[name]))
        return self.run(stage, config, out_dir, name=name, callbacks=cbs, **kwargs)


def epoch_fault(tid: str, out: Path, epoch: int):
    """A Lightning callback raising once (per rank) at the start of training epoch `epoch`."""
    import lightning.pytorch as pl

    class EpochFault(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            flag = Path(out) / f".fault_epoch_injected.rank{int(trainer.global_rank)}"
            if trainer.current_epoch == epoch and not flag.exists():
                flag.write_text(str(trainer.current_epoch))
                raise RuntimeError(f"injected one-off fault in {tid} at epoch {trainer.current_epoch}")

    return EpochFault()
