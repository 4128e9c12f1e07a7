"""The CLI generated from the typed configs (core/config_cli.py) and its use by the two run scripts.

Generic over the config fields: a field added to PretrainConfig / SegmentConfig (or a new section) is
covered by these tests without editing them. Everything runs in-process and stops before training.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core.config import ConfigBase  # noqa: E402
from core.config_cli import (  # noqa: E402
    FlagCollision,
    OneLineParser,
    add_config_arguments,
    config_dict_from_args,
    config_flags,
    field_docs,
    format_value,
)
from core.errors import ConfigError  # noqa: E402

SCRIPTS = ("pretrain", "segment")


def _module(script: str):
    import importlib

    return importlib.import_module(f"experiments.{script}")


def _config_cls(script: str):
    import core.config as C

    return {"pretrain": C.PretrainConfig, "segment": C.SegmentConfig}[script]


def _to_config(script: str, argv: list[str]):
    """Flags -> config exactly as the script's main does it (parser + the script's own resolution)."""
    m = _module(script)
    ns = m.build_parser().parse_args(argv)
    return m.config_from_args(ns) if script == "pretrain" else m.resolve_config(ns)


def _parsed_dict(script: str, argv: list[str]) -> dict:
    return config_dict_from_args(_module(script).build_parser().parse_args(argv), _config_cls(script))


def _nested(path: tuple[str, ...], value) -> dict:
    d: dict = {path[-1]: value}
    for name in reversed(path[:-1]):
        d = {name: d}
    return d


def _get(cfg, path: tuple[str, ...]):
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def _leaf_paths(cls, prefix=()) -> set[tuple[str, ...]]:
    """Every settable field of `cls`, sections walked (written independently of config_cli)."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, ConfigBase):
            out |= _leaf_paths(tp, prefix + (f.name,))
        else:
            out.add(prefix + (f.name,))
    return out


