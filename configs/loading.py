"""Read a YAML preset, apply ``key=value`` overrides, validate, and explain failures in one line."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import UserInputError
from .schema import RadsynthConfig, ScoringConfig


def preset_path(name_or_path: str | Path) -> Path:
    """A config path as given, or the name of a shipped preset (``demo`` -> the installed demo.yaml)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = resources.files(__package__) / f"{name_or_path}.yaml"
    return Path(str(shipped)) if shipped.is_file() else path


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RadsynthConfig:
    path = preset_path(path)
    raw = _read_yaml(path)
    for override in overrides:
        _apply_override(raw, override, path)
    return validate_config(raw, path)


def apply_overrides(config: RadsynthConfig, overrides: list[str] | tuple[str, ...],
                    where: str = "<overrides>") -> RadsynthConfig:
    """A loaded config with ``key=value`` overrides applied, validated again."""
    raw = config.model_dump(mode="json", by_alias=True)
    for override in overrides:
        _apply_override(raw, override, Path(where))
    return validate_config(raw, where)


def validate_config(raw: dict[str, Any], where: str | Path = "<config>") -> RadsynthConfig:
    try:
        return RadsynthConfig.model_validate(raw)
    except ValidationError as error:
        raise UserInputError(where, *_describe(error)) from None


def load_scoring_config(overrides: list[str] | tuple[str, ...] = (), where: str = "<command line>") -> ScoringConfig:
    """A ``scoring`` section from ``scoring.key=value`` overrides alone (``radsynth score`` has no config file)."""
    raw: dict[str, Any] = {}
    for override in overrides:
        if not override.startswith("scoring."):
            raise UserInputError(where, f"override '{override}' is not a scoring setting", "scoring.<key>=<value>")
        _apply_override(raw, override, Path(where))
    try:
        return ScoringConfig.model_validate(raw.get("scoring", {}))
    except ValidationError as error:
        problem, allowed = _describe(error)
        # The schema path starts inside the section: put the section back in front of the key.
        if problem.startswith("unknown"):
            problem = problem.replace("key '", "key 'scoring.", 1)
            allowed = f"allowed: {', '.join(ScoringConfig.model_fields)}"
        else:
            problem = f"scoring.{problem}"
        raise UserInputError(where, problem, allowed) from None


def config_to_yaml(config: RadsynthConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserInputError(path, "config file not found", "pass a YAML file or a preset name")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise UserInputError(path, f"not valid YAML{line}: {getattr(error, 'problem', error)}",
                             "a YAML mapping of sections, e.g. 'data:', 'runtime:'") from None
    if not isinstance(raw, dict):
        raise UserInputError(path, "top level must be a mapping of sections", "e.g. 'data:', 'runtime:'")
    return raw


def _apply_override(raw: dict[str, Any], override: str, where: Path) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserInputError(where, f"override '{override}' is not key=value", "e.g. runtime.seed=3")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    node = raw
    *parents, leaf = key.split(".")
    for index, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            parent_key = ".".join(parents[: index + 1])
            raise UserInputError(where, f"override '{key}': '{parent_key}' is a value, not a section")
        node = child
    node[leaf] = value


def _describe(error: ValidationError) -> tuple[str, str | None]:
    """The first validation problem as (problem, allowed), with the dotted YAML path of the key."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(first["loc"][:-1])
        return f"unknown key '{location}'", f"allowed here: {', '.join(allowed)}" if allowed else None
    if first["type"] == "missing":
        return f"missing required key '{location}'", None
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    where = f"{location}: " if location else ""
    return f"{where}{first['msg']}{shown}", None


def _allowed_keys(location: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = RadsynthConfig
    for part in location:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []
