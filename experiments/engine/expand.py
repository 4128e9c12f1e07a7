"""A parsed grid document -> `GridSpec`: the top-level keys validated, stage 1 and stage 2 expanded
(stage1.py, stage2.py), the (source, backbone) pairs without weights reported once each, ids checked
unique. `load_grid` reads the file first (gridfile.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from core.config import WANDB_MODES, DataConfig
from core.errors import ConfigError
from experiments.engine.gridfile import DEFAULT_MAX_TRIALS, TOP_KEYS, absolute_sources, apply_overrides, read_yaml
from experiments.engine.spec import GridSpec
from experiments.engine.stage1 import expand_stage1
from experiments.engine.stage2 import expand_stage2
from experiments.engine.validate import Ctx, ModelChecks, locate, origins_for, short, weights_refusal


def load_grid(path: Path | str, overrides: Optional[dict] = None, *, check_models: bool = True,
              collect: bool = False) -> GridSpec:
    """Read, validate and expand a grid file. `overrides`: CLI values (`data_root`, `wandb`,
    `max_concurrent`). `collect`: per-trial problems go to `GridSpec.problems` (else the first is raised)."""
    path = Path(path)
    doc = read_yaml(path)
    return build_grid(doc, path, overrides, check_models=check_models, collect=collect)


def build_grid(doc: dict, path: Path, overrides: Optional[dict] = None, *, check_models: bool = True,
               collect: bool = False) -> GridSpec:
    """Validate and expand a parsed grid document (`path`: its file; relative `checkpoint:` sources are
    read against its folder: gridfile.py `absolute_sources`). A malformed file raises one ConfigError line;
    per-trial problems are collected in the result's `problems` when `collect`, else the first one
    is raised (see the module docstring)."""
    path = Path(path)
    c = Ctx(path.name, collect)
    doc = absolute_sources(apply_overrides(doc, overrides), path.expanduser().resolve().parent)
    c.mapping("", doc, TOP_KEYS)

    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise c.err(f"name={short(name)}", "must be a simple name (letters, digits, . _ -); it names results/<name>-<time>/")
    wandb = doc.get("wandb", "offline")
    if wandb not in WANDB_MODES:
        raise c.err(f"wandb={short(wandb)}", f"is not allowed; choose one of: {', '.join(WANDB_MODES)}")
    max_conc = c.number("max_concurrent", doc.get("max_concurrent", 1), minimum=1, integer=True)
    retries = c.number("retries", doc.get("retries", 0), minimum=0, integer=True)
    c.max_trials = int(c.number("max_trials", doc.get("max_trials", DEFAULT_MAX_TRIALS), minimum=1, integer=True))
    data = c.mapping("data", doc.get("data"))
    if data.get("root") is not None and not isinstance(data.get("root"), str):
        raise c.err(f"data.root={short(data.get('root'))}", "must be a folder path (a string) or null for the generated dataset")
    try:
        DataConfig.from_dict(data)
    except ConfigError as e:
        raise c.err("", locate(str(e), origins_for("data", {"data": data})).replace("DataConfig: ", "data: ")) from None

    checks = ModelChecks() if check_models else None
    s1 = doc.get("stage1")
    s2 = doc.get("stage2")
    if s1 is None and s2 is None:
        raise c.err("", "has neither stage1 nor stage2; add at least one (see experiments/grids/smoke.yaml)")
    pre = expand_stage1(c, s1, data, wandb, checks) if s1 is not None else []
    seg = expand_stage2(c, s2, data, wandb, pre, checks) if s2 is not None else []
    for (source, backbone), nw in c.no_weights.items():
        c.left_out += [t.id for t in nw["trials"]] + nw["dependants"]
        blocks = sorted({_axes_block(w) for w in nw["where"]})
        deps = nw["dependants"]
        c.problem(" and ".join(nw["where"]),
                  f"{weights_refusal(source, backbone)}, so these trials would fail every attempt and are not "
                  f"scheduled; remove the pair from {' / '.join(blocks)}, or add {{backbone: {backbone}, "
                  f"source: {source}}} to stage1.exclude",
                  [t.id for t in nw["trials"]],
                  note=f"and {len(deps)} segmentation trial(s) from them" if deps else "")
    trials = pre + seg
    if not trials and not c.problems:
        raise c.err("", "expands to no trial; check stage1.axes and stage2.evaluations")
    seen: set[str] = set()
    for t in trials:
        if t.id in seen:  # only possible through odd names; keep ids unique and stable
            raise c.err("", f"two trials get the same id {t.id}; remove the duplicate axis value or add a tag")
        seen.add(t.id)
    return GridSpec(name=name, path=path, raw=doc, wandb=wandb, max_concurrent=int(max_conc),
                    retries=int(retries), max_trials=c.max_trials, trials=trials, problems=c.problems, left_out=c.left_out)


def _axes_block(where: str) -> str:
    """`stage1.axes[1].source[0]=... x ...` -> `stage1.axes[1]` (the axes block a combination comes from)."""
    m = re.match(r"stage1\.axes(\[\d+\])?", where)
    return m.group(0) if m else "stage1.axes"
