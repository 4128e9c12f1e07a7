"""What a result is: the record of what produced it, and how two records differ.

A run's identity (`result_identity(cfg)`) is
- ``config``: the resolved config (`cfg.to_dict()`, paths absolute) without the bookkeeping fields
  (`metadata={"bookkeeping": True}` in core/config.py: wandb, keep_checkpoints); a ``checkpoint:PATH`` source
  reads ``checkpoint`` there, the file being identified by its content below (so a results folder that is
  copied or moved, whose stage-2 configs then name the stage-1 weights at their new place, is the same request);
- ``data``: `core.data.fingerprint.data_fingerprint(cfg.data)` (ids and sizes of the files read, the
  generator's parameters where generated);
- ``weights``: ``[{"path", "sha256"}]`` of every weight file the run starts from (`core.weights.source_files`).

core/runs/skeleton.py writes it to ``identity.json`` when a run starts (what a resume is checked against) and
into metrics.json under ``identity`` (what reuse of a finished folder is checked against); a folder is reused
or resumed only when all three parts match the request (`identity_differences`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

IDENTITY_FILE = "identity.json"
IDENTITY_KEY = "identity"


def flat(d: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: value}."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def bookkeeping(cfg) -> set[str]:
    """Dotted names of the fields marked `metadata={"bookkeeping": True}` in core/config.py (they do not
    change the result: wandb, keep_checkpoints)."""
    out: set[str] = set()

    def walk(obj, prefix: str) -> None:
        if not dataclasses.is_dataclass(obj):
            return
        for f in dataclasses.fields(obj):
            if f.metadata.get("bookkeeping"):
                out.add(prefix + f.name)
            walk(getattr(obj, f.name), f"{prefix}{f.name}.")

    walk(cfg, "")
    return out


def _config_record(cfg, d: Optional[dict] = None) -> dict:
    """{dotted field: value} of config dict `d` (default: `cfg`'s), bookkeeping fields left out, paths
    resolved, a checkpoint source reduced to ``checkpoint``."""
    skip = bookkeeping(cfg)
    out = {k: v for k, v in flat(cfg.to_dict() if d is None else d).items() if k not in skip}
    for k in ("data.root", "data.ssl_root"):
        if isinstance(out.get(k), str):
            out[k] = str(Path(out[k]).expanduser().resolve())
    if isinstance(out.get("source"), str) and out["source"].startswith("checkpoint:"):
        out["source"] = "checkpoint"
    return out


def result_identity(cfg) -> dict:
    """The identity of the result `cfg` would produce (see the module docstring)."""
    from core.data.fingerprint import data_fingerprint
    from core.weights import file_sha256, source_files

    weights = [{"path": str(p), "sha256": file_sha256(p)} for p in source_files(cfg.source, cfg.backbone)]
    return {"config": _config_record(cfg), "data": data_fingerprint(cfg.data), "weights": weights}


_MISSING = object()


def _record_diff(a: dict, b: dict, cfg) -> list[str]:
    """Dotted fields in which config record `a` (stored) differs from `b` (requested). A field `a` lacks (added
    to the config class since it was written) reads as its default."""
    try:
        defaults = _config_record(cfg, type(cfg)().to_dict())
    except Exception:  # noqa: BLE001 - a config class without a default instance: compare as written
        defaults = {}
    a = {**{k: v for k, v in defaults.items() if k not in a}, **a}
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


def config_field_differences(old: dict, cfg) -> list[str]:
    """Dotted fields in which config dict `old` (a config.json) differs from `cfg` (bookkeeping ignored)."""
    return _record_diff(_config_record(cfg, old), _config_record(cfg), cfg)


def fields_text(diff: list[str], n: int = 8) -> str:
    return ", ".join(diff[:n]) + (f" and {len(diff) - n} more" if len(diff) > n else "")


def identity_differences(old: dict, new: dict, cfg) -> list[str]:
    """Phrases naming what differs between a stored identity `old` and the request's `new` (empty: the same
    result), e.g. ``with a different config (fields lr)``, ``on different data (...)``,
    ``from different weights (...)``."""
    from core.data.fingerprint import describe_change

    out = []
    old_cfg = old.get("config")
    if not isinstance(old_cfg, dict):
        out.append("with an unreadable config record")
    else:
        diff = _record_diff(old_cfg, new["config"], cfg)
        if diff:
            out.append(f"with a different config (fields {fields_text(diff)})")
    data = describe_change(old.get("data") or {}, new["data"])
    if data:
        out.append(f"made on different data ({data})")
    ow, nw = list(old.get("weights") or []), list(new["weights"])
    changed = []
    for i in range(max(len(ow), len(nw))):
        o = ow[i] if i < len(ow) else {}
        n = nw[i] if i < len(nw) else {}
        if o.get("sha256") != n.get("sha256"):
            changed.append(f"{n.get('path') or o.get('path')}: sha256 {(o.get('sha256') or 'none')[:12]} -> "
                           f"{(n.get('sha256') or 'missing')[:12]}")
    if changed:
        out.append(f"started from different weights ({'; '.join(changed)})")
    return out
