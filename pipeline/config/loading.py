"""Resolve a preset or YAML file plus `key.sub=value` overrides into a validated `Config`.

Errors are `ConfigError`s that name the offending key, what was given, and what is allowed, so a bad launch fails
on the submitting machine before any cluster resource is requested.
"""

from __future__ import annotations

import argparse
import importlib.resources
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.schema import Config


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def preset_names() -> list[str]:
    """Presets shipped inside the package (`pipeline/config/presets/*.yaml`)."""
    presets = importlib.resources.files("pipeline.config") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in presets.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
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
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {text!r}: {exc}") from exc
        node = raw
        for part in dotted[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{part}' is a section but the YAML gives it {child!r}")
            node = child
        node[leaf] = value
    return raw


def _allowed_keys(loc: tuple[Any, ...]) -> str:
    owner: type[BaseModel] = Config
    for part in loc[:-1]:
        sub = _section(owner.model_fields[str(part)].annotation) if str(part) in owner.model_fields else None
        if sub is None:
            return ""
        owner = sub
    return ", ".join(owner.model_fields)


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown config key '{key}'; allowed in this section: {_allowed_keys(loc)}"
    given = error.get("input")
    message = error["msg"]
    if error["type"] == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        message = f"must be one of {expected}"
    return f"config key '{key}' = {given!r}: {message}"


def validate(raw: Mapping[str, Any]) -> Config:
    """Validate a raw mapping into `Config`, collecting every problem into one `ConfigError`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


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
