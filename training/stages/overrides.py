"""`--set key=value` overrides of frozen dataclass configs, typed by the dataclass's own annotations.

A value is parsed according to the field it replaces (int, float, bool, str, tuples, `X | None`), so
a typo'd key or an unparsable value fails before any training starts, naming the field and the type
it expected.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """`["a.b=1", "c=x"]` → `{"a.b": "1", "c": "x"}`; an item without `=` is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key] = value.strip()
    return out


def _parse(raw: str, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(raw, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: cannot parse {raw!r} as {tp} ({'; '.join(errors)})")
    if origin is typing.Literal:
        for arg in args:
            if str(arg) == raw:
                return arg
        raise ValueError(f"{where}: {raw!r} is not one of {list(args)}")
    if tp is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"{where}: expected a boolean (true/false), got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {raw!r}") from None
    if tp is str:
        return raw
    if origin in (tuple, list):
        text = raw.strip()
        if text.startswith("["):
            try:
                items = [str(v) for v in json.loads(text)]
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: {raw!r} is not a JSON list ({exc})") from None
        else:
            items = [p.strip() for p in text.strip("()").split(",") if p.strip()]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            values = [_parse(v, args[0], where) for v in items]
        elif origin is tuple and args:
            if len(items) != len(args):
                raise ValueError(f"{where}: expected {len(args)} comma-separated values, got {raw!r}")
            values = [_parse(v, a, where) for v, a in zip(items, args, strict=True)]
        else:
            item_tp = args[0] if args else str
            values = [_parse(v, item_tp, where) for v in items]
        return tuple(values) if origin is tuple else values
    raise ValueError(f"{where}: overriding fields of type {tp} is not supported")


def apply_overrides(config: Any, overrides: Mapping[str, str], what: str) -> Any:
    """A copy of the frozen dataclass `config` with fields replaced by parsed `overrides`.

    Nested dataclass fields are reached with dots (`optim.lr=1e-4`). Unknown keys raise, listing the
    valid ones; the dataclass's own `__post_init__` validation runs on the result.
    """
    if not overrides:
        return config
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{what} is not a dataclass config")
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, str]] = {}
    for key, raw in overrides.items():
        head, dot, rest = key.partition(".")
        if head not in fields:
            raise ValueError(f"unknown {what} setting {key!r}; valid keys: {', '.join(sorted(fields))}")
        if dot:
            if not dataclasses.is_dataclass(getattr(config, head)):
                raise ValueError(f"{what}.{head} is not a nested config, so {key!r} is invalid")
            nested.setdefault(head, {})[rest] = raw
        else:
            direct[head] = _parse(raw, hints[head], f"{what}.{head}")
    for head, sub in nested.items():
        direct[head] = apply_overrides(getattr(config, head), sub, f"{what}.{head}")
    return dataclasses.replace(config, **direct)