def _call_main(script: str, argv: list[str], capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _module(script).main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def _assert_one_line(code, err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("twinseg: error: "), err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ============================================================================ (a) every field, its ONE default
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_field_has_a_flag_and_its_default_round_trips(script):
    cls = _config_cls(script)
    specs = config_flags(cls)
    assert {s.path for s in specs} == _leaf_paths(cls)  # nothing left without a flag, nested included
    parser = _module(script).build_parser()
    options = set(parser._option_string_actions)
    default = cls()
    for spec in specs:
        assert spec.default == _get(default, spec.path), spec.dotted  # the help shows the dataclass default
        text = format_value(spec.default)
        typed = None if (spec.optional and text == "none") else text
        for flag in spec.flags + spec.hidden_flags:  # every spelling: --data-x, alias, --data.x, --data.x-y
            assert flag in options, flag
            assert _parsed_dict(script, [flag, text]) == _nested(spec.path, typed), flag  # routed to its field
            assert _to_config(script, [flag, text]) == default, flag
    # all of them at once, and none at all: the default config (the dataclass is the only default)
    argv = [a for s in specs for a in (s.flag, format_value(s.default))]
    assert _to_config(script, argv) == default
    assert _to_config(script, []) == default
    assert _parsed_dict(script, []) == {}  # only flags the user gave reach the config


def test_segment_has_no_defaults_of_its_own():
    import experiments.segment as S

    assert not hasattr(S, "GENERATED_DEFAULTS")
    assert _to_config("segment", []) == _config_cls("segment")()


# ============================================================================ (b) non-default values per type
def _candidates(spec):
    """Non-default values of the field's type to try (the config may refuse some: they are skipped)."""
    d, t = spec.default, spec.type
    if t is bool:
        return [not d]
    if t is int:
        return [1, 2, 8] if d is None else [v for v in (d + 1, d * 2, d - 1) if v != d]
    if t is float:
        return [0.5, 0.25] if d is None else [v for v in (d * 0.5, d * 2, d + 0.125) if v != d]
    if typing.get_origin(t) is tuple:
        if d:
            return [tuple(d[:1]) if len(d) > 1 else tuple(d) * 2, tuple(x * 2 for x in d)]
        return []
    return []  # str: free-form or named choices; explicit cases below


def test_a_non_default_value_of_every_type_reaches_the_config():
    covered = set()
    for script in SCRIPTS:
        cls = _config_cls(script)
        for spec in config_flags(cls):
            for value in _candidates(spec):
                try:
                    expected = cls.from_dict(_nested(spec.path, value))
                except ConfigError:
                    continue
                cfg = _to_config(script, [spec.flag, format_value(value)])
                assert _get(cfg, spec.path) == value and cfg == expected, (script, spec.flag, value)
                kind = spec.type if spec.type in (bool, int, float) else typing.get_origin(spec.type)
                covered.add(kind)
                break
            if spec.optional and spec.default is not None:  # Optional -> None (and metadata's cli_none_words)
                assert {"none", "null"} <= set(spec.none_words)
                for word in (*spec.none_words, "None", "NULL"):
                    cfg = _to_config(script, [spec.flag, word])
                    assert _get(cfg, spec.path) is None, (script, spec.flag, word)
                covered.add(None)
    assert covered >= {bool, int, float, tuple, None}, covered


def test_documented_flags_reach_the_config():
    c = _to_config("pretrain", ["--method", "dino", "--backbone", "resnet_tiny", "--projector", "64-32",
                                "--lr", "none", "--compile", "--no-gpu-augment", "--lambd", "0.01",
                                "--image-size", "32", "--limit-train", "8", "--num-workers", "1",
                                "--corrupt-policy", "skip", "--data-ssl-split", "trainaug"])
    assert (c.method, c.backbone, c.projector, c.lr, c.compile, c.gpu_augment) == (
        "dino", "resnet_tiny", (64, 32), None, True, False)
    assert c.barlow_twins.lambd == 0.01
    assert (c.data.image_size, c.data.limit_train, c.data.num_workers, c.data.corrupt_policy, c.data.ssl_split) == (
        32, 8, 1, "skip", "trainaug")
    assert _to_config("pretrain", ["--lr", "recipe"]).lr is None  # the documented word (metadata cli_none_words)
    c = _to_config("pretrain", ["--compile", "false", "--gpu-augment", "yes", "--dino-out-dim", "256",
                                "--dino.local_crops", "4", "--barlow-twins.scale", "0.5"])
    assert (c.compile, c.gpu_augment, c.dino.out_dim, c.dino.local_crops, c.barlow_twins.scale) == (
        False, True, 256, 4, 0.5)
    c = _to_config("segment", ["--head", "linear", "--fusion-alpha", "0.3", "--fusion-steps", "3",
                               "--weight-decay", "0", "--compile", "--dataset", "coco_stuff", "--limit-val", "4",
                               "--data.corrupt_policy", "skip"])
    assert (c.head, c.fusion_alpha, c.fusion_steps, c.weight_decay, c.compile) == ("linear", 0.3, 3, 0.0, True)
    assert (c.data.dataset, c.data.limit_val, c.data.corrupt_policy) == ("coco_stuff", 4, "skip")


def test_segment_presets_stay_under_explicit_flags(tmp_path):
    c = _to_config("segment", ["--evaluation", "e3", "--head", "setr_naive"])  # case-insensitive name
    assert (c.evaluation, c.backbone, c.head, c.fusion) == ("E3", "vit_nano_patch8", "setr_naive", "features")
    c = _to_config("segment", ["--evaluation", "E1", "--size", "full", "--fusion-steps", "3"])
    assert (c.backbone, c.head, c.fusion_steps) == ("resnet50", "deeplabv3", 3)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_module_docstring_examples_parse(script):
    """Every `python experiments/<script>.py ...` line of the module docstring is a valid command."""
    import shlex

    from core.errors import DataError

    lines = [ln.strip() for ln in _module(script).__doc__.splitlines()
             if ln.strip().startswith(f"python experiments/{script}.py")]
    assert len(lines) >= 3
    for line in lines:
        argv = shlex.split(line.split("#", 1)[0])[2:]
        try:
            _to_config(script, argv)
        except DataError as e:  # an example pointing at a real dataset folder this machine lacks
            assert "--data-root" in str(e) and "--data-root" in argv, (line, e)


# ============================================================================ (c) a bad value for EVERY flag
def _bad_value(spec) -> str:
    t = spec.type
    if t is bool:
        return "maybe"
    if t in (int, float):
        return "x"
    if typing.get_origin(t) is tuple:
        return "x"
    return "bogus_name_xyz"


def _bad_cases():
    cases = []
    for script in SCRIPTS:
        cls = _config_cls(script)
        for spec in config_flags(cls):
            bad = _bad_value(spec)
            try:  # a free-form string (a path) has no bad value the config can refuse
                cls.from_dict(_nested(spec.path, bad))
                continue
            except ConfigError:
                pass
            cases.append((script, spec.flag, bad, spec.path[-1]))
    return cases


def test_a_bad_value_for_every_flag_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TWINSEG_TRACEBACK", raising=False)
    cases = _bad_cases()
    kinds = {(s, f) for s, f, _, _ in cases}
    assert ("pretrain", "--epochs") in kinds and ("segment", "--data-image-size") in kinds and len(cases) > 40
    for i, (script, flag, bad, name) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code, stdout, err = _call_main(script, [flag, bad, "--output", str(out), "--no-progress"], capsys)
        line = _assert_one_line(code, err, name)
        assert bad in line, line
        assert "Traceback" not in err + stdout
        assert not out.exists(), f"{script} {flag} {bad}: wrote {out}"


def test_bad_evaluation_and_method_come_from_the_registries(capsys, tmp_path):
    from core.evaluations import EVALUATIONS

    code, _, err = _call_main("segment", ["--evaluation", "E9", "--output", str(tmp_path / "o")], capsys)
    _assert_one_line(code, err, "evaluation='E9'", ", ".join(EVALUATIONS))
    code, _, err = _call_main("pretrain", ["--method", "simclr", "--output", str(tmp_path / "o")], capsys)
    _assert_one_line(code, err, "method='simclr'", "barlow_twins")
    assert not (tmp_path / "o").exists()


def test_segment_missing_data_root_is_one_line(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, _, err = _call_main("segment", ["--data-root", str(missing), "--output", str(tmp_path / "o")], capsys)
    _assert_one_line(code, err, f"--data-root {missing}: no such folder")
    assert not (tmp_path / "o").exists()


# ============================================================================ (d) unknown flags, missing values
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("argv,needle", [
    (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag 1"),
    (["--epochs"], "argument --epochs: expected one argument"),
    (["--epoch", "3"], "unrecognized arguments: --epoch"),  # no prefix abbreviations
    (["--no-compile", "true"], "--no-compile: takes no value"),
    (["--data.bogus", "1"], "unrecognized arguments: --data.bogus"),
])
def test_usage_errors_are_one_line(script, argv, needle, capsys, tmp_path):
    code, _, err = _call_main(script, argv + ["--output", str(tmp_path / "o")], capsys)
    _assert_one_line(code, err, needle, "--help")
    assert not (tmp_path / "o").exists()


def test_segment_size_choice_is_one_line(capsys):
    code, _, err = _call_main("segment", ["--size", "huge"], capsys)
    _assert_one_line(code, err, "--size", "huge")


# ============================================================================ (e) --help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_its_doc_and_default(script, capsys):
    code, out, err = _call_main(script, ["--help"], capsys)
    assert code == 0 and not err
    flat = "".join(out.split())  # argparse re-wraps (and breaks at hyphens)
    specs = config_flags(_config_cls(script))
    documented = 0
    for spec in specs:
        assert spec.flag in out, spec.flag
        assert "".join(f"(default:{format_value(spec.default)}".split()) in flat, spec.dotted
        if spec.help:
            documented += 1
            assert "".join(spec.help.split()) in flat, spec.dotted
    assert documented > 0
    for flag in ("--output", "--no-progress"):
        assert flag in out
    if script == "segment":
        assert "--size" in out and "backbone size (--size)" in out


# ============================================================================ (f) docs, aliases, spellings
@dataclass(frozen=True)
class _Inner(ConfigBase):
    """An inner section."""

    image_size: int = field(default=64, metadata={"cli_aliases": ("image-size", "px")})
    """Side in px; 100% of the image."""
    fast: bool = False
    """Go fast."""
    limit: Optional[int] = None
    """At most N."""
    where: Optional[str] = field(default=None, metadata={"help": "from metadata"})


@dataclass(frozen=True)
class _Base(ConfigBase):
    lr: Optional[float] = field(default=0.1, metadata={"cli_none_words": ("recipe",)})
    """Base doc of lr."""
    widths: tuple[int, ...] = (4, 4)
    """Widths."""


@dataclass(frozen=True)
class _Outer(_Base):
    """The outer config."""

    lr: Optional[float] = field(default=0.2, metadata={"cli_none_words": ("recipe",)})
    """Overridden doc of lr."""
    some_name: str = "a"
    undocumented: int = 3
    my_section: _Inner = field(default_factory=_Inner)
    """The section's own doc."""


def _outer(argv):
    p = OneLineParser(prog="t")
    add_config_arguments(p, _Outer)
    d = config_dict_from_args(p.parse_args(argv), _Outer)
    return d, _Outer.from_dict(d)


def test_docs_come_from_attribute_docstrings_then_metadata():
    docs = field_docs(_Outer)
    assert docs["lr"] == "Overridden doc of lr." and docs["widths"] == "Widths."  # subclass wins, base kept
    assert "undocumented" not in docs and "some_name" not in docs
    by = {s.dotted: s for s in config_flags(_Outer)}
    assert by["my_section.where"].help == "from metadata"
    assert by["my_section.image_size"].help == "Side in px; 100% of the image."
    assert by["undocumented"].help == ""
    p = OneLineParser(prog="t")
    add_config_arguments(p, _Outer)
    text = p.format_help()  # '%' in a doc does not break argparse's formatting
    assert "100% of the image" in text and "(default: 64)" in text and "The section's own doc" in text
    assert "--my-section.FIELD" in text or "--my_section.FIELD" in text


def test_aliases_sections_and_spellings():
    for argv in (["--my-section-image-size", "32"], ["--image-size", "32"], ["--px", "32"],
                 ["--my_section.image_size", "32"], ["--my-section.image-size", "32"],
                 ["--my_section.image-size", "32"], ["--my-section.image_size=32"]):
        d, cfg = _outer(argv)
        assert d == {"my_section": {"image_size": "32"}}, argv  # the string as typed: the config coerces
        assert cfg.my_section.image_size == 32
    d, cfg = _outer(["--my-section-fast"])
    assert d == {"my_section": {"fast": "true"}} and cfg.my_section.fast is True
    d, cfg = _outer(["--my-section-fast", "--no-my-section.fast"])
    assert cfg.my_section.fast is False
    d, cfg = _outer(["--lr", "recipe", "--my-section-limit", "null", "--widths", "8-16"])
    assert d == {"lr": None, "my_section": {"limit": None}, "widths": "8-16"}
    assert cfg.lr is None and cfg.widths == (8, 16)
    d, cfg = _outer(["--some-name", "none"])  # 'none' is a plain string for a non-Optional field
    assert cfg.some_name == "none"


def test_declared_aliases_of_the_real_configs_work():
    n = 0
    for script in SCRIPTS:
        for spec in config_flags(_config_cls(script)):
            for alias in spec.flags[1:]:
                text = format_value(spec.default)
                assert _parsed_dict(script, [alias, text]) == _parsed_dict(script, [spec.flag, text]), alias
                n += 1
    assert n > 0


# ============================================================================ (g) collisions are bugs
@dataclass(frozen=True)
class _Sub(ConfigBase):
    root: Optional[str] = None


@dataclass(frozen=True)
class _FieldClash(ConfigBase):
    data_root: str = "x"
    data: _Sub = field(default_factory=_Sub)


@dataclass(frozen=True)
class _AliasClash(ConfigBase):
    epochs: int = 1
    steps: int = field(default=2, metadata={"cli_aliases": ("epochs",)})


@dataclass(frozen=True)
class _BoolClash(ConfigBase):
    compile: bool = False
    no_compile: int = 0


@dataclass(frozen=True)
class _ScriptClash(ConfigBase):
    output: str = "x"


@pytest.mark.parametrize("cls,flag", [(_FieldClash, "--data-root"), (_AliasClash, "--epochs"),
                                      (_BoolClash, "--no-compile"), (_ScriptClash, "--output")])
def test_a_flag_collision_raises_when_the_parser_is_built(cls, flag):
    p = argparse.ArgumentParser()
    p.add_argument("--output")
    with pytest.raises(FlagCollision, match=flag):
        add_config_arguments(p, cls)


def test_exclude_leaves_fields_out():
    p = OneLineParser(prog="t")
    specs = add_config_arguments(p, _Outer, exclude=("undocumented", "my_section.limit"))
    paths = {s.dotted for s in specs}
    assert "undocumented" not in paths and "my_section.limit" not in paths and "my_section.fast" in paths
