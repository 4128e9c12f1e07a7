"""Stage 2 of a grid file (`stage2:`): one segmentation `TrialSpec` per (dataset, evaluation entry, stage-1
trial its `from` selects), or per (dataset, combination of its `axes`) for a standalone `from: none` entry.

The dataset is a stage-2 axis: `stage2.datasets` maps each segmentation dataset (core.config SEG_DATASETS)
to its own SegmentConfig settings (its recipe, and a `data:` section: root, coco_labels, ...); without the
block there is one dataset, the grid's `data.dataset`. An entry runs on every dataset unless it lists
`datasets: [...]`. The grid's default dataset (`data.dataset`, voc unless set) is not part of a trial's id;
another one is (`seg-E2-coco_stuff-from-pt-...`), so a grid without other datasets keeps its ids. Every
segmentation trial's labels carry `dataset` (and `tag` when its entry has one), as its metrics.json does."""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.config import SEG_DATASETS, SegmentConfig
from core.errors import ConfigError, TwinsegError
from core.stages import SEGMENT, get_stage
from experiments.engine.axes import axis_names, fmt_num, matches, safe_name, source_tag, stage2_match_keys
from experiments.engine.spec import TrialSpec, dependency_source
from experiments.engine.validate import (Ctx, ModelChecks, axis_values, check_devices, check_settings_keys, locate, merge,
                                         origins_for, parse_overrides, parse_resources, refusal, short,
                                         trial_resources, weights_refusal)

STAGE2_KEYS = ("resources", "settings", "datasets", "overrides", "evaluations")


ENTRY_KEYS = ("evaluation", "from", "axes", "datasets", "settings", "tag")


STAGE2_OWN_FIELDS = {"evaluation"}


STANDALONE_AXES = ("backbone", "source", "seed")
"""The axes of a `from: none` entry (`axes: {backbone: [...], source: [...], seed: [...]}`): the fields a
stage-1 trial would otherwise give; the product of their lists, one standalone trial each."""


@dataclass
class _Dataset:
    """One value of the dataset axis: its name, its settings (a `data:` section included) and their key path."""

    name: str
    settings: dict
    path: str
    data: dict  # the grid's `data` as this dataset starts from it (another dataset does not inherit data.root)
    default: bool  # the grid's default dataset (no token in trial ids)


@dataclass
class _Entry:
    """One validated `stage2.evaluations` entry."""

    index: int
    path: str
    evaluation: str
    label: str  # `E2`, or `E2-<tag>`
    tag: Optional[str]
    settings: dict
    src: Any  # the `from` value
    datasets: list[str]
    axes: dict = field(default_factory=dict)  # a standalone entry's axes: name -> values

    @property
    def standalone(self) -> bool:
        return self.src is None or (isinstance(self.src, str) and self.src.lower() == "none")

    def combinations(self) -> list[dict]:
        """A standalone entry's axis values, one {name: (index, value)} per trial ([{}] without axes)."""
        names = list(self.axes)
        return [dict(zip(names, combo)) for combo in itertools.product(*(list(enumerate(self.axes[k])) for k in names))]


def _evaluations():
    try:
        from core.evaluations import EVALUATIONS, apply_evaluation
    except ImportError as e:  # pragma: no cover - the module is part of core
        raise TwinsegError(f"core.evaluations is not importable ({e}); the install is incomplete") from None
    return EVALUATIONS, apply_evaluation


def segment_id(label: str, dataset: str, default_dataset: str, rest: str) -> str:
    """`seg-<label>[-<dataset>]-<rest>`: the dataset only when it is not the grid's default one."""
    ds = [] if dataset == default_dataset else [safe_name(dataset)]
    return "-".join(["seg", label, *ds, rest])


