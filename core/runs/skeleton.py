"""The one run skeleton shared by pretraining and segmentation: validate, build, resume, fit,
evaluate, write.

`execute(stage_run, out_dir, ...)` drives a `StageRun` (core/runs/pretrain.py `PretrainRun`,
core/runs/segment.py `SegmentRun`) through the same steps, so the rules of a run folder live here:

0. `--output` must be a writable folder (StorageError, one line); SIGTERM / SIGINT from here on end the
   call with `InterruptedRun` (exit 143 / 130, one line saying how to continue), nothing half-written;
1. finished (`read_metrics`: metrics.json readable) with the same config -> its metrics, nothing
   trained; with another config (bookkeeping fields such as wandb / keep_checkpoints ignored) ->
   ConfigError naming the fields, unless `overwrite` (the run's own files are deleted,
   `clear_run_folder`; other files in the folder stay);
2. an unfinished folder holding another config is refused the same way (mixing two runs);
3. `build()`: data, model and weights are built and checked (one-line TwinsegError) BEFORE any
   file is written;
4. the folder is locked (`core.folder_lock`: one writer; a second one gets FolderBusyError) and
   checked again; config.json, `before_fit()` (e.g. the "before" evaluation), loggers (CSV + wandb),
   the Trainer (checkpoints written atomically in the folder itself, `make_checkpoint_io`; RNG states
   saved in them and restored at resume; a NaN / inf training loss stops the fit with NonFiniteError);
5. `trainer.fit`, resuming from checkpoints/last.ckpt when present (an unreadable one is set aside
   with a warning and the run restarts from scratch); non-finite weights after the fit -> NonFiniteError;
6. `on_every_rank_after_fit()` (collective calls allowed); then rank 0 only: `after_fit()` evaluates and
   writes the stage's artifact (backbone.pt / model.pt), non-finite results -> NonFiniteError,
   history.csv, then LAST and atomically metrics.json, checked against core/runs/metrics_schema.py;
   then checkpoints/last.ckpt is deleted unless `keep_checkpoints` (a finished run keeps its weights,
   metrics, history, figures and config);
7. on any failure the artifact is removed (checkpoints stay for resume): nothing that could pass
   for a result survives. A full disk / read-only folder found while writing is one StorageError line.

`ddp` (`core.runs.common.ExternalDDP`) makes this call one rank of an externally launched DDP job:
every rank builds and fits, only global rank 0 writes files, the other ranks return {}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from core.errors import ConfigError, InterruptedRun, NonFiniteError, StorageError
from core.folder_lock import folder_lock, is_locked
from core.rng import preserved_rng
from core.runs import metrics_schema
from core.runs.common import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAST_CKPT,
    METRICS_FILE,
    ExternalDDP,
    NonFiniteLossCallback,
    RngStateCallback,
    _jsonable,
    atomic_write_json,
    check_finite_metrics,
    check_wandb,
    finish_wandb,
    last_checkpoint,
    loader_generators,
    lr_hint,
    make_loggers,
    make_trainer,
    read_metrics,
    resolve_accelerator,
    usable_checkpoint,
    write_history,
)


class StageRun:
    """One stage's part of a run. Subclasses set `stage`, `artifact`, `summary_keys` and implement
    the hooks; `self.cfg` is the validated config, `self.ddp` the DDP hook (None: one process)."""

    stage: str = ""
    artifact: str = ""  # the file a finished run exports (removed if the run fails)
    summary_keys: tuple[str, ...] = ()  # metrics copied to the wandb run summary as final/<key>

    def __init__(self, cfg, ddp: Optional[ExternalDDP] = None):
        self.cfg = cfg
        self.ddp = ddp

    def resolve_device(self) -> None:
        """`self.accelerator` ("cpu" | "gpu") and `self.device` (where evaluations outside fit run)."""
        if self.ddp is None:  # device=cuda without a GPU: ConfigError before anything is written
            self.accelerator, _ = resolve_accelerator(self.cfg.device, self.cfg.devices)
            self.device = torch.device("cuda" if self.accelerator == "gpu" else "cpu")
        else:  # one device per rank, chosen by the launcher
            self.accelerator, self.device = self.ddp.accelerator, torch.device(self.ddp.device)

    @property
    def is_writer(self) -> bool:
        return self.ddp is None or self.ddp.is_rank_zero

    # ------------------------------------------------------------------ hooks
    def build(self) -> None:
        """Build and check data, model and weights; raise one-line errors; write nothing."""
        raise NotImplementedError

    def before_fit(self) -> None:
        """After config.json is written, before training (e.g. evaluate the initial backbone)."""

    def module(self):
        """The LightningModule to fit."""
        raise NotImplementedError

    def fit_kwargs(self, trainer) -> dict:
        """Dataloaders for `trainer.fit`."""
        raise NotImplementedError

    def callbacks(self, out_dir: Path) -> list:
        """The stage's diagnostic callbacks."""
        return []

    def trainer_limits(self) -> dict:
        """How long to train: `make_trainer`'s max_epochs / max_steps / val_every_steps."""
        return {"max_epochs": self.cfg.epochs}

    def on_every_rank_after_fit(self, trainer) -> None:
        """Every rank, after training (collective calls allowed, e.g. a last validation pass)."""

    def after_fit(self, trainer, out_dir: Path) -> dict:
        """Rank 0 alone (no collective call), after training: evaluate, write the artifact; return the stage's metrics."""
        raise NotImplementedError

    def extra_metric_keys(self) -> Iterable[str]:
        """Keys beyond the stage's schema this run may write (an SSL method's `result_keys`)."""
        return ()

    def flops_per_image(self) -> Optional[int]:
        """FLOPs of forward + backward of one training image (all its views) through `module()`, on 2
        real samples of `self.loaders.train` at the run's input sizes, on `self.device`
        (core/flops.py; the run is left unchanged); None without a train loader or when not countable."""
        loaders = getattr(self, "loaders", None)
        if loaders is None or getattr(loaders, "train", None) is None:
            return None
        from core.flops import run_flops_per_image

        return run_flops_per_image(self.module(), loaders.train, device=getattr(self, "device", None))

    def default_name(self, out_dir: Path) -> str:
        return out_dir.name


