"""Command-line flags generated from the typed configs (`core.config`).

Every field of a config dataclass becomes one flag, nested sections included:

- a top-level field `batch_size` is `--batch-size VALUE`;
- a field of a nested section (a field whose type is itself a `ConfigBase` dataclass, e.g.
  `data: DataConfig`) is `--data-image-size VALUE`, equally `--data.image_size` / `--data.image-size`;
- extra names come from the field's metadata: `field(..., metadata={"cli_aliases": ("image-size",)})`
  (names without the leading dashes);
- a bool field is `--compile` / `--no-compile` (also `--compile false`);
- an Optional field takes the words `none` / `null` (and any `metadata["cli_none_words"]`) for None.

The help of a flag is the field's own doc (the attribute docstring written right after the field in
the class body, else `metadata["help"]`) followed by its ONE default, read from the dataclass.

Values stay the strings the user typed: `Cls.from_dict` coerces and validates them, so the config
remains the only validator and a bad value ends in its one-line `ConfigError`. Only flags the user
gave reach the dict (argparse.SUPPRESS defaults): every default lives in the dataclass.

Two fields (or an alias) producing the same flag is a programming error: `FlagCollision` is raised
while the parser is built. This module does not import torch.

    p = OneLineParser(prog="python experiments/x.py")
    add_config_arguments(p, PretrainConfig)
    cfg = PretrainConfig.from_dict(config_dict_from_args(p.parse_args(argv), PretrainConfig))
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from core.config import ConfigBase

#: words that set an Optional field to None on the command line
NONE_WORDS = ("none", "null")
#: prefix of the argparse dest of every generated flag (keeps them apart from the scripts' own flags)
DEST_PREFIX = "cfg:"
_MISSING = dataclasses.MISSING


class FlagCollision(ValueError):
    """Two config fields (or a field and an alias / an existing flag) want the same flag: a bug."""


# --------------------------------------------------------------------------- field introspection
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args:
            inner = [a for a in args if a is not type(None)]
            return (inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]), True
    return tp, False


def is_section(tp: Any) -> bool:
    """True when `tp` is a nested config section (a ConfigBase dataclass)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, ConfigBase)


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: use the raw field types
        return {f.name: f.type for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _class_source_docs(klass: type) -> tuple[dict[str, str], str]:
    """(attribute docstrings, class docstring) of one class, read with `ast` from its source."""
    try:
        src = textwrap.dedent(inspect.getsource(klass))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return {}, ""
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}, ""
    docs: dict[str, str] = {}
    body = node.body
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs, ast.get_docstring(node) or ""


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of the fields of `cls` and its dataclass bases (a subclass's doc wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        docs.update(_class_source_docs(klass)[0])
    return docs


def field_help(cls: type, f: dataclasses.Field) -> str:
    """The field's own doc: its attribute docstring, else metadata["help"], else ""."""
    doc = field_docs(cls).get(f.name) or f.metadata.get("help") or ""
    return " ".join(str(doc).split())


def field_default(f: dataclasses.Field) -> Any:
    """The field's default (`default` or `default_factory()`), or dataclasses.MISSING."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def format_value(value: Any) -> str:
    """A Python value written as it is typed on the command line (from_dict reads it back)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "-".join(format_value(v) for v in value)
    return str(value)


def _dash(name: str) -> str:
    return name.replace("_", "-")


def _metavar(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _metavar(args[0]) if args else "V"
        return f"{inner}-{inner}-..."
    return {int: "INT", float: "FLOAT", str: "STR"}.get(tp, "VALUE")


@dataclass(frozen=True)
class FlagSpec:
    """One config field as a command-line flag."""

    path: tuple[str, ...]  # ("data", "image_size")
    owner: type  # the dataclass that declares the field
    field: dataclasses.Field
    type: Any  # the annotated type, Optional removed
    optional: bool
    default: Any  # dataclasses.MISSING when the field has none
    help: str  # the field's own doc
    flags: tuple[str, ...]  # shown in --help: the generated name first, then the aliases
    hidden_flags: tuple[str, ...]  # the --section.field spellings (accepted, not listed)
    none_words: tuple[str, ...]

    @property
    def dest(self) -> str:
        return DEST_PREFIX + ".".join(self.path)

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return self.flags[0]

    @property
    def is_bool(self) -> bool:
        return self.type is bool


def config_flags(cls: type, *, exclude: Iterable[str] = (), _prefix: tuple[str, ...] = ()) -> list[FlagSpec]:
    """The flags of every field of `cls`, recursing into sections (discovered from the type hints).

    `exclude`: dotted field paths ("evaluation", "data.root", or a whole section "data") to leave out.
    """
    exclude = set(exclude)
    hints = _type_hints(cls)
    out: list[FlagSpec] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = _prefix + (f.name,)
        dotted = ".".join(path)
        if dotted in exclude:
            continue
        tp, optional = _unwrap_optional(hints.get(f.name, f.type))
        if is_section(tp):
            out.extend(config_flags(tp, exclude=exclude, _prefix=path))
            continue
        generated = "--" + "-".join(_dash(p) for p in path)
        aliases = f.metadata.get("cli_aliases", ()) or ()
        if isinstance(aliases, str):
            aliases = (aliases,)
        flags = [generated] + ["--" + str(a).lstrip("-") for a in aliases]
        hidden: list[str] = []
        if len(path) > 1:
            heads = {".".join(path[:-1]), ".".join(_dash(p) for p in path[:-1])}
            tails = {path[-1], _dash(path[-1])}
            hidden = sorted({f"--{h}.{t}" for h in heads for t in tails})
        flags = list(dict.fromkeys(flags))
        hidden = [h for h in hidden if h not in flags]
        none_words = tuple(NONE_WORDS) + tuple(str(w).lower() for w in f.metadata.get("cli_none_words", ()) or ())
        out.append(FlagSpec(path=path, owner=cls, field=f, type=tp, optional=optional, default=field_default(f),
                            help=field_help(cls, f), flags=tuple(flags), hidden_flags=tuple(hidden),
                            none_words=none_words if optional else ()))
    return out


# --------------------------------------------------------------------------- argparse pieces
class _BoolFlag(argparse.Action):
    """`--x` (true), `--x VALUE` (passed on as typed: the config validates it), `--no-x` (false)."""

    def __init__(self, option_strings, dest, negatives: Sequence[str] = (), **kw):
        kw.setdefault("nargs", "?")
        super().__init__(option_strings, dest, **kw)
        self.negatives = tuple(negatives)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.negatives:
            if values is not None:
                parser.error(f"argument {option_string}: takes no value (got {values!r})")
            setattr(namespace, self.dest, "false")
        else:
            setattr(namespace, self.dest, "true" if values is None else values)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions/epilogs as written; shows a bool flag as `--x [true|false], --no-x`."""

    def _format_action_invocation(self, action):
        if isinstance(action, _BoolFlag):
            pos = [o for o in action.option_strings if o not in action.negatives]
            return ", ".join([f"{o} [true|false]" for o in pos] + list(action.negatives))
        return super()._format_action_invocation(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are ONE line (`twinseg: error: ...`) and exit 2, no usage dump.

    Prefix abbreviations are off: a flag list generated from the config grows, and an abbreviation
    that works today would turn ambiguous (or silently mean another field) tomorrow."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message: str):  # noqa: D401
        from core.cli import fail

        fail(f"{message} (see {self.prog} --help)")


def _help_text(spec: FlagSpec) -> str:
    text = spec.help
    if spec.default is not _MISSING:
        extra = f"default: {format_value(spec.default)}"
    else:
        extra = "required"
    extra_words = [w for w in spec.none_words if w not in NONE_WORDS]
    if spec.optional and (spec.default is not None or extra_words):
        extra += f"; {'/'.join([spec.none_words[0], *extra_words])} allowed"
    if spec.is_bool:
        extra += f"; {spec.flags[0].replace('--', '--no-', 1)} for false"
    text = f"{text} ({extra})" if text else f"({extra})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _negatives(flags: Sequence[str]) -> list[str]:
    return ["--no-" + f[2:] for f in flags]


def _check_free(parser: argparse.ArgumentParser, spec: FlagSpec, options: Sequence[str],
                claimed: dict[str, str]) -> None:
    taken = getattr(parser, "_option_string_actions", {})
    for opt in options:
        if opt in claimed and claimed[opt] != spec.dotted:
            raise FlagCollision(f"flag {opt} of field {spec.dotted} is also the flag of field {claimed[opt]}")
        if opt in taken:
            other = taken[opt].dest
            other = other[len(DEST_PREFIX):] if other.startswith(DEST_PREFIX) else f"the script's {other!r} flag"
            raise FlagCollision(f"flag {opt} of field {spec.dotted} collides with {other}")
    for opt in options:
        claimed[opt] = spec.dotted


def _group_title(cls: type, path: tuple[str, ...], doc: str = "") -> tuple[str, Optional[str]]:
    doc = " ".join((doc or _class_source_docs(cls)[1].split("\n\n")[0]).split())
    if not path:
        return f"{cls.__name__} fields", doc or None
    sec = ".".join(path)
    flag = "-".join(_dash(p) for p in path)
    note = f"flags --{flag}-FIELD, also accepted as --{sec}.FIELD"
    return f"section {sec} ({cls.__name__})", (f"{doc} ({note})" if doc else note)


def _section_of(cls: type, path: tuple[str, ...]) -> tuple[type, str]:
    """The section class at `path` below `cls` and the doc of the field holding it."""
    doc = ""
    for name in path:
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        doc = field_help(cls, f)
        cls = _unwrap_optional(_type_hints(cls).get(name, f.type))[0]
    return cls, doc


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *,
                         exclude: Iterable[str] = ()) -> list[FlagSpec]:
    """Add one flag per field of `cls` (sections included) to `parser`; returns their specs.

    Flags store the typed string under a private dest (default SUPPRESS: absent unless given);
    read them back with `config_dict_from_args`. Raises FlagCollision on a duplicated flag.
    """
    specs = config_flags(cls, exclude=exclude)
    claimed: dict[str, str] = {}
    # validate everything before adding anything (a collision leaves the parser untouched)
    for spec in specs:
        options = list(spec.flags) + list(spec.hidden_flags)
        if spec.is_bool:
            options += _negatives(spec.flags) + _negatives(spec.hidden_flags)
        _check_free(parser, spec, options, claimed)
    groups: dict[tuple[str, ...], Any] = {}
    for spec in specs:
        key = spec.path[:-1]
        if key not in groups:
            sec_cls, doc = _section_of(cls, key)
            title, desc = _group_title(sec_cls, key, doc)
            groups[key] = parser.add_argument_group(title, desc)
        group = groups[key]
        common = dict(dest=spec.dest, default=argparse.SUPPRESS)
        if spec.is_bool:
            group.add_argument(*spec.flags, *_negatives(spec.flags), action=_BoolFlag,
                               negatives=_negatives(spec.flags), help=_help_text(spec), **common)
            if spec.hidden_flags:
                group.add_argument(*spec.hidden_flags, *_negatives(spec.hidden_flags), action=_BoolFlag,
                                   negatives=_negatives(spec.hidden_flags), help=argparse.SUPPRESS, **common)
        else:
            metavar = _metavar(spec.type) + ("|none" if spec.optional else "")
            group.add_argument(*spec.flags, metavar=metavar, help=_help_text(spec), **common)
            if spec.hidden_flags:
                group.add_argument(*spec.hidden_flags, metavar=metavar, help=argparse.SUPPRESS, **common)
    return specs


def config_dict_from_args(namespace: argparse.Namespace, cls: type, *, exclude: Iterable[str] = ()) -> dict:
    """The flags the user gave, as the nested dict `cls.from_dict` takes (values still strings,
    the none words of Optional fields already None)."""
    given = vars(namespace)
    out: dict = {}
    for spec in config_flags(cls, exclude=exclude):
        if spec.dest not in given:
            continue
        value = given[spec.dest]
        if spec.optional and isinstance(value, str) and value.strip().lower() in spec.none_words:
            value = None
        d = out
        for name in spec.path[:-1]:
            d = d.setdefault(name, {})
        d[spec.path[-1]] = value
    return resolve_paths(out)


def resolve_paths(d: dict, base=None) -> dict:
    """`d` (a config dict) with its relative paths made absolute against `base` (default: the current
    folder) when it is read: a `checkpoint:PATH` source, data.root, data.ssl_root. A run then names the same
    files wherever it is resumed from, and a result's identity (core/runs/identity.py) holds absolute paths."""
    from pathlib import Path

    base = Path.cwd() if base is None else Path(base)

    def absolute(p: str) -> str:
        q = Path(p.strip()).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    out = dict(d)
    src = out.get("source")
    if isinstance(src, str) and src.startswith("checkpoint:") and src[len("checkpoint:"):].strip():
        out["source"] = "checkpoint:" + absolute(src[len("checkpoint:"):])
    if isinstance(out.get("data"), dict):
        data = dict(out["data"])
        for k in ("root", "ssl_root"):
            if isinstance(data.get(k), str) and data[k].strip():
                data[k] = absolute(data[k])
        out["data"] = data
    return out
