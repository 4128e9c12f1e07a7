"""The results folder of a grid run: where it goes (`--output`, or <storage>/<grid>-<timestamp>/ with the
storage `results/` by default; the latest one for `--resume`), which folders are refused (/, system
folders, $HOME), and whether a grid may continue a folder (`--resume` keeps every finished trial, so only
ADDING trials is allowed).

Storage (`--storage URI` or the grid's `storage:` key; `core.storage`): a local or shared folder, or an
object store (`s3://bucket/prefix`). On a folder (the default `results/`) the trials and the driver work
in the results folder itself, as they always did. On an object store (`Results.remote`) the driver keeps a
working copy (grid.yaml, summary.*, the recorded trial.json files) under a node-local scratch root and
uploads what it writes; each trial works in `<scratch root>/trials/<id>/` on whatever node runs it and
persists its run folder to `<results>/trials/<id>/` (experiments/engine/trial.py). The scratch root is
`$TWINSEG_SCRATCH` (default /tmp/twinseg-scratch) `/<results name>-<hash of the URI>`; TWINSEG_* variables
travel to every Ray worker.

References between trials are relative to the results folder (a stage-2 trial's source is
`checkpoint:trials/<dep>/backbone.pt`: experiments/engine/spec.py `dependency_source`), made absolute where
an attempt runs (the results folder, or the scratch root), so a copied or moved results folder records
the same configs and resumes (`resume_changes` compares configs; a real change names its fields)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from core.errors import ConfigError
from core.storage import Storage
from experiments.engine.axes import method_sections
from experiments.engine.spec import GridSpec


DEFAULT_STORAGE = "results"
SCRATCH_ENV, DEFAULT_SCRATCH = "TWINSEG_SCRATCH", "/tmp/twinseg-scratch"
MIRRORED = ("grid.yaml", "summary.json")
"""What a driver copies from an object store into its working copy at a resume (with trials/*/trial.json)."""


@dataclass
class Results:
    """Where a grid run's results live: `storage` (the results folder on its storage), `local` (the
    driver's working folder: the results folder itself on a folder storage, else a node-local copy) and
    `trials_root` (where a trial works: `<results>/trials` on a folder storage, else node-local scratch)."""

    storage: Storage
    local: Path
    trials_root: Path

    @property
    def remote(self) -> bool:
        return not self.storage.is_local

    @property
    def where(self) -> str:
        """The results folder as the user names it (a path or a URI)."""
        return self.storage.join()

    def upload(self, *names: str) -> None:
        """Copy the driver's files `names` (relative to `local`) to the storage (object stores only)."""
        if self.remote:
            for name in names:
                if (self.local / name).is_file():
                    self.storage.upload_file(self.local / name, name)


def scratch_root(uri: str) -> Path:
    """The node-local working root of the results folder `uri` on an object store (same path on every
    node: $TWINSEG_SCRATCH or /tmp/twinseg-scratch, then the results name and a hash of the URI)."""
    base = Path(os.environ.get(SCRATCH_ENV) or DEFAULT_SCRATCH).expanduser()
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "results"
    return base.resolve() / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}"


def results_for(storage: Storage) -> Results:
    """`Results` of the results folder `storage` (module docstring)."""
    if storage.is_local:
        local = Path(storage.root)
        return Results(storage, local, local / "trials")
    root = scratch_root(storage.join())
    return Results(storage, root / "driver", root / "trials")


def storage_base(args, doc: Optional[dict] = None) -> tuple[Storage, bool]:
    """(storage under which results folders go, given explicitly?): --storage, else the grid's
    `storage:` key, else `results/`. A bad URI or value is one line."""
    given = getattr(args, "storage", None)
    if given is None and isinstance(doc, dict) and doc.get("storage") is not None:
        given = doc["storage"]
        if not isinstance(given, str) or not given.strip():
            raise ConfigError(f"storage: {given!r} must be a path or a URI such as s3://bucket/prefix "
                              "(default: results/)")
    if given is None:
        return Storage(DEFAULT_STORAGE), False
    return Storage(given), True


def _latest_remote(base: Storage, name: str) -> Optional[Storage]:
    names = [d for d in base.list_dirs() if d.startswith(f"{name}-")]
    for cand in reversed(names):
        if base.child(cand).exists("grid.yaml"):
            return base.child(cand)
    return None


def mirror_remote(results: Results) -> None:
    """Refresh the driver's working copy of a results folder on an object store: grid.yaml,
    summary.json and every trials/<id>/trial.json (what a resume compares), nothing else."""
    shutil.rmtree(results.local / "trials", ignore_errors=True)
    for name in MIRRORED:
        (results.local / name).unlink(missing_ok=True)
        if results.storage.exists(name):
            results.storage.download_file(name, results.local / name)
    for f in results.storage.list("trials"):
        if f.count("/") == 1 and f.endswith("/trial.json"):
            results.storage.download_file(f"trials/{f}", results.local / "trials" / f)


def choose_results(args, name: str, doc: Optional[dict] = None) -> tuple[Results, bool]:
    """(results, resuming?) for a grid named `name` (`doc`: the grid document, for its `storage:`).
    `--output`: a URI as given; a relative path lies under an explicitly given storage (--storage /
    `storage:`), else under the current folder as before."""
    import copy

    base, explicit = storage_base(args, doc)
    out = str(args.output) if args.output else None
    store: Optional[Storage] = None
    if out is not None and "://" in out:
        store = Storage(out)
    elif out is not None and explicit and not os.path.isabs(os.path.expanduser(out)):
        store = base.child(out)
    elif out is not None and not base.is_local:
        raise ConfigError(f"--output {out}: an absolute path with the storage {base.join()}; pass a name under the "
                          "storage (e.g. --output mygrid), a full URI, or drop --storage")
    elif out is not None:
        store = Storage(Path(out).expanduser())
    if (store or base).is_local:
        a = copy.copy(args)
        a.output = store.root if store is not None else None
        folder, resuming = choose_results_dir(a, name, base=Path(base.root) if explicit else None)
        return results_for(Storage(folder)), resuming
    if store is None and args.resume:
        store = _latest_remote(base, name)
        if store is None:
            raise ConfigError(f"--resume: no earlier {base.join(name + '-*')} folder to continue; run without "
                              "--resume first, or pass --output")
    elif store is None:
        store = base.child(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume and not store.exists("grid.yaml"):
        raise ConfigError(f"--resume --output {store.join()}: no grid.yaml there (not a grid results folder); "
                          "pass the folder of an earlier run or drop --resume to start a new one")
    if not args.resume and (store.exists("grid.yaml") or store.exists("summary.json")):
        raise ConfigError(f"--output {store.join()} already holds a grid run; add --resume to continue it, or "
                          "choose a new folder")
    return results_for(store), bool(args.resume)


def _latest_results(base: Path, name: str) -> Optional[Path]:
    cands = sorted(p for p in base.glob(f"{name}-*") if p.is_dir() and (p / "grid.yaml").is_file())
    return cands[-1] if cands else None


def choose_results_dir(args, name: str, base: Optional[Path] = None) -> tuple[Path, bool]:
    """(results folder, resuming?) on a folder storage (`base`: where new folders go, default results/)."""
    base = Path(DEFAULT_STORAGE) if base is None else base
    if args.resume:
        if args.output:
            out = Path(args.output).expanduser()
            if not (out / "grid.yaml").is_file():
                raise ConfigError(f"--resume --output {out}: no grid.yaml there (not a grid results folder); "
                                  "pass the folder of an earlier run or drop --resume to start a new one")
            return out.resolve(), True
        out = _latest_results(base, name)
        if out is None:
            raise ConfigError(f"--resume: no earlier {base / (name + '-*')} folder to continue; run without --resume "
                              "first, or pass --output DIR")
        return out.resolve(), True
    if args.output:
        out = Path(args.output).expanduser()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output {out} is a file; pass a folder")
        if (out / "summary.json").exists() or (out / "grid.yaml").exists():
            raise ConfigError(f"--output {out} already holds a grid run; add --resume to continue it, or choose a new folder")
        return out.resolve(), False
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = base / f"{name}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = base / f"{name}-{stamp}-{n}"
    return out.resolve(), False


SYSTEM_FOLDERS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/opt", "/proc",
                  "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/usr/local", "/usr/bin", "/usr/lib")
"""Folders a grid never writes into as `--output` (nor below /dev, /proc, /sys); $HOME itself too."""


def check_output_folder(path: Path, flag: str = "--output") -> None:
    """Refuse / , system folders and $HOME itself as a results folder (one line): a grid writes
    grid.yaml, summary.*, report.md, tables/, figures/, trials/ and ray/ straight into it."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    try:
        real = p.resolve()
    except OSError:
        real = p
    home = Path(os.path.abspath(Path.home()))
    for cand in {p, real}:
        parts = cand.parts
        system = str(cand) in SYSTEM_FOLDERS or (len(parts) > 1 and parts[1] in ("dev", "proc", "sys"))
        if system or cand == home or cand == home.resolve():
            what = "your home folder" if cand in (home, home.resolve()) else "a system folder"
            raise ConfigError(f"{flag} {path}: {cand} is {what}; a grid writes its results folder straight into "
                              f"{flag}, so pass a new folder (e.g. results/mygrid)")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def recorded_trials(results_dir: Path) -> dict[str, dict]:
    """trial id -> config the results folder recorded: summary.json's trials, overridden by each
    started trial's own trials/<id>/trial.json (what it actually ran with)."""
    out: dict[str, dict] = {}
    try:
        doc = json.loads((results_dir / "summary.json").read_text())
        for t in doc.get("trials", []):
            if isinstance(t, dict) and "id" in t and isinstance(t.get("config"), dict):
                out[str(t["id"])] = t["config"]
    except (OSError, ValueError):
        pass
    for f in (results_dir / "trials").glob("*/trial.json"):
        try:
            t = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(t, dict) and isinstance(t.get("config"), dict):
            out[f.parent.name] = t["config"]
    return out


def resume_changes(spec: GridSpec, results_dir: Path) -> Optional[str]:
    """Why `spec` may not continue `results_dir` (one line), or None. A resume keeps every finished
    trial, so each trial the folder recorded must come back with the same config: a changed or removed
    trial is refused; trials the grid ADDS are allowed (they simply run)."""
    old = recorded_trials(results_dir)
    if not old:
        return None
    new = {t.id: json.loads(json.dumps(t.config, default=str)) for t in spec.trials}
    removed = [tid for tid in old if tid not in new and tid not in spec.left_out]
    changed = []
    sections = set(method_sections())
    for tid, cfg in old.items():
        if tid in new and new[tid] != cfg:
            a, b = _flat(cfg), _flat(new[tid])
            # another SSL method's section (e.g. dino.* of a Barlow Twins trial) does not affect the trial
            mine = str(cfg.get("method", ""))
            keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>")
                          and not (k.split(".", 1)[0] in sections and k.split(".", 1)[0] != mine))
            if keys:
                changed.append((tid, keys, a, b))
    if not changed and not removed:
        return None
    parts = []
    if changed:
        tid, keys, a, b = changed[0]
        shown = ", ".join(f"{k} {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}" for k in keys[:3])
        more = f" (+{len(keys) - 3} more fields)" if len(keys) > 3 else ""
        others = f"; {len(changed) - 1} more trial(s) changed" if len(changed) > 1 else ""
        parts.append(f"trial {tid} changed: {shown}{more}{others}")
    if removed:
        parts.append(f"{len(removed)} trial(s) removed ({', '.join(removed[:3])}{'...' if len(removed) > 3 else ''})")
    return "; ".join(parts)


