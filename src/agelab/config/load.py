"""Reading study files: YAML → ``key=value`` overrides → :class:`StudyConfig`.

``key=value`` overrides from the command line are applied to the raw mapping *before*
validation, so they are checked by exactly the same rules (``train.epochs=2``,
``search.space.model.norm=[batch,none]``). Values are parsed as YAML scalars/lists.
Every problem is a :class:`~agelab.errors.ConfigError` naming the file, the field path and
what is valid there; YAML is loaded safely (no tags, bounded alias expansion).
"""

from __future__ import annotations

import copy
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from agelab.config.schema import StudyConfig, set_path
from agelab.errors import ConfigError

_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_.-]+)*)=(.*)$", re.S)


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=2`` → ("train.epochs", 2). Values are parsed as YAML."""
    m = _OVERRIDE.match(text)
    if not m:
        raise ConfigError("(command line)", [f"{text!r} is not key=value (e.g. train.epochs=2)"])
    key, raw = m.groups()
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("search.space."):
            # Space keys are dotted paths themselves: search.space.model.norm=[a,b]
            raw.setdefault("search", {}).setdefault("space", {})[key[len("search.space.") :]] = (
                value
            )
        else:
            try:
                set_path(raw, key, value)
            except ValueError as exc:  # train.epochs.x=1: a value is not a section
                raise ConfigError("(command line)", [f"{text!r}: {exc}"]) from None
    return raw


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at the section an 'extra_forbidden' error points into."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            valid = _field_names(StudyConfig, loc)
            msg = "unknown key" + (f"; valid keys here: {', '.join(valid)}" if valid else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {_SHORT.repr(err['input'])})"
        problems.append(f"{path}: {msg}")
    return problems


#: Values in a study config, counted as YAML aliases expand: a few hundred in practice. A
#: "billion laughs" file (aliases of aliases) stops here instead of hanging the validator.
MAX_CONFIG_VALUES = 100_000

_SHORT = reprlib.Repr()  # error messages quote bad inputs, never megabytes of them
_SHORT.maxstring = _SHORT.maxother = 80


def _check_size(raw: Any, source: str) -> None:
    budget, stack = MAX_CONFIG_VALUES, [raw]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(
                source,
                [
                    f"the config holds more than {MAX_CONFIG_VALUES:,} values (YAML aliases "
                    "repeating anchors, or a self-referencing one?); write the values out"
                ],
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def validate(raw: Any, source: str = "(config)") -> StudyConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            source, [f"top level must be a mapping of sections, got {type(raw).__name__}"]
        )
    _check_size(raw, source)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, _format_errors(exc)) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        return (
            f"YAML tag not allowed{' at ' + at(mark) if mark else ''}: {problem}; study files "
            "are loaded safely (plain values, lists and mappings only): remove the !tag"
        )
    where = f" at {at(mark)}" if mark else ""
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    started = f" ({context} started at {at(context_mark)})" if context and context_mark else ""
    return (
        f"malformed YAML{where}: {problem}{started}; fix the syntax there (indent with "
        "spaces, not tabs; close brackets and quotes)"
    )


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            near = sorted(p.name for p in path.parent.glob("*.yaml"))
            hint = f"; studies in {path.parent}: {', '.join(near)}" if near else ""
        raise ConfigError(str(path), [f"file not found{hint}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [_yaml_problem(exc)]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text: {exc}"]) from None
    if raw is None:
        raise ConfigError(str(path), ["file is empty; a study needs at least `name:`"])
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Load, override and validate a study file. Raises :class:`ConfigError`."""
    raw = load_raw(path)
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [f"top level must be a mapping, got {type(raw).__name__}"])
    source = str(path) + (f" with overrides {' '.join(overrides)}" if overrides else "")
    return validate(apply_overrides(raw, overrides or []), source)
