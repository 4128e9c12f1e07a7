"""Load a grid results folder (ARCHITECTURE.md, "Grid results folder") into plain `Trial` records.

Reads ONLY the given folder: `summary.json` and `trials/<id>/{metrics.json,config.json,history.csv,
figures/*.png}`. A missing or unreadable `summary.json` is tolerated by scanning `trials/`. Anything
that is not a results folder raises `TwinsegError` with one line.

Pretraining variants are read from the results, not declared here: a trial's summary `labels` (the
stage-1 axis values the grid declared, minus the seed; axes that do not apply to its method are null)
and the `method_label` its metrics.json carries. No SSL method, evaluation or axis list is named in
this package: a method or axis added to the grid shows up in the report by itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.errors import TwinsegError
from core.stages import StageSpec, stages

UNKNOWN = "unknown"  # the stage of a trial whose folder says nothing recognisable

STATUSES = ("done", "failed", "skipped", "pending")

# Label names with a fixed role (summary.json "labels"); every other stage-1 label is a grid axis
# whose name and values are read from the results and shown generically ("name=value").
METHOD, BACKBONE, SOURCE, SEED = "method", "backbone", "source", "seed"
SEGMENT_LABELS = ("evaluation", "from")  # a segmentation trial's own labels (not stage-1 axes)
AXIS_SYMBOLS = {"lambd": "λ"}  # display aliases of axis names (anything else is shown by its name)
# Folders written before summary labels existed: the method option that was a grid axis, and the
# metric that shows a run used it. Old runs wrote the (flat) `lambd` for EVERY method; only the runs
# that also reported the cross-correlation statistics it weighs were sweeping it.
LEGACY_AXES = {"lambd": "cc_offdiag_rms"}


@dataclass
class Trial:
    id: str
    stage: str  # a stage name (core/stages.py) or UNKNOWN
    status: str  # done | failed | skipped | pending | incomplete (no metrics.json)
    reason: str = ""
    depends_on: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    dir: Optional[Path] = None
    labels: dict = field(default_factory=dict)  # summary.json "labels" ({} in older folders)
    # filled by link_trials()
    pretrain_id: Optional[str] = None
    # filled by assign_variants(): a pretraining trial's own variant; for a segmentation trial, the
    # variant of the pretraining whose checkpoint it used (None when unknown)
    variant: Optional["Variant"] = None

    @property
    def ok(self) -> bool:
        return self.status == "done" and bool(self.metrics)

    def get(self, key: str, default: Any = None) -> Any:
        """A metric, else the config value, else the summary label, else `default`."""
        for src in (self.metrics, self.config, self.labels):
            v = src.get(key)
            if v is not None:
                return v
        return default

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

    def stage(self, stage: "str | StageSpec", ok_only: bool = True) -> list[Trial]:
        """The (finished, unless not `ok_only`) trials of `stage` (a StageSpec or its name)."""
        name = getattr(stage, "name", stage)
        return [t for t in self.trials if t.stage == name and (t.ok or not ok_only)]


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
    """`x` as a finite float, or None: missing, non-numeric, NaN / inf, and booleans (`mIoU: true` is not 1.0)."""
    if isinstance(x, bool):
        return None
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
    """The trial's recorded stage, else the stage whose `markers` its config or metrics carry (later stages
    first: a segmentation config may name the method of the pretraining it used), else UNKNOWN."""
    stage = metrics.get("stage") or config.get("stage")
    if stage in stages():
        return stage
    for spec in sorted(stages().values(), key=lambda s: -s.order):
        if any(k in config or k in metrics for k in spec.markers):
            return spec.name
    return UNKNOWN


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
    single_run = summary is None and not trial_dirs and (
        (root / "metrics.json").is_file() or (root / "config.json").is_file())
    if summary is None and not trial_dirs and not single_run:
        raise TwinsegError(
            f"{root} is not a results folder (no summary.json, no trials/<id>/ folders, no metrics.json or "
            "config.json of a single run); pass the folder written by experiments/grid.py "
            "(results/<grid>-<timestamp>/) or by experiments/pretrain.py / segment.py"
        )
    if single_run:  # a run folder of experiments/pretrain.py / segment.py: a one-trial report
        t = _scan_trial(root, notes)
        notes.append(f"{root.name} is a single run folder (no grid): one trial")
        res = Results(root=root, grid=root.name, created="", trials=[t], notes=notes, has_summary=False)
        link_trials(res)
        assign_variants(res)
        return res

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
                stage=str(entry.get("stage") or UNKNOWN),
                status=status if status in STATUSES else status,
                reason=str(entry.get("reason") or ""),
                depends_on=_as_list(entry.get("depends_on")),
                config=dict(entry.get("config") or {}),
                metrics=dict(entry.get("metrics") or {}),
                dir=_resolve_dir(root, tid, entry.get("dir")),
                labels=dict(entry.get("labels") or {}) if isinstance(entry.get("labels"), dict) else {},
            )
            _load_trial_files(t, notes)
            if t.status == "done" and not t.metrics:
                t.status, t.reason = "incomplete", t.reason or "no metrics.json"
            if t.stage not in stages():
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
    assign_variants(res)
    return res


def _scan_trial(d: Path, notes: list[str]) -> Trial:
    t = Trial(id=d.name, stage=UNKNOWN, status="done", dir=d)
    _load_trial_files(t, notes)
    if not t.metrics:
        t.status = "incomplete"
        t.reason = t.reason or "no metrics.json (not finished, killed, or failed)"
    t.stage = _infer_stage(t.config, t.metrics)
    return t


def stage_of(t: Trial) -> "StageSpec | None":
    """The StageSpec of a trial (None for UNKNOWN)."""
    return stages().get(t.stage)


def variant_stage() -> StageSpec:
    """The stage whose trials define the pretraining variants (stage 1: the one depending on no other)."""
    return next(s for s in stages().values() if s.depends_on_stage is None)


def _sources(res: Results, t: Trial) -> "dict[str, Trial] | None":
    """The trials of the stage `t`'s stage starts from (by id); None when it depends on no stage."""
    spec = stage_of(t)
    if spec is None or spec.depends_on_stage is None:
        return None
    return {p.id: p for p in res.trials if p.stage == spec.depends_on_stage}