def _short(v: Any, n: int = 40) -> str:
    t = json.dumps(v, default=str)
    return t if len(t) <= n else t[: n - 3] + "..."


def refuse_changed_resume(spec: GridSpec, results_dir: Path, grid_arg: Optional[str]) -> None:
    """ConfigError (one line) when `spec` may not continue `results_dir` (`resume_changes`, which names the
    differing fields), saying whether the grid changed or, with the same grid, what it expands to (the
    code's defaults, or a file the grid names); `grid_arg`: the --grid given with --resume, if any."""
    why = resume_changes(spec, results_dir)
    if not why:
        return
    given = f"--grid {grid_arg}" if grid_arg else f"the stored {results_dir / 'grid.yaml'}"
    try:
        ran = json.loads((results_dir / "summary.json").read_text()).get("grid_sha256")
    except (OSError, ValueError, AttributeError):
        ran = None
    if not grid_arg and ran and ran == file_sha256(results_dir / "grid.yaml"):
        raise ConfigError(f"--resume: the grid of {results_dir} is unchanged but its trials' configs are not: "
                          f"{why}; a resume keeps the finished trials, so their configs must stay: run the "
                          "code it ran with (its defaults may have changed), or start a new --output")
    raise ConfigError(f"--resume: {given} differs from what {results_dir} ran: {why}; a resume keeps the "
                      "finished trials, so only ADDING trials is allowed: restore the grid, or start a "
                      "new --output")


