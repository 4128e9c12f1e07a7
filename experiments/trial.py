"""The Ray Tune trainable of the grid: one trial = one `run_pretrain` / `run_segment` run folder.

`grid_trial(config)` receives `config = {"trial": payload}` where the payload (built by
experiments/grid.py) holds the trial id, stage, the validated config dict, the trial folder, the
wandb mode and group, and the driver's working directory. The run folder is
`<results>/trials/<id>/`, NOT Ray's trial folder, so that:
  * a finished trial (metrics.json present) is never rerun, even by a retry or a new driver;
  * a retry after a failure (Ray Tune `max_failures`) or a `--resume` after a kill calls the same
    run function on the same folder, which resumes from `checkpoints/last.ckpt`.
On failure the trainable writes `error.txt` (one line: `<Type>: <message>`) in the trial folder and
re-raises, so Ray records the error and the grid can report why dependants were skipped.

Per-epoch metrics are forwarded to Tune (`tune.report`) by a Lightning callback, so the Ray
dashboard / Tune state show progress; the final metrics are reported once at the end.

A trial whose config says `devices: N` (N > 1) runs as a Ray Train job with N workers (Lightning
DDP, experiments/ray_ddp.py): this trainable is then only its driver. Same folder, same contract.

Test hooks (environment variables, used only by tests/test_grid.py and tests/test_ray_ddp.py; never
set by the grid):
  TWINSEG_FAKE_RUNS=1            use `fake_run` (a fast stand-in writing the same files) instead of
                                 the real run functions;
  TWINSEG_FAKE_SLEEP=SECONDS     fake runs take this long;
  TWINSEG_FAULT_ONCE=ID[,ID]     the trial raises once (a flag file marks that it did), then works;
  TWINSEG_FAULT_ALWAYS=ID[,ID]   the trial always raises;
  TWINSEG_FAULT_EPOCH_ONCE=ID:E[,ID:E]  the run raises once at the start of training epoch E (after
                                 epoch E-1's checkpoint; on every DDP rank), then works: a retry
                                 resumes from checkpoints/last.ckpt.
With TWINSEG_FAKE_RUNS=1 a trial with devices > 1 runs the fake run in the trial's process.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ERROR_FILE = "error.txt"
TRIAL_FILE = "trial.json"


# ----------------------------------------------------------------------------- helpers
from core.io import atomic_write_text as _atomic_write  # noqa: E402


def read_metrics(trial_dir: Path) -> Optional[dict]:
    """metrics.json of a finished run folder, or None (absent / unreadable / not a mapping)."""
    p = Path(trial_dir) / "metrics.json"
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def read_error(trial_dir: Path) -> Optional[str]:
    try:
        line = (Path(trial_dir) / ERROR_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return " ".join(line.split()) or None


def one_line_error(e: BaseException, limit: int = 400) -> str:
    msg = " ".join(str(e).split())
    line = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def scalar_metrics(m: dict) -> dict:
    """Finite numeric metrics only (what Tune can show as columns)."""
    out = {}
    for k, v in (m or {}).items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[str(k)] = v
    return out


def _ids(var: str) -> set[str]:
    return {s.strip() for s in os.environ.get(var, "").split(",") if s.strip()}


def _inject_faults(tid: str, out: Path) -> None:
    if tid in _ids("TWINSEG_FAULT_ALWAYS"):
        raise RuntimeError(f"injected permanent fault in {tid} (TWINSEG_FAULT_ALWAYS)")
    if tid in _ids("TWINSEG_FAULT_ONCE"):
        flag = out / ".fault_injected"
        if not flag.exists():
            flag.write_text("1")
            raise RuntimeError(f"injected one-off fault in {tid} (TWINSEG_FAULT_ONCE)")


# ----------------------------------------------------------------------------- run functions
def fake_run(stage: str) -> Callable[..., dict]:
    """A fast stand-in for run_pretrain / run_segment (tests only): same files, same contract.

    Appends one line per call to `calls.log` (`start` / `resume`), so tests can count reruns."""

    def run(cfg, out_dir, *, progress=True, wandb_group=None, callbacks=()):
        out = Path(out_dir)
        if read_metrics(out) is not None:
            return read_metrics(out)
        ckpt = out / "checkpoints" / "last.ckpt"
        with open(out / "calls.log", "a") as f:
            f.write(("resume" if ckpt.exists() else "start") + "\n")
        d = cfg.to_dict()
        if stage == "segment" and str(cfg.source).startswith("checkpoint:"):
            src = Path(str(cfg.source)[len("checkpoint:"):])
            if not src.is_file():
                raise FileNotFoundError(f"source checkpoint {src} does not exist")
        _atomic_write(out / "config.json", json.dumps(d, indent=2))
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
        delay = float(os.environ.get("TWINSEG_FAKE_SLEEP", "0") or 0)
        epochs = int(d.get("epochs", 1))
        rows = ["epoch,loss"]
        for e in range(epochs):
            time.sleep(delay / max(epochs, 1))
            rows.append(f"{e},{1.0 / (e + 1):.4f}")
            _atomic_write(ckpt, json.dumps({"epoch": e}))
            for cb in callbacks or ():
                hook = getattr(cb, "report_epoch", None)
                if hook:
                    hook(e + 1, {"loss": 1.0 / (e + 1)})
        _atomic_write(out / "history.csv", "\n".join(rows) + "\n")
        if stage == "pretrain":
            _atomic_write(out / "backbone.pt", json.dumps({"arch": d["backbone"]}))
            m = {"stage": "pretrain", "method": d["method"], "backbone": d["backbone"], "source": d["source"],
                 "lambd": d["lambd"], "seed": d["seed"], "knn_acc": 50.0 + 100 * d["lambd"], "knn_acc_init": 20.0,
                 "final_loss": 1.0 / epochs, "epochs": epochs, "wall_time_s": delay, "device": "cpu",
                 "backbone_path": str(out / "backbone.pt")}
        else:
            m = {"stage": "segment", "evaluation": d.get("evaluation"), "backbone": d["backbone"],
                 "head": d["head"], "fusion": d["fusion"], "source": d["source"], "mode": d["mode"],
                 "seed": d["seed"], "mIoU": 30.0, "aAcc": 80.0, "mAcc": 40.0, "IoU": [30.0] * 21,
                 "wall_time_s": delay, "device": "cpu"}
        _atomic_write(out / "metrics.json", json.dumps(m, indent=2))
        return m

    return run


def fault_callbacks(tid: str, out: Path, rank: int = 0) -> list:
    """Test hook TWINSEG_FAULT_EPOCH_ONCE (see the module docstring): [] unless it names `tid`."""
    epochs = []
    for item in _ids("TWINSEG_FAULT_EPOCH_ONCE"):
        t, _, e = item.rpartition(":")
        if t == tid and e.isdigit():
            epochs.append(int(e))
    if not epochs or os.environ.get("TWINSEG_FAKE_RUNS") == "1":
        return []
    import lightning.pytorch as pl

    flag = Path(out) / f".fault_epoch_injected.rank{int(rank)}"

    class EpochFault(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch in epochs and not flag.exists():
                flag.write_text(str(trainer.current_epoch))
                raise RuntimeError(f"injected one-off fault in {tid} at epoch {trainer.current_epoch} "
                                   "(TWINSEG_FAULT_EPOCH_ONCE)")

    return [EpochFault()]


def get_run_function(stage: str) -> Callable[..., dict]:
    if os.environ.get("TWINSEG_FAKE_RUNS") == "1":
        return fake_run(stage)
    if stage == "pretrain":
        from core.runs.pretrain import run_pretrain

        return run_pretrain
    from core.runs.segment import run_segment

    return run_segment


class _FakeConfig:
    """Config stand-in for fake runs (tests): the grid validated the dict already; this skips
    importing torch/timm in every trial process."""

    def __init__(self, d: dict):
        self._d = dict(d)

    def __getattr__(self, k: str):
        try:
            return self._d[k]
        except KeyError:
            raise AttributeError(k) from None

    def to_dict(self) -> dict:
        return dict(self._d)


def build_config(stage: str, d: dict):
    if os.environ.get("TWINSEG_FAKE_RUNS") == "1":
        return _FakeConfig(d)
    from core.config import PretrainConfig, SegmentConfig

    return (PretrainConfig if stage == "pretrain" else SegmentConfig).from_dict(d)


# ----------------------------------------------------------------------------- Tune reporting
class _EpochReporter:
    """Forwards per-epoch scalar metrics to Tune; never breaks a run."""

    def __init__(self, tid: str):
        self.tid = tid

    def report_epoch(self, epoch: int, metrics: dict) -> None:
        try:
            from ray import tune

            tune.report({"trial": self.tid, "epoch": int(epoch), "done_run": 0, **scalar_metrics(metrics)})
        except Exception:  # e.g. outside a Tune session
            pass


def _make_report_callback(tid: str):
    """A Lightning callback reporting each training epoch to Tune (a plain reporter for fake runs)."""
    if os.environ.get("TWINSEG_FAKE_RUNS") == "1":
        return _EpochReporter(tid)
    import lightning.pytorch as pl

    class TuneEpochReport(pl.Callback, _EpochReporter):
        def __init__(self) -> None:
            pl.Callback.__init__(self)
            _EpochReporter.__init__(self, tid)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if getattr(trainer, "global_rank", 0) != 0 or getattr(trainer, "sanity_checking", False):
                return
            self.report_epoch(trainer.current_epoch + 1, epoch_scalars(trainer))

    return TuneEpochReport()


def epoch_scalars(trainer) -> dict:
    """The Trainer's finite scalar callback metrics, '/' replaced by '_' (Tune column names)."""
    vals = {}
    for k, v in dict(trainer.callback_metrics).items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            vals[str(k).replace("/", "_")] = f
    return vals