#: the files and folders a run writes into its folder: what --overwrite removes (nothing else is touched)
RUN_FOLDER_ENTRIES = ("metrics.json", "config.json", "history.csv", "backbone.pt", "model.pt", "checkpoints",
                      "logs", "figures", "wandb", "accounting.json")


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _bookkeeping(cfg) -> set[str]:
    """Dotted names of the fields marked `metadata={"bookkeeping": True}` in core/config.py (they do not
    change the result: wandb, keep_checkpoints): ignored when a folder's config is compared."""
    out: set[str] = set()

    def walk(obj, prefix: str) -> None:
        if not dataclasses.is_dataclass(obj):
            return
        for f in dataclasses.fields(obj):
            if f.metadata.get("bookkeeping"):
                out.add(prefix + f.name)
            walk(getattr(obj, f.name), f"{prefix}{f.name}.")

    walk(cfg, "")
    return out


def config_differences(out_dir: Path, cfg) -> Optional[list[str]]:
    """The dotted config fields in which `out_dir/config.json` differs from `cfg` (bookkeeping fields
    ignored); None when the folder holds no readable config.json (nothing to compare). A field the folder's
    config.json lacks (added to the config class since it was written) reads as that field's default, so a
    run made before a new option existed still matches a config that leaves the option at its default."""
    try:
        old = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict):
        return None
    a, b, skip = _flat(old), _flat(cfg.to_dict()), _bookkeeping(cfg)
    try:
        defaults = _flat(type(cfg)().to_dict())
    except Exception:  # noqa: BLE001 - a config class without a default instance: compare as written
        defaults = {}
    a = {**{k: v for k, v in defaults.items() if k not in a}, **a}
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def _fields(diff: list[str], n: int = 8) -> str:
    return ", ".join(diff[:n]) + (f" and {len(diff) - n} more" if len(diff) > n else "")


def check_same_config(out_dir: Path, cfg) -> None:
    """An existing run folder that holds another configuration is refused (a finished one would return
    the wrong result, an unfinished one would mix two runs' checkpoints and history); --overwrite opts in."""
    out_dir = Path(out_dir)
    diff = config_differences(out_dir, cfg)
    if not diff:
        return
    state = "a finished" if read_metrics(out_dir) is not None else "an unfinished"
    raise ConfigError(f"{out_dir} holds {state} run with a different config (fields {_fields(diff)}); "
                      f"use another --output, or --overwrite to replace that run")


