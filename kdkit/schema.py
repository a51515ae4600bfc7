"""A small typed-schema validator for dataclasses.

Config sections and method options are plain dataclasses. :func:`parse` turns a dict (from YAML and
``key=value`` overrides) into such a dataclass, checking every key and value before any work starts:
unknown keys get a did-you-mean, values are checked against the type hints (``int``, ``float``,
``bool``, ``str``, ``Optional``, ``Literal``, ``list[...]``, ``dict``, nested dataclasses and unions of
those) and against bounds given in the field metadata (``ge``, ``gt``, ``le``, ``lt``).

Field metadata keys: ``help`` (one line shown in docs and errors), ``ge``/``gt``/``le``/``lt`` (bounds).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from .errors import ConfigError, did_you_mean

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` checked (and gently coerced) against type `tp`, or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[tuple[Any, ConfigError]] = []
        # try the most specific alternatives first so 3 stays an int in `int | float`
        for alt in sorted(args, key=lambda a: 0 if a in (bool, int) else 1):
            if alt is type(None):
                continue
            try:
                return _coerce(value, alt, where)
            except ConfigError as e:
                errors.append((alt, e))
        for alt, e in errors:  # a string meant as one of a few names: the did-you-mean is the useful error
            if isinstance(value, str) and get_origin(alt) is Literal:
                raise e
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        hint = did_you_mean(str(value), [str(a) for a in allowed])
        raise ConfigError(
            f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-3` as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return parse(tp, value, where)
    raise TypeError(f"schema type {tp!r} at {where} is not supported")  # a kdkit bug, not user input


def _check_bounds(value: Any, f: dataclasses.Field, where: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    m = f.metadata
    if "ge" in m and not value >= m["ge"]:
        raise ConfigError(f"{where}: must be >= {m['ge']}, got {value}")
    if "gt" in m and not value > m["gt"]:
        raise ConfigError(f"{where}: must be > {m['gt']}, got {value}")
    if "le" in m and not value <= m["le"]:
        raise ConfigError(f"{where}: must be <= {m['le']}, got {value}")
    if "lt" in m and not value < m["lt"]:
        raise ConfigError(f"{where}: must be < {m['lt']}, got {value}")


def parse(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and bad values with a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown key '{full}'{did_you_mean(str(key), fields)}; "
                f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}"
            )
        v = _coerce(value, hints[key], full)
        _check_bounds(v, fields[key], full)
        kwargs[key] = v
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required key(s) {', '.join(missing)}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for YAML and JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field of dataclass `cls`, for docs and `--help`."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f.name, _type_name(hints[f.name]), to_dict(default), f.metadata.get("help", "")))
    return rows


def opt(default: Any = dataclasses.MISSING, help: str = "", **bounds: Any) -> Any:
    """Shorthand for a dataclass field with help text and bounds."""
    meta = {"help": help, **bounds}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
