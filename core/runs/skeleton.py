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
from lightning.pytorch.callbacks import Callback

from core.errors import ConfigError, InterruptedRun, NonFiniteError, StorageError
from core.folder_lock import folder_lock, is_locked
from core.rng import preserved_rng
from core.runs import metrics_schema
from core.runs.identity import (
    IDENTITY_FILE,
    IDENTITY_KEY,
    config_field_differences,
    fields_text,
    identity_differences,
    result_identity,
)
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


#: the files and folders a run writes into its folder (the `RunManifest` plans them; a folder from before manifests
#: existed is cleared by these names, `clear_run_folder`)
RUN_FOLDER_ENTRIES = ("metrics.json", "config.json", IDENTITY_FILE, "history.csv", "backbone.pt", "model.pt",
                      "checkpoints", "logs", "figures", "wandb", "accounting.json")
MANIFEST_FILE = "manifest.json"
_NOT_LISTED = (MANIFEST_FILE, ".lock")


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def config_differences(out_dir: Path, cfg) -> Optional[list[str]]:
    """The dotted config fields in which `out_dir/config.json` differs from `cfg` (bookkeeping fields
    ignored, paths resolved, a checkpoint source compared by its weights: `core.runs.identity`); None when the
    folder holds no readable config.json. A field the folder's config.json lacks (added to the config class
    since it was written) reads as that field's default."""
    old = _read_json(Path(out_dir) / CONFIG_FILE)
    if not isinstance(old, dict):
        return None
    return config_field_differences(old, cfg)


def record_problem(out_dir: Path, cfg, ident: dict, done: Optional[dict]) -> Optional[str]:
    """Why the folder's run is not the requested result (a phrase), or None when it is (or holds nothing to
    check). `done`: the folder's metrics.json (None: unfinished). A finished folder is a result only with a
    readable config.json and an `identity` record in metrics.json matching `ident`; an unfinished one is
    checked against its identity.json (a folder from before identity records: against its config.json; with
    neither, a checkpoint there cannot be checked and is refused)."""
    out_dir = Path(out_dir)
    if done is not None:
        if not isinstance(_read_json(out_dir / CONFIG_FILE), dict):
            return (f"whose {CONFIG_FILE} is missing or unreadable, so it is not a result (it cannot be checked "
                    "against this request)")
        rec = done.get(IDENTITY_KEY)
        if not isinstance(rec, dict):
            return (f"whose {METRICS_FILE} holds no identity record (written before records existed, or edited), "
                    "so it is not a result (it cannot be checked against this request)")
    else:
        rec = _read_json(out_dir / IDENTITY_FILE)
        if not isinstance(rec, dict):
            diff = config_differences(out_dir, cfg)
            if diff:
                return f"with a different config (fields {fields_text(diff)})"
            if diff is None and last_checkpoint(out_dir) is not None:
                return (f"whose {CONFIG_FILE} and {IDENTITY_FILE} are missing or unreadable, so its checkpoint cannot "
                        "be checked against this request")
            return None
    return "; ".join(identity_differences(rec, ident, cfg)) or None


def check_folder(out_dir: Path, cfg, ident: dict) -> None:
    """An existing run folder that holds another request's run (config, data or starting weights; or one that
    cannot be checked) is refused: a finished one would return the wrong result, an unfinished one would mix
    two runs' checkpoints and history; --overwrite opts in."""
    out_dir = Path(out_dir)
    done = read_metrics(out_dir)
    why = record_problem(out_dir, cfg, ident, done)
    if why is None:
        return
    state = "a finished" if done is not None else "an unfinished"
    raise ConfigError(f"{out_dir} holds {state} run {why}; use another --output, or --overwrite to replace that run")


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


def check_output_outside_data(out_dir: Path, data_cfg) -> None:
    """--output and the data folders (data.root, data.ssl_root) must not overlap, either inside the other: a run's
    figures and weights would become training images, and --overwrite would reach the data."""
    from core.data.fingerprint import data_roots

    out = Path(out_dir).expanduser().resolve()
    for root in data_roots(data_cfg):
        if out == root or root in out.parents:
            raise ConfigError(f"--output {out_dir} lies inside the data folder {root}: the run's files would be read "
                              "as data; choose an --output outside it")
        if out in root.parents:
            raise ConfigError(f"--output {out_dir} contains the data folder {root}: the run's files would mix with "
                              "the data; choose an --output outside it")


def _walk_rel(out_dir: Path) -> set[str]:
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(out_dir):
        rel = Path(dirpath).relative_to(out_dir)
        for n in dirnames + filenames:
            r = (rel / n).as_posix()
            if r not in _NOT_LISTED:
                out.add(r)
    return out


