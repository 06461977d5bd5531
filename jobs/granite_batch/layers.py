"""Configuration in layers: a YAML file, the environment, flags and `--set`, merged over a pydantic
model's defaults, each value remembering where it came from so that an error names the file and
line, the variable or the flag that gave it."""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

# The environment layer: PREFIX<FIELD>, nested fields joined by "__"
# (GRANITE_BATCH_RESOURCES__GPUS_PER_ACTOR=0.5); lists and mappings as JSON.
ENV_PREFIX = "GRANITE_BATCH_"
ENV_NESTED_DELIMITER = "__"

FieldPath = tuple[str, ...]
Origins = dict[FieldPath, str]


class ConfigError(ValueError):
    """The job configuration is invalid; the message names the field."""


def format_validation_error(error: ValidationError, sources: list[str], origins: Origins) -> str:
    """One line per bad field: its dotted path, pydantic's reason, and the layer that set it."""
    lines = [f"invalid job configuration ({', '.join(sources)}):"]
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        field = ".".join(loc) or "(top level)"
        # The layer that gave the value: the longest of the field's paths that a layer set.
        origin = next((origins[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in origins), None)
        lines.append(f"  {field}: {item['msg']}" + (f" ({origin})" if origin else ""))
    return "\n".join(lines)


def _record(origins: Origins, path: FieldPath, value: Any, origin: Callable[[FieldPath], str]) -> None:
    """`path`, and every path below it, now comes from `origin`."""
    for known in [known for known in origins if known[: len(path)] == path]:
        del origins[known]
    origins[path] = origin(path)
    if isinstance(value, dict):
        for key, inner in value.items():
            _record(origins, (*path, str(key)), inner, origin)


def merge(
    base: dict[str, Any],
    layer: dict[str, Any],
    origins: Origins,
    origin: Callable[[FieldPath], str],
    keep_none: bool = False,
    path: FieldPath = (),
) -> None:
    """Deep-merge `layer` into `base`, noting in `origins` where each value came from. None means
    "not given" (an unset flag) unless `keep_none`: a file's or a `--set`'s null asks for null."""
    for key, value in layer.items():
        if value is None and not keep_none:
            continue
        here = (*path, str(key))
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value, origins, origin, keep_none, here)
        else:
            base[key] = value
            _record(origins, here, value, origin)


def read_yaml(yaml_path: str | Path) -> tuple[dict[str, Any], Callable[[FieldPath], str]]:
    """The file's fields, and a function naming the file and line of any of their paths."""
    try:
        with open(yaml_path, encoding="utf-8") as handle:
            text = handle.read()
        loaded = yaml.safe_load(text) or {}
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {yaml_path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {yaml_path} is not text: byte 0x{exc.object[exc.start]:02x} at "
            f"offset {exc.start} is not UTF-8 (give a YAML file)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {yaml_path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {yaml_path} must hold a mapping of fields")
    lines: dict[FieldPath, int] = {}

    def walk(node: yaml.Node, path: FieldPath) -> None:
        children: list[tuple[str, yaml.Node, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            children = [(str(key.value), key, value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(str(index), value, value) for index, value in enumerate(node.value)]
        for name, marked, value in children:
            lines[(*path, name)] = marked.start_mark.line + 1
            walk(value, (*path, name))

    if root is not None:
        walk(root, ())
    return loaded, lambda path: f"{yaml_path} line {lines[path]}" if path in lines else str(yaml_path)


def read_environment(model: type[BaseModel]) -> dict[str, Any]:
    """ENV_PREFIX variables, read by pydantic-settings: nested with "__", case-insensitive, lists and
    mappings as JSON. Variables that name no field are left alone (the notebooks read
    GRANITE_BATCH_FIGURES); a misspelt nested field is refused by validation, by name."""
    from pydantic_settings import EnvSettingsSource

    source = EnvSettingsSource(
        model,  # type: ignore[arg-type]  # it reads only model_fields and model_config, as of a BaseSettings
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
    )
    return source()


def variable(path: FieldPath) -> str:
    """The environment variable that set `path`: the longest of its prefixes that is set."""
    names = {name.upper() for name in os.environ}
    for n in range(len(path), 0, -1):
        name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(path[:n]).upper()
        if name in names:
            return f"environment {name}"
    return "environment"


def _field_kind(annotation: Any) -> type[BaseModel] | str:
    """What a path may go on into: a model's fields, a mapping's free keys, or nothing."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        if candidate is dict or typing.get_origin(candidate) is dict:
            return "mapping"
        if candidate is list or typing.get_origin(candidate) is list:
            return "list"
    return "value"


def parse_set(item: str, model: type[BaseModel]) -> dict[str, Any]:
    """`--set a.b=VALUE` as a nested layer {a: {b: VALUE}}: the path checked against `model`'s fields,
    VALUE read as YAML (`0.5`, `true`, `null`, `[srt, vtt]`, `{s3: {anon: true}}`). Raises
    ConfigError naming the path."""
    dotted, equals, text = item.partition("=")
    path = tuple(dotted.strip().split("."))
    if not equals or not all(path):
        raise ConfigError(f"--set {item!r}: give FIELD=VALUE, e.g. --set resources.gpus_per_actor=0.5")
    inside: type[BaseModel] | str = model
    for depth, name in enumerate(path):
        if inside == "mapping":  # storage_options, actor_resources: any key
            break
        where = ".".join(path[:depth]) or "the config"
        if not isinstance(inside, type):
            raise ConfigError(f"--set {dotted}: {where} is a {inside}, not a group of fields; set it whole")
        if name not in inside.model_fields:
            known = ", ".join(inside.model_fields)
            raise ConfigError(f"--set {dotted}: {name!r} is not a field of {where} (its fields: {known})")
        inside = _field_kind(inside.model_fields[name].annotation)
    try:
        layer: dict[str, Any] = {path[-1]: yaml.safe_load(text)}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}: the value is not valid YAML: {exc}") from exc
    for name in reversed(path[:-1]):
        layer = {name: layer}
    return layer
