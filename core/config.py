"""Job configs: one frozen dataclass per job, loaded from YAML and overridable by flags.

Each field is declared once with :func:`option`; its help text feeds both ``--help`` and
:func:`config_help`, so the two cannot disagree. Values are layered, later wins:

    dataclass defaults <- YAML file (--config) <- flags given on the command line <- overrides

A value of the wrong type raises :class:`ConfigError` naming the field and where the value
came from. Nothing is rewritten silently; the only conversions are int -> float, list -> tuple
(YAML has no tuples) and '1e-6' -> float (YAML 1.1 reads exponents without a dot as strings).

    @dataclass(frozen=True)
    class ChatConfig:
        model: str = option(REQUIRED, "local model directory, hub id, or 'default'")
        temperature: float = option(0.0, "sampling temperature (0 = greedy)")

    add_config_arguments(parser, ChatConfig)
    config = load_config(ChatConfig, parser.parse_args())

Nested dataclass fields are flattened: their own fields become top-level flags (so every
name must be unique), and in YAML they may be written flat or as a mapping under the field.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import yaml

REQUIRED: Any = dataclasses.MISSING
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""Default for options without one: required on the command line unless the YAML sets it."""


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid. The message names the field and source."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a setting's value must be: its test and the words that state it, written once.

    ``at_least(2).because("a pair needs two answers")`` tests ``>= 2`` and says "at least 2: a
    pair needs two answers"; ``above(0) & at_most(1)`` says "above 0 and at most 1". Applied to
    a value it gives the :class:`Check` that :func:`failing` reads."""

    text: str
    test: Callable[[Any], bool]

    def __call__(self, value) -> Check:
        return Check(bool(self.test(value)), value, self.text)

    def __and__(self, other: Rule) -> Rule:
        return Rule(f"{self.text} and {other.text}", lambda v: self.test(v) and other.test(v))

    def because(self, why: str) -> Rule:
        return Rule(f"{self.text}: {why}", self.test)

    def or_none(self) -> Rule:
        """The rule, or no value at all (a setting whose None means "let the cluster decide")."""
        return Rule(f"{self.text}, or unset", lambda v: v is None or self.test(v))


def at_least(low) -> Rule:
    return Rule(f"at least {low}", lambda v: v >= low)


def above(low) -> Rule:
    return Rule(f"above {low}", lambda v: v > low)


def at_most(high) -> Rule:
    return Rule(f"at most {high}", lambda v: v <= high)


def below(high) -> Rule:
    return Rule(f"below {high}", lambda v: v < high)


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule applied to a setting's value."""

    ok: bool
    value: Any
    rule: str


_UNSHOWN: Any = object()


@dataclasses.dataclass(frozen=True)
class Problem:
    """A setting whose value breaks its rule; ``str()`` gives "--flag: value (rule)"."""

    name: str
    value: Any = _UNSHOWN
    rule: str = ""

    def __str__(self) -> str:
        flag = "--" + self.name.replace("_", "-")
        if self.value is _UNSHOWN:
            return flag
        shown = repr(self.value) if isinstance(self.value, str) else json.dumps(as_recorded(self.value))
        return f"{flag}: {shown} ({self.rule})" if self.rule else f"{flag}: {shown}"


def failing(checks: dict[str, bool | Check]) -> list[Problem]:
    """The settings whose check fails (for a config's ``problems()``). Give each its rule applied
    to its value, ``{"samples": at_least(2)(self.samples)}``, so the message says the value and
    the range; a bare bool names the setting alone."""
    problems = []
    for name, check in checks.items():
        if isinstance(check, Check):
            if not check.ok:
                problems.append(Problem(name, check.value, check.rule))
        elif not check:
            problems.append(Problem(name))
    return problems


def require_valid(*problem_lists: list[Problem | str]) -> None:
    """Raise one :class:`ConfigError` naming every invalid setting as its flag, with its value
    and rule: "invalid value for --samples: 1 (at least 2: a pair needs two answers)". A plain
    string in a list is a setting's name."""
    bad = [p if isinstance(p, Problem) else Problem(p) for problems in problem_lists for p in problems]
    if bad:
        raise ConfigError("invalid value for " + "; ".join(map(str, bad)))


