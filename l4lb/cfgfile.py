"""Configuration files: a frozen dataclass to JSON and back, every value type-checked.

The controller renders each process's configuration dataclass (fastpath.config.LbConfig,
agent.config.AgentConfig) into a JSON file; the process reads it back with `load`. Field
types come from the annotations: str, int, float (an int is accepted), bool, `X | None`,
`tuple[X, ...]`, `tuple[X, Y]`, `dict[str, X]` and nested dataclasses. A missing required
field, an unknown key or a value of the wrong type is a ConfigError naming the file and the
field; the dataclass's own `__post_init__` then checks ranges, so each rule lives once, in the
dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from l4lb.errors import ConfigError

T = TypeVar("T")


def load(cls: type[T], path: str | Path) -> T:
    """Read a JSON file into the dataclass `cls`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{p}: not JSON: {exc}") from None
    return from_dict(cls, data, str(p))


def from_dict(cls: type[T], data: object, where: str = "config") -> T:
    """Build `cls` from decoded JSON; ConfigError names `where` and the field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a JSON object, not {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing key {name!r}")
            continue
        kwargs[name] = _value(hints[name], data[name], f"{where}: {name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def to_dict(obj: object) -> dict[str, Any]:
    """The dataclass as JSON-ready data (tuples become lists)."""
    assert dataclasses.is_dataclass(obj) and not isinstance(obj, type)
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def dump(obj: object) -> str:
    """The dataclass as the text of its file."""
    return json.dumps(to_dict(obj), indent=1, sort_keys=True) + "\n"


def _value(tp: Any, v: object, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        for a in others:
            try:
                return _value(a, v, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {v!r} is not {_name(tp)}")
    if origin is tuple:
        if not isinstance(v, list | tuple):
            raise ConfigError(f"{where}: must be a list, not {type(v).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise ConfigError(f"{where}: must be a list of {len(args)}, not {len(v)}")
        pairs = enumerate(zip(args, v, strict=True))
        return tuple(_value(a, x, f"{where}[{i}]") for i, (a, x) in pairs)
    if origin is dict:
        if not isinstance(v, Mapping):
            raise ConfigError(f"{where}: must be an object, not {type(v).__name__}")
        return {str(k): _value(args[1], x, f"{where}.{k}") for k, x in v.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, v, where)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: must be true or false, not {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: must be an integer, not {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{where}: must be a number, not {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: must be a string, not {v!r}")
        return v
    if tp is Any:
        return v
    raise TypeError(f"{where}: unsupported field type {tp!r}")  # a bug in the dataclass


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