def check_storage_from_driver(spec: GridSpec, results: Results, dry_run: bool = False) -> list[str]:
    """Problems of the results storage seen from the driver (one line each): an object store must be
    reachable and writable (credentials, endpoint, bucket: `Storage.check`); a folder is created by the
    run itself (a dry run only checks that its nearest existing parent is writable). A trial on several
    devices (Ray Train) needs a folder every node mounts: its ranks share the run folder."""
    from core.errors import StorageError
    from experiments.engine import ray_ddp

    out: list[str] = []
    if results.remote:
        try:
            results.storage.check()
        except StorageError as e:
            out.append(str(e))
        ddp = [t.id for t in spec.trials if ray_ddp.workers({"config": t.config}) > 1]
        if ddp:
            out.append(f"{spec.path.name}: settings.devices > 1 ({len(ddp)} trial(s), e.g. {ddp[0]}): a trial on "
                       f"several devices shares its run folder between ranks, which {results.where} cannot hold; "
                       "use --storage with a folder every node mounts, or devices: 1")
    elif dry_run:
        folder = Path(results.storage.root)
        parent = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
            out.append(f"results folder {folder}: {parent} is not a writable folder; choose another --output / "
                       "--storage or fix its permissions")
    return out


def file_sha256(path: Path) -> str:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""
