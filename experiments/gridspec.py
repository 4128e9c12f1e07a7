"""Grid files: load, validate and expand a declarative study grid (no Ray here).

A grid file (YAML, no code) describes the whole study; see `experiments/grids/smoke.yaml` for a
commented example. Schema (every key optional unless marked):

    name: smoke                      # results/<name>-<timestamp>/ (default: the file's stem)
    description: "..."
    wandb: offline                   # offline | online | disabled (one wandb run per trial)
    max_concurrent: 2                # trials running at once (>= 1)
    retries: 1                       # Ray Tune max_failures per trial (>= 0; retry resumes last.ckpt);
                                     # crashes only: a TwinsegError (e.g. NonFiniteError) is never retried
    max_trials: 1000                 # refuse a grid expanding to more trials (before anything is written)
    data: {DataConfig fields}        # shared by both stages
    stage1:                          # self-supervised pretraining
      resources: {cpu: 1, gpu: 0}    # per trial; gpu may be a fraction (several trials per GPU)
      settings: {PretrainConfig fields}      # shared; `data:` here merges over the top-level data
                                     # devices: N (> 1): the trial runs as N Ray Train workers
                                     # (Lightning DDP); resources are then PER WORKER (whole GPUs)
                                     # and batch_size is per worker (global batch N x batch_size)
      axes:                          # product of lists; or a LIST of such blocks (union of products)
        backbone: [vit_nano_patch8]
        source: [random]
        lambd: [0.0051]              # a method's own axis (Barlow Twins): ignored (collapsed) for others
        method: [barlow_twins]       # any registered SSL method (core/methods/registry.py)
        seed: [0]
      exclude: [{backbone: resnet_tiny, method: dino}]   # drop matching combinations
      overrides: [{match: {method: dino}, set: {optimizer: adamw}}]   # per-variant settings
    stage2:                          # segmentation, one trial per (evaluation, matched stage-1 trial)
      resources: {cpu: 1, gpu: 0}
      settings: {SegmentConfig fields}
      overrides: [{match: {evaluation: E1}, set: {batch_size: 8}}]  # keys: evaluation + stage-1 axes
      evaluations:
        - evaluation: E1             # preset of core.evaluations (E1..E5)
          from: {backbone: resnet_tiny, method: barlow_twins}  # stage-1 trials it consumes
          settings: {...}            # optional SegmentConfig fields for this entry
          tag: pup                   # optional, disambiguates ids of two entries of one evaluation
        - evaluation: E5
          from: none                 # standalone: no stage-1 dependency (settings give source)

Stage-1 axes are declared once, in `stage1_axes()`: the common ones plus each SSL method's own
(`SSLMethodSpec.axes`, e.g. Barlow Twins' `lambd` -> config `barlow_twins.lambd`); the trial ids,
the labels written to summary.json and the report all derive from that declaration. Method
sections are nested mappings in settings (`dino: {out_dim: 256}`).

A `from` match maps stage-1 axis names to a value or a list of values; it selects EVERY matching
stage-1 trial (one segmentation trial each, which inherits its backbone and seed and consumes its
`backbone.pt`). When `method` is not given it defaults to the preset's `pretrain_method`.

Validation happens before anything starts: every trial's `PretrainConfig` / `SegmentConfig` is
built with `from_dict`; errors are ONE line `<file>: <key path> ...` (ConfigError).

Two kinds of errors:
* a malformed file (YAML syntax, unknown keys, a value a config refuses, an empty match) stops the
  expansion at once: one ConfigError line;
* per-trial problems, independent of one another, are COLLECTED (`build_grid(..., collect=True)` puts
  them in `GridSpec.problems`, one `Problem` each; without `collect` the first one is raised as
  before): an image size a backbone refuses, a head or fusion that does not fit the backbone of a
  segmentation trial (e.g. E3's attention fusion on a CNN), and a (source, backbone) pair that has
  no weights at all (`core.weights.WEIGHT_SPECS`, what `load_source` resolves; e.g. imagenet for
  vit_small_patch8). Identical problems are merged into one line naming the trials concerned:
  `<file>: <key path> (<n> trials: <ids>): <problem>; <fix>`.
  A trial whose (source, backbone) pair has no weights is NOT part of the grid (it could only fail,
  every attempt) and neither are the segmentation trials that would consume it: the problem names
  the pair, the pretraining trials it would create and how many segmentation trials depend on
  them; the fix is to remove the pair from the axes or add a `stage1.exclude` entry. The other
  problem trials stay in `GridSpec.trials` (the plan marks them).
Environment problems (weight files missing offline, data folders, cluster size) are collected by
experiments/grid.py with the same `Problem` lines.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from core.config import WANDB_MODES, DataConfig, SegmentConfig
from core.errors import ConfigError, TwinsegError

GRIDS_DIR = Path(__file__).resolve().parent / "grids"


@dataclass(frozen=True)
class Axis:
    """A stage-1 grid axis: its key in grid files and trial labels, where it lives in PretrainConfig,
    and its token in trial ids. `method`: the axis is that method's own option (None: every method)."""

    name: str
    path: tuple[str, ...]
    token: str = ""
    method: Optional[str] = None

    def applies(self, method: str) -> bool:
        return self.method is None or self.method == method

    def get(self, cfg_dict: dict) -> Any:
        v: Any = cfg_dict
        for k in self.path:
            v = v[k]
        return v

    def set(self, cfg_dict: dict, value: Any) -> None:
        d = cfg_dict
        for k in self.path[:-1]:
            d = d.setdefault(k, {})
        d[self.path[-1]] = value