def check_output_path(out_dir: Path) -> None:
    """--output must be a folder this process can write (or create): one line otherwise, before anything
    is built."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StorageError(f"--output {out_dir} is a file, not a folder; pass a folder path (it is created if missing)")
    probe = out_dir
    while not probe.exists():  # the nearest existing ancestor is where the folder would be made
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise StorageError(f"--output {out_dir}: {probe} is a file, not a folder; pass a folder path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        what = "is" if probe == out_dir else f"cannot be created: {probe} is"
        raise StorageError(f"--output {out_dir} {what} not writable (read-only or permission denied); "
                           "choose a writable folder")


def clear_run_folder(out_dir: Path) -> list[str]:
    """--overwrite: delete what a run wrote into `out_dir` (RUN_FOLDER_ENTRIES; any other file stays).
    Returns the names removed."""
    removed = []
    for name in RUN_FOLDER_ENTRIES:
        p = Path(out_dir) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


class _Signalled(BaseException):
    """SIGTERM / SIGINT arrived (raised from the signal handler; not a KeyboardInterrupt, which Lightning
    turns into sys.exit(1), nor a SystemExit like Lightning's SIGTERMException, which exits 0)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGINT raise `_Signalled` in the main thread for the duration (a grid trial running
    in a worker thread keeps its launcher's handling). Lightning's own SIGTERM handler, installed for
    `fit`, calls this one after its own (it chains the handler it finds)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:  # a second signal during the clean-up: let the clean-up finish
            return
        fired.append(signum)
        raise _Signalled(signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _interrupted(out_dir: Path, signum: int, started: bool) -> InterruptedRun:
    name = signal.Signals(signum).name
    ckpt = last_checkpoint(out_dir) if started else None
    if ckpt is not None:
        how = f"rerun the same command to resume from {ckpt}"
    elif started:
        how = "no checkpoint was saved yet; rerun the same command to start again"
    else:
        how = "nothing was written; rerun the same command to start"
    return InterruptedRun(f"interrupted by {name}; {how}", signum)


def _storage_error(e: OSError, out_dir: Path) -> Optional[StorageError]:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left on the device holding {out_dir} ({e.filename or 'writing'}); free some "
                            "space and rerun the same command to resume")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename and \
            str(Path(str(e.filename)).resolve()).startswith(str(out_dir.resolve())):
        return StorageError(f"cannot write {e.filename} ({e.strerror}); make {out_dir} writable or choose "
                            "another --output")
    return None


def execute(run: StageRun, out_dir, *, progress: bool = True, wandb_group: Optional[str] = None,
            callbacks: Iterable = (), name: Optional[str] = None, overwrite: bool = False) -> dict:
    """Run `run` into `out_dir` (see the module docstring); returns the metrics (== metrics.json).
    `overwrite`: a folder holding another (finished or unfinished) run is cleared (`clear_run_folder`)
    instead of refused."""
    out_dir = Path(out_dir)
    check_output_path(out_dir)
    with _signals_interrupt():
        try:
            return _execute(run, out_dir, progress=progress, wandb_group=wandb_group, callbacks=callbacks,
                            name=name, overwrite=overwrite)
        except _Signalled as e:
            done = read_metrics(out_dir)
            if done is not None and config_differences(out_dir, run.cfg) == []:
                return done  # the signal came after metrics.json: the run is complete
            raise _interrupted(out_dir, e.signum, out_dir.is_dir()) from None


def _finished(out_dir: Path, cfg, overwrite: bool) -> Optional[dict]:
    """The result of a finished folder holding the same config; ConfigError for another config (unless
    `overwrite`); None when the folder is not finished."""
    done = read_metrics(out_dir)
    if done is None:
        return None
    if not overwrite:
        check_same_config(out_dir, cfg)
        return done
    return None


def _execute(run: StageRun, out_dir: Path, *, progress: bool, wandb_group: Optional[str], callbacks: Iterable,
             name: Optional[str], overwrite: bool) -> dict:
    import lightning.pytorch as pl

    cfg = run.cfg
    owner = f"{run.stage} run" if run.stage else "run"
    done = _finished(out_dir, cfg, overwrite)
    if done is not None:
        return done
    if run.is_writer and is_locked(out_dir):  # fail fast; the lock below is the authority (DDP: rank 0 holds it)
        with folder_lock(out_dir, owner):
            pass
    if not overwrite:
        check_same_config(out_dir, cfg)
    check_wandb(cfg.wandb)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run.resolve_device()
    run.build()
    # Only now, with data, model and weights known good, does the run folder appear.
    lock = folder_lock(out_dir, owner) if run.is_writer else contextlib.nullcontext(out_dir)
    with lock:
        # checked again under the lock: another writer may have finished or started this folder meanwhile
        done = _finished(out_dir, cfg, overwrite)
        if done is not None:
            return done
        if overwrite and run.is_writer:
            removed = clear_run_folder(out_dir)
            if removed:
                warnings.warn(f"--overwrite: removed the previous run's {', '.join(removed)} from {out_dir}",
                              RuntimeWarning, stacklevel=2)
        elif not overwrite:
            check_same_config(out_dir, cfg)
        try:
            return _fit_and_write(run, out_dir, progress=progress, wandb_group=wandb_group, callbacks=callbacks,
                                  name=name)
        except OSError as e:
            err = _storage_error(e, out_dir)
            if err is None:
                raise
            raise err from None


def _fit_and_write(run: StageRun, out_dir: Path, *, progress: bool, wandb_group: Optional[str],
                   callbacks: Iterable, name: Optional[str]) -> dict:
    from core.accounting import AccountingCallback

    cfg = run.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    if run.is_writer:
        atomic_write_json(out_dir / CONFIG_FILE, cfg.to_dict())
    artifact = out_dir / run.artifact
    loggers: list = []
    hint = lr_hint(cfg)
    try:
        with preserved_rng(getattr(run, "device", None)):  # evaluations do not shift the training's random stream
            run.before_fit()
        loggers = make_loggers(out_dir, cfg.wandb, wandb_group, name or run.default_name(out_dir), cfg.to_dict())
        with preserved_rng(getattr(run, "device", None)):
            flops = run.flops_per_image()
        accounting = AccountingCallback(out_dir, flops_per_image=flops)
        rng = RngStateCallback()
        trainer = make_trainer(out_dir=out_dir, device=cfg.device, devices=cfg.devices, precision=cfg.precision,
                               loggers=loggers, progress=progress, ddp=run.ddp,
                               callbacks=[rng, accounting, NonFiniteLossCallback(hint), *run.callbacks(out_dir),
                                          *callbacks], **run.trainer_limits())
        resume = usable_checkpoint(out_dir) if run.is_writer else last_checkpoint(out_dir)
        if resume is not None:  # Lightning warns that the checkpoint folder it resumes from is not empty
            warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")
        fit_kwargs = run.fit_kwargs(trainer)
        rng.generators = loader_generators(*fit_kwargs.values())
        trainer.fit(run.module(), ckpt_path=str(resume) if resume else None, **fit_kwargs)
        if trainer.interrupted:
            raise KeyboardInterrupt
        check_finite_weights(run.module(), hint)
        run.on_every_rank_after_fit(trainer)
        if not trainer.is_global_zero:  # ranks other than 0 write nothing
            return {}
        metrics: dict[str, Any] = {"stage": run.stage, **run.after_fit(trainer, out_dir), **accounting.summary()}
        check_finite_metrics(metrics, hint)
        write_history(out_dir)
        metrics_schema.check(run.stage, metrics, run.extra_metric_keys())
        _wandb_summary(loggers, {k: metrics.get(k) for k in run.summary_keys})
        atomic_write_json(out_dir / METRICS_FILE, metrics)
    except BaseException:
        if run.is_writer:  # nothing that could pass for a result survives (checkpoints stay for resume)
            artifact.unlink(missing_ok=True)
        raise
    finally:
        finish_wandb(loggers)
    if not getattr(cfg, "keep_checkpoints", False):  # issue 19: a finished run keeps its weights, not its state
        drop_checkpoints(out_dir)
    return _jsonable(metrics)  # exactly what metrics.json holds


def drop_checkpoints(out_dir: Path) -> None:
    """Delete checkpoints/last.ckpt (and the folder when nothing else is in it) of a finished run."""
    ck = Path(out_dir) / CHECKPOINT_DIR
    (ck / LAST_CKPT).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        ck.rmdir()


def check_finite_weights(module, hint: str = "") -> None:
    """After training: every floating parameter / buffer finite, else NonFiniteError (before any
    evaluation runs on them: the linear probe would overflow on such features)."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"training diverged: the weights are not finite after training ({n} NaN/inf "
                                 f"values in {name}); {hint or 'the learning rate is likely too high'}; "
                                 "no result was written")


def _wandb_summary(loggers: list, values: dict) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and values:
            try:
                lg.experiment.summary.update({f"final/{k}": v for k, v in values.items()})
            except Exception as e:  # noqa: BLE001 - logging never fails a finished run, but says so
                warnings.warn(f"wandb: writing the final summary failed ({type(e).__name__}: {e}); "
                              "metrics.json is complete", RuntimeWarning, stacklevel=2)
