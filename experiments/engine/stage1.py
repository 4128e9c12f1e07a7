"""Stage 1 of a grid file (`stage1:`): the product of the axis lists (or a union of such blocks), minus
`exclude`, with `overrides`, into one pretraining `TrialSpec` per distinct trial id."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Optional

from core.errors import ConfigError
from core.stages import PRETRAIN
from experiments.engine.axes import (axis_labels, axis_names, matches, pretrain_id, stage1_axes,
                                     stage1_axis_fields)
from experiments.engine.spec import TrialSpec
from experiments.engine.validate import (Ctx, ModelChecks, axis_values, check_devices, check_settings_keys, locate, merge,
                                         origins_for, parse_overrides, parse_resources, refusal, short,
                                         trial_resources, weights_refusal)

STAGE1_KEYS = ("resources", "settings", "axes", "exclude", "overrides")


def _axis_blocks(c: Ctx, axes: Any) -> list[tuple[str, dict]]:
    if axes is None:
        raise c.err("stage1.axes", "is missing; list at least backbone and method, e.g. axes: {backbone: [vit_nano_patch8], method: [barlow_twins]}")
    blocks = [("stage1.axes", axes)] if isinstance(axes, dict) else None
    if blocks is None:
        if not isinstance(axes, list) or not axes:
            raise c.err("stage1.axes", "must be a mapping of axis lists, or a non-empty list of such mappings")
        blocks = [(f"stage1.axes[{i}]", b) for i, b in enumerate(axes)]
    out = []
    for p, b in blocks:
        b = c.mapping(p, b, axis_names(), allow_none=False)
        norm = {}
        for k in axis_names():
            if k not in b:
                continue
            norm[k] = axis_values(c, f"{p}.{k}", b[k],
                                  "give at least one value (or remove the axis to use the default)")
        out.append((p, norm))
    return out


def expand_stage1(c: Ctx, s1: Any, data: dict, wandb: str, checks: Optional[ModelChecks]) -> list[TrialSpec]:
    s1 = c.mapping("stage1", s1, STAGE1_KEYS, allow_none=False)
    res = parse_resources(c, "stage1.resources", s1.get("resources"))
    settings = c.mapping("stage1.settings", s1.get("settings"))
    from core.config import PretrainConfig

    axes = stage1_axes()
    own = stage1_axis_fields() | {"wandb"}
    check_settings_keys(c, "stage1.settings", settings, PretrainConfig, own)
    check_devices(c, "stage1", settings, res, "stage1.resources")
    overrides = parse_overrides(c, "stage1.overrides", s1.get("overrides"), tuple(axes), PretrainConfig, own)
    excl = s1.get("exclude")
    if excl is not None and not isinstance(excl, list):
        raise c.err("stage1.exclude", "must be a list of matches, e.g. [{backbone: resnet_tiny, method: dino}]")
    excludes = [(c.mapping(f"stage1.exclude[{i}]", e, tuple(axes), allow_none=False), i) for i, e in enumerate(excl or [])]
    defaults = PretrainConfig().to_dict()
    base = merge({"data": copy.deepcopy(data)}, settings)

    trials: list[TrialSpec] = []
    ids: set[str] = set()
    used_excl: set[int] = set()
    blocks = _axis_blocks(c, s1.get("axes"))
    bound = sum(math.prod(len(v) for v in block.values()) for _, block in blocks)
    if bound > c.max_trials:  # counted before any config is built (an upper bound: exclude may drop some)
        raise c.too_many(bound, "stage1.axes expand to" + (" up to" if excludes else ""))
    for bpath, block in blocks:
        names = list(block)
        for combo in itertools.product(*(list(enumerate(block[k])) for k in names)):
            labels = {k: ax.get(defaults) for k, ax in axes.items()}
            idx = {}
            for k, (j, v) in zip(names, combo):
                labels[k] = v
                idx[k] = j
            hit = [i for e, i in excludes if matches(e, labels)]
            if hit:
                used_excl.update(hit)
                continue
            cfg, origins = _pretrain_config(c, base, settings, data, overrides, labels, idx, bpath, wandb)
            norm_labels = axis_labels(cfg.to_dict())
            tid = pretrain_id(norm_labels)
            if tid in ids:  # e.g. DINO across lambdas: lambd does not apply, one trial
                continue
            ids.add(tid)
            trial_res = trial_resources(c, res, "stage1.resources", cfg.devices, origins, cfg.device)
            trial = TrialSpec(id=tid, stage=PRETRAIN.name, config=cfg.to_dict(), resources=trial_res,
                              labels=norm_labels)
            if weights_refusal(cfg.source, cfg.backbone) is not None:
                _leave_out(c, trial, cfg, origins)  # never part of the grid (see gridfile.py's docstring)
                continue
            err = refusal(checks.input_size, cfg.backbone, cfg.data.image_size) if checks is not None else None
            if err is not None:
                where = origins.get("data.image_size", "data.image_size (default)")
                c.problem(f"{where}={cfg.data.image_size}", f"does not fit backbone {cfg.backbone}: {err}", tid)
            trials.append(trial)
    for e, i in excludes:
        if i not in used_excl:
            raise c.err(f"stage1.exclude[{i}]={short(e)}", "matches no stage-1 combination; fix or remove it")
    if not trials and not c.no_weights:
        raise c.err("stage1", "expands to no trial (every combination excluded); check stage1.axes and stage1.exclude")
    return trials


def _pretrain_config(c: Ctx, base: dict, settings: dict, data: dict, overrides: list, labels: dict, idx: dict,
                     bpath: str, wandb: str):
    """(PretrainConfig, origins) of one axis combination: settings, matching overrides, then the axis values
    (another method's axes keep their defaults); `origins`: config field -> the grid file's key path."""
    from core.config import PretrainConfig

    d = copy.deepcopy(base)
    origins = origins_for("stage1.settings", settings)
    origins.update({f"data.{k}": f"data.{k}" for k in data if f"data.{k}" not in origins})
    for match, st, oi in overrides:
        if matches(match, labels):
            d = merge(d, st)
            origins.update(origins_for(f"stage1.overrides[{oi}].set", st))
    for k, ax in stage1_axes().items():
        if not ax.applies(labels["method"]):
            continue  # another method's option: its default stays (and the id ignores it)
        ax.set(d, labels[k])
        key = ".".join(ax.path)
        origins[key] = f"{bpath}.{k}[{idx[k]}]" if k in idx else f"stage1 default {k}"
    d["wandb"] = wandb
    try:
        return PretrainConfig.from_dict(d), origins
    except ConfigError as e:
        raise c.err("", locate(str(e), origins)) from None


def _leave_out(c: Ctx, trial: TrialSpec, cfg, origins: dict) -> None:
    """Record a trial whose (source, backbone) pair has no weights: reported once per pair by build_grid."""
    nw = c.no_weights.setdefault((cfg.source, cfg.backbone), {"where": [], "trials": [], "dependants": []})
    loc = (f"{origins.get('source', 'stage1 default source')}={cfg.source!r} x "
           f"{origins.get('backbone', 'stage1 default backbone')}={cfg.backbone!r}")
    if loc not in nw["where"]:
        nw["where"].append(loc)
    nw["trials"].append(trial)