@functools.lru_cache(maxsize=None)
def stage1_axes() -> dict[str, Axis]:
    """The stage-1 axes, in trial-id order: backbone, source, method, each method's own axes, seed.
    (Built on first use: the method registry imports the methods, and with them Lightning.)"""
    from core.methods.registry import ssl_methods

    axes = [Axis("backbone", ("backbone",)), Axis("source", ("source",)), Axis("method", ("method",))]
    for spec in ssl_methods().values():
        axes += [Axis(f, (spec.name, f), token, spec.name) for f, token in spec.axes.items()]
    axes.append(Axis("seed", ("seed",), "s"))
    return {a.name: a for a in axes}


def method_sections() -> tuple[str, ...]:
    """Config sections of the SSL methods (one per registered method: `barlow_twins`, `dino`, ...)."""
    from core.methods.registry import ssl_methods

    return tuple(ssl_methods())


def axis_names() -> tuple[str, ...]:
    return tuple(stage1_axes())


def stage2_match_keys() -> tuple[str, ...]:
    return ("evaluation",) + axis_names()


def stage1_axis_fields() -> set[str]:
    """Config fields the stage-1 axes set (dotted for a section's field): settings may not set them."""
    return {".".join(a.path) for a in stage1_axes().values()}


TOP_KEYS = ("name", "description", "wandb", "max_concurrent", "retries", "max_trials", "data", "stage1", "stage2")
DEFAULT_MAX_TRIALS = 1000
"""Default `max_trials` (grid key; `--max-trials` overrides): the paper grid has ~160 trials; a typo'd
axis (a 200,000-seed range) is refused with its count instead of writing a 400 MB summary.json."""
STAGE1_KEYS = ("resources", "settings", "axes", "exclude", "overrides")
STAGE2_KEYS = ("resources", "settings", "overrides", "evaluations")
ENTRY_KEYS = ("evaluation", "from", "settings", "tag")
RESOURCE_KEYS = ("cpu", "gpu")
# Fields a grid sets itself (per trial): refusing them in `settings` avoids silent no-ops
# (stage 1: `stage1_axis_fields()`).
STAGE2_OWN_FIELDS = {"evaluation"}


# ----------------------------------------------------------------------------- data types
@dataclass
class TrialSpec:
    """One trial of the grid (a run folder under trials/<id>/)."""

    id: str
    stage: str  # "pretrain" | "segment"
    config: dict  # the validated config (to_dict); source of a segment trial = checkpoint:<dep>/backbone.pt
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


# ----------------------------------------------------------------------------- resolution
def list_grids() -> list[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def resolve_grid(arg: Optional[str]) -> Path:
    """`smoke` / `paper` -> experiments/grids/NAME.yaml; anything path-like -> that file."""
    arg = "smoke" if arg in (None, "") else str(arg)
    looks_like_path = ("/" in arg) or ("\\" in arg) or arg.endswith((".yaml", ".yml")) or Path(arg).is_file()
    if looks_like_path:
        p = Path(arg).expanduser()
        if not p.is_file():
            raise ConfigError(
                f"--grid {arg}: no such grid file; pass an existing YAML file or one of: {', '.join(list_grids())}"
            )
        return p
    p = GRIDS_DIR / f"{arg}.yaml"
    if not p.is_file():
        hint = difflib.get_close_matches(arg, list_grids(), n=1)
        dym = f" (did you mean {hint[0]}?)" if hint else ""
        raise ConfigError(
            f"--grid {arg}: unknown grid{dym}; choose one of: {', '.join(list_grids())}, or pass a YAML file path"
        )
    return p


def read_yaml(path: Path) -> dict:
    fname = Path(path).name
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the grid file ({e.strerror or e}); check the path") from None
    try:
        doc = safe_load_limited(text, fname)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{fname}:{where} is not valid YAML ({problem}); fix the syntax") from None
    if doc is None:
        raise ConfigError(f"{fname}: the grid file is empty; see experiments/grids/smoke.yaml for the format")
    if not isinstance(doc, dict):
        raise ConfigError(f"{fname}: a grid file must be a mapping of keys ({', '.join(TOP_KEYS)}), not a {type(doc).__name__}")
    return doc


MAX_YAML_NODES = 100_000
"""Most values a grid file's aliases (`*name`) may ADD once followed (expanded nodes minus written
nodes): a real grid adds a few hundred at most; a "billion laughs" file (aliases of aliases) would add
billions and exhaust the memory of whatever reads it (the loader below refuses it before building any
Python object). A long written-out list (100,000 seeds) adds nothing: max_trials judges it."""


def _expanded_nodes(root: yaml.Node) -> tuple[int, int]:
    """(nodes `root` stands for once every alias is expanded (shared nodes counted at each use),
    distinct nodes written), in one pass over the composed graph (memoised per node: linear in its
    size; the counts are Python ints, exact however large)."""
    memo: dict[int, int] = {}
    order: list[yaml.Node] = []
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep nesting cannot hit the recursion limit
        node, expanded = stack.pop()
        if id(node) in memo:
            continue
        if expanded or isinstance(node, yaml.ScalarNode):
            memo[id(node)] = 1 + sum(memo[id(c)] for c in _children(node))
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in memo)
    return memo[id(root)], len(memo)


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    return []


