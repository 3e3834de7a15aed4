"""The argument checks the layers share (a ``ValueError`` naming the argument and its value)."""

from __future__ import annotations


def check_positive(name: str, value: int) -> int:
    """``value``, a positive integer (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def check_non_negative(name: str, value: float) -> float:
    """``value`` as a float, >= 0."""
    if not value >= 0:
        raise ValueError(f"{name}={value!r} must be >= 0")
    return float(value)
