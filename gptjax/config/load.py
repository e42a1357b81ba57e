"""Configs from YAML files and `section.key=value` overrides, and back to plain dicts.

A config is a YAML file or the name of a preset shipped in `presets/` (package data, so preset
names work from an installed wheel); every value is coerced to its field's type or refused.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from gptjax.config.schema import PRESETS, SECTIONS, Config, ConfigError, ModelConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks `value` against a field annotation (already resolved), converting where lossless."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return tuple(_coerce(key, v, item) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 375e6 in YAML
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"unknown config key {section}.{k} "
                              f"(known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(f"{section}.{k}", v, hints[k])
    return cls(**kwargs)


def resolve_config_path(name: str | Path) -> Path:
    """A path to a YAML file, or a preset name such as `gpt3-small`, `small` or `default`."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    stem = str(name)
    if stem in PRESETS:
        stem = f"gpt3-{stem}"
    candidate = PRESET_DIR / f"{stem}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown config {name!r} (known presets: {', '.join(known)})")
    return candidate


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`["model.n_layer=4", "mesh.data=2"]` → `{"model": {"n_layer": 4}, "mesh": {"data": 2}}`."""
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {item!r} "
                              f"(known: {', '.join(SECTIONS)})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[name] = "" if value is None else value
    return out


def config_from_dict(raw: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Builds and validates a Config from nested dicts (YAML contents plus overrides)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("a config file must hold a mapping of sections")
    merged: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} (known: {', '.join(SECTIONS)})")
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        merged[section] = dict(values)
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    parts = {name: _build(SECTIONS[name], name, merged.get(name, {})) for name in SECTIONS}
    cfg = Config(**parts)
    cfg.check()
    return cfg


def load_config(name: str | Path = "default", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML config (path or preset name) and applies `section.key=value` overrides."""
    path = resolve_config_path(name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not valid UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    # An empty file would otherwise run every default (GPT-3 Small into runs/default) unasked.
    if raw is None:
        raise ConfigError(f"{path} is empty (nothing but comments or null): a config file holds "
                          "sections such as model: and train: (see configs/default.yaml)")
    return config_from_dict(raw, parse_overrides(list(overrides)))


def model_config(name: str | Path) -> ModelConfig:
    """The ModelConfig of a preset (`gpt3-small`, …, `default`) or a configs/*.yaml path."""
    return load_config(name).model


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
    return {s: {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def override_help() -> str:
    """Every `section.key` with its type and default, for `--help`."""
    lines = []
    for section in SECTIONS:
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            ann = hints[f.name]
            tname = "list" if typing.get_origin(ann) is tuple else getattr(ann, "__name__", str(ann))
            default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            lines.append(f"  {section}.{f.name}={default!s}  ({tname})")
    return "\n".join(lines)


def replace_cfg(cfg: Config, **sections: dict[str, Any]) -> Config:
    """cfg with some fields of some sections replaced: replace_cfg(cfg, train={"steps": 3})."""
    parts = {name: dataclasses.replace(getattr(cfg, name), **vals) for name, vals in sections.items()}
    return dataclasses.replace(cfg, **parts)
