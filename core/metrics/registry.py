"""The metric registry: every metrics.json key declared once, next to what computes it.

A `MetricSpec` says everything the rest of the code needs to know about one key:

- `key`, `stage` (a `core.stages` name) and `description` (its metrics.json schema entry);
- `when` it is measured: `RUN` (the run's record: config echo, accounting, artifact paths), `BEFORE` /
  `AFTER` pretraining (the evaluations of the initial / trained backbone), `EPOCH` (a per-epoch
  monitor, its last value written) or `EVAL` (the final validation of a segmentation run);
- `compute(ctx)`: how its value is obtained; the stage run calls `evaluate(stage, when, ctx)`, which
  computes every spec of that stage and moment in ascending `order` and returns {key: value} in that
  order. The context is the stage's: `EvalContext` for pretraining's BEFORE / AFTER evaluations, the
  final validation dict (`SegmentationMetrics.compute` + `val_pixels`) for EVAL. Specs without
  `compute` are written by the code named in their description (e.g. the SSL method's
  `collapse_metrics`). Work shared by several keys (one k-NN pass gives `knn_acc` and
  `linear_probe_acc`) runs once per evaluation through `EvalContext.once`;
- `columns`: its report columns (`Column`: table, header, digits, which value is best, position),
  read by analysis/tables.py and analysis/figures.py;
- `headline` / `required`: a value the report names in a note when it is null / non-finite (`required`:
  also when absent from a finished run).

Declarations live in the modules that compute the values: every module of `core/metrics/` exposing
`METRICS` (found by scanning the package, so a new metric module is picked up by itself),
`core/diagnostics/collapse.py` (the collapse monitors), `core/runs/metrics_schema.py` (the run record)
and each SSL method's `result_keys` (core/methods/<name>.py, wrapped here; `result_columns` gives their
report columns). `register(spec)` / `registered(*specs)` add one at run time (tests, plug-ins).

A new evaluation takes an `order` after the existing ones of its moment, so the values computed before
it (and their RNG use) stay as they were.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

RUN, BEFORE, AFTER, EPOCH, EVAL = "run", "before", "after", "epoch", "eval"
WHEN = {
    RUN: "written once from the run's config, bookkeeping and accounting",
    BEFORE: "evaluation of the backbone before pretraining (under preserved RNG state)",
    AFTER: "evaluation after training",
    EPOCH: "monitored every epoch, the last value written",
    EVAL: "the final validation of a segmentation run",
}

#: report tables a column may go to (analysis/tables.py)
TABLES = ("pretraining", "emerging", "segmentation")

#: the modules outside core/metrics/ that declare `METRICS`
DECLARING_MODULES = ("core.runs.metrics_schema", "core.diagnostics.collapse")


@dataclass(frozen=True)
class Column:
    """One report column of a metric: table `table` (TABLES), header `header`, `digits` shown, `best`
    (+1 the highest value is best and bold, -1 the lowest, 0 none), `position` (left to right within
    the table), `name` (CSV column stem, default the metric key), `transform` (display units from
    the metrics.json value, e.g. seconds -> hours) and `matrix` (segmentation: also its own evaluation x
    pretraining-variant table)."""

    table: str
    header: str
    digits: int = 2
    best: int = 0
    position: float = 0.0
    name: str = ""
    transform: Optional[Callable[[float], float]] = None
    matrix: bool = False

    def __post_init__(self):
        if self.table not in TABLES:
            raise ValueError(f"Column table={self.table!r}; choose one of: {', '.join(TABLES)}")
        if self.best not in (-1, 0, 1):
            raise ValueError(f"Column best={self.best!r}; choose -1, 0 or +1")


@dataclass(frozen=True)
class MetricSpec:
    key: str
    stage: str
    description: str
    when: str = AFTER
    compute: Optional[Callable[[Any], Any]] = None
    order: float = 0.0
    columns: tuple[Column, ...] = ()
    headline: bool = False
    required: bool = False
    source: str = field(default="", compare=False)  # the declaring module (filled in by the registry)

    def __post_init__(self):
        if self.when not in WHEN:
            raise ValueError(f"MetricSpec {self.key}: when={self.when!r}; choose one of: {', '.join(WHEN)}")
        if isinstance(self.columns, Column):
            object.__setattr__(self, "columns", (self.columns,))


@dataclass
class EvalContext:
    """What a BEFORE / AFTER pretraining evaluation reads: the exported backbone, the run's loaders, config
    and device, the moment and the keys evaluated in it (`wants`)."""

    backbone: Any
    loaders: Any
    cfg: Any
    device: Any
    when: str
    keys: tuple[str, ...] = ()
    cache: dict = field(default_factory=dict)

    def once(self, name: str, fn: Callable[[], Any]) -> Any:
        """`fn()` computed on first use in this evaluation, its result reused by the other keys."""
        if name not in self.cache:
            self.cache[name] = fn()
        return self.cache[name]

    def wants(self, key: str) -> bool:
        return key in self.keys

    def mask_loaders(self) -> Optional[tuple[Any, Any]]:
        """(train, val): the k-NN images WITH their masks (`core.data.module.knn_mask_loader`: same datasets,
        original masks), or None when either split has none (imagefolder sources)."""
        def build():
            from core.data.module import knn_mask_loader

            train, val = knn_mask_loader(self.loaders.knn_train), knn_mask_loader(self.loaders.knn_val)
            return None if train is None or val is None else (train, val)

        return self.once("mask_loaders", build)


_registered: list[MetricSpec] = []
_declared_cache: Optional[tuple[MetricSpec, ...]] = None


def _with_source(spec: MetricSpec, source: str) -> MetricSpec:
    if spec.source:
        return spec
    from dataclasses import replace

    return replace(spec, source=source)


def _module_specs(name: str) -> list[MetricSpec]:
    mod = importlib.import_module(name)
    return [_with_source(s, name) for s in getattr(mod, "METRICS", ())]


def _method_specs() -> list[MetricSpec]:
    """An SSL method's own keys (`result_keys`, key -> description; `result_columns`, key -> Column or
    tuple of Columns), written after training by its `result_metrics`."""
    from core.methods.registry import ssl_methods
    from core.stages import PRETRAIN

    out: list[MetricSpec] = []
    seen: set[str] = set()
    for spec in ssl_methods().values():
        cls = spec.module
        cols = getattr(cls, "result_columns", {}) or {}
        for key, desc in cls.result_keys.items():
            if key in seen:
                continue
            seen.add(key)
            c = cols.get(key, ())
            out.append(MetricSpec(key, PRETRAIN.name, desc, AFTER, columns=(c,) if isinstance(c, Column) else tuple(c),
                                  source=cls.__module__))
    return out


def _declared() -> tuple[MetricSpec, ...]:
    global _declared_cache
    if _declared_cache is None:
        import core.metrics as pkg

        specs: list[MetricSpec] = []
        for name in DECLARING_MODULES:
            specs += _module_specs(name)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name != "registry" and not info.name.startswith("_"):
                specs += _module_specs(f"core.metrics.{info.name}")
        specs += _method_specs()
        _check_unique(specs)
        _declared_cache = tuple(specs)
    return _declared_cache


def _check_unique(specs: Iterable[MetricSpec]) -> None:
    """One home per key: a (stage, key) declared twice is a programming error naming both places."""
    from core.stages import get_stage

    seen: dict[tuple[str, str], MetricSpec] = {}
    for s in specs:
        get_stage(s.stage)  # ConfigError naming the stages for an unknown one
        other = seen.get((s.stage, s.key))
        if other is not None:
            raise RuntimeError(f"metrics.json key {s.key!r} ({s.stage}) is declared twice: in {other.source} and "
                               f"{s.source}; keep one")
        seen[(s.stage, s.key)] = s


def metrics(stage: Optional[str] = None, when: Optional[str] = None) -> list[MetricSpec]:
    """Every declared (and registered) metric, or those of `stage` (a name or a StageSpec) / `when`."""
    name = getattr(stage, "name", stage)
    specs = [*_declared(), *_registered]
    return [s for s in specs if (name is None or s.stage == name) and (when is None or s.when == when)]


def get_metric(key: str, stage) -> MetricSpec:
    for s in metrics(stage):
        if s.key == key:
            return s
    raise KeyError(f"metric {key!r} of stage {getattr(stage, 'name', stage)!r} is not declared")


def descriptions(stage) -> dict[str, str]:
    """key -> description of every metrics.json key `stage` may write (core/runs/metrics_schema.py)."""
    return {s.key: s.description for s in metrics(stage)}


def register(spec: MetricSpec) -> MetricSpec:
    """Add `spec` at run time (its key must be new to its stage); returns it with its source set."""
    spec = _with_source(spec, "registered at run time")
    _check_unique([*metrics(spec.stage), spec])
    _registered.append(spec)
    return spec


def unregister(spec: MetricSpec) -> None:
    _registered[:] = [s for s in _registered if not (s.key == spec.key and s.stage == spec.stage)]


@contextlib.contextmanager
def registered(*specs: MetricSpec) -> Iterator[tuple[MetricSpec, ...]]:
    """`specs` registered for the duration of the block."""
    done: list[MetricSpec] = []
    try:
        for s in specs:
            done.append(register(s))
        yield tuple(done)
    finally:
        for s in done:
            unregister(s)


def scheduled(stage, when: str) -> list[MetricSpec]:
    """The computed specs of `stage` at `when`, in the order they run (ascending `order`, then declaration)."""
    specs = [s for s in metrics(stage, when) if s.compute is not None]
    return sorted(specs, key=lambda s: s.order)


def evaluate(stage, when: str, ctx: Any = None, *, skip: bool = False) -> dict:
    """{key: value} of every computed spec of `stage` at `when`, computed in order with `ctx`
    (`EvalContext` for pretraining: its `when` / `keys` are filled in); all None when `skip` (nothing to
    evaluate on, e.g. no k-NN images)."""
    specs = scheduled(stage, when)
    if skip:
        return {s.key: None for s in specs}
    if isinstance(ctx, EvalContext):
        ctx.when, ctx.keys = when, tuple(s.key for s in specs)
    return {s.key: s.compute(ctx) for s in specs}


def columns(table: str, stage=None) -> list[tuple[MetricSpec, Column]]:
    """(spec, column) of every metric shown in report table `table`, left to right."""
    if table not in TABLES:
        raise ValueError(f"table={table!r}; choose one of: {', '.join(TABLES)}")
    cols = [(s, c) for s in metrics(stage) for c in s.columns if c.table == table]
    return sorted(cols, key=lambda sc: sc[1].position)


def column_value(spec: MetricSpec, col: Column, metrics_dict: dict) -> Any:
    """The value a column shows for one run (its transform applied to a finite number; else as is)."""
    v = metrics_dict.get(spec.key)
    if col.transform is None or v is None or isinstance(v, bool):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return col.transform(f) if f == f and abs(f) != float("inf") else None


def headline(stage) -> list[MetricSpec]:
    """The headline values of a finished run of `stage` (the report's n/a notes)."""
    return [s for s in metrics(stage) if s.headline or s.required]