def link_trials(res: Results) -> None:
    """Find, for each trial of a dependent stage (segmentation), the trial whose checkpoint it used."""
    for t in res.trials:
        pre = _sources(res, t)
        if pre is None:
            continue
        src_id = t.labels.get("from")
        if isinstance(src_id, str) and src_id in pre:  # the grid's record of the stage-1 trial it consumed
            t.pretrain_id = src_id
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


# ----------------------------------------------------------------------------- variants
def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt_value(v: Any) -> str:
    """An axis value for display: numbers as %g, anything else as text."""
    if _is_number(v):
        f = _finite(v)
        return f"{f:g}" if f is not None else str(v)
    return str(v)


def _sortable(v: Any) -> tuple:
    return (0, float(v), "") if _is_number(v) and _finite(v) is not None else (1, 0.0, str(v))


def axis_header(name: str) -> str:
    return AXIS_SYMBOLS.get(name, name)


class Variant(Mapping):
    """A pretraining variant: the stage-1 axis values of a trial (its labels minus the seed; axes
    that are null, i.e. do not apply to its method, are left out), in the results' order, plus the
    method's display name. Two trials are the same variant when their axis values are equal."""

    __slots__ = ("_items", "_key", "method_label")

    def __init__(self, axes: Mapping[str, Any], method_label: str = ""):
        items = tuple((str(k), _freeze(v)) for k, v in axes.items() if v is not None and k != SEED)
        self._items = items
        self._key = frozenset(items)
        self.method_label = str(method_label or dict(items).get(METHOD) or "?")

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self):
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Variant) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Variant({dict(self._items)!r}, method_label={self.method_label!r})"

    @property
    def method(self) -> str:
        return str(self.get(METHOD, "?"))

    @property
    def backbone(self) -> str:
        return str(self.get(BACKBONE, "?"))

    @property
    def source(self) -> str:
        return str(self.get(SOURCE, "?"))

    def extra(self) -> list[tuple[str, Any]]:
        """The axes beyond method / backbone / source (e.g. a method's own option), in order."""
        return [(k, v) for k, v in self._items if k not in (METHOD, BACKBONE, SOURCE)]

    def without(self, *names: str) -> "Variant":
        return Variant({k: v for k, v in self._items if k not in names}, self.method_label)

    @property
    def label(self) -> str:
        s = f"{self.method_label} {self.backbone} init={self.source}"
        for k, v in self.extra():
            s += f" {axis_header(k)}={fmt_value(v)}"
        return s

    def sort_key(self, method_rank: Optional[Mapping[str, int]] = None) -> tuple:
        rank = (method_rank or {}).get(self.method, len(method_rank or {}))
        return (self.backbone, self.source, rank, self.method,
                tuple(sorted((k, _sortable(v)) for k, v in self.extra())))