def _under(path: str, entries: Iterable[str]) -> bool:
    return any(path == e or path.startswith(e + "/") for e in entries)


class RunManifest:
    """The files and folders a run wrote into its folder, listed in `manifest.json`: what --overwrite (and the
    clean-up of a run that failed before its first checkpoint) removes, and nothing else. Made before the run
    writes anything: what the folder already holds is the user's (unless an earlier manifest lists it); the
    entries the run will write (`RUN_FOLDER_ENTRIES`, when absent now) are listed from the start, so a run killed
    at any point leaves them listed; `record()` adds whatever else appeared since (the topmost new path: a new
    logs/version_N/ folder inside a user's own logs/ folder)."""

    def __init__(self, out_dir: Path, planned: Iterable[str] = RUN_FOLDER_ENTRIES):
        self.out_dir = Path(out_dir)
        self.owned: set[str] = set(listed_entries(self.out_dir) or ())
        self.before = {p for p in _walk_rel(self.out_dir) if not _under(p, self.owned)}
        self.owned |= {p for p in planned if p not in self.before}

    def record(self) -> None:
        now = _walk_rel(self.out_dir)
        new = {p for p in now if p not in self.before and not _under(p, self.owned)}
        self.owned |= {p for p in new if Path(p).parent.as_posix() in self.before or "/" not in p}
        atomic_write_json(self.out_dir / MANIFEST_FILE, {"entries": sorted(self.owned)})


def listed_entries(out_dir: Path) -> Optional[list[str]]:
    """The entries `manifest.json` lists (relative paths inside `out_dir`), None without a readable one."""
    m = _read_json(Path(out_dir) / MANIFEST_FILE)
    entries = m.get("entries") if isinstance(m, dict) else None
    if not isinstance(entries, list):
        return None
    return [e for e in entries if isinstance(e, str) and e and not Path(e).is_absolute() and ".." not in Path(e).parts]


def _legacy_entries(out_dir: Path) -> list[str]:
    """A folder without a manifest (written before manifests existed): the run's fixed files, its checkpoint, and
    the folders Lightning / wandb name for a run (logs/version_N, wandb/*run-*); figures/ is left alone (its
    files cannot be told apart from the user's)."""
    out = [n for n in ("metrics.json", "config.json", IDENTITY_FILE, "history.csv", "backbone.pt", "model.pt",
                       "accounting.json") if (out_dir / n).exists()]
    ck = out_dir / CHECKPOINT_DIR
    out += [f"{CHECKPOINT_DIR}/{p.name}" for p in sorted(ck.glob(f"{LAST_CKPT}*"))]
    out += [f"logs/{p.name}" for p in sorted((out_dir / "logs").glob("version_*")) if p.is_dir()]
    out += [f"wandb/{p.name}" for p in sorted((out_dir / "wandb").glob("*run-*"))]
    return out


def clear_run_folder(out_dir: Path) -> list[str]:
    """--overwrite: delete exactly what the run wrote into `out_dir` (its `manifest.json` entries; a folder from
    before manifests: `_legacy_entries`), then folders of the run's left empty; any other file stays. Returns
    the entries removed."""
    out_dir = Path(out_dir)
    listed = listed_entries(out_dir)
    entries = listed if listed is not None else _legacy_entries(out_dir)
    removed = []
    for name in sorted(entries, key=lambda e: -e.count("/")):
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    if listed is None:
        for name in ("checkpoints", "logs", "wandb"):  # emptied by the removal: the run's own
            with contextlib.suppress(OSError):
                (out_dir / name).rmdir()
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    return sorted(removed)


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
    if isinstance(e, StorageError):  # core.io.DiskFullError: its own line already names the file and the space
        return e
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
    check_output_outside_data(out_dir, run.cfg.data)
    with _signals_interrupt():
        ident: dict = {}
        try:
            return _execute(run, out_dir, ident, progress=progress, wandb_group=wandb_group, callbacks=callbacks,
                            name=name, overwrite=overwrite)
        except _Signalled as e:
            done = read_metrics(out_dir)
            if done is not None and ident and record_problem(out_dir, run.cfg, ident, done) is None:
                return done  # the signal came after metrics.json: the run is complete
            raise _interrupted(out_dir, e.signum, out_dir.is_dir()) from None


def _finished(out_dir: Path, cfg, ident: dict, overwrite: bool) -> Optional[dict]:
    """The result of a finished folder holding the requested result; ConfigError for another one, or one
    that cannot be checked (unless `overwrite`); None when the folder is not finished."""
    done = read_metrics(out_dir)
    if done is None or overwrite:
        return None
    check_folder(out_dir, cfg, ident)
    return done


