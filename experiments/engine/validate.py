"""The checks the expansion of both stages shares: the error helper (`Ctx`: one-line messages located at
the grid file's key path, per-trial problems collected), settings keys, overrides, resources and
devices, config errors mapped back to key paths, and the backbone-level checks (image size, head / fusion
fit, weights of a (source, backbone) pair)."""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any, Optional

from core.config import SegmentConfig
from core.errors import ConfigError
from experiments.engine.axes import fmt_num, same_key, stage1_axis_fields
from experiments.engine.gridfile import DEFAULT_MAX_TRIALS
from experiments.engine.spec import Problem

RESOURCE_KEYS = ("cpu", "gpu")


class Ctx:
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
            raise self.err(path, f"must be a mapping (key: value), got {short(v)}")
        if allowed is not None:
            for k in v:
                if k not in allowed:
                    raise self.err(f"{path}.{k}" if path else str(k), f"is not a known key; {choices(k, allowed)}")
        return v

    def number(self, path: str, v: Any, *, minimum: float = 0.0, strict: bool = False, integer: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            kind = "an integer" if integer else "a number"
            raise self.err(f"{path}={short(v)}", f"must be {kind}; write e.g. {path.rsplit('.', 1)[-1]}: 1")
        if v != v or v in (float("inf"), float("-inf")):
            raise self.err(f"{path}={v!r}", "must be a finite number")
        if integer and float(v) != int(v):
            raise self.err(f"{path}={v!r}", "must be an integer")
        if (strict and not v > minimum) or (not strict and v < minimum):
            raise self.err(f"{path}={v!r}", f"must be {'>' if strict else '>='} {minimum:g}")
        return int(v) if integer else float(v)


def axis_values(c: "Ctx", path: str, raw: Any, if_empty: str) -> list:
    """The values of one grid axis (`path`: its key path; a scalar is a one-value list): refused in one line when
    empty (`if_empty` says what to do), when a value is not a single value, or when one is listed twice. Linear:
    one set lookup per value (100,000 seeds stay instant)."""
    vals = raw if isinstance(raw, list) else [raw]
    if not vals:
        raise c.err(path, f"is an empty list; {if_empty}")
    seen: set = set()
    for j, v in enumerate(vals):
        if v is None or isinstance(v, (dict, list)):
            raise c.err(f"{path}[{j}]={short(v)}", "must be a single value")
        key = same_key(v)
        if key in seen:
            raise c.err(f"{path}[{j}]={short(v)}", "is listed twice; remove the duplicate")
        seen.add(key)
    return vals


def short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def choices(k: Any, allowed) -> str:
    hint = difflib.get_close_matches(str(k), [str(a) for a in allowed], n=1)
    dym = f"did you mean {hint[0]}? " if hint else ""
    return f"{dym}allowed: {', '.join(map(str, allowed))}"


def merge(base: dict, over: dict) -> dict:
    """Settings merge; config sections (`data`, a method's options) merge key by key."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **copy.deepcopy(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


# ----------------------------------------------------------------------------- settings, resources
def parse_resources(c: Ctx, path: str, v: Any) -> dict:
    r = c.mapping(path, v, RESOURCE_KEYS)
    cpu = c.number(f"{path}.cpu", r.get("cpu", 1), minimum=0, strict=True)
    gpu = c.number(f"{path}.gpu", r.get("gpu", 0), minimum=0)
    if gpu > 1 and not float(gpu).is_integer():
        raise c.err(f"{path}.gpu={gpu!r}", "must be a fraction <= 1 or a whole number of GPUs")
    return {"cpu": cpu, "gpu": gpu}


def check_devices(c: Ctx, path: str, settings: dict, res: dict, res_path: str) -> None:
    if "devices" in settings:  # several devices: a Ray Train job of `devices` workers (ray_ddp.py)
        c.number(f"{path}.settings.devices", settings["devices"], minimum=1, integer=True)
    device = settings.get("device", "auto")
    if device == "cuda" and res["gpu"] == 0:
        raise c.err(f"{path}.settings.device='cuda'", f"needs a GPU but {res_path}.gpu=0; set {res_path}.gpu > 0 or device: auto")


def trial_resources(c: Ctx, res: dict, res_path: str, devices: int, origins: dict, device: str = "auto") -> dict:
    """A trial's resources: `res` as is for one device; with devices = N > 1 the trial runs as N
    Ray Train workers (Lightning DDP) and `res` is PER WORKER: {"cpu", "gpu", "workers": N}."""
    out = dict(res)
    n = int(devices)
    if n <= 1:
        return out
    where = f"{origins.get('devices', 'settings.devices')}={n}"
    gpu = res["gpu"]
    if gpu and not float(gpu).is_integer():
        raise c.err(f"{res_path}.gpu={fmt_num(gpu)}",
                    f"is a fraction of a GPU, but {where} runs the trial as {n} DDP workers (Ray Train) that "
                    f"each need a whole GPU; set {res_path}.gpu: 1 (GPUs per worker) or devices: 1")
    if gpu > 1:
        raise c.err(f"{res_path}.gpu={fmt_num(gpu)}",
                    f"is per worker with {where} and each DDP worker drives one GPU; set {res_path}.gpu: 1 "
                    f"({n} workers x 1 GPU)")
    if gpu and device == "cpu":
        raise c.err(f"{res_path}.gpu={fmt_num(gpu)}",
                    f"reserves a GPU per worker but {origins.get('device', 'settings.device')}='cpu' trains the "
                    f"{n} DDP workers on the CPU; set {res_path}.gpu: 0 (CPU workers, gloo) or device: auto")
    out["workers"] = n
    return out


def check_settings_keys(c: Ctx, path: str, settings: dict, cls, own: set) -> None:
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
            raise c.err(f"{path}.{k}", f"is not a {cls.__name__} field; {choices(k, sorted(names))}")
        if k in sections:
            sub = c.mapping(f"{path}.{k}", settings[k])
            allowed = sections[k].__dataclass_fields__
            for sk in sub:
                if f"{k}.{sk}" in own:
                    raise refuse_own(f"{k}.{sk}", f"{path}.{k}.{sk}")
                if sk not in allowed:
                    raise c.err(f"{path}.{k}.{sk}", f"is not a {sections[k].__name__} field; {choices(sk, sorted(allowed))}")


def parse_overrides(c: Ctx, path: str, v: Any, match_keys: tuple, cls, own: set) -> list[tuple[dict, dict, int]]:
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
        check_settings_keys(c, f"{p}.set", st, cls, own)
        out.append((match, st, i))
    return out


# ----------------------------------------------------------------------------- config errors -> key paths
_FIELD_RE = re.compile(r"^(?:(?:PretrainConfig|SegmentConfig)\.)?([A-Za-z_][\w.]*)=(.*)$", re.S)


def locate(msg: str, origins: dict[str, str]) -> str:
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


def origins_for(prefix: str, d: dict) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):  # a config section
            for dk in v:
                out[f"{k}.{dk}"] = f"{prefix}.{k}.{dk}"
        else:
            out[k] = f"{prefix}.{k}"
    return out


# ----------------------------------------------------------------------------- backbone-level checks (cached)
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


class ModelChecks:
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


def refusal(check, *args) -> Optional[ConfigError]:
    """The ConfigError `check(*args)` raises, or None."""
    try:
        check(*args)
    except ConfigError as e:
        return e
    return None
