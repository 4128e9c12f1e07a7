"""The expanded grid: `GridSpec` (settings + trials), `TrialSpec` (one run folder) and `Problem` (one
reason the grid cannot run as written, printed as one line). No Ray, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

from core.stages import stages


TRIALS_DIR = "trials"
"""The trials' folder inside a results folder: `<results>/trials/<id>/` is a trial's run folder."""
CHECKPOINT = "checkpoint:"


def dependency_source(dep_id: str, artifact: str) -> str:
    """The `source` of a trial that starts from its dependency's artifact: `checkpoint:trials/<dep>/<artifact>`,
    RELATIVE to the results folder, so that a copied or moved results folder names the same files (it is
    made absolute when the trial runs: `resolved_config`)."""
    return f"{CHECKPOINT}{TRIALS_DIR}/{dep_id}/{artifact}"


def source_dependency(source) -> Optional[tuple[str, str]]:
    """(dependency id, its file) of a source made by `dependency_source`, else None (a source the grid file
    gives is absolute once read: experiments/engine/gridfile.py `absolute_sources`)."""
    if not isinstance(source, str) or not source.startswith(CHECKPOINT):
        return None
    parts = PurePosixPath(source[len(CHECKPOINT):]).parts
    if len(parts) != 3 or parts[0] != TRIALS_DIR or ".." in parts:
        return None
    return parts[1], parts[2]


def resolved_config(config: dict, results_root) -> dict:
    """The trial's `config` with a dependency's source made absolute under `results_root` (the folder that
    holds `trials/`: the results folder, or an object store's node-local scratch root)."""
    dep = source_dependency(config.get("source"))
    if dep is None:
        return config
    return {**config, "source": f"{CHECKPOINT}{(Path(results_root) / TRIALS_DIR / dep[0] / dep[1]).as_posix()}"}


@dataclass
class TrialSpec:
    """One trial of the grid (a run folder under trials/<id>/)."""

    id: str
    stage: str  # "pretrain" | "segment"
    config: dict  # the validated config (to_dict); source of a segment trial = checkpoint:trials/<dep>/backbone.pt
    depends_on: list[str] = field(default_factory=list)
    resources: dict = field(default_factory=dict)  # {"cpu", "gpu"} (+ "workers": N, resources per worker, when devices > 1)
    labels: dict = field(default_factory=dict)  # axis values (pretrain) / evaluation + from (segment)


@dataclass
class GridSpec:
    name: str
    path: Path
    raw: dict  # the parsed (and CLI-overridden) YAML document
    wandb: str
    max_concurrent: int
    retries: int
    max_trials: int
    trials: list[TrialSpec]
    problems: list["Problem"] = field(default_factory=list)  # per-trial problems (build_grid(collect=True))
    left_out: list[str] = field(default_factory=list)  # ids of trials not scheduled: their pair has no weights

    def by_id(self) -> dict[str, TrialSpec]:
        return {t.id: t for t in self.trials}

    def dependants(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {t.id: [] for t in self.trials}
        for t in self.trials:
            for d in t.depends_on:
                out[d].append(t.id)
        return out

    def stage(self, stage: str) -> list[TrialSpec]:
        return [t for t in self.trials if t.stage == stage]


@dataclass
class Problem:
    """One reason the grid cannot run as written, printed as ONE line:
    `<file>: <where> (<trials>): <what>` where `what` is `<problem>; <fix>`."""

    fname: str
    where: str  # key path (or another short locator, e.g. `source=dino backbone=resnet50`)
    what: str  # "<problem>; <fix>"
    trials: list[str] = field(default_factory=list)  # ids of the trials concerned (may be empty)
    note: str = ""  # more about the trials concerned (e.g. how many trials depend on them)

    @property
    def line(self) -> str:
        who = _trial_list(self.trials)
        if self.note:
            who = f"{who}; {self.note}" if who else self.note
        loc = f"{self.where} ({who})" if who and self.where else (self.where or (f"({who})" if who else ""))
        return f"{self.fname}: {loc}: {self.what}" if loc else f"{self.fname}: {self.what}"


def _trial_list(ids: list[str], shown: int = 2) -> str:
    if not ids:
        return ""
    if len(ids) == 1:
        return f"trial {ids[0]}"
    more = f", +{len(ids) - shown} more" if len(ids) > shown else ""
    return f"{len(ids)} trials: {', '.join(ids[:shown])}{more}"


def describe(spec: GridSpec) -> str:
    """`grid <name> (<file>): <n> pretraining + <m> segmentation trials` (one count per stage, in order)."""
    counts = " + ".join(f"{len(spec.stage(s.name))} {s.label.lower()}" for s in stages().values())
    return f"grid {spec.name} ({spec.path.name}): {counts} trials"
