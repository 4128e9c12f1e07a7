"""What every run (pretrain, segment) shares: device choice, loggers, trainer, atomic files, resume.

A run folder (see ARCHITECTURE.md) holds config.json, history.csv, checkpoints/last.ckpt,
backbone.pt, figures/ and, written last and atomically, metrics.json: its presence means finished.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from core.errors import ConfigError
from core.io import METRICS_FILE, atomic_write_text, read_metrics  # noqa: F401  (re-exported for the runs)

CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"


# --------------------------------------------------------------------------- atomic files
def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


CONFIG_FILE = "config.json"


def is_finished(out_dir: Path) -> bool:
    return read_metrics(out_dir) is not None


def last_checkpoint(out_dir: Path) -> Optional[Path]:
    p = Path(out_dir) / CHECKPOINT_DIR / LAST_CKPT
    return p if p.is_file() else None


# --------------------------------------------------------------------------- device / trainer
def resolve_accelerator(device: str, devices: int) -> tuple[str, int]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; use device=auto or device=cpu")
    if device == "cuda" and devices > torch.cuda.device_count():
        raise ConfigError(f"devices={devices} but only {torch.cuda.device_count()} GPU(s) are visible")
    if device == "cpu":
        return "cpu", 1
    return "gpu", devices


def effective_precision(precision: str, accelerator: str) -> str:
    """bf16 autocast on CPU is slow and numerically pointless for tiny runs: fall back to 32 there."""
    if accelerator == "cpu" and precision != "32":
        return "32"
    return precision


def make_loggers(out_dir: Path, wandb_mode: str, group: Optional[str], name: str, config: dict) -> list:
    """CSV always; wandb offline by default (never prompts for a login), online on request."""
    from lightning.pytorch.loggers import CSVLogger

    # version=None: each attempt (first run, resume after a kill) logs to its own logs/version_N, so
    # nothing an interrupted attempt logged is overwritten; write_history merges them in order.
    loggers: list = [CSVLogger(save_dir=str(out_dir), name="logs", version=None)]
    if wandb_mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        if wandb_mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        from lightning.pytorch.loggers import WandbLogger

        # Lightning's WandbLogger attaches to `wandb.run` when one is open: a run left open in this
        # process (an earlier trial in a reused worker, a crashed caller) would receive this trial's
        # metrics under its own name and group. Close it first.
        if "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None:
            sys.modules["wandb"].finish()
        wb = WandbLogger(
            project=os.environ.get("WANDB_PROJECT", "twinseg"),
            name=name,
            group=group,
            save_dir=str(out_dir),
            mode=wandb_mode,
            config=config,
            id=_wandb_id(out_dir),
            resume="allow",
            settings=None,
        )
        # Lightning always passes `anonymous=None` to wandb.init; recent wandb (0.31 in the lock) deprecated it
        # and prints a warning for any value, on every run. We never use it: drop the key.
        init_kwargs = getattr(wb, "_wandb_init", None)
        if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous") is None:
            init_kwargs.pop("anonymous", None)
        loggers.append(wb)
    return loggers


def _wandb_id(out_dir: Path) -> str:
    """A stable run id per run folder, so a resumed trial continues its wandb run."""
    import hashlib

    return hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ExternalDDP:
    """This process is ONE rank of a data-parallel (DDP) job that a launcher outside core started
    (the grid's Ray Train workers, experiments/ray_ddp.py). core never imports the launcher: the
    launcher injects the Lightning pieces and the rank layout, `make_trainer` builds the Trainer with
    them, and the run functions let rank 0 alone write the run folder's files.

    - `accelerator`: "cpu" | "gpu", this rank's; one device per rank (`devices="auto"` for Lightning,
      the strategy's `root_device` picks it);
    - `device`: this rank's torch device (where evaluations outside `trainer.fit` run);
    - `world_size`, `global_rank`: the job's layout;
    - `strategy`, `plugins`: given to `pl.Trainer` (e.g. `RayDDPStrategy()`, `(RayLightningEnvironment(),)`);
    - `prepare`: called with the constructed `pl.Trainer`, returns the Trainer to use (e.g.
      `ray.train.lightning.prepare_trainer`); None: used as built.
    Batch semantics: `batch_size` is per rank (the global batch is `world_size x batch_size`).
    """

    accelerator: str
    device: Any
    world_size: int
    global_rank: int
    strategy: Any
    plugins: tuple = ()
    prepare: Optional[Callable[[Any], Any]] = None

    @property
    def is_rank_zero(self) -> bool:
        return int(self.global_rank) == 0


def make_trainer(
    *,
    out_dir: Path,
    max_epochs: int,
    device: str,
    devices: int,
    precision: str,
    loggers: list,
    callbacks: Iterable = (),
    progress: bool = True,
    val_every: int = 1,
    max_steps: int = -1,
    val_every_steps: Optional[int] = None,
    ddp: Optional[ExternalDDP] = None,
):
    """The run's Lightning Trainer. `ddp` (None: this process alone, `device`/`devices` decide) makes
    it one rank of an externally launched DDP job (see `ExternalDDP`). `max_steps` > 0 (with
    max_epochs=-1) trains by iterations; `val_every_steps` then validates every that many steps instead
    of every `val_every` epochs (Lightning would otherwise stop mid-epoch without a last validation)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    if ddp is None:
        accelerator, n = resolve_accelerator(device, devices)
    else:
        accelerator, n = ddp.accelerator, 1
    if accelerator == "gpu":  # TF32 matmuls for fp32 parts (e.g. the D x D cross-correlation), tuned convs
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    # monitor=None + save_top_k=1 keeps exactly one checkpoint, the latest, named last.ckpt
    # (save_last with save_top_k=0 writes nothing in Lightning 2.6).
    ckpt = ModelCheckpoint(
        dirpath=str(Path(out_dir) / CHECKPOINT_DIR),
        filename=Path(LAST_CKPT).stem,
        monitor=None,
        save_top_k=1,
        every_n_epochs=1,
        enable_version_counter=False,
    )
    cbs = [ckpt]
    if progress:
        cbs.append(RichProgressBar(leave=True))
    else:  # quiet runs (CLI --no-progress, grid trials): no Lightning INFO lines on stderr, so that an
        # error mid-run stays the one `twinseg: error:` line there
        import logging

        for lg in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(lg).setLevel(logging.WARNING)
    cbs.extend(callbacks)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*is deprecated.*")
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(out_dir),
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=n,
        strategy="ddp" if n > 1 else "auto",
        precision=effective_precision(precision, accelerator),
        logger=loggers,
        callbacks=cbs,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=val_every,
        max_steps=max_steps,
    )
    if val_every_steps is not None:
        kwargs.update(check_val_every_n_epoch=None, val_check_interval=int(val_every_steps))
    if ddp is None:
        return pl.Trainer(**kwargs)
    kwargs.update(devices="auto", strategy=ddp.strategy, plugins=list(ddp.plugins))
    trainer = pl.Trainer(**kwargs)
    return ddp.prepare(trainer) if ddp.prepare is not None else trainer