# ----------------------------------------------------------------------------- the trainable
def setup_trial_env(payload: dict, out: Path) -> None:
    """Process settings of a trial (its own process, or each DDP worker): wandb one run per trial,
    grouped by the grid run, never prompting (offline needs no key); the driver's working folder
    (relative caches data/, weights/ as for a single run)."""
    mode = payload.get("wandb", "offline")
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("WANDB_DIR", str(out))
    os.environ.setdefault("WANDB_CONSOLE", "off")
    if payload.get("cwd"):
        try:
            os.chdir(payload["cwd"])
        except OSError:
            pass


def run_payload(payload: dict, report_epochs: bool = True) -> dict:
    """Run one trial described by `payload` (plain Python; Tune-independent for tests).

    devices > 1: the run is a Ray Train job (experiments/ray_ddp.py; needs the grid's Ray)."""
    tid = payload["id"]
    stage = payload["stage"]
    out = Path(payload["dir"])
    out.mkdir(parents=True, exist_ok=True)
    done = read_metrics(out)
    if done is not None:  # finished earlier (another attempt or an earlier driver): never rerun
        return done
    _atomic_write(out / TRIAL_FILE, json.dumps(
        {k: payload[k] for k in ("id", "stage", "depends_on", "config", "resources") if k in payload}, indent=2))
    setup_trial_env(payload, out)
    try:
        (out / ERROR_FILE).unlink(missing_ok=True)
        _inject_faults(tid, out)
        cfg = build_config(stage, payload["config"])
        from experiments import ray_ddp

        if ray_ddp.workers(payload) > 1 and os.environ.get("TWINSEG_FAKE_RUNS") != "1":
            metrics = ray_ddp.run_ddp(payload) or {}
        else:
            run = get_run_function(stage)
            cbs = [_make_report_callback(tid)] if report_epochs else []
            cbs += fault_callbacks(tid, out)
            kwargs: dict[str, Any] = {"progress": False, "wandb_group": payload.get("group"), "callbacks": cbs}
            try:
                if "name" in inspect.signature(run).parameters:
                    kwargs["name"] = tid
            except (TypeError, ValueError):
                pass
            metrics = run(cfg, out, **kwargs)
        if read_metrics(out) is None:
            raise RuntimeError(f"the {stage} run returned without writing {out / 'metrics.json'}")
        metrics = read_metrics(out) or metrics
    except BaseException as e:
        try:
            _atomic_write(out / ERROR_FILE, one_line_error(e) + "\n")
            with open(out / "error.log", "a", encoding="utf-8") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}\n")
        except OSError:
            pass
        raise
    return metrics


def grid_trial(config: dict) -> None:
    """Ray Tune function trainable (wrapped by tune.with_resources in experiments/grid.py)."""
    from ray import tune

    payload = config["trial"]
    metrics = run_payload(payload)
    tune.report({"trial": payload["id"], "done_run": 1, **scalar_metrics(metrics)})
