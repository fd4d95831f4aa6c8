"""Typed TOML configs with command-line overrides, shared by every recipe.

A recipe's config is a dataclass whose fields are section dataclasses (`[model]`, `[training]`, ...).
Section fields hold what TOML can express: int, float, str, bool, `Literal[...]`, `X | None`, and
(nested) lists and tuples of those. Each field has a default and an attribute docstring (a string
literal on the line after it), shown by `--help` and `--dry-run`.

    cfg = main_config(MyConfig)   # --config run.toml --training.lr 2e-5 --data.seed=3 [--dry-run]

Precedence: command line > config file > defaults. TOML has no null, so an optional field is set to
None with the string "none" (or "null"), in a file as on the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from wmtp.logs import exit_with_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    try:
        import tomli as tomllib
    except ImportError as exc:
        raise ImportError("Python < 3.11 needs the 'tomli' package to read TOML configs: pip install tomli") from exc

__all__ = [
    "ConfigError",
    "config_to_dict",
    "field_docs",
    "flatten",
    "format_help",
    "main_config",
    "parse_config",
    "to_toml",
]

C = TypeVar("C")

_COMMAND_LINE = "command line"
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")
_USAGE = "[--config PATH] [--dry-run] [--help] [--section.key VALUE | --section.key=VALUE ...]"


class ConfigError(ValueError):
    """A config file or command line that does not fit the config dataclass."""


# ---------------------------------------------------------------------------------------------
# Introspection


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a class (and its bases): {field name: docstring}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (REPL, exec): no docs rather than a failure
            continue
        class_def = ast.parse(source).body[0]
        if not isinstance(class_def, ast.ClassDef):
            continue
        body = class_def.body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (string annotations included)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _sections(config_cls: type) -> dict[str, type]:
    """{section name: section dataclass} of a recipe config."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")
    sections = _field_types(config_cls)
    for name, tp in sections.items():
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise TypeError(f"{config_cls.__name__}.{name} must be a section dataclass, not {tp!r}")
    return sections


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Readable type, e.g. 'float | None', 'list[list[float]]', '"auto" | "bf16"'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(_toml_value(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", repr(tp))


def _describe(value: Any) -> str:
    """A received value with its TOML type, for error messages."""
    kind = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )
    try:
        shown = _toml_value(value)
    except TypeError:  # tables, dates and times
        shown = str(value)
    return f"{shown} ({kind})"


# ---------------------------------------------------------------------------------------------
# Validation of values read from TOML (file values, and parsed command-line arrays)


class _Mismatch(Exception):
    """A value that does not fit a type; `path` is the index suffix of the offending element."""

    def __init__(self, path: str, expected: str, value: Any):
        super().__init__(path)
        self.path, self.expected, self.value = path, expected, value


def _check(value: Any, tp: Any, path: str = "") -> Any:
    """Return `value` as type `tp` (int -> float, list -> tuple) or raise _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)):
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _check(value, arm, path)
            except _Mismatch as exc:
                if exc.path != path:  # an element of a matching container is wrong: report that
                    raise
        raise _Mismatch(path, _type_name(tp), value)
    if origin is Literal:
        # `True == 1`, so compare types too: Literal[1] must not accept `true`
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch(path, _type_name(tp), value)
    if tp is bool or tp is str:
        if type(value) is tp:
            return value
    elif tp is int:
        if type(value) is int:
            return value
    elif tp is float:
        if type(value) in (int, float):
            return float(value)
    elif origin is list:
        if type(value) is list:
            return [_check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if type(value) is list:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    else:
        raise TypeError(f"unsupported config field type {tp!r}")
    raise _Mismatch(path, _type_name(tp), value)


def _validated(value: Any, tp: Any, where: str, key: str) -> Any:
    try:
        return _check(value, tp)
    except _Mismatch as exc:
        raise ConfigError(f"{where}: {key}{exc.path}: expected {exc.expected}, got {_describe(exc.value)}") from None


# ---------------------------------------------------------------------------------------------
# Command-line values


def _from_string(raw: str, tp: Any) -> Any:
    """One non-union type from a command-line string; ValueError when it does not parse."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return raw
    if tp is bool:
        if raw.lower() in _TRUE_WORDS:
            return True
        if raw.lower() in _FALSE_WORDS:
            return False
        raise ValueError(raw)
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    if origin is Literal:
        for choice in args:  # a Literal of strings takes the word verbatim, others their TOML spelling
            if raw == (choice if isinstance(choice, str) else _toml_value(choice)):
                return choice
        raise ValueError(raw)
    if origin in (list, tuple):
        return _check(tomllib.loads(f"v = {raw}")["v"], tp)  # TOMLDecodeError is a ValueError
    raise TypeError(f"unsupported config field type {tp!r}")


def _parse_cli_value(raw: str, tp: Any, key: str) -> Any:
    """Parse a command-line string by the field's type (str verbatim, lists as TOML arrays)."""
    arms = [tp]
    if _is_union(tp):
        if type(None) in typing.get_args(tp) and raw.lower() in _NONE_WORDS:
            return None
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
    for arm in arms:
        try:
            return _from_string(raw, arm)
        except _Mismatch as exc:
            if exc.path:  # a well-formed array with a wrong element: name the element
                raise ConfigError(
                    f"{_COMMAND_LINE}: {key}{exc.path}: expected {exc.expected}, got {_describe(exc.value)}"
                ) from None
        except ValueError:
            pass
    hint = (
        " (true/false/1/0/yes/no)"
        if bool in arms
        else " (a TOML array such as [1, 2])"
        if any(typing.get_origin(a) in (list, tuple) for a in arms)
        else ""
    )
    raise ConfigError(f"{_COMMAND_LINE}: {key}: expected {_type_name(tp)}{hint}, got {raw!r}")


# ---------------------------------------------------------------------------------------------
# Resolution


def _suggest(name: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _lookup(config_cls: type, section: str, key: str, where: str) -> Any:
    """The type of `section.key`, or a ConfigError naming the unknown section/key."""
    sections = _sections(config_cls)
    if section not in sections:
        raise ConfigError(f"{where}: unknown section {section!r}{_suggest(section, sections)}")
    fields = _field_types(sections[section])
    if key not in fields:
        # A key put in the wrong section is a common slip: point to its section before a near spelling.
        elsewhere = [f"{s}.{key}" for s, cls in sections.items() if key in _field_types(cls)]
        hint = f"; did you mean {elsewhere[0]!r}?" if elsewhere else _suggest(key, fields, f"{section}.")
        raise ConfigError(f"{where}: unknown key '{section}.{key}'{hint}")
    return fields[key]


def _read_file(config_cls: type, path: str) -> dict[str, dict[str, Any]]:
    """Validated {section: {key: value}} of a TOML file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except tomllib.TOMLDecodeError as exc:  # the message carries "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    sections = _sections(config_cls)
    out: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section not in sections:
            raise ConfigError(f"{path}: unknown section {section!r}{_suggest(section, sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section}: expected a table [{section}], got {_describe(table)}")
        out[section] = {
            key: _validated(value, _lookup(config_cls, section, key, path), path, f"{section}.{key}")
            for key, value in table.items()
        }
    return out


def _split_argv(argv: list[str]) -> tuple[str | None, bool, list[tuple[str, str]]]:
    """(config path, dry run, [(dotted key, raw value)]) of a command line."""
    config_path: str | None = None
    dry_run = False
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--dry-run":
            dry_run = True
            continue
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"{_COMMAND_LINE}: unexpected argument {arg!r}; usage: {_USAGE}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            # A following option means the value was forgotten; a value that starts with "--"
            # can still be given as --key=VALUE.
            if i == len(argv) or argv[i].startswith("--"):
                raise ConfigError(f"{_COMMAND_LINE}: --{name} expects a value")
            value = argv[i]
            i += 1
        if name == "config":
            if config_path is not None:
                raise ConfigError(f"{_COMMAND_LINE}: --config given twice ({config_path!r}, {value!r})")
            config_path = value
        elif name == "dry-run":
            raise ConfigError(f"{_COMMAND_LINE}: --dry-run takes no value")
        elif "." in name:
            overrides.append((name, value))
        else:
            raise ConfigError(
                f"{_COMMAND_LINE}: unknown option '--{name}'; overrides are spelled --section.key VALUE (see --help)"
            )
    return config_path, dry_run, overrides


def parse_config(config_cls: type[C], argv: list[str] | None = None) -> C:
    """Build `config_cls` from defaults, `--config FILE` and `--section.key VALUE` overrides.

    `--help` prints the fields and `--dry-run` the resolved config as TOML; both exit 0.
    Raises ConfigError for anything that does not fit the dataclass.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(format_help(config_cls))  # the command's output (stdout), as argparse's --help
        raise SystemExit(0)
    config_path, dry_run, cli = _split_argv(argv)

    values = _read_file(config_cls, config_path) if config_path is not None else {}
    for dotted, raw in cli:
        section, _, key = dotted.partition(".")
        tp = _lookup(config_cls, section, key, _COMMAND_LINE)
        values.setdefault(section, {})[key] = _parse_cli_value(raw, tp, dotted)

    # Start from an instance so a recipe's own section defaults (default_factory) are kept.
    cfg = config_cls()
    replaced = {}
    for section, updates in values.items():
        try:
            replaced[section] = dataclasses.replace(getattr(cfg, section), **updates)
        except ValueError as exc:  # a section's __post_init__ rejecting a value or a combination
            raise ConfigError(f"[{section}]: {_post_init_message(section, exc)}") from None
    cfg = dataclasses.replace(cfg, **replaced)

    if dry_run:
        print(to_toml(cfg, with_docs=True), end="")  # the command's output (stdout)
        raise SystemExit(0)
    return cfg


def _post_init_message(section: str, exc: ValueError) -> str:
    """A section's __post_init__ error; one that names its field (`key` and `requirement`, as
    wmtp.config.sections.FieldRangeError does) is spelled `section.key requirement`."""
    key, requirement = getattr(exc, "key", None), getattr(exc, "requirement", None)
    if isinstance(key, str) and isinstance(requirement, str):
        return f"{section}.{key} {requirement}"
    return str(exc)


def main_config(config_cls: type[C], argv: list[str] | None = None) -> C:
    """parse_config for a recipe's entry point: a ConfigError becomes `error: ...` and exit 2."""
    try:
        return parse_config(config_cls, argv)
    except ConfigError as exc:
        exit_with_error(str(exc))


def format_help(config_cls: type) -> str:
    """Usage plus every section's fields with type, default and docstring."""
    lines = [
        f"usage: {Path(sys.argv[0]).name} {_USAGE}",
        "",
        "Precedence: command line > config file > defaults. Lists use TOML syntax ([1, 2]);",
        "optional fields take none. --dry-run prints the resolved config and exits.",
        "",
    ]
    defaults = config_cls()
    section_docs = field_docs(config_cls)
    for section, cls in _sections(config_cls).items():
        lines.append(f"[{section}]" + (f"  {section_docs[section]}" if section in section_docs else ""))
        docs = field_docs(cls)
        for key, tp in _field_types(cls).items():
            default = _toml_value(getattr(getattr(defaults, section), key))
            lines.append(f"  --{section}.{key}  {_type_name(tp)} = {default}")
            lines += [f"      {line}" for line in docs.get(key, "").splitlines()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Output


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} with tuples as lists, e.g. for MLflow params or a JSON dump."""
    return {
        f.name: {
            g.name: _plain(getattr(getattr(cfg, f.name), g.name)) for g in dataclasses.fields(getattr(cfg, f.name))
        }
        for f in dataclasses.fields(cfg)
    }


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"section.key": leaf} of a nested dict (leaves are scalars, lists or None)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value: Any) -> str:
    """A value as TOML (None as "none", the spelling the loader reads back as None)."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # always has "." or "e" (or is inf/-inf), so it reads back as a float
    if isinstance(value, str):
        chars = (_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in value)
        return f'"{"".join(chars)}"'
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_toml_value(v) for v in value)}]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def to_toml(cfg: Any, *, with_docs: bool) -> str:
    """The config as a TOML document that parse_config reads back to an equal config."""
    blocks = []
    section_docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        docs = field_docs(type(section))
        lines = []
        if with_docs and f.name in section_docs:
            lines += [f"# {line}".rstrip() for line in section_docs[f.name].splitlines()]
        lines.append(f"[{f.name}]")
        for g in dataclasses.fields(section):
            if with_docs and g.name in docs:
                lines += [f"# {line}".rstrip() for line in docs[g.name].splitlines()]
            lines.append(f"{g.name} = {_toml_value(getattr(section, g.name))}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