def _execute(run: StageRun, out_dir: Path, ident: dict, *, progress: bool, wandb_group: Optional[str],
             callbacks: Iterable, name: Optional[str], overwrite: bool) -> dict:
    import lightning.pytorch as pl

    cfg = run.cfg
    owner = f"{run.stage} run" if run.stage else "run"
    ident.update(result_identity(cfg))
    done = _finished(out_dir, cfg, ident, overwrite)
    if done is not None:
        return done
    if run.is_writer and is_locked(out_dir):  # fail fast; the lock below is the authority (DDP: rank 0 holds it)
        with folder_lock(out_dir, owner):
            pass
    if not overwrite:
        check_folder(out_dir, cfg, ident)
    check_wandb(cfg.wandb)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run.resolve_device()
    run.build()
    ident.update(result_identity(cfg))  # a named source's weights may have been fetched by build()
    # Only now, with data, model and weights known good, does the run folder appear.
    lock = folder_lock(out_dir, owner) if run.is_writer else contextlib.nullcontext(out_dir)
    with lock:
        # checked again under the lock: another writer may have finished or started this folder meanwhile
        done = _finished(out_dir, cfg, ident, overwrite)
        if done is not None:
            return done
        if overwrite and run.is_writer:
            removed = clear_run_folder(out_dir)
            if removed:
                warnings.warn(f"--overwrite: removed the previous run's {', '.join(removed)} from {out_dir}",
                              RuntimeWarning, stacklevel=2)
        elif not overwrite:
            check_folder(out_dir, cfg, ident)
        try:
            return _fit_and_write(run, out_dir, ident, progress=progress, wandb_group=wandb_group,
                                  callbacks=callbacks, name=name)
        except OSError as e:
            err = _storage_error(e, out_dir)
            if err is None:
                raise
            raise err from None


class _ManifestCallback(Callback):
    """Records the run's files in its manifest each time a checkpoint is saved."""

    def __init__(self, manifest: RunManifest):
        super().__init__()
        self.manifest = manifest

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.manifest.record()


def _fit_and_write(run: StageRun, out_dir: Path, ident: dict, *, progress: bool, wandb_group: Optional[str],
                   callbacks: Iterable, name: Optional[str]) -> dict:
    from core.accounting import AccountingCallback

    cfg = run.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = RunManifest(out_dir, planned=(*RUN_FOLDER_ENTRIES, run.artifact)) if run.is_writer else None
    resumed = last_checkpoint(out_dir) is not None
    if manifest is not None:
        manifest.record()  # before anything else is written: a kill from here on leaves the run's entries listed
        atomic_write_json(out_dir / CONFIG_FILE, cfg.to_dict())
        atomic_write_json(out_dir / IDENTITY_FILE, ident)
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
        extra = [_ManifestCallback(manifest)] if manifest is not None else []
        trainer = make_trainer(out_dir=out_dir, device=cfg.device, devices=cfg.devices, precision=cfg.precision,
                               loggers=loggers, progress=progress, ddp=run.ddp,
                               callbacks=[rng, accounting, NonFiniteLossCallback(hint), *run.callbacks(out_dir),
                                          *extra, *callbacks], **run.trainer_limits())
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
        metrics: dict[str, Any] = {"stage": run.stage, **run.after_fit(trainer, out_dir), **accounting.summary(),
                                   IDENTITY_KEY: ident}
        check_finite_metrics(metrics, hint)
        write_history(out_dir)
        metrics_schema.check(run.stage, metrics, run.extra_metric_keys())
        _wandb_summary(loggers, {k: metrics.get(k) for k in run.summary_keys})
        manifest.record()
        atomic_write_json(out_dir / METRICS_FILE, metrics)
    except BaseException:
        if run.is_writer:  # nothing that could pass for a result survives (checkpoints stay for resume)
            artifact.unlink(missing_ok=True)
            _after_failure(out_dir, manifest, resumed)
        raise
    finally:
        finish_wandb(loggers)
    manifest.record()
    if not getattr(cfg, "keep_checkpoints", False):  # a finished run keeps its weights, not its state
        drop_checkpoints(out_dir)
    return _jsonable(metrics)  # exactly what metrics.json holds


def _after_failure(out_dir: Path, manifest: Optional[RunManifest], resumed: bool) -> None:
    """A run that fails before its first checkpoint leaves nothing to resume: everything it wrote goes (its
    config.json would otherwise refuse the corrected rerun its error suggests, e.g. --corrupt-policy skip, as a
    different config). With a checkpoint (this attempt's or an earlier one's) the files stay for the resume."""
    if manifest is None:
        return
    with contextlib.suppress(OSError):
        if resumed or last_checkpoint(out_dir) is not None:
            manifest.record()
        else:
            manifest.record()
            clear_run_folder(out_dir)


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
