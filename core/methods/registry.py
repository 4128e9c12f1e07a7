"""The self-supervised method registry: one entry per method, owning everything about it.

A method is ONE module `core/methods/<name>.py` that ends with

    METHOD = SSLMethodSpec(name="barlow_twins", label="Barlow Twins", short="bt", paper="...",
                           options=BarlowTwinsOptions, module=BarlowTwinsMethod, views=pair_views,
                           axes={"lambd": "l"})

and the rest of the code reads the registry instead of naming methods:
- `PretrainConfig` gets one config section per method (`cfg.<name>`, the `options` dataclass:
  its fields, defaults, validation and docs), so every option is a CLI flag `--<name>-<field>`;
- `PretrainConfig.method` accepts exactly the registered names;
- the pretraining run builds the views (`views(cfg, gpu_augment) -> MultiViewTransform`) and the
  LightningModule (`module`, a `core.methods.ssl_base.SSLMethod`) from the entry, and writes the
  module's `result_keys` into metrics.json;
- `defaults` replace shared settings' defaults for this method (PretrainConfig.from_dict);
- the grid names its trials with `short` and adds the method's `axes` (option field -> id token) to
  the stage-1 axes; the report labels rows with `label` (read back from metrics.json).

Methods are found by scanning this package for modules that define `METHOD`; adding a method
touches no other file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from core.errors import ConfigError


@dataclass(frozen=True)
class SSLMethodSpec:
    name: str  # the value of PretrainConfig.method and the name of its config section
    label: str  # how reports and logs name it ("Barlow Twins")
    short: str  # token in grid trial ids ("bt")
    paper: str  # citation shown in --help and the docs
    options: type  # its config section: a frozen core.config.ConfigBase dataclass
    module: type  # its LightningModule (a core.methods.ssl_base.SSLMethod)
    views: Callable[[Any, bool], Any]  # (PretrainConfig, gpu_augment) -> MultiViewTransform
    axes: dict[str, str] = field(default_factory=dict)  # option fields that are grid axes -> id token
    order: int = 100  # position in listings (the default method first)
    #: shared `PretrainSettings` values this method starts from instead of the field defaults (its own CPU
    #: recipe, e.g. a learning rate); `PretrainConfig.from_dict` (the CLI, grid trials) applies them under
    #: every value given explicitly, as segment.py applies an evaluation preset under explicit flags
    defaults: dict[str, Any] = field(default_factory=dict)


_SPECS: Optional[dict[str, SSLMethodSpec]] = None


def ssl_methods() -> dict[str, SSLMethodSpec]:
    """Every registered method by name, in `order`."""
    global _SPECS
    if _SPECS is None:
        import core.methods as package

        found: dict[str, SSLMethodSpec] = {}
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_") or info.name == "registry":
                continue
            spec = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "METHOD", None)
            if isinstance(spec, SSLMethodSpec):
                if spec.name in found:
                    raise RuntimeError(f"two modules register the SSL method {spec.name!r}")
                found[spec.name] = spec
        _SPECS = dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))
    return _SPECS


def get_method(name: str) -> SSLMethodSpec:
    specs = ssl_methods()
    if name not in specs:
        raise ConfigError(f"method={name!r} is not allowed; choose one of: {', '.join(specs)}")
    return specs[name]
