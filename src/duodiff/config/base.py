"""The shared machinery of every duodiff config: runtime type checks, dict round trip, :class:`ConfigError`.

A config is a frozen dataclass deriving from :class:`_Config`: its fields are checked against their annotations
when it is built (JSON lists become tuples, nested dicts nested configs), then its ``validate()`` checks
cross-field rules. ``duodiff.train.config`` builds the training configs on the same base.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = ["ConfigError", "ConfigTypeError"]

T = TypeVar("T", bound="_Config")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and the fix."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value has the wrong type (a ``TypeError`` and a :class:`ConfigError`: bad user input)."""


def _is_instance(value: Any, annotation: Any) -> bool:
    """Minimal runtime check for the annotations used in this module."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_instance(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is_instance(v, a) for v, a in zip(value, args))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (annotation, Mapping))
    return isinstance(value, annotation)


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn JSON lists into tuples and nested dicts into nested configs (after type checking)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(annotation):
            if a is not type(None) and _is_instance(value, a):
                return _coerce(value, a)
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if annotation is float and isinstance(value, int):
        return float(value)
    if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
        return annotation.from_dict(value)
    return value


@dataclass(frozen=True)
class _Config:
    """Shared machinery: type checking, JSON-friendly dict round trip, validation hook."""

    _name: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            annotation = hints[f.name]
            if not _is_instance(value, annotation):
                raise ConfigTypeError(
                    f"{self._name}.{f.name} must be {_describe(annotation)}, got {value!r} "
                    f"({type(value).__name__})."
                )
            try:
                coerced = _coerce(value, annotation)
            except (ConfigError, TypeError) as e:  # a nested config: say which one (two autoencoders share a class)
                raise type(e)(f"{f.name}: {e}") from e
            object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Check cross-field constraints; raise :class:`ConfigError` naming the fix."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists, nested configs become dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Build from a dict, rejecting unknown keys by name."""
        if not isinstance(data, Mapping):
            raise ConfigTypeError(f"{cls._name} must be a mapping, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"Unknown key(s) {unknown} in {cls._name}. Allowed keys: {sorted(names)}."
            )
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"Missing required key(s) {missing} in {cls._name}.")
        return cls(**dict(data))

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, _Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    return value


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a sequence of {_describe(args[0])}"
        return f"a sequence of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
