"""The machinery of the typed config sections: every field checked against its annotation, then
the section's own rules; an invalid value is a ``ConfigError`` naming the dotted key.

``_Section`` is the base of ``ModelConfig``, ``DataConfig`` and ``TrainConfig``
(``aoe.config.sections``): ``validate()`` coerces each field (int -> float for float fields,
tuple -> list, ``"3e-4"`` -> 3e-4; integers within int64, numbers within float32) and calls the
section's ``_check``, which uses the helpers ``_positive``, ``_non_negative``, ``_finite``,
``_choice`` and ``_fail``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from aoe.errors import InputError, shown


class ConfigError(InputError):
    """An invalid, unknown or ill-typed configuration value (the message names the dotted key), or
    a config file that cannot be read as one (the message names the file). A ``ValueError``."""



def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


#: The largest magnitudes a config value may have: its integers end up in int64 tensors (seeds,
#: sizes, steps), its numbers in float32 arithmetic (the learning rate times a gradient...).
_INT64_MAX = 2**63 - 1
_FLOAT32_MAX = 3.4028234663852886e38


def _as_number(value: Any, bad: ConfigError) -> int | float:
    """A float field's value as an int or float; strings such as ``3e-4`` (which YAML 1.1 reads as
    text) are parsed. Anything else raises ``bad``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise bad from None
    return value


def _check_magnitude(value: int | float, limit: float, key: str, kind: str) -> None:
    """Refuse a finite value beyond what ``kind`` holds (inf and nan are left to the sections' rules)."""
    if (isinstance(value, int) or math.isfinite(value)) and abs(value) > limit:
        raise ConfigError(f"{key}={shown(value, 40)} is out of range: it must fit {kind} "
                          f"(magnitude at most {limit:.3g}); give a smaller value")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it normalized (int -> float for float
    fields, tuple -> list). Strings such as ``3e-4`` (which YAML 1.1 reads as text) are accepted
    for float fields."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        raise ConfigError(f"{key}: unsupported annotation {tp}")  # pragma: no cover
    bad = ConfigError(f"{key}={shown(value)} must be {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        _check_magnitude(value, _INT64_MAX, key, "a 64-bit integer")
        return value
    if tp is float:
        value = _as_number(value, bad)
        _check_magnitude(value, _FLOAT32_MAX, key, "a 32-bit float")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")  # pragma: no cover


class _Section:
    """Shared machinery of the three sections: type coercion then ``_check`` on construction."""

    SECTION = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Type-check and validate every field (raises ``ConfigError`` naming the key)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self._key(f.name)))
        self._check()

    def _check(self) -> None:  # pragma: no cover - overridden
        pass

    # -- helpers for _check ----------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}"

    def _fail(self, name: str, why: str) -> None:
        raise ConfigError(f"{self._key(name)}={getattr(self, name)!r} {why}")

    def _positive(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and not v > 0:
                self._fail(n, "must be > 0")

    def _non_negative(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and not v >= 0:
                self._fail(n, "must be >= 0")

    def _finite(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and not math.isfinite(v):
                self._fail(n, "must be finite")

    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            self._fail(name, f"is not one of {list(choices)}")
