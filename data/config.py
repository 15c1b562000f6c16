"""One config system for every entry script: a YAML file plus dotted `key=value` overrides.

Configs are plain (possibly nested) dataclasses. Values are checked against the field types
(int, float, str, bool, Path, Literal, Optional, list, nested dataclass) and every error names the
key and what would fix it. A dataclass may define `validate(self)` to check derived values; it is
called after loading, before any expensive work. A dataclass may name groups of mutually exclusive
fields in `__exclusive__`: a command-line override of one member replaces the recipe's choice (the
other members become null in the resolved, saved config) instead of failing as "set exactly one".
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from data.artifacts import write_text_atomic

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a command-line string) to the field type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                with contextlib.suppress(ValueError):  # 37e9 (YAML reads it as a string)
                    if float(value).is_integer():
                        return int(float(value))
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _build(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here are: "
            + ", ".join(prefix + name for name in fields)
        )
    kwargs = {}
    for name, field in fields.items():
        if name in values:
            value = values[name]
            if dataclasses.is_dataclass(hints[name]) and field.default_factory is not dataclasses.MISSING \
                    and isinstance(value, dict):  # a partial section updates the field's default, not the class's
                value = merge_dicts(dataclasses.asdict(field.default_factory()), value)
            kwargs[name] = _coerce(prefix + name, value, hints[name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {prefix}{name} ({_type_name(hints[name])})")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example training.lr=1e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, recursively for nested mappings (overrides over YAML, a `deepspeed` section over ours)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def _clear_exclusive(cls: type, values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`values` (the recipe) with the other members of each exclusive group that `overrides` sets nulled."""
    values = dict(values)
    for group in getattr(cls, "__exclusive__", ()):
        chosen = [name for name in group if overrides.get(name) is not None]
        if chosen:
            values.update({name: None for name in group if name not in chosen})
    hints = typing.get_type_hints(cls)
    for name, override in overrides.items():
        if isinstance(override, dict) and dataclasses.is_dataclass(hints.get(name)):
            section = values.get(name)
            values[name] = _clear_exclusive(hints[name], section if isinstance(section, dict) else {}, override)
    return values


def load_config(cls: type[C], path: Path | None = None, overrides: list[str] | None = None) -> C:
    """Build a validated `cls` from an optional YAML file and dotted overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        values = loaded
    overridden = parse_overrides(overrides or [])
    values = merge_dicts(_clear_exclusive(cls, values, overridden), overridden)
    config = _build(cls, values)
    _validate(config)
    return config


def _validate(config: Any) -> None:
    for field in dataclasses.fields(config):
        child = getattr(config, field.name)
        if dataclasses.is_dataclass(child):
            _validate(child)
    if hasattr(config, "validate"):
        config.validate()


def to_dict(config: Any) -> dict[str, Any]:
    """A YAML/JSON-friendly dict of a config (paths as strings)."""
    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value
    return convert(dataclasses.asdict(config))


def save_config(config: Any, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