def safe_load_limited(text: str, fname: str) -> Any:
    """`yaml.safe_load` that refuses (one ConfigError line) a document expanding to more than
    MAX_YAML_NODES nodes through aliases, before constructing it."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml: 100,000 values in ~2 s, not ~10
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded, written = _expanded_nodes(node)
        if expanded - written > MAX_YAML_NODES:
            raise ConfigError(f"{fname}: the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases "
                              "(*name); a grid file is a few hundred; write the values out or use fewer aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


# ----------------------------------------------------------------------------- problems
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


def weights_refusal(source: str, backbone: str) -> Optional[str]:
    """Why `source` can never initialise `backbone` (no weight file exists for the pair; what
    `core.weights.load_source` would refuse at run time), or None. random / checkpoint:PATH always can."""
    source = str(source)
    if source == "random" or source.startswith("checkpoint:"):
        return None
    from core.weights import WEIGHT_SPECS, available_sources

    if (source, backbone) in WEIGHT_SPECS:
        return None
    return (f"source {source} has no weights for backbone {backbone} (no such weight file exists, sources "
            f"for {backbone}: {', '.join(available_sources(backbone))}, checkpoint:PATH)")


# ----------------------------------------------------------------------------- small checks
class _Ctx:
    """Error helper: every message is `<file>: <key path> <problem>; <fix>`.

    `collect`: per-trial problems go to `problems` (merged by location and message) instead of
    being raised at once."""

    def __init__(self, fname: str, collect: bool = False):
        self.fname = fname
        self.collect = collect
        self.problems: list[Problem] = []
        self._index: dict[tuple[str, str], Problem] = {}
        # (source, backbone) -> {"where": [...], "trials": [TrialSpec], "dependants": [ids]}
        self.no_weights: dict[tuple[str, str], dict] = {}
        self.left_out: list[str] = []  # ids of trials not part of the grid for want of weights
        self.max_trials = DEFAULT_MAX_TRIALS

    def too_many(self, n: int, what: str) -> ConfigError:
        return self.err(f"max_trials={self.max_trials}", f"is exceeded: {what} {n:,} trials; shorten the axes / "
                        "evaluations, or raise max_trials (grid key or --max-trials N) if you mean it")

    def err(self, path: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.fname}: {path} {msg}" if path else f"{self.fname}: {msg}")

    def problem(self, where: str, what: str, trials: Any = (), note: str = "") -> None:
        """A per-trial problem: raised at once (ConfigError) unless collecting; the same
        (where, what) again adds its trials to the first line."""
        trials = [trials] if isinstance(trials, str) else list(trials)
        key = (where, what)
        if key in self._index:
            pr = self._index[key]
            pr.trials += [t for t in trials if t not in pr.trials]
        else:
            pr = Problem(self.fname, where, what, trials, note)
            self._index[key] = pr
            self.problems.append(pr)
        if not self.collect:
            raise ConfigError(pr.line)

    def mapping(self, path: str, v: Any, allowed: Optional[tuple] = None, *, allow_none: bool = True) -> dict:
        if v is None and allow_none:
            return {}
        if not isinstance(v, dict):
            raise self.err(path, f"must be a mapping (key: value), got {_short(v)}")
        if allowed is not None:
            for k in v:
                if k not in allowed:
                    raise self.err(f"{path}.{k}" if path else str(k), f"is not a known key; {_choices(k, allowed)}")
        return v

    def number(self, path: str, v: Any, *, minimum: float = 0.0, strict: bool = False, integer: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            kind = "an integer" if integer else "a number"
            raise self.err(f"{path}={_short(v)}", f"must be {kind}; write e.g. {path.rsplit('.', 1)[-1]}: 1")
        if v != v or v in (float("inf"), float("-inf")):
            raise self.err(f"{path}={v!r}", "must be a finite number")
        if integer and float(v) != int(v):
            raise self.err(f"{path}={v!r}", "must be an integer")
        if (strict and not v > minimum) or (not strict and v < minimum):
            raise self.err(f"{path}={v!r}", f"must be {'>' if strict else '>='} {minimum:g}")
        return int(v) if integer else float(v)


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _choices(k: Any, allowed) -> str:
    hint = difflib.get_close_matches(str(k), [str(a) for a in allowed], n=1)
    dym = f"did you mean {hint[0]}? " if hint else ""
    return f"{dym}allowed: {', '.join(map(str, allowed))}"


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _merge(base: dict, over: dict) -> dict:
    """Settings merge; config sections (`data`, a method's options) merge key by key."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **copy.deepcopy(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


def _same(a: Any, b: Any) -> bool:
    """Axis value equality that treats 0.0051 and '0.0051' and 1 / 1.0 alike."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _same_key(v: Any) -> tuple:
    """A hashable key with `_same(a, b)` <=> `_same_key(a) == _same_key(b)` for single axis values
    (numbers and numeric strings by value, other values by their text)."""
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return ("s", str(v))
    return ("n", f) if f == f else ("s", str(v))


def _matches(match: dict, labels: dict) -> bool:
    for k, want in match.items():
        have = labels.get(k)
        if not any(_same(have, w) for w in _as_list(want)):
            return False
    return True


# ----------------------------------------------------------------------------- ids
def _fmt_num(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else format(f, "g")


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", str(s)).strip("_") or "x"


def _source_tag(source: str) -> str:
    if str(source).startswith("checkpoint:"):
        p = Path(str(source)[len("checkpoint:"):])
        stem = p.parent.name if p.name in ("backbone.pt", "last.ckpt") else p.stem
        digest = hashlib.sha1(str(source).encode()).hexdigest()[:6]
        return f"ckpt_{_safe(stem)[:40]}_{digest}"
    return _safe(source)


def pretrain_id(labels: dict) -> str:
    """`pt-<backbone>-<source>-<method short>[-<method axes>]-s<seed>`, from the axis declarations."""
    from core.methods.registry import get_method

    method = labels["method"]
    parts = ["pt", _safe(labels["backbone"]), _source_tag(labels["source"]), get_method(method).short]
    for ax in stage1_axes().values():
        if ax.method is not None and ax.applies(method):
            parts.append(f"{ax.token}{_fmt_num(labels[ax.name])}")
    parts.append(f"s{_fmt_num(labels['seed'])}")
    return "-".join(parts)


def axis_labels(cfg_dict: dict) -> dict:
    """The stage-1 axis values of a (validated) PretrainConfig dict; None for another method's axes."""
    method = cfg_dict["method"]
    return {name: (ax.get(cfg_dict) if ax.applies(method) else None) for name, ax in stage1_axes().items()}


# ----------------------------------------------------------------------------- config errors -> key paths
_FIELD_RE = re.compile(r"^(?:(?:PretrainConfig|SegmentConfig)\.)?([A-Za-z_][\w.]*)=(.*)$", re.S)


def _locate(msg: str, origins: dict[str, str]) -> str:
    """Rewrite `field=value rest` into `<key path>=value rest` using `origins` (field -> key path)."""
    m = _FIELD_RE.match(msg)
    if not m:
        return msg
    fieldname, rest = m.group(1), m.group(2)
    key = fieldname
    if key.startswith("data.") or key in origins:
        pass
    elif f"data.{key}" in origins:  # DataConfig coercion messages say "DataConfig.image_size="
        key = f"data.{key}"
    path = origins.get(key)
    if path is None:
        return msg
    return f"{path}={rest}"


def _origins_for(prefix: str, d: dict) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):  # a config section
            for dk in v:
                out[f"{k}.{dk}"] = f"{prefix}.{k}.{dk}"
        else:
            out[k] = f"{prefix}.{k}"
    return out