def expand_stage2(c: Ctx, s2: Any, data: dict, wandb: str, pre: list[TrialSpec],
                  checks: Optional[ModelChecks]) -> list[TrialSpec]:
    EVALUATIONS, apply_evaluation = _evaluations()
    s2 = c.mapping("stage2", s2, STAGE2_KEYS, allow_none=False)
    res = parse_resources(c, "stage2.resources", s2.get("resources"))
    settings = c.mapping("stage2.settings", s2.get("settings"))
    own = STAGE2_OWN_FIELDS | {"wandb"}
    check_settings_keys(c, "stage2.settings", settings, SegmentConfig, own)
    check_devices(c, "stage2", settings, res, "stage2.resources")
    datasets, default_ds = _parse_datasets(c, s2, data, settings, res, own)
    overrides = parse_overrides(c, "stage2.overrides", s2.get("overrides"), stage2_match_keys(), SegmentConfig, own)
    raw_entries = s2.get("evaluations")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise c.err("stage2.evaluations", "must be a non-empty list, e.g. [{evaluation: E2, from: {method: barlow_twins}}]")
    entries = [_parse_entry(c, i, ent, EVALUATIONS, datasets, res, own) for i, ent in enumerate(raw_entries)]
    work = [(ds, e) for ds in datasets.values() for e in entries if ds.name in e.datasets]
    counts = [_entry_count(e, pre, EVALUATIONS) for _, e in work]

    trials: list[TrialSpec] = []
    for k, (ds, e) in enumerate(work):
        if len(pre) + len(trials) + counts[k] > c.max_trials:
            n = len(pre) + len(trials) + sum(counts[k:])
            raise c.too_many(n, f"stage1 ({len(pre)}) + stage2 ({n - len(pre)}) expand to")
        if e.standalone:
            deps: Optional[list] = [None]
        else:
            deps = _select_deps(c, e, ds.name, default_ds, pre, EVALUATIONS)
        if deps is None:
            continue
        for dep in deps:
            for combo in ([{}] if dep is not None else e.combinations()):
                t = _segment_trial(c, e, ds, default_ds, dep, combo, settings, overrides, wandb, apply_evaluation,
                                   res, checks)
                if t is not None:
                    trials.append(t)
    return trials


def _parse_datasets(c: Ctx, s2: dict, data: dict, settings: dict, res: dict, own: set) -> tuple[dict, str]:
    """The dataset axis ({name: _Dataset}, in the file's order) and the grid's default dataset (no id token)."""
    default = str((settings.get("data") or {}).get("dataset") or data.get("dataset") or "voc")
    if "datasets" not in s2:
        return {default: _Dataset(default, {}, "stage2", copy.deepcopy(data), True)}, default
    block = c.mapping("stage2.datasets", s2.get("datasets"), SEG_DATASETS, allow_none=False)
    if not block:
        raise c.err("stage2.datasets", f"is empty; map at least one of {', '.join(SEG_DATASETS)} to its settings "
                    "(e.g. voc: {train_split: trainaug}) or remove the block")
    if "dataset" in (settings.get("data") or {}):
        raise c.err("stage2.settings.data.dataset", "is set by the keys of stage2.datasets; remove it (or the block)")
    out = {}
    for name, st in block.items():
        p = f"stage2.datasets.{name}"
        st = c.mapping(p, st)
        if "dataset" in (st.get("data") or {}):
            raise c.err(f"{p}.data.dataset", f"is the block's key ({name}); remove it")
        check_settings_keys(c, p, st, SegmentConfig, own)
        check_devices(c, p, st, res, "stage2.resources")
        base = copy.deepcopy(data)
        if name != default:  # another dataset's folder is its own (none: the generated one)
            base.pop("root", None)
            base["dataset"] = name
        out[name] = _Dataset(name, st, p, base, name == default)
    return out, default


def _parse_entry(c: Ctx, i: int, ent: Any, evaluations: dict, datasets: dict, res: dict, own: set) -> _Entry:
    p = f"stage2.evaluations[{i}]"
    ent = c.mapping(p, ent, ENTRY_KEYS, allow_none=False)
    ev = ent.get("evaluation")
    if ev not in evaluations:
        raise c.err(f"{p}.evaluation={short(ev)}", f"is not a preset; choose one of: {', '.join(evaluations)}")
    tag = ent.get("tag")
    if tag is not None and (not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z0-9._]+", tag)):
        raise c.err(f"{p}.tag={short(tag)}", "must be a short name (letters, digits, . _)")
    esettings = c.mapping(f"{p}.settings", ent.get("settings"))
    check_settings_keys(c, f"{p}.settings", esettings, SegmentConfig, own)
    check_devices(c, p, esettings, res, "stage2.resources")
    if "dataset" in (esettings.get("data") or {}):
        raise c.err(f"{p}.settings.data.dataset", "is the dataset axis; list the entry's datasets in "
                    f"{p}.datasets instead (declared in stage2.datasets: {', '.join(datasets)})")
    if "from" not in ent:
        raise c.err(f"{p}.from", "is missing; give the stage-1 trials it consumes, e.g. from: {backbone: vit_nano_patch8}, or from: none")
    e = _Entry(i, p, ev, f"{ev}-{tag}" if tag else ev, tag, esettings, ent.get("from"),
               _entry_datasets(c, p, ent, datasets))
    if "axes" in ent:
        if not e.standalone:
            raise c.err(f"{p}.axes", "applies to from: none only (a from match takes backbone, source and seed from "
                        "the stage-1 trials it selects); remove it or write from: none")
        e.axes = _standalone_axes(c, p, ent.get("axes"), esettings)
    return e