def _stage1_labels(labels: dict) -> dict:
    return {k: v for k, v in labels.items() if k not in SEGMENT_LABELS and k != SEED}


def _fallback_axes(t: Trial, legacy_axes: Mapping[str, set]) -> dict:
    """Stage-1 axis values of a pretraining trial without summary labels (scanned or older folders):
    method / backbone / source from metrics or config; a method option (LEGACY_AXES) from metrics,
    else the config section of the trial's method, else the old flat config field, when not null."""
    method = t.get(METHOD)
    axes = {METHOD: method, BACKBONE: t.get(BACKBONE), SOURCE: t.get(SOURCE)}
    section = t.config.get(str(method)) if method is not None else None
    new_format = "method_label" in t.metrics or isinstance(section, dict)
    for name in LEGACY_AXES:
        v = t.metrics.get(name)
        if v is None and isinstance(section, dict):
            v = section.get(name)
        if v is None and not new_format:
            v = t.config.get(name)
        # old folders wrote the flat option for every method: keep it only for the methods whose runs
        # show they used it (LEGACY_AXES)
        if v is not None and not new_format and str(method) not in legacy_axes.get(name, set()):
            v = None
        axes[name] = v
    return axes


def method_labels(res: Results) -> dict[str, str]:
    """method name -> display name, from the metrics.json of the trials that wrote one."""
    out: dict[str, str] = {}
    for t in res.trials:
        m, lab = t.get(METHOD), t.metrics.get("method_label")
        if m is not None and lab and str(m) not in out:
            out[str(m)] = str(lab)
    return out


def method_order(res: Results) -> dict[str, int]:
    """method name -> rank, in the order the results list the methods' trials (the grid's order)."""
    out: dict[str, int] = {}
    for t in res.trials:
        if t.variant is not None and t.variant.method not in out:
            out[t.variant.method] = len(out)
    return out


def assign_variants(res: Results) -> None:
    """Set `variant` of every pretraining trial (and of each segmentation trial: the variant it used)."""
    legacy: dict[str, set] = {}
    first = variant_stage().name
    for t in res.trials:
        if t.stage == first and not t.labels:
            for name, evidence in LEGACY_AXES.items():
                if t.metrics.get(evidence) is not None:
                    legacy.setdefault(name, set()).add(str(t.get(METHOD)))
    labels = method_labels(res)
    for t in res.trials:
        if t.stage != first:
            continue
        axes = _stage1_labels(t.labels) if t.labels else _fallback_axes(t, legacy)
        m = axes.get(METHOD)
        t.variant = Variant(axes, t.metrics.get("method_label") or labels.get(str(m), ""))
    for t in res.trials:
        pre = _sources(res, t)
        if pre is None:
            continue
        p = pre.get(t.pretrain_id) if t.pretrain_id else None
        if p is not None:
            t.variant = p.variant
        else:
            axes = _stage1_labels(t.labels)
            if axes.get(METHOD) is not None:  # consumed a stage-1 trial this folder does not hold
                t.variant = Variant(axes, labels.get(str(axes[METHOD]), ""))


def pretrain_variant(t: Trial) -> Variant:
    """The variant of a pretraining trial (set by load_results; computed alone otherwise)."""
    if t.variant is None:
        axes = _stage1_labels(t.labels) if t.labels else _fallback_axes(t, {})
        t.variant = Variant(axes, str(t.metrics.get("method_label") or ""))
    return t.variant


def segment_variant(t: Trial, pre: Optional[dict[str, Trial]] = None) -> str:
    """Label of the pretraining a segment trial used (its stage-1 variant, or its weight source)."""
    if t.variant is not None:
        return t.variant.label
    p = (pre or {}).get(t.pretrain_id) if t.pretrain_id else None
    if p is not None:
        return pretrain_variant(p).label
    src = str(t.get("source", "?"))
    if src.startswith("checkpoint:"):
        src = "checkpoint " + Path(src[len("checkpoint:"):]).parent.name
    return f"{t.get('backbone', '?')} weights={src}"


def finite(x: Any) -> Optional[float]:
    return _finite(x)
