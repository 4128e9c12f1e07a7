"""What every run (pretrain, segment) shares: device choice, loggers, trainer, atomic files, resume.

A run folder (see ARCHITECTURE.md) holds config.json, history.csv, checkpoints/last.ckpt,
backbone.pt, figures/ and, written last and atomically, metrics.json: its presence means finished.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from lightning.pytorch.callbacks import Callback

from core.config import check_wandb  # noqa: F401  (re-exported for the runs)
from core.errors import ConfigError
from core.io import (  # noqa: F401  (re-exported for the runs)
    METRICS_FILE,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json as _write_json,
    atomic_write_text,
    read_metrics,
)

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
    """`core.io.atomic_write_json` of `obj` with tensors as lists and non-finite floats as null."""
    _write_json(path, _jsonable(obj))


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
    """CSV always; wandb offline by default (never prompts for a login), online on request. Online, `wandb.init`
    waits at most $TWINSEG_WANDB_INIT_TIMEOUT seconds (core.config.check_wandb) for the server, and a server
    that cannot be reached or refuses the key is one ConfigError line saying how to go offline."""
    from lightning.pytorch.loggers import CSVLogger

    # version=None: each attempt (first run, resume after a kill) logs to its own logs/version_N, so
    # nothing an interrupted attempt logged is overwritten; write_history merges them in order.
    loggers: list = [CSVLogger(save_dir=str(out_dir), name="logs", version=None)]
    if wandb_mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        if wandb_mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        timeout = check_wandb(wandb_mode)

        # Lightning's WandbLogger attaches to `wandb.run` when one is open: a run left open in this
        # process (an earlier trial in a reused worker, a crashed caller) would receive this trial's
        # metrics under its own name and group. Close it first.
        if "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None:
            sys.modules["wandb"].finish()
        wb = _wandb_logger(out_dir, timeout)(
            project=os.environ.get("WANDB_PROJECT", "twinseg"),
            name=name,
            group=group,
            save_dir=str(out_dir),
            mode=wandb_mode,
            config=config,
            id=_wandb_id(out_dir),
            resume="allow",
            settings=None if timeout is None else {"init_timeout": timeout},
        )
        # Lightning always passes `anonymous=None` to wandb.init; recent wandb (0.31 in the lock) deprecated it
        # and prints a warning for any value, on every run. We never use it: drop the key.
        init_kwargs = getattr(wb, "_wandb_init", None)
        if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous") is None:
            init_kwargs.pop("anonymous", None)
        loggers.append(wb)
    return loggers


def _wandb_logger(out_dir: Path, timeout: Optional[float]):
    """Lightning's WandbLogger; online (`timeout` not None), one whose run (`experiment`, made by `wandb.init` on
    first use, on rank 0 only) turns wandb's errors into one ConfigError line: the server unreachable within
    `timeout` s (CommError), the key refused (AuthenticationError), a bad argument or state (UsageError)."""
    from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

    if timeout is None:
        return LightningWandbLogger

    class WandbLogger(LightningWandbLogger):
        @property
        def experiment(self):
            import wandb

            try:
                return super().experiment
            except wandb.errors.Error as e:
                raise ConfigError(wandb_failure(e, out_dir, timeout)) from None

    return WandbLogger


def wandb_failure(e: Exception, out_dir: Path, timeout: Optional[float]) -> str:
    """The one line of a failed `wandb.init` online: what wandb said (its first line) and how to go offline."""
    import wandb

    said = (str(e).strip().splitlines() or [type(e).__name__])[0]
    offline = f"or use --wandb offline and `wandb sync {Path(out_dir) / 'wandb'}/offline-run-*` later"
    if isinstance(e, wandb.errors.AuthenticationError):
        return (f"wandb=online: the wandb server refused the API key ({said}); check WANDB_API_KEY or run "
                f"`wandb login`, {offline}")
    if isinstance(e, wandb.errors.CommError):
        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        wait = f" within {timeout:g} s" if timeout is not None else ""
        return (f"wandb=online: the wandb server {server} did not start the run{wait} ({said}); check the network "
                f"and the API key (TWINSEG_WANDB_INIT_TIMEOUT=SECONDS waits longer), {offline}")
    return f"wandb=online: wandb.init failed ({type(e).__name__}: {said}); {offline}"


def _wandb_id(out_dir: Path) -> str:
    """A stable run id per run folder, so a resumed trial continues its wandb run."""
    import hashlib

    return hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ExternalDDP:
    """This process is ONE rank of a data-parallel (DDP) job that a launcher outside core started
    (the grid's Ray Train workers, experiments/engine/ray_ddp.py). core never imports the launcher: the
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
    # checkpoints are written atomically in the run folder itself (make_checkpoint_io), unless the
    # launcher brings its own CheckpointIO
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

    if ddp is None:
        return pl.Trainer(**kwargs, plugins=[make_checkpoint_io()])
    plugins = list(ddp.plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(make_checkpoint_io())
    kwargs.update(devices="auto", strategy=ddp.strategy, plugins=plugins)
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


# --------------------------------------------------------------------------- reliability
def lr_hint(cfg) -> str:
    """The 'likely cause' part of a non-finite message: the value that is likely too high. The weight decay when
    it is above 1 (a decoupled decay step lr x wd near or above 1 flips or blows up the weights; the recipes use
    1e-6 .. 0.4), else the configured learning rate."""
    wd, lr = getattr(cfg, "weight_decay", None), getattr(cfg, "lr", None)
    if isinstance(wd, (int, float)) and wd > 1:
        return f"the weight decay (weight_decay={wd:g}) is likely too high; lower --weight-decay"
    return (f"the learning rate (lr={lr:g}) is likely too high; lower --lr" if isinstance(lr, (int, float))
            else "the learning rate is likely too high; lower --lr")


class NonFiniteLossCallback(Callback):
    """Stops training with `core.errors.NonFiniteError` (one line: step, value, likely cause) as soon as
    the training loss is NaN / inf. The check is cheap: on the CPU every step; on a GPU a device-side
    flag is OR-ed every step (no host sync) and read every `every` steps and at each epoch end, so a
    diverged run stops within `every` steps. It runs before ModelCheckpoint's epoch-end save (Lightning
    calls monitoring callbacks last), so no checkpoint of diverged weights is written at that epoch."""

    def __init__(self, hint: str = "", every: int = 50):
        super().__init__()
        self.hint, self.every = hint, int(every)
        self._bad = None  # device flag: a non-finite loss was seen since the last check
        self._first = None  # (step, value) of the first bad one, recorded on the device

    @staticmethod
    def _loss(outputs):
        if isinstance(outputs, dict):
            outputs = outputs.get("loss")
        return outputs.detach() if isinstance(outputs, torch.Tensor) else None

    def _raise(self, trainer, value: float, step: int) -> None:
        from core.errors import NonFiniteError

        raise NonFiniteError(f"training diverged: the loss is {value} at step {step} (epoch {trainer.current_epoch}); "
                             f"{self.hint or 'the learning rate is likely too high'}; no result was written")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = self._loss(outputs)
        if loss is None:
            return
        step = int(trainer.global_step)
        if loss.device.type == "cpu":  # no sync cost: check every step
            v = float(loss.float().mean()) if loss.numel() != 1 else float(loss)
            if not math.isfinite(v):
                self._raise(trainer, v, step)
            return
        bad = ~torch.isfinite(loss).all()
        if self._bad is None:
            self._bad = bad.clone()
            self._first = torch.where(bad, loss.float().reshape(-1)[0], torch.zeros((), device=loss.device))
            self._first_step = torch.full((), step, device=loss.device)
        else:
            first_new = bad & ~self._bad
            self._first = torch.where(first_new, loss.float().reshape(-1)[0], self._first)
            self._first_step = torch.where(first_new, torch.full_like(self._first_step, step), self._first_step)
            self._bad |= bad
        if self.every > 0 and (batch_idx + 1) % self.every == 0:
            self._check(trainer)

    def _check(self, trainer) -> None:
        if self._bad is not None and bool(self._bad):
            self._raise(trainer, float(self._first), int(self._first_step))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)


def check_finite_metrics(metrics: dict, hint: str = "") -> None:
    """The run's scalar results (top-level float values) must be finite: a NaN / inf accuracy, loss or
    statistic means the training (or the evaluation on its features) diverged -> NonFiniteError. Lists
    (per-class IoU, NaN for a class absent from val) are not checked."""
    from core.errors import NonFiniteError

    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise NonFiniteError(f"the run's results are not finite ({', '.join(f'{k}={metrics[k]}' for k in bad)}); "
                             f"{hint or 'the learning rate is likely too high'}; no result was written")


# ----- RNG states: saved in every checkpoint, restored at resume (a killed-and-resumed run = uninterrupted)
RNG_KEY = "twinseg_rng"


def loader_generators(*loaders) -> list:
    """The distinct torch.Generators of `loaders` (DataLoaders, or lists / tuples / dicts of them), in
    order: shuffle order and worker base seeds come from them (core.data.module gives each DataLoader its
    own seeded generator, so they are not part of torch's global state)."""
    out: list = []

    def walk(x) -> None:
        if isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        else:
            g = getattr(x, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not h for h in out):
                out.append(g)

    walk(list(loaders))
    return out


def collect_rng_states(generators: Iterable = ()) -> dict:
    """torch (CPU and every CUDA device), numpy, python `random` and the DataLoader generators, as
    plain tensors / numbers (a checkpoint stays loadable with weights_only=True)."""
    import random

    import numpy as np

    py = random.getstate()
    npst = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64),
                   "gauss": py[2]},
        "numpy": {"keys": torch.from_numpy(npst[1].astype(np.int64)), "pos": int(npst[2]),
                  "has_gauss": int(npst[3]), "gauss": float(npst[4])},
        "loaders": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_states(state: dict, generators: Iterable = ()) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    gens, saved = list(generators), list(state.get("loaders", []))
    if len(gens) == len(saved):
        for g, st in zip(gens, saved):
            g.set_state(st)
    else:
        warnings.warn(f"resume: {len(saved)} saved DataLoader generator states for {len(gens)} loaders; the data "
                      "order after the resume differs from an uninterrupted run", RuntimeWarning, stacklevel=2)


