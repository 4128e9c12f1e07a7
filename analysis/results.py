"""Load a grid results folder (ARCHITECTURE.md, "Grid results folder") into plain `Trial` records.

Reads ONLY the given folder: `summary.json` and `trials/<id>/{metrics.json,config.json,history.csv,
figures/*.png}`. A missing or unreadable `summary.json` is tolerated by scanning `trials/`. Anything
that is not a results folder raises `TwinsegError` with one line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.errors import TwinsegError

STATUSES = ("done", "failed", "skipped", "pending")
METHOD_SHORT = {"barlow_twins": "BT", "dino": "DINO"}


@dataclass
class Trial:
    id: str
    stage: str  # "pretrain" | "segment" | "unknown"
    status: str  # done | failed | skipped | pending | incomplete (no metrics.json)
    reason: str = ""
    depends_on: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    dir: Optional[Path] = None
    # filled by link_trials()
    pretrain_id: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "done" and bool(self.metrics)

    def get(self, key: str, default: Any = None) -> Any:
        """A metric, else the config value, else `default`."""
        v = self.metrics.get(key)
        if v is None:
            v = self.config.get(key)
        return default if v is None else v

    def figures(self, prefix: str) -> list[Path]:
        if self.dir is None:
            return []
        fdir = self.dir / "figures"
        if not fdir.is_dir():
            return []
        return sorted((p for p in fdir.glob(f"{prefix}*.png") if p.is_file()), key=natural_key)

    @property
    def history_path(self) -> Optional[Path]:
        if self.dir is None:
            return None
        p = self.dir / "history.csv"
        return p if p.is_file() else None


@dataclass
class Results:
    root: Path
    grid: str
    created: str
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)  # problems met while reading (shown in the report)
    has_summary: bool = True

    def by_id(self) -> dict[str, Trial]:
        return {t.id: t for t in self.trials}

    def stage(self, stage: str, ok_only: bool = True) -> list[Trial]:
        return [t for t in self.trials if t.stage == stage and (t.ok or not ok_only)]


def natural_key(p: Path | str) -> list:
    s = Path(p).name if isinstance(p, Path) else str(p)
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", s)]


def _read_json(path: Path) -> Optional[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _as_list(x: Any) -> list[str]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [str(v) for v in x if v is not None]
    return [str(x)]


def _infer_stage(config: dict, metrics: dict) -> str:
    stage = metrics.get("stage") or config.get("stage")
    if stage in ("pretrain", "segment"):
        return stage
    if "evaluation" in config or "head" in config or "mIoU" in metrics:
        return "segment"
    if "method" in config or "knn_acc" in metrics:
        return "pretrain"
    return "unknown"


def _resolve_dir(root: Path, tid: str, d: Any) -> Optional[Path]:
    """The trial folder INSIDE the results folder (a 'dir' from another machine is mapped back)."""
    cands = [root / "trials" / tid]
    if isinstance(d, str) and d:
        p = Path(d)
        if not p.is_absolute():
            cands.append(root / p)
        else:
            try:
                p.resolve().relative_to(root.resolve())
                cands.append(p)
            except ValueError:
                pass
            cands.append(root / "trials" / p.name)
    for c in cands:
        if c.is_dir():
            return c
    return None


def _load_trial_files(trial: Trial, notes: list[str]) -> None:
    if trial.dir is None:
        return
    cfg = _read_json(trial.dir / "config.json")
    if isinstance(cfg, dict):
        trial.config = {**trial.config, **cfg}
    mpath = trial.dir / "metrics.json"
    if mpath.is_file():
        m = _read_json(mpath)
        if isinstance(m, dict):
            trial.metrics = m
        else:
            notes.append(f"{trial.id}: metrics.json is unreadable (ignored)")
            trial.metrics = {}
            if trial.status == "done":
                trial.status, trial.reason = "incomplete", "metrics.json unreadable"


def load_results(results_dir: str | Path) -> Results:
    root = Path(results_dir).expanduser()
    if not root.exists():
        raise TwinsegError(
            f"results folder {root} does not exist; pass the folder written by experiments/grid.py "
            "(results/<grid>-<timestamp>/)"
        )
    if not root.is_dir():
        raise TwinsegError(f"{root} is not a folder; pass a grid results folder (results/<grid>-<timestamp>/)")
    notes: list[str] = []
    summary_path = root / "summary.json"
    trials_dir = root / "trials"
    summary = _read_json(summary_path) if summary_path.is_file() else None
    if summary_path.is_file() and not (isinstance(summary, dict) and isinstance(summary.get("trials"), list)):
        notes.append("summary.json is unreadable or has no 'trials' list; trials were found by scanning trials/")
        summary = None
    trial_dirs = sorted((p for p in trials_dir.iterdir() if p.is_dir()), key=natural_key) if trials_dir.is_dir() else []
    if summary is None and not trial_dirs:
        raise TwinsegError(
            f"{root} is not a grid results folder (no summary.json and no trials/<id>/ folders); "
            "pass the folder written by experiments/grid.py (results/<grid>-<timestamp>/)"
        )

    trials: list[Trial] = []
    if summary is not None:
        seen: set[str] = set()
        for i, entry in enumerate(summary["trials"]):
            if not isinstance(entry, dict):
                notes.append(f"summary.json trial #{i} is not a mapping (ignored)")
                continue
            tid = str(entry.get("id") or f"trial_{i}")
            seen.add(tid)
            status = str(entry.get("status") or "pending")
            t = Trial(
                id=tid,
                stage=str(entry.get("stage") or "unknown"),
                status=status if status in STATUSES else status,
                reason=str(entry.get("reason") or ""),
                depends_on=_as_list(entry.get("depends_on")),
                config=dict(entry.get("config") or {}),
                metrics=dict(entry.get("metrics") or {}),
                dir=_resolve_dir(root, tid, entry.get("dir")),
            )
            _load_trial_files(t, notes)
            if t.status == "done" and not t.metrics:
                t.status, t.reason = "incomplete", t.reason or "no metrics.json"
            if t.stage not in ("pretrain", "segment"):
                t.stage = _infer_stage(t.config, t.metrics)
            trials.append(t)
        # Trial folders that the summary does not know (e.g. summary written before they started).
        for d in trial_dirs:
            if d.name not in seen and ((d / "metrics.json").exists() or (d / "config.json").exists()):
                trials.append(_scan_trial(d, notes))
                notes.append(f"{d.name}: found in trials/ but not in summary.json")
        grid = str(summary.get("grid") or root.name)
        created = str(summary.get("created") or "")
    else:
        trials = [_scan_trial(d, notes) for d in trial_dirs]
        grid, created = root.name, ""
        if not summary_path.is_file():
            notes.append("no summary.json; trials were found by scanning trials/ (statuses inferred from metrics.json)")

    res = Results(root=root, grid=grid, created=created, trials=trials, notes=notes, has_summary=summary is not None)
    link_trials(res)
    return res


def _scan_trial(d: Path, notes: list[str]) -> Trial:
    t = Trial(id=d.name, stage="unknown", status="done", dir=d)
    _load_trial_files(t, notes)
    if not t.metrics:
        t.status = "incomplete"
        t.reason = t.reason or "no metrics.json (not finished, killed, or failed)"
    t.stage = _infer_stage(t.config, t.metrics)
    return t


def link_trials(res: Results) -> None:
    """Find, for each segment trial, the pretraining trial whose checkpoint it used."""
    pre = {t.id: t for t in res.trials if t.stage == "pretrain"}
    for t in res.trials:
        if t.stage != "segment":
            continue
        for dep in t.depends_on:
            if dep in pre:
                t.pretrain_id = dep
                break
        if t.pretrain_id:
            continue
        src = str(t.get("source", ""))
        if src.startswith("checkpoint:"):
            path = src[len("checkpoint:"):].replace("\\", "/")
            parts = [p for p in path.split("/") if p]
            for pid, p in pre.items():
                bp = str(p.metrics.get("backbone_path") or "").replace("\\", "/")
                if pid in parts or (bp and (bp == path or path.endswith(bp) or bp.endswith(path))):
                    t.pretrain_id = pid
                    break


# ----------------------------------------------------------------------------- variant labels
def fmt_lambda(x: Any) -> str:
    v = _finite(x)
    return "" if v is None else f"{v:g}"


def pretrain_variant(t: Trial) -> tuple:
    """(method, backbone, source, lambd) of a pretraining trial; lambd is None for DINO."""
    method = str(t.get("method", "?"))
    lam = _finite(t.get("lambd")) if method == "barlow_twins" else None
    return (method, str(t.get("backbone", "?")), str(t.get("source", "?")), lam)


def variant_label(v: tuple) -> str:
    method, backbone, source, lam = v
    s = f"{METHOD_SHORT.get(method, method)} {backbone} init={source}"
    if lam is not None:
        s += f" λ={fmt_lambda(lam)}"
    return s


def segment_variant(t: Trial, pre: dict[str, Trial]) -> str:
    """Label of the pretraining a segment trial used (its stage-1 variant, or its weight source)."""
    p = pre.get(t.pretrain_id) if t.pretrain_id else None
    if p is not None:
        return variant_label(pretrain_variant(p))
    src = str(t.get("source", "?"))
    if src.startswith("checkpoint:"):
        src = "checkpoint " + Path(src[len("checkpoint:"):]).parent.name
    return f"{t.get('backbone', '?')} weights={src}"


def finite(x: Any) -> Optional[float]:
    return _finite(x)