def _entry_datasets(c: Ctx, p: str, ent: dict, datasets: dict) -> list[str]:
    if "datasets" not in ent:
        return list(datasets)
    v = ent.get("datasets")
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise c.err(f"{p}.datasets", f"is an empty list; name at least one of {', '.join(datasets)} (or remove it: "
                    "every dataset)")
    for j, d in enumerate(vals):
        if d not in datasets:
            declared = "data.dataset" if any(x.path == "stage2" for x in datasets.values()) else "stage2.datasets"
            raise c.err(f"{p}.datasets[{j}]={short(d)}", f"is not a dataset of this grid; choose one of: "
                        f"{', '.join(datasets)} (declared in {declared})")
    if len(set(vals)) != len(vals):
        raise c.err(f"{p}.datasets={short(vals)}", "lists a dataset twice; remove the duplicate")
    return [d for d in datasets if d in vals]


def _standalone_axes(c: Ctx, p: str, v: Any, esettings: dict) -> dict:
    axes = c.mapping(f"{p}.axes", v, STANDALONE_AXES, allow_none=False)
    out = {}
    for k in STANDALONE_AXES:
        if k not in axes:
            continue
        if k in esettings:
            raise c.err(f"{p}.settings.{k}", f"is also given by {p}.axes.{k}; keep one of them")
        out[k] = axis_values(c, f"{p}.axes.{k}", axes[k], "give at least one value (or remove it)")
    return out


def _select_deps(c: Ctx, e: _Entry, dataset: str, default_ds: str, pre: list[TrialSpec],
                 evaluations: dict) -> Optional[list[Optional[TrialSpec]]]:
    """The stage-1 trials an entry's `from` selects, or None when every one of them is left out for want of
    weights (their dependants are counted in the pair's problem instead)."""
    match = dict(c.mapping(f"{e.path}.from", e.src, axis_names(), allow_none=False))
    if not match:
        raise c.err(f"{e.path}.from", "is empty; name at least one stage-1 axis (e.g. backbone) or write from: none")
    match.setdefault("method", evaluations[e.evaluation].get("pretrain_method"))
    deps: list[Optional[TrialSpec]] = [t for t in pre if matches(match, t.labels)]
    # stage-1 trials left out for want of weights: their dependants are counted, not created
    lost = [(pair, t) for pair, nw in c.no_weights.items() for t in nw["trials"] if matches(match, t.labels)]
    for pair, t in lost:
        c.no_weights[pair]["dependants"].append(segment_id(e.label, dataset, default_ds, f"from-{t.id}"))
    if not deps and lost:
        return None
    if not deps:
        have = {k: sorted({str(t.labels[k]) for t in pre}) for k in axis_names()}
        avail = "; ".join(f"{k} in [{', '.join(have[k])}]" for k in match)
        raise c.err(f"{e.path}.from={short(match, 120)}", f"selects no stage-1 trial (stage-1 has {avail or 'no trial'}); "
                    "fix the match or the stage-1 axes")
    return deps


def _segment_trial(c: Ctx, e: _Entry, ds: _Dataset, default_ds: str, dep: Optional[TrialSpec], combo: dict,
                   settings: dict, overrides: list, wandb: str, apply_evaluation, res: dict,
                   checks: Optional[ModelChecks]) -> Optional[TrialSpec]:
    """One segmentation trial, or None when its (source, backbone) pair has no weights (a problem then)."""
    cfg, origins, labels = _segment_config(c, e, ds, dep, combo, settings, overrides, wandb, apply_evaluation)
    if dep is not None:
        rest = f"from-{dep.id}"
    else:
        rest = f"{safe_name(cfg.backbone)}-{source_tag(cfg.source)}-s{fmt_num(cfg.seed)}"
    tid = segment_id(e.label, ds.name, default_ds, rest)
    no_weights = weights_refusal(cfg.source, cfg.backbone)
    if no_weights is not None:  # e.g. from: none with source: dino on a backbone DINO never published
        where = origins.get("source", f"{e.path} source")
        c.left_out.append(tid)
        c.problem(f"{where}={cfg.source!r}",
                  f"{no_weights}, so the trial would fail every attempt and is not scheduled; choose a source "
                  f"that has weights for {cfg.backbone} (or another backbone) or remove the entry", tid)
        return None
    _segment_problems(c, e.path, e.evaluation, cfg, origins, checks, tid)
    labels = {**labels, "from": dep.id if dep else None, "dataset": ds.name}
    if e.tag:
        labels["tag"] = e.tag
    return TrialSpec(id=tid, stage=SEGMENT.name, config=cfg.to_dict(), depends_on=[dep.id] if dep else [],
                     resources=trial_resources(c, res, "stage2.resources", cfg.devices, origins, cfg.device),
                     labels=labels)


