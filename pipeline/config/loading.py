"""Resolve a preset or YAML file plus `key.sub=value` overrides into a validated `Config`.

Errors are `ConfigError`s that name the offending key, what was given, and what is allowed, so a bad launch fails
on the submitting machine before any cluster resource is requested.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.schema import Config


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class _YamlLoader(yaml.SafeLoader):
    """PyYAML implements YAML 1.1, which reads `1e-5` as a *string*; the schema is strict about types, so configs
    and overrides are read with YAML 1.2's float syntax (`1e-5`, `3E+6`) as well."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def preset_names() -> list[str]:
    """Presets shipped inside the package (`pipeline/config/presets/*.yaml`)."""
    presets = importlib.resources.files("pipeline.config") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in presets.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def read_preset_or_file(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a shipped preset (by name) or of a YAML file (by path)."""
    if name_or_path in preset_names():
        resource = importlib.resources.files("pipeline.config") / "presets" / f"{name_or_path}.yaml"
        return _read_yaml(resource.read_text(), f"preset '{name_or_path}'")
    path = Path(name_or_path)
    if path.is_file():
        return _read_yaml(path.read_text(), str(path))
    raise ConfigError(f"--config {name_or_path!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file")


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section class behind a field annotation (`Section` or `Section | None`), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_text(annotation: Any) -> bool:
    """A plain string setting (`str` or `str | None`), which takes an override's text as written."""
    return annotation is str or set(get_args(annotation)) == {str, type(None)}


def _section_fields(model: type[BaseModel], dotted: list[str]) -> tuple[type[BaseModel], str]:
    """Walk `dotted` (all but the leaf) through nested sections; return the leaf's owner and the leaf name."""
    owner = model
    for depth, part in enumerate(dotted[:-1]):
        field = owner.model_fields.get(part)
        sub = _section(field.annotation) if field else None
        if sub is None:
            where = ".".join(dotted[: depth + 1])
            raise ConfigError(f"unknown config section '{where}'; allowed here: {', '.join(owner.model_fields)}")
        owner = sub
    return owner, dotted[-1]


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set `a.b=value` pairs into a nested mapping; values are parsed as YAML scalars/lists (`x=[1,2]`, `y=null`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted = key.strip().split(".")
        owner, leaf = _section_fields(Config, dotted)
        if leaf not in owner.model_fields:
            raise ConfigError(f"unknown config key '{key}'; allowed in this section: {', '.join(owner.model_fields)}")
        try:
            value = _load_yaml(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {text!r}: {exc}") from exc
        if _is_text(owner.model_fields[leaf].annotation) and value is not None and not isinstance(value, str):
            value = text.strip()  # run.name=2024 means the name "2024", not the number
        node = raw
        for part in dotted[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{part}' is a section but the YAML gives it {child!r}")
            node = child
        node[leaf] = value
    return raw


def _field_path(loc: tuple[Any, ...]) -> tuple[tuple[str, ...], type[BaseModel] | None]:
    """The config key in a pydantic error location (dropping union-member tags such as 'float' or
    "literal['auto']" that follow the field), and the section that owns its last part (None if unknown)."""
    owner: type[BaseModel] | None = Config
    path: list[str] = []
    parts = [str(part) for part in loc]
    for depth, part in enumerate(parts):
        if owner is None or part not in owner.model_fields:
            break
        path.append(part)
        parent, owner = owner, _section(owner.model_fields[part].annotation)
        if owner is None:
            container = get_origin(parent.model_fields[part].annotation) in (dict, list)
            if container and depth + 1 < len(parts):  # a mapping's key or a list's index names the bad entry
                path.append(parts[depth + 1])
            return tuple(path), parent
    return tuple(path), owner


def _describe(errors: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per offending key; a union's alternatives (`float | 'auto'`) are merged into that line."""
    lines: dict[str, list[str]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            path, owner = _field_path(loc[:-1])
            key = ".".join(str(p) for p in loc)
            allowed = ", ".join(owner.model_fields) if owner else ""
            lines.setdefault(f"unknown config key '{key}'; allowed in this section: {allowed}", [])
            continue
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "literal_error":
            message = f"must be one of {error.get('ctx', {}).get('expected', '')}"
        path, _ = _field_path(loc)
        if not path:  # a check across sections (Config._consistent): its message names the keys
            lines.setdefault(message, [])
            continue
        head = f"config key '{'.'.join(path)}' = {error.get('input')!r}"
        lines.setdefault(head, []).append(message)
    return [f"{head}: {'; or '.join(messages)}" if messages else head for head, messages in lines.items()]


def validate(raw: Mapping[str, Any]) -> Config:
    """Validate a raw mapping into `Config`, collecting every problem into one `ConfigError`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(exc.errors()))) from None


def load_config(name_or_path: str = "demo", overrides: Iterable[str] = ()) -> Config:
    """The resolved config: preset or file, then overrides, then validation."""
    return validate(apply_overrides(read_preset_or_file(name_or_path), overrides))


def config_to_yaml(config: Config) -> str:
    """A YAML text that `load_config` reads back to an equal `Config` (saved beside checkpoints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_options(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per setting, `key = default  # description`, for `--help` (generated from the schema)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section(field.annotation)
        if section is not None:
            lines += describe_options(section, f"{key}.")
            continue
        default = field.get_default(call_default_factory=True)
        note = f"  # {field.description}" if field.description else ""
        lines.append(f"{key} = {default!r}{note}")
    return lines


def config_argument_parser(description: str) -> argparse.ArgumentParser:
    """The command line every job shares: `--config PRESET_OR_YAML` and `key.sub=value` overrides, with every
    setting and its default listed under --help. Jobs add their own flags to it."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (key = default  # meaning):\n  " + "\n  ".join(describe_options()))
    parser.add_argument("--config", default="demo", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings that replace the preset's")
    return parser
