"""Field checks for the frozen config dataclasses, shared by `model/` and `training/`.

Every check names the dataclass and the field (`TokenizerTrainConfig.steps must be …`), so a bad
`--set` value or a hand-edited config.json fails before anything is built. A `bool` is never a number
here: Python counts `True` as the int 1, which would let `steps=True` through a plain `isinstance`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, never a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fail(owner: object, name: str, what: str, value: object) -> None:
    raise ValueError(f"{type(owner).__name__}.{name} must be {what}, got {value!r}")


def positive_ints(owner: object, *names: str) -> None:
    """Each named field of `owner` is an int ≥ 1."""
    for name in names:
        value = getattr(owner, name)
        if not (_is_int(value) and value >= 1):
            _fail(owner, name, "a positive int", value)


def non_negative_ints(owner: object, *names: str) -> None:
    """Each named field of `owner` is an int ≥ 0."""
    for name in names:
        value = getattr(owner, name)
        if not (_is_int(value) and value >= 0):
            _fail(owner, name, "an int ≥ 0", value)


def positive_numbers(owner: object, *names: str) -> None:
    """Each named field of `owner` is a finite number > 0."""
    for name in names:
        value = getattr(owner, name)
        if not (is_number(value) and value > 0):
            _fail(owner, name, "a finite number > 0", value)


def non_negative_numbers(owner: object, *names: str) -> None:
    """Each named field of `owner` is a finite number ≥ 0."""
    for name in names:
        value = getattr(owner, name)
        if not (is_number(value) and value >= 0):
            _fail(owner, name, "a finite number ≥ 0", value)


def fraction(owner: object, *names: str, closed: bool = False) -> None:
    """Each named field of `owner` is a number in [0, 1) (a probability or a decay), or [0, 1] when
    `closed`."""
    for name in names:
        value = getattr(owner, name)
        if not (is_number(value) and value >= 0.0 and (value <= 1.0 if closed else value < 1.0)):
            _fail(owner, name, f"a number in [0, 1{']' if closed else ')'}", value)


def betas(owner: object, name: str = "betas") -> None:
    """An Adam `(beta1, beta2)` pair, each in [0, 1)."""
    value = getattr(owner, name)
    if not (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(is_number(b) and 0.0 <= b < 1.0 for b in value)
    ):
        _fail(owner, name, "two numbers in [0, 1)", value)


def one_of(owner: object, name: str, choices: Iterable[object]) -> None:
    """The named field of `owner` is one of `choices`."""
    value = getattr(owner, name)
    allowed = tuple(choices)
    if value not in allowed:
        _fail(owner, name, f"one of {allowed}", value)