# ----------------------------------------------------------------------------- backbone-level checks (cached)
class _ModelChecks:
    """Checks that need a backbone instance (input size, fusion, head fit); one build per name/size."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], Any] = {}

    def backbone(self, name: str, size: int):
        key = (name, int(size))
        if key not in self._cache:
            from core.models.registry import create_backbone

            self._cache[key] = create_backbone(name, image_size=int(size))
        return self._cache[key]

    def input_size(self, name: str, size: int) -> None:
        self.backbone(name, size).check_input_size(size, size)

    def segment(self, cfg: SegmentConfig) -> None:
        from core.runs.segment import check_fit

        check_fit(cfg, self.backbone(cfg.backbone, cfg.data.image_size))


def _refusal(check, *args) -> Optional[ConfigError]:
    """The ConfigError `check(*args)` raises, or None."""
    try:
        check(*args)
    except ConfigError as e:
        return e
    return None


# ----------------------------------------------------------------------------- loading
def load_grid(path: Path | str, overrides: Optional[dict] = None, *, trials_root: Path | str = "trials",
              check_models: bool = True, collect: bool = False) -> GridSpec:
    """Read, validate and expand a grid file. `overrides`: CLI values (`data_root`, `wandb`,
    `max_concurrent`). `trials_root`: folder of the trial dirs (segment sources point into it).
    `collect`: per-trial problems go to `GridSpec.problems` (else the first is raised)."""
    path = Path(path)
    doc = read_yaml(path)
    return build_grid(doc, path, overrides, trials_root=trials_root, check_models=check_models, collect=collect)


def apply_overrides(doc: dict, overrides: Optional[dict]) -> dict:
    doc = copy.deepcopy(doc)
    ov = overrides or {}
    if ov.get("data_root") is not None:
        data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
        data = dict(data or {})
        data["root"] = str(ov["data_root"])
        doc["data"] = data
    if ov.get("wandb") is not None:
        doc["wandb"] = ov["wandb"]
    if ov.get("max_concurrent") is not None:
        doc["max_concurrent"] = ov["max_concurrent"]
    if ov.get("max_trials") is not None:
        doc["max_trials"] = ov["max_trials"]
    return doc


def build_grid(doc: dict, path: Path, overrides: Optional[dict] = None, *, trials_root: Path | str = "trials",
               check_models: bool = True, collect: bool = False) -> GridSpec:
    """Validate and expand a parsed grid document. A malformed file raises one ConfigError line;
    per-trial problems are collected in the result's `problems` when `collect`, else the first one
    is raised (see the module docstring)."""
    path = Path(path)
    c = _Ctx(path.name, collect)
    doc = apply_overrides(doc, overrides)
    c.mapping("", doc, TOP_KEYS)

    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise c.err(f"name={_short(name)}", "must be a simple name (letters, digits, . _ -); it names results/<name>-<time>/")
    wandb = doc.get("wandb", "offline")
    if wandb not in WANDB_MODES:
        raise c.err(f"wandb={_short(wandb)}", f"is not allowed; choose one of: {', '.join(WANDB_MODES)}")
    max_conc = c.number("max_concurrent", doc.get("max_concurrent", 1), minimum=1, integer=True)
    retries = c.number("retries", doc.get("retries", 0), minimum=0, integer=True)
    c.max_trials = int(c.number("max_trials", doc.get("max_trials", DEFAULT_MAX_TRIALS), minimum=1, integer=True))
    data = c.mapping("data", doc.get("data"))
    if data.get("root") is not None and not isinstance(data.get("root"), str):
        raise c.err(f"data.root={_short(data.get('root'))}", "must be a folder path (a string) or null for the generated dataset")
    try:
        DataConfig.from_dict(data)
    except ConfigError as e:
        raise c.err("", _locate(str(e), _origins_for("data", {"data": data})).replace("DataConfig: ", "data: ")) from None

    checks = _ModelChecks() if check_models else None
    s1 = doc.get("stage1")
    s2 = doc.get("stage2")
    if s1 is None and s2 is None:
        raise c.err("", "has neither stage1 nor stage2; add at least one (see experiments/grids/smoke.yaml)")
    pre = _expand_stage1(c, s1, data, wandb, checks) if s1 is not None else []
    seg = _expand_stage2(c, s2, data, wandb, pre, Path(trials_root), checks) if s2 is not None else []
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


def _resources(c: _Ctx, path: str, v: Any) -> dict:
    r = c.mapping(path, v, RESOURCE_KEYS)
    cpu = c.number(f"{path}.cpu", r.get("cpu", 1), minimum=0, strict=True)
    gpu = c.number(f"{path}.gpu", r.get("gpu", 0), minimum=0)
    if gpu > 1 and not float(gpu).is_integer():
        raise c.err(f"{path}.gpu={gpu!r}", "must be a fraction <= 1 or a whole number of GPUs")
    return {"cpu": cpu, "gpu": gpu}


def _check_devices(c: _Ctx, path: str, settings: dict, res: dict, res_path: str) -> None:
    if "devices" in settings:  # several devices: a Ray Train job of `devices` workers (experiments/ray_ddp.py)
        c.number(f"{path}.settings.devices", settings["devices"], minimum=1, integer=True)
    device = settings.get("device", "auto")
    if device == "cuda" and res["gpu"] == 0:
        raise c.err(f"{path}.settings.device='cuda'", f"needs a GPU but {res_path}.gpu=0; set {res_path}.gpu > 0 or device: auto")


def _trial_resources(c: _Ctx, res: dict, res_path: str, devices: int, origins: dict, device: str = "auto") -> dict:
    """A trial's resources: `res` as is for one device; with devices = N > 1 the trial runs as N
    Ray Train workers (Lightning DDP) and `res` is PER WORKER: {"cpu", "gpu", "workers": N}."""
    out = dict(res)
    n = int(devices)
    if n <= 1:
        return out
    where = f"{origins.get('devices', 'settings.devices')}={n}"
    gpu = res["gpu"]
    if gpu and not float(gpu).is_integer():
        raise c.err(f"{res_path}.gpu={_fmt_num(gpu)}",
                    f"is a fraction of a GPU, but {where} runs the trial as {n} DDP workers (Ray Train) that "
                    f"each need a whole GPU; set {res_path}.gpu: 1 (GPUs per worker) or devices: 1")
    if gpu > 1:
        raise c.err(f"{res_path}.gpu={_fmt_num(gpu)}",
                    f"is per worker with {where} and each DDP worker drives one GPU; set {res_path}.gpu: 1 "
                    f"({n} workers x 1 GPU)")
    if gpu and device == "cpu":
        raise c.err(f"{res_path}.gpu={_fmt_num(gpu)}",
                    f"reserves a GPU per worker but {origins.get('device', 'settings.device')}='cpu' trains the "
                    f"{n} DDP workers on the CPU; set {res_path}.gpu: 0 (CPU workers, gloo) or device: auto")
    out["workers"] = n
    return out


def _check_settings_keys(c: _Ctx, path: str, settings: dict, cls, own: set) -> None:
    names = [f for f in cls.__dataclass_fields__ if f not in own]
    axis_fields = stage1_axis_fields()

    def refuse_own(key: str, where: str) -> ConfigError:
        kind = "an axis" if key in axis_fields else "per entry"
        return c.err(where, f"is set by the grid itself ({kind}); remove it from {path}")

    sections = cls.sections()
    for k in settings:
        if k in own:
            raise refuse_own(k, f"{path}.{k}")
        if k not in names:
            raise c.err(f"{path}.{k}", f"is not a {cls.__name__} field; {_choices(k, sorted(names))}")
        if k in sections:
            sub = c.mapping(f"{path}.{k}", settings[k])
            allowed = sections[k].__dataclass_fields__
            for sk in sub:
                if f"{k}.{sk}" in own:
                    raise refuse_own(f"{k}.{sk}", f"{path}.{k}.{sk}")
                if sk not in allowed:
                    raise c.err(f"{path}.{k}.{sk}", f"is not a {sections[k].__name__} field; {_choices(sk, sorted(allowed))}")


def _overrides(c: _Ctx, path: str, v: Any, match_keys: tuple, cls, own: set) -> list[tuple[dict, dict, int]]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise c.err(path, "must be a list of {match: {...}, set: {...}}")
    out = []
    for i, o in enumerate(v):
        p = f"{path}[{i}]"
        o = c.mapping(p, o, ("match", "set"), allow_none=False)
        match = c.mapping(f"{p}.match", o.get("match"), match_keys)
        st = c.mapping(f"{p}.set", o.get("set"))
        _check_settings_keys(c, f"{p}.set", st, cls, own)
        out.append((match, st, i))
    return out


def _axis_blocks(c: _Ctx, axes: Any) -> list[tuple[str, dict]]:
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
            vals = b[k]
            if not isinstance(vals, list):
                vals = [vals]
            if not vals:
                raise c.err(f"{p}.{k}", "is an empty list; give at least one value (or remove the axis to use the default)")
            seen: set = set()
            for j, v in enumerate(vals):
                if v is None or isinstance(v, (dict, list)):
                    raise c.err(f"{p}.{k}[{j}]={_short(v)}", "must be a single value")
                key = _same_key(v)  # linear: one set lookup per value (100,000 seeds stay instant)
                if key in seen:
                    raise c.err(f"{p}.{k}[{j}]={_short(v)}", "is listed twice; remove the duplicate")
                seen.add(key)
            norm[k] = vals
        out.append((p, norm))
    return out


def _expand_stage1(c: _Ctx, s1: Any, data: dict, wandb: str, checks: Optional[_ModelChecks]) -> list[TrialSpec]:
    s1 = c.mapping("stage1", s1, STAGE1_KEYS, allow_none=False)
    res = _resources(c, "stage1.resources", s1.get("resources"))
    settings = c.mapping("stage1.settings", s1.get("settings"))
    from core.config import PretrainConfig

    axes = stage1_axes()
    own = stage1_axis_fields() | {"wandb"}
    _check_settings_keys(c, "stage1.settings", settings, PretrainConfig, own)
    _check_devices(c, "stage1", settings, res, "stage1.resources")
    overrides = _overrides(c, "stage1.overrides", s1.get("overrides"), tuple(axes), PretrainConfig, own)
    excl = s1.get("exclude")
    if excl is not None and not isinstance(excl, list):
        raise c.err("stage1.exclude", "must be a list of matches, e.g. [{backbone: resnet_tiny, method: dino}]")
    excludes = [(c.mapping(f"stage1.exclude[{i}]", e, tuple(axes), allow_none=False), i) for i, e in enumerate(excl or [])]
    defaults = PretrainConfig().to_dict()
    base = _merge({"data": copy.deepcopy(data)}, settings)

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
            hit = [i for e, i in excludes if _matches(e, labels)]
            if hit:
                used_excl.update(hit)
                continue
            d = copy.deepcopy(base)
            origins = _origins_for("stage1.settings", settings)
            origins.update({f"data.{k}": f"data.{k}" for k in data if f"data.{k}" not in origins})
            for match, st, oi in overrides:
                if _matches(match, labels):
                    d = _merge(d, st)
                    origins.update(_origins_for(f"stage1.overrides[{oi}].set", st))
            for k, ax in axes.items():
                if not ax.applies(labels["method"]):
                    continue  # another method's option: its default stays (and the id ignores it)
                ax.set(d, labels[k])
                key = ".".join(ax.path)
                origins[key] = f"{bpath}.{k}[{idx[k]}]" if k in idx else f"stage1 default {k}"
            d["wandb"] = wandb
            try:
                cfg = PretrainConfig.from_dict(d)
            except ConfigError as e:
                raise c.err("", _locate(str(e), origins)) from None
            norm_labels = axis_labels(cfg.to_dict())
            tid = pretrain_id(norm_labels)
            if tid in ids:  # e.g. DINO across lambdas: lambd does not apply, one trial
                continue
            ids.add(tid)
            trial_res = _trial_resources(c, res, "stage1.resources", cfg.devices, origins, cfg.device)
            trial = TrialSpec(id=tid, stage="pretrain", config=cfg.to_dict(), resources=trial_res,
                              labels=norm_labels)
            if weights_refusal(cfg.source, cfg.backbone) is not None:
                # never part of the grid (see the module docstring); reported once per pair by build_grid
                nw = c.no_weights.setdefault((cfg.source, cfg.backbone), {"where": [], "trials": [], "dependants": []})
                loc = (f"{origins.get('source', 'stage1 default source')}={cfg.source!r} x "
                       f"{origins.get('backbone', 'stage1 default backbone')}={cfg.backbone!r}")
                if loc not in nw["where"]:
                    nw["where"].append(loc)
                nw["trials"].append(trial)
                continue
            err = _refusal(checks.input_size, cfg.backbone, cfg.data.image_size) if checks is not None else None
            if err is not None:
                where = origins.get("data.image_size", "data.image_size (default)")
                c.problem(f"{where}={cfg.data.image_size}", f"does not fit backbone {cfg.backbone}: {err}", tid)
            trials.append(trial)
    for e, i in excludes:
        if i not in used_excl:
            raise c.err(f"stage1.exclude[{i}]={_short(e)}", "matches no stage-1 combination; fix or remove it")
    if not trials and not c.no_weights:
        raise c.err("stage1", "expands to no trial (every combination excluded); check stage1.axes and stage1.exclude")
    return trials


def _evaluations():
    try:
        from core.evaluations import EVALUATIONS, apply_evaluation
    except ImportError as e:  # pragma: no cover - the module is part of core
        raise TwinsegError(f"core.evaluations is not importable ({e}); the install is incomplete") from None
    return EVALUATIONS, apply_evaluation


def _expand_stage2(c: _Ctx, s2: Any, data: dict, wandb: str, pre: list[TrialSpec], trials_root: Path,
                   checks: Optional[_ModelChecks]) -> list[TrialSpec]:
    EVALUATIONS, apply_evaluation = _evaluations()
    s2 = c.mapping("stage2", s2, STAGE2_KEYS, allow_none=False)
    res = _resources(c, "stage2.resources", s2.get("resources"))
    settings = c.mapping("stage2.settings", s2.get("settings"))
    own = STAGE2_OWN_FIELDS | {"wandb"}
    _check_settings_keys(c, "stage2.settings", settings, SegmentConfig, own)
    _check_devices(c, "stage2", settings, res, "stage2.resources")
    overrides = _overrides(c, "stage2.overrides", s2.get("overrides"), stage2_match_keys(), SegmentConfig, own)
    entries = s2.get("evaluations")
    if not isinstance(entries, list) or not entries:
        raise c.err("stage2.evaluations", "must be a non-empty list, e.g. [{evaluation: E2, from: {method: barlow_twins}}]")

    trials: list[TrialSpec] = []
    for i, ent in enumerate(entries):
        p = f"stage2.evaluations[{i}]"
        ent = c.mapping(p, ent, ENTRY_KEYS, allow_none=False)
        ev = ent.get("evaluation")
        if ev not in EVALUATIONS:
            raise c.err(f"{p}.evaluation={_short(ev)}", f"is not a preset; choose one of: {', '.join(EVALUATIONS)}")
        tag = ent.get("tag")
        if tag is not None and (not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z0-9._]+", tag)):
            raise c.err(f"{p}.tag={_short(tag)}", "must be a short name (letters, digits, . _)")
        esettings = c.mapping(f"{p}.settings", ent.get("settings"))
        _check_settings_keys(c, f"{p}.settings", esettings, SegmentConfig, own)
        _check_devices(c, p, esettings, res, "stage2.resources")
        if "from" not in ent:
            raise c.err(f"{p}.from", "is missing; give the stage-1 trials it consumes, e.g. from: {backbone: vit_nano_patch8}, or from: none")
        src = ent.get("from")
        label = f"{ev}-{tag}" if tag else ev
        if src is None or (isinstance(src, str) and src.lower() == "none"):
            deps: list[Optional[TrialSpec]] = [None]
        else:
            match = dict(c.mapping(f"{p}.from", src, axis_names(), allow_none=False))
            if not match:
                raise c.err(f"{p}.from", "is empty; name at least one stage-1 axis (e.g. backbone) or write from: none")
            match.setdefault("method", EVALUATIONS[ev].get("pretrain_method"))
            deps = [t for t in pre if _matches(match, t.labels)]
            if len(pre) + len(trials) + len(deps) > c.max_trials:
                n = len(pre) + len(trials) + sum(len(_entry_deps(e, pre, EVALUATIONS)) for e in entries[i:])
                raise c.too_many(n, f"stage1 ({len(pre)}) + stage2 ({n - len(pre)}) expand to")
            # stage-1 trials left out for want of weights: their dependants are counted, not created
            lost = [(pair, t) for pair, nw in c.no_weights.items() for t in nw["trials"] if _matches(match, t.labels)]
            for pair, t in lost:
                c.no_weights[pair]["dependants"].append(f"seg-{label}-from-{t.id}")
            if not deps and lost:
                continue
            if not deps:
                have = {k: sorted({str(t.labels[k]) for t in pre}) for k in axis_names()}
                avail = "; ".join(f"{k} in [{', '.join(have[k])}]" for k in match)
                raise c.err(f"{p}.from={_short(match, 120)}", f"selects no stage-1 trial (stage-1 has {avail or 'no trial'}); fix the match or the stage-1 axes")
        for dep in deps:
            d = _merge({"data": copy.deepcopy(data)}, settings)
            origins = _origins_for("stage2.settings", settings)
            origins.update({f"data.{k}": f"data.{k}" for k in data if f"data.{k}" not in origins})
            d = _merge(d, esettings)
            origins.update(_origins_for(f"{p}.settings", esettings))
            labels = {"evaluation": ev}
            if dep is not None:
                labels.update(dep.labels)
                d["backbone"] = dep.config["backbone"]
                d["seed"] = dep.config["seed"]
                d["source"] = f"checkpoint:{(trials_root / dep.id / 'backbone.pt').as_posix()}"
                for k in ("backbone", "seed", "source"):
                    origins[k] = f"{p}.from (stage-1 trial {dep.id})"
            for match, st, oi in overrides:
                if _matches(match, {**labels, "backbone": d.get("backbone"), "seed": d.get("seed")}):
                    d = _merge(d, st)
                    origins.update(_origins_for(f"stage2.overrides[{oi}].set", st))
            d["wandb"] = wandb
            explicit = {k: v for k, v in d.items() if v is not None}
            d = apply_evaluation(d, ev)
            d.update(explicit)  # explicit values always win over the preset
            d.pop("pretrain_method", None)
            d.pop("description", None)
            for k in d:
                origins.setdefault(k, f"{p} (preset {ev}) {k}")
            try:
                cfg = SegmentConfig.from_dict(d)
            except ConfigError as e:
                raise c.err("", _locate(str(e), origins)) from None
            if dep is not None:
                tid = f"seg-{label}-from-{dep.id}"
            else:
                tid = "-".join(["seg", label, _safe(cfg.backbone), _source_tag(cfg.source), f"s{_fmt_num(cfg.seed)}"])
            refusal = weights_refusal(cfg.source, cfg.backbone)
            if refusal is not None:  # e.g. from: none with source: dino on a backbone DINO never published
                where = origins.get("source", f"{p} source")
                c.left_out.append(tid)
                c.problem(f"{where}={cfg.source!r}",
                          f"{refusal}, so the trial would fail every attempt and is not scheduled; choose a source "
                          f"that has weights for {cfg.backbone} (or another backbone) or remove the entry", tid)
                continue
            # the image size first, located (and merged with stage 1's line) at the size's key path
            err = _refusal(checks.input_size, cfg.backbone, cfg.data.image_size) if checks is not None else None
            if err is not None:
                where = origins.get("data.image_size", "data.image_size (default)")
                c.problem(f"{where}={cfg.data.image_size}", f"does not fit backbone {cfg.backbone}: {err}", tid)
            else:
                err = _refusal(checks.segment, cfg) if checks is not None else None
                if err is not None:
                    c.problem(p, f"evaluation {ev} on backbone {cfg.backbone}: {err}", tid)
            labels = {**labels, "from": dep.id if dep else None}
            trials.append(TrialSpec(id=tid, stage="segment", config=cfg.to_dict(),
                                    depends_on=[dep.id] if dep else [],
                                    resources=_trial_resources(c, res, "stage2.resources", cfg.devices, origins,
                                                               cfg.device),
                                    labels=labels))
    return trials


def _entry_deps(ent: Any, pre: list[TrialSpec], evaluations: dict) -> list:
    """The stage-1 trials a (later, not yet validated) stage-2 entry selects; for counting only."""
    if not isinstance(ent, dict):
        return [None]
    src = ent.get("from")
    if not isinstance(src, dict):
        return [None]
    match = dict(src)
    match.setdefault("method", (evaluations.get(ent.get("evaluation")) or {}).get("pretrain_method"))
    return [t for t in pre if _matches(match, t.labels)] or [None]


def describe(spec: GridSpec) -> str:
    n1, n2 = len(spec.stage("pretrain")), len(spec.stage("segment"))
    return f"grid {spec.name} ({spec.path.name}): {n1} pretraining + {n2} segmentation trials"
