"""Stage-1 grid axes (declared once: the common ones plus each SSL method's own), axis-value matching and
the trial ids built from them."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


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
    """Keys of a `stage2.overrides` match: the evaluation, the dataset (stage-2 axis) and the stage-1 axes."""
    return ("evaluation", "dataset") + axis_names()


def stage1_axis_fields() -> set[str]:
    """Config fields the stage-1 axes set (dotted for a section's field): settings may not set them."""
    return {".".join(a.path) for a in stage1_axes().values()}


# ----------------------------------------------------------------------------- matching
def as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def same(a: Any, b: Any) -> bool:
    """Axis value equality that treats 0.0051 and '0.0051' and 1 / 1.0 alike."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def same_key(v: Any) -> tuple:
    """A hashable key with `same(a, b)` <=> `same_key(a) == same_key(b)` for single axis values
    (numbers and numeric strings by value, other values by their text)."""
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return ("s", str(v))
    return ("n", f) if f == f else ("s", str(v))


def matches(match: dict, labels: dict) -> bool:
    for k, want in match.items():
        have = labels.get(k)
        if not any(same(have, w) for w in as_list(want)):
            return False
    return True


# ----------------------------------------------------------------------------- ids
def fmt_num(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else format(f, "g")


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", str(s)).strip("_") or "x"


def source_tag(source: str) -> str:
    if str(source).startswith("checkpoint:"):
        p = Path(str(source)[len("checkpoint:"):])
        stem = p.parent.name if p.name in ("backbone.pt", "last.ckpt") else p.stem
        digest = hashlib.sha1(str(source).encode()).hexdigest()[:6]
        return f"ckpt_{safe_name(stem)[:40]}_{digest}"
    return safe_name(source)


def pretrain_id(labels: dict) -> str:
    """`pt-<backbone>-<source>-<method short>[-<method axes>]-s<seed>`, from the axis declarations."""
    from core.methods.registry import get_method

    method = labels["method"]
    parts = ["pt", safe_name(labels["backbone"]), source_tag(labels["source"]), get_method(method).short]
    for ax in stage1_axes().values():
        if ax.method is not None and ax.applies(method):
            parts.append(f"{ax.token}{fmt_num(labels[ax.name])}")
    parts.append(f"s{fmt_num(labels['seed'])}")
    return "-".join(parts)


def axis_labels(cfg_dict: dict) -> dict:
    """The stage-1 axis values of a (validated) PretrainConfig dict; None for another method's axes."""
    method = cfg_dict["method"]
    return {name: (ax.get(cfg_dict) if ax.applies(method) else None) for name, ax in stage1_axes().items()}