def _segment_config(c: Ctx, e: _Entry, ds: _Dataset, dep: Optional[TrialSpec], combo: dict, settings: dict,
                    overrides: list, wandb: str, apply_evaluation):
    """(SegmentConfig, origins, labels) of one segmentation trial: the dataset's data, stage-2 settings, the
    dataset's settings, the entry's settings (and its `axes` values), the stage-1 trial it consumes
    (backbone, seed, source = its artifact, relative to the results folder: spec.py `dependency_source`), matching overrides, then the evaluation preset under every
    explicit value; `origins`: config field -> the grid file's key path."""
    d = merge({"data": copy.deepcopy(ds.data)}, settings)
    origins = origins_for("stage2.settings", settings)
    origins.update({f"data.{k}": f"data.{k}" for k in ds.data if f"data.{k}" not in origins})
    if not ds.default:
        origins["data.dataset"] = ds.path
    d = merge(d, ds.settings)
    origins.update(origins_for(ds.path, ds.settings))
    d = merge(d, e.settings)
    origins.update(origins_for(f"{e.path}.settings", e.settings))
    for k, (j, v) in combo.items():
        d[k] = v
        origins[k] = f"{e.path}.axes.{k}[{j}]"
    labels = {"evaluation": e.evaluation}
    if dep is not None:
        artifact = get_stage(dep.stage).artifact
        labels.update(dep.labels)
        d["backbone"] = dep.config["backbone"]
        d["seed"] = dep.config["seed"]
        d["source"] = dependency_source(dep.id, artifact)
        for k in ("backbone", "seed", "source"):
            origins[k] = f"{e.path}.from (stage-1 trial {dep.id})"
    for match, st, oi in overrides:
        if matches(match, {**labels, "dataset": ds.name, "backbone": d.get("backbone"), "seed": d.get("seed")}):
            d = merge(d, st)
            origins.update(origins_for(f"stage2.overrides[{oi}].set", st))
    d["wandb"] = wandb
    explicit = {k: v for k, v in d.items() if v is not None}
    d = apply_evaluation(d, e.evaluation)
    d.update(explicit)  # explicit values always win over the preset
    d.pop("pretrain_method", None)
    d.pop("description", None)
    for k in d:
        origins.setdefault(k, f"{e.path} (preset {e.evaluation}) {k}")
    try:
        return SegmentConfig.from_dict(d), origins, labels
    except ConfigError as err:
        raise c.err("", locate(str(err), origins)) from None


def _segment_problems(c: Ctx, p: str, ev: str, cfg: SegmentConfig, origins: dict, checks: Optional[ModelChecks],
                      tid: str) -> None:
    """The image size first, located (and merged with stage 1's line) at the size's key path; else whether
    the evaluation's head / fusion fits the backbone."""
    err = refusal(checks.input_size, cfg.backbone, cfg.data.image_size) if checks is not None else None
    if err is not None:
        where = origins.get("data.image_size", "data.image_size (default)")
        c.problem(f"{where}={cfg.data.image_size}", f"does not fit backbone {cfg.backbone}: {err}", tid)
    else:
        err = refusal(checks.segment, cfg) if checks is not None else None
        if err is not None:
            c.problem(p, f"evaluation {ev} on backbone {cfg.backbone}: {err}", tid)


def _entry_count(e: _Entry, pre: list[TrialSpec], evaluations: dict) -> int:
    """Trials an entry makes on one dataset (for max_trials, before any config is built): its standalone
    combinations, or the stage-1 trials its `from` selects (at least 1)."""
    if e.standalone:
        return math.prod(len(v) for v in e.axes.values())
    if not isinstance(e.src, dict):
        return 1
    match = dict(e.src)
    match.setdefault("method", (evaluations.get(e.evaluation) or {}).get("pretrain_method"))
    return max(1, sum(1 for t in pre if matches(match, t.labels)))