class RngStateCallback(Callback):
    """Saves the RNG states (torch CPU / CUDA, numpy, python, and the DataLoaders' own generators, given
    as `generators`: `loader_generators(...)` of the loaders passed to fit) into every checkpoint and
    restores them at resume, in `on_load_checkpoint`: Lightning calls it before anything of the resumed
    fit draws a random number (a resumed fit makes its first DataLoader iterator, and prefetches the first
    batch, in `FitLoop.setup_data`, before `on_train_start`). The epoch-end checkpoint is the last thing
    of its epoch (ModelCheckpoint runs after every other epoch-end hook), so the saved states are those the
    next epoch starts from. Lightning itself does not checkpoint these RNGs (lightning.pytorch 2.6
    `_CheckpointConnector.dump_checkpoint`).
    Exact equality with an uninterrupted run holds for epoch-end checkpoints with `data.num_workers=0`;
    with workers, the (persistent) worker processes' own RNG states are not checkpointable, so their
    augmentations differ after a resume."""

    def __init__(self, generators: Iterable = ()):
        super().__init__()
        self.generators = list(generators)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[RNG_KEY] = collect_rng_states(self.generators)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        state = checkpoint.get(RNG_KEY)
        if state is not None:
            restore_rng_states(state, self.generators)


# ----- crash-safe checkpoints
def make_checkpoint_io():
    """Lightning CheckpointIO that writes checkpoints with `core.io.atomic_write_bytes` in the run folder itself
    (temp file, fsync, rename, folder fsync; a full disk is one StorageError line, the old checkpoint kept).
    Lightning's TorchCheckpointIO goes through fsspec's transaction, whose temp file lives in $TMPDIR
    (fsspec LocalFileOpener: tempfile.mkstemp(), then shutil.move): across filesystems that move is a
    copy, so a kill or a full disk during it leaves a truncated last.ckpt."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO takes no storage_options")
            atomic_torch_save(checkpoint, Path(path), what="the checkpoint")

    return AtomicCheckpointIO()


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` (a torch zip checkpoint) is unreadable (truncated, bad CRC), or None when it is intact.
    Reads the zip's central directory and checks every member's CRC; does not unpickle anything."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as e:
        return f"{type(e).__name__}: {str(e)[:80]}"
    return None if bad is None else f"member {bad} is corrupt (CRC mismatch)"


def usable_checkpoint(out_dir: Path) -> Optional[Path]:
    """checkpoints/last.ckpt when it is intact; an unreadable one (from a kill during a non-atomic write,
    a copy cut short, a bad disk) is set aside as last.ckpt.corrupt-<time> with a warning naming it, and
    the run restarts from scratch (None): there is no older checkpoint to go back to, since each save
    replaces the previous one atomically."""
    import time

    p = last_checkpoint(out_dir)
    if p is None:
        return None
    why = checkpoint_problem(p)
    if why is None:
        return p
    aside = p.with_name(f"{p.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(p, aside)
    warnings.warn(f"{p} is unreadable ({why}); set aside as {aside.name}, the run restarts from scratch",
                  RuntimeWarning, stacklevel=2)
    return None
