"""Typed configs: dataclasses with a help string per field, filled from YAML and ``--set key=value``.

Every config class is a plain dataclass whose fields carry ``metadata={"help": ...}``; this module
turns YAML mappings into those dataclasses with type checks (unknown or ill-typed keys fail naming the
key and the valid ones), applies dotted overrides, and renders the help text the CLI prints.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from essa import EssaError


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise EssaError(f"config file {path} does not exist; pass a YAML file (see configs/ for examples)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EssaError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise EssaError(f"{path} must hold a mapping of config keys, not a {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key=value`` / ``section.key=value`` strings; values are parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise EssaError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise EssaError(f"--set {key}: {raw!r} is not a YAML value; quote it, e.g. --set '{key}=\"{raw}\"'") from None
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict, key: str, value) -> None:
    """``data[a][b] = value`` for ``key`` "a.b" (sections created, copied before they change)."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is not None and not isinstance(node[part], dict):
            raise EssaError(f"--set {key}: {part} is not a section (it holds {node[part]!r}); set {part} itself")
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[parts[-1]] = value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, tp, where: str):
    """Return value converted to type tp, or raise EssaError naming the key."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except EssaError as e:
                errors.append(str(e))
        raise EssaError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise EssaError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    if origin in (list, tuple):
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            if origin is list and isinstance(value, str) and typing.get_args(tp) in ((str,),):
                value = [value]  # a single string where a list of strings is expected
            else:
                raise EssaError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise EssaError(f"{where} must be a mapping, got {value!r}")
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise EssaError(f"{where} must be one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, bool, str):
        raise EssaError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = "", validate: bool = True):
    """Build dataclass ``cls`` from a mapping, checking keys and types (and ``validate()`` unless told not to)."""
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise EssaError(f"unknown config key {prefix}{unknown[0]!r}; valid keys: {', '.join(names)}")
    hints = _hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    if validate and hasattr(obj, "validate"):
        obj.validate()
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def help_text(cls, prefix: str = "") -> str:
    """One line per field: name, type, default and help (nested dataclasses indented)."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"  {prefix}{f.name}: ({tp.__name__}) {f.metadata.get('help', '')}")
            lines.append(help_text(tp, prefix=f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(f"  {prefix}{f.name} ({name}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def help_field(default=dataclasses.MISSING, help: str = "", **kw):  # noqa: A002
    """``dataclasses.field`` with a help string; mutable defaults become factories."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)