def option(default, help: str, *, choices=None, flag: str | None = None, positional: bool = False,
           extend: bool = False, identity: bool = False):
    """Declare a config field: its default (or ``REQUIRED``) and its one help text.

    ``choices`` restricts the values (``Literal[...]`` annotations do the same), ``flag``
    replaces the derived ``--field-name``, ``positional`` makes it a positional argument, and
    ``extend`` lets a list flag be given several times, each adding to the list
    (argparse's ``extend``) instead of the last one replacing the others. ``identity`` marks
    a setting that changes a run's output: :func:`identity` collects them, and a rerun into
    the same folder must match them to resume (or to count as done).
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None,
                "flag": flag, "positional": positional, "extend": extend, "identity": identity}
    if default is REQUIRED:
        # keyword-only, so required fields may follow fields that have defaults
        return dataclasses.field(kw_only=True, metadata=metadata)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- walking a config class ---------------------------------------------------------------


def _is_config_class(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _walk(cls, prefix: tuple[str, ...] = ()):
    """Yield ``(path, field, type)`` for every field, nested config fields before their own."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: declare config fields with option(default, help)")
        path = prefix + (f.name,)
        yield path, f, hints[f.name]
        if _is_config_class(hints[f.name]):
            yield from _walk(hints[f.name], path)


