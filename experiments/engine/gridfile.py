"""Grid files: find, read (with YAML limits) and override a declarative study grid (no Ray here).

Validation and expansion into trials: experiments/engine/expand.py (stage 1: stage1.py, stage 2:
stage2.py; the axes: axes.py; the shared checks: validate.py; the data types: spec.py).

A grid file (YAML, no code) describes the whole study; see `experiments/grids/smoke.yaml` for a
commented example. Schema (every key optional unless marked):

    name: smoke                      # results/<name>-<timestamp>/ (default: the file's stem)
    description: "..."
    wandb: offline                   # offline | online | disabled (one wandb run per trial)
    max_concurrent: 2                # trials running at once (>= 1)
    retries: 1                       # Ray Tune max_failures per trial (>= 0; retry resumes last.ckpt);
                                     # crashes only: a TwinsegError (e.g. NonFiniteError) is never retried
    max_trials: 1000                 # refuse a grid expanding to more trials (before anything is written)
    storage: s3://bucket/prefix      # where results folders go (default results/; --storage overrides)
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
    stage2:                          # segmentation, one trial per (dataset, evaluation, matched stage-1 trial)
      resources: {cpu: 1, gpu: 0}
      settings: {SegmentConfig fields}
      datasets:                      # optional, the dataset axis (default: data.dataset alone)
        voc: {train_split: trainaug} # each segmentation dataset -> its own SegmentConfig settings; one
        coco_stuff:                  # other than data.dataset has its own folder (data.root here; none:
          data: {root: DIR, coco_labels: fine}   # generated) and is part of its trials' ids
      overrides: [{match: {evaluation: E1}, set: {batch_size: 8}}]  # keys: evaluation, dataset + stage-1 axes
      evaluations:
        - evaluation: E1             # preset of core.evaluations (E1..E5)
          from: {backbone: resnet_tiny, method: barlow_twins}  # stage-1 trials it consumes
          settings: {...}            # optional SegmentConfig fields for this entry
          datasets: [voc]            # optional: run on these datasets only (default: every one)
          tag: pup                   # optional, disambiguates ids of two entries of one evaluation
        - evaluation: E5
          from: none                 # standalone: no stage-1 dependency (settings give source)
          axes: {backbone: vit_small_patch16, source: dino, seed: [0, 1, 2]}  # optional: one trial each

Stage-1 axes are declared once, in axes.py `stage1_axes()`: the common ones plus each SSL method's own
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
experiments/engine/checks.py with the same `Problem` lines.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Optional

import yaml

from core.errors import ConfigError

GRIDS_DIR = Path(__file__).resolve().parent.parent / "grids"
TOP_KEYS = ("name", "description", "wandb", "max_concurrent", "retries", "max_trials", "storage", "data", "stage1",
            "stage2")


DEFAULT_MAX_TRIALS = 1000
"""Default `max_trials` (grid key; `--max-trials` overrides): the paper grid has ~160 trials; a typo'd
axis (a 200,000-seed range) is refused with its count instead of writing a 400 MB summary.json."""


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


def absolute_sources(doc: Any, base: Path) -> Any:
    """A copy of the grid document `doc` whose relative `checkpoint:PATH` sources (every `source` value:
    settings, axes, from matches, overrides, excludes) are made absolute against `base`, the grid file's
    folder (`core.config_cli.resolve_paths`, as a single run resolves its own), when the grid is read: the
    trial ids then hash the absolute path and a resume from another folder names the same file. The
    sources the grid makes itself (a stage-2 trial's `checkpoint:trials/<id>/backbone.pt`) are added
    later, relative to the results folder (experiments/engine/spec.py)."""
    from core.config_cli import resolve_paths

    def one(v: Any) -> Any:
        return resolve_paths({"source": v}, base)["source"] if isinstance(v, str) else v

    if isinstance(doc, dict):
        return {k: ([one(x) for x in v] if isinstance(v, list) else one(v)) if k == "source"
                else absolute_sources(v, base) for k, v in doc.items()}
    if isinstance(doc, list):
        return [absolute_sources(x, base) for x in doc]
    return doc


DATASET_FOLDERS = {"voc": "VOCdevkit/", "coco_stuff": "images/ and stuffthingmaps_trainval2017/ (COCO-Stuff 164k)"}
"""What a dataset's folder (data.root) holds, for the fix of a missing one (core/data/voc.py, coco_stuff.py)."""


def data_root_key(doc: dict, dataset: str) -> str:
    """The grid key that sets the folder of `dataset`: `stage2.datasets.<name>.data.root` for a stage-2 dataset
    other than the grid's `data.dataset` (it does not inherit data.root: experiments/engine/stage2.py), else
    `data.root`."""
    data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
    s2 = doc.get("stage2") if isinstance(doc.get("stage2"), dict) else {}
    block = s2.get("datasets") if isinstance(s2.get("datasets"), dict) else {}
    if dataset != (data.get("dataset") or "voc") and dataset in block:
        return f"stage2.datasets.{dataset}.data.root"
    return "data.root"


def data_root_fix(key: str, dataset: str) -> str:
    """How to point `key` (data_root_key) at the folder of `dataset`."""
    holds = DATASET_FOLDERS.get(dataset, "the images")
    if key == "data.root":
        return f"pass --data-root DIR pointing to the folder that holds {holds} (or set data.root in the grid file)"
    return f"set {key} in the grid file to the folder that holds {holds} (a relative path: from the current folder)"
