"""Method settings as dataclasses: the single source of every default and of key validation.

A method module names its settings dataclass in the class attribute ``settings_class``. Config
composition takes the method group's schema from it (:func:`settings_defaults`: the YAML files hold
only what differs), and the module builds its settings with :func:`build_settings`, which checks
each value's type against the field's annotation and turns lists into tuples, naming the key on
error. Validation that depends on several values lives in the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from sdzero.config import ConfigError, _did_you_mean

T = TypeVar("T")


def _plain(value: Any) -> Any:
    """Tuples to lists (YAML/OmegaConf containers), recursively."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def settings_defaults(cls: type) -> dict[str, Any]:
    """Every field of a settings dataclass with its default, as plain YAML-able values."""
    default = cls()
    return {f.name: _plain(getattr(default, f.name)) for f in dataclasses.fields(cls) if f.init}


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


_NO = object()


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as the annotation ``hint`` wants it, or ``_NO``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            got = _coerce(value, arg)
            if got is not _NO:
                return got
        return _NO
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return _NO
        item = typing.get_args(hint)[0]
        items = [_coerce(v, item) for v in value]
        return _NO if any(v is _NO for v in items) else tuple(items)
    if hint is type(None):
        return None if value is None else _NO
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else _NO
    if hint is str:
        return value if isinstance(value, str) else _NO
    return value


def coerce_values(
    names: Sequence[str], hints: Mapping[str, Any], values: Mapping[str, Any], key: str = "method"
) -> dict[str, Any]:
    """``values`` as their fields' annotations (``hints``) want them; an unknown key or a wrong
    type is a ``key.name`` error. A field of ``names`` without a hint takes its value as it is."""
    kwargs = {}
    prefix = f"{key}." if key else ""
    for name, value in values.items():
        if name not in names:
            hint = _did_you_mean(name, list(names), prefix)
            raise ConfigError(f"unknown config key {prefix}{name}.{hint}")
        got = _coerce(value, hints[name]) if name in hints else value
        if got is _NO:
            raise ConfigError(f"{prefix}{name} must be {_describe(hints[name])}, got {value!r}")
        kwargs[name] = got
    return kwargs


def build_settings(cls: type[T], values: Mapping[str, Any], key: str = "method") -> T:
    """``cls(**values)`` with unknown keys and wrong types reported as ``key.name`` errors."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = coerce_values(names, typing.get_type_hints(cls), values, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a dataclass's own checks (they name their keys)
        raise ConfigError(str(err)) from err