# --------------------------------------------------------------------------- history
def _attempt_logs(out_dir: Path) -> list[Path]:
    def number(p: Path) -> int:
        try:
            return int(p.parent.name.split("_", 1)[1])
        except (IndexError, ValueError):
            return -1

    return sorted((Path(out_dir) / "logs").glob("version_*/metrics.csv"), key=number)


def write_history(out_dir: Path) -> Path:
    """Flatten Lightning's CSVLogger files (one per attempt, one row per logging call) into one row
    per (epoch, step). A later attempt's values win for an epoch logged twice (a resume re-runs the
    epoch that was interrupted).
    """
    out_dir = Path(out_dir)
    dst = out_dir / "history.csv"
    rows: list[dict] = []
    for src in _attempt_logs(out_dir):
        with open(src, newline="") as f:
            rows.extend(csv.DictReader(f))
    if not rows:
        atomic_write_text(dst, "")
        return dst
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("epoch", ""), r.get("step", ""))
        m = merged.setdefault(key, {})
        m.update({k: v for k, v in r.items() if v not in ("", None)})
    cols: list[str] = []
    for m in merged.values():
        cols.extend(c for c in m if c not in cols)
    lead = [c for c in ("epoch", "step") if c in cols]
    cols = lead + sorted(c for c in cols if c not in lead)
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for m in merged.values():
        w.writerow(m)
    atomic_write_text(dst, buf.getvalue())
    return dst


def finish_wandb(loggers: list) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                if wandb.run is not None:
                    wandb.finish()
            except Exception as e:  # noqa: BLE001 - logging must never fail a finished run, but say so
                warnings.warn(f"wandb: closing the run failed ({type(e).__name__}: {e}); the local CSV logs "
                              "are complete", RuntimeWarning, stacklevel=2)