def _leaves(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Field name -> (field, type) for every non-config field, nested ones flattened."""
    leaves, seen = {}, {"config"}  # --config is the YAML file
    for path, f, hint in _walk(cls):
        if path[-1] in seen:
            raise TypeError(f"{cls.__name__}: option name {path[-1]!r} is used twice (nested configs are flattened)")
        seen.add(path[-1])
        if not _is_config_class(hint):
            leaves[path[-1]] = (f, hint)
    return leaves


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def _default_values(cls) -> dict[str, Any]:
    """Flat name -> default. Walked inside out, so a nested field's default instance wins."""
    values = {}
    for path, f, hint in reversed(list(_walk(cls))):
        default = _field_default(f)
        if default is not REQUIRED:
            values.update(_flat_values(default) if _is_config_class(hint) else {path[-1]: default})
    return values


def _flat_values(cfg) -> dict[str, Any]:
    """Field name -> value for every leaf of a config instance, nested ones flattened."""
    leaves = (path for path, _, hint in _walk(type(cfg)) if not _is_config_class(hint))
    return {path[-1]: functools.reduce(getattr, path, cfg) for path in leaves}


def option_flag(name: str, f: dataclasses.Field) -> str:
    """The command-line flag of option ``name`` (its metadata may rename it)."""
    return f.metadata["flag"] or "--" + name.replace("_", "-")


# -- the command line ---------------------------------------------------------------------


def _show(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "empty"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def _one_of(members: list) -> Callable[[str], Any]:
    """argparse ``type`` for a union such as ``float | Literal["auto"]``: the first member that
    reads the text (a word of a Literal as itself, else the number)."""
    def read(text: str):
        for member in members:
            if typing.get_origin(member) is Literal:
                if text in typing.get_args(member):
                    return text
                continue
            try:
                return _scalar(member)[0](text)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"{text!r}: expected {' or '.join(_union_word(m) for m in members)}")

    return read


def _union_word(member) -> str:
    if typing.get_origin(member) is Literal:
        return " or ".join(map(repr, typing.get_args(member)))
    return f"a {member.__name__}" if isinstance(member, type) else str(member)


def _scalar(hint) -> tuple[Any, tuple | None]:
    """argparse ``type`` and ``choices`` for a single value."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return _one_of([m for m in typing.get_args(hint) if m is not type(None)]), None
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0]), typing.get_args(hint)
    if hint in (str, int, float, Path):
        return hint, None
    raise TypeError(f"config options of type {hint!r} are not supported on the command line")


def _argument(name: str, f: dataclasses.Field, hint, default) -> tuple[list[str], dict]:
    """The ``add_argument`` names and keywords for one field."""
    meta = f.metadata
    shown = " (required)" if default is REQUIRED else f" (default: {_show(default)})"
    if "(default" in meta["help"]:
        shown = ""  # the help text already says what happens by default
    kwargs: dict = {"default": argparse.SUPPRESS, "help": (meta["help"] + shown).replace("%", "%%")}
    members = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (Union, types.UnionType) and len(members) == 1:
        hint = members[0]  # Optional[X]: None comes only from defaults or YAML
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(hint) is dict:
        kwargs.update(type=_json, metavar="JSON")
    else:
        many = typing.get_origin(hint) in (list, tuple)
        kwargs["type"], choices = _scalar(typing.get_args(hint)[0] if many else hint)
        kwargs["choices"] = meta["choices"] or choices
        if many:
            kwargs["nargs"] = "*" if meta["positional"] else "+"
            if meta["extend"]:
                kwargs["action"] = "extend"
        elif meta["positional"]:
            kwargs["nargs"] = "?"  # so the value may come from the YAML file instead
    if meta["positional"]:
        if hint is bool:
            raise TypeError(f"bool option {name!r} cannot be positional")
        return [name], {**kwargs, "metavar": kwargs.get("metavar", name.upper())}
    return [option_flag(name, f)], {**kwargs, "dest": name}


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one argument per field of ``cls`` (nested configs as argument groups), plus ``--config``.

    Every default is ``argparse.SUPPRESS``, so the namespace holds only the flags actually
    given and :func:`load_config` can layer them over the YAML file.
    """
    try:
        parser.add_argument("--config", metavar="FILE", help="YAML file with these options; flags override it")
    except argparse.ArgumentError:
        pass  # already there, e.g. from a second config class on the same command
    _leaves(cls)  # checks names are unique before any argument is added
    defaults = _default_values(cls)
    groups: dict[tuple[str, ...], Any] = {(): parser}
    for path, f, hint in _walk(cls):
        if _is_config_class(hint):
            groups[path] = parser.add_argument_group(f"{path[-1]} options", f.metadata["help"])
            continue
        names, kwargs = _argument(path[-1], f, hint, defaults.get(path[-1], REQUIRED))
        groups[path[:-1]].add_argument(*names, **{k: v for k, v in kwargs.items() if v is not None})


# -- loading ------------------------------------------------------------------------------


class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def _conform(hint, value):
    """Return ``value`` as ``hint`` (int -> float, list -> tuple only) or raise ``_Mismatch``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch("one of " + ", ".join(map(repr, args)))
    if origin in (Union, types.UnionType):
        for member in args:
            try:
                return _conform(member, value)
            except _Mismatch:
                pass
        raise _Mismatch(" or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args))
    if hint is type(None) and value is None:
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string; it is the number
    if hint is Path and isinstance(value, str):
        return Path(value)
    try:
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            return origin(_conform(args[0], item) for item in value)
        if origin is dict and isinstance(value, dict):
            return {_conform(args[0], k): _conform(args[1], v) for k, v in value.items()}
    except _Mismatch as exc:  # name the container, since the whole value is shown
        raise _Mismatch(f"{'a mapping' if origin is dict else 'a list'} with {exc.expected} items") from None
    if isinstance(hint, type) and isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise _Mismatch({list: "a list", tuple: "a list", dict: "a mapping"}.get(origin, getattr(hint, "__name__", str(hint))))


def _checked(cls, flat: dict, where: str) -> dict:
    """Check every value of a flat ``{name: value}`` mapping against its field."""
    leaves, out = _leaves(cls), {}
    for name, value in flat.items():
        f, hint = leaves[name]
        try:
            out[name] = _conform(hint, value)
        except _Mismatch as exc:
            raise ConfigError(f"invalid `{name}` {where}: expected {exc.expected}, got "
                              f"{type(value).__name__} {value!r}") from None
        choices = f.metadata["choices"]
        bad = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if choices and v not in choices]
        if bad:
            raise ConfigError(f"invalid `{name}` {where}: {bad[0]!r} is not one of {', '.join(map(repr, choices))}")
    return out


def _flatten(cls, data, where: str) -> dict:
    """Flatten YAML-style data (nested or flat, dashes or underscores) to ``{name: value}``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {where} must be a mapping of option names, got {type(data).__name__}")
    leaves = _leaves(cls)
    groups = {path[-1]: hint for path, _, hint in _walk(cls) if _is_config_class(hint)}
    flat: dict = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in groups:
            if not isinstance(value, dict):
                raise ConfigError(f"`{name}` {where} must be a mapping of its options, got {type(value).__name__}")
            items = _flatten(groups[name], value, f"{where} (under `{name}`)")
        elif name in leaves:
            items = {name: value}
        else:
            raise ConfigError(f"unknown key {key!r} {where}; valid keys: {', '.join([*leaves, *groups])}")
        for item in items:
            if item in flat:
                raise ConfigError(f"`{item}` is given twice {where}")
        flat.update(items)
    return flat


def read_yaml(path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


def _instantiate(cls, values: dict):
    kwargs, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and _is_config_class(hints[f.name]):
            kwargs[f.name] = _instantiate(hints[f.name], values)
        elif f.init and f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _missing(name: str, f: dataclasses.Field) -> str:
    what = f"argument {name.upper()}" if f.metadata["positional"] else f"option {option_flag(name, f)}"
    return f"missing required {what} (or `{name}:` in the config file)"


def load_config(cls, args: argparse.Namespace | None = None, *, config_file: str | None = None,
                overrides: dict | None = None):
    """Build a ``cls``: defaults <- YAML (``args.config`` or ``config_file``) <- given flags <- overrides.

    The dataclass's own ``__post_init__`` runs last and may raise ``ConfigError`` itself.
    """
    values = _default_values(cls)
    path = getattr(args, "config", None) or config_file
    if path:
        values.update(_checked(cls, _flatten(cls, read_yaml(path), f"in {path}"), f"in {path}"))
    if args is not None:
        given = {name: getattr(args, name) for name in _leaves(cls) if hasattr(args, name)}
        values.update(_checked(cls, given, "on the command line"))
    if overrides:
        values.update(_checked(cls, _flatten(cls, overrides, "in overrides"), "in overrides"))
    missing = [_missing(name, f) for name, (f, _) in _leaves(cls).items() if name not in values]
    if missing:
        raise ConfigError("; ".join(missing))
    return _instantiate(cls, values)


def config_to_dict(cfg) -> dict:
    """A plain nested dict of ``cfg`` (for manifests and YAML); ``load_config`` reads it back."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return str(cfg) if isinstance(cfg, Path) else cfg


def config_help(cls) -> dict[str, str]:
    """Field name -> help text, nested fields included, in declaration order (for docs)."""
    return {path[-1]: f.metadata["help"] for path, f, _ in _walk(cls)}


def config_options(cls) -> dict[str, dataclasses.Field]:
    """Option name -> field for every option of ``cls``, nested configs flattened: the names
    of its flags (``--name-with-dashes``) and of its YAML keys."""
    return {name: f for name, (f, _) in _leaves(cls).items()}


def as_recorded(value):
    """A value as JSON reads it back (tuples as lists, paths as strings), so identities compare
    equal to the ones recorded in manifests and summaries."""
    return json.loads(json.dumps(config_to_dict(value)))


def identity(cfg, **resolved) -> dict[str, Any]:
    """The settings of ``cfg`` declared with ``option(..., identity=True)``, flat, plus
    ``resolved`` values that stand for inputs (a model's resolved path, a file's fingerprint).
    A run folder records it at the first start; a rerun resumes only with the same identity."""
    values = _flat_values(cfg)
    chosen = {name: values[name] for name, f in config_options(type(cfg)).items() if f.metadata.get("identity")}
    return as_recorded({**chosen, **resolved})


def identity_defaults(cls) -> dict[str, Any]:
    """The default of every identity setting of ``cls`` that has one, as recorded."""
    defaults = {}
    for name, f in config_options(cls).items():
        if f.metadata.get("identity") and f.default is not dataclasses.MISSING:
            defaults[name] = f.default
        elif f.metadata.get("identity") and f.default_factory is not dataclasses.MISSING:
            defaults[name] = f.default_factory()
    return as_recorded(defaults)


def recorded_identity(cls, recorded: dict[str, Any]) -> dict[str, Any]:
    """The identity settings of ``cls`` found in a recorded config (``config_to_dict`` of an
    older or newer layout: nested groups or flat keys), for runs recorded before identities were."""
    groups = {path[-1] for path, _, hint in _walk(cls) if _is_config_class(hint)}
    flat: dict[str, Any] = {}

    def collect(data: dict[str, Any]) -> None:
        for key, value in data.items():
            if key in groups and isinstance(value, dict):
                collect(value)
            else:
                flat.setdefault(key, value)

    collect(recorded)
    names = [name for name, f in config_options(cls).items() if f.metadata.get("identity")]
    return as_recorded({name: flat[name] for name in names if name in flat})
