"""Reading study files: YAML → ``key=value`` overrides → :class:`StudyConfig`.

``key=value`` overrides from the command line are applied to the raw mapping *before*
validation, so they are checked by exactly the same rules (``train.epochs=2``,
``search.space.model.norm=[batch,none]``). Values are parsed as YAML scalars/lists.
Every problem is a :class:`~agelab.errors.ConfigError` naming the file, the field path and
what is valid there; YAML is loaded safely and strictly: no tags, bounded alias expansion and
nesting, and a key given twice in one mapping is an error (PyYAML would keep the last one
silently, so the study would not run what its file seems to say).
"""

from __future__ import annotations

import copy
import os
import re
import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from agelab.config.schema import StudyConfig, set_path
from agelab.errors import ConfigError
from agelab.secrets import mask_home, mask_uri

_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_.-]+)*)=(.*)$", re.S)

#: Deepest nesting of mappings and lists in a study: a handful in practice (search.space →
#: key → list → value). Far deeper input is a mistake or an attack, and would otherwise end
#: in a RecursionError somewhere in the YAML parser, a deep copy or the validator.
MAX_CONFIG_DEPTH = 32


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses duplicate keys (merge keys ``<<`` may be overridden,
    as YAML intends)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = self.construct_object(key_node, deep=False)
            if key in first:
                mark = first[key]
                raise DuplicateKey(
                    None,
                    None,
                    f"duplicate key {key!r} (first given at line {mark.line + 1}, column "
                    f"{mark.column + 1})",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


class TooDeep(yaml.YAMLError):
    """Nesting so deep that the (recursive) YAML parser gave up."""

    def __str__(self) -> str:
        return (
            f"nested far more than {MAX_CONFIG_DEPTH} levels deep (the YAML parser gave up); "
            "a study needs a few levels (section → field → list)"
        )


def _load_yaml(text: str) -> Any:
    loader = StrictLoader(text)  # what yaml.safe_load does, with the strict constructor
    try:
        return loader.get_single_data()
    except RecursionError:
        raise TooDeep() from None
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=2`` → ("train.epochs", 2). Values are parsed as YAML."""
    m = _OVERRIDE.match(text)
    if not m:
        raise ConfigError("(command line)", [f"{text!r} is not key=value (e.g. train.epochs=2)"])
    key, raw = m.groups()
    try:
        value = _load_yaml(raw) if raw != "" else None
    except DuplicateKey as exc:
        raise ConfigError("(command line)", [f"{text!r}: {exc.problem}"]) from None
    except TooDeep as exc:
        raise ConfigError("(command line)", [f"{key}: {exc}"]) from None
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself (a name with a colon, say)
    _check_size(value, "(command line)", key)
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


def _union_noise(errors: list[dict]) -> set[int]:
    """Indexes of errors from the union branch a value was not meant for: a Range with an
    infinite end also fails ``list[Any]`` ("Input should be a valid list"); the Range's own
    error says what is wrong."""
    locs = [tuple(e["loc"]) for e in errors]
    return {
        i
        for i, loc in enumerate(locs)
        if loc
        and isinstance(loc[-1], str)
        and loc[-1].startswith(("list[", "dict["))
        and any(other[: len(loc) - 1] == loc[:-1] and other != loc for other in locs)
    }


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    errors = exc.errors()
    noise = _union_noise(errors)
    for i, err in enumerate(errors):
        if i in noise:
            continue
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


def _check_size(raw: Any, source: str, where: str = "") -> None:
    """At most MAX_CONFIG_VALUES values, nested at most MAX_CONFIG_DEPTH deep (iteratively:
    the check itself must not recurse)."""
    budget, stack = MAX_CONFIG_VALUES, [(raw, 0, where)]
    while stack:
        node, depth, path = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(
                source,
                [
                    f"the config holds more than {MAX_CONFIG_VALUES:,} values (YAML aliases "
                    "repeating anchors, or a self-referencing one?); write the values out"
                ],
            )
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                source,
                [
                    f"{path or '(top level)'}: nested more than {MAX_CONFIG_DEPTH} levels "
                    "deep; a study needs a few (section → field → list)"
                ],
            )
        if isinstance(node, dict):
            stack.extend((v, depth + 1, f"{path}.{k}" if path else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, depth + 1, path) for v in node)


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
    if isinstance(exc, DuplicateKey):
        return (
            f"{problem.replace(' (first', f' at {at(mark)} (first', 1)}: a key may appear once "
            "per mapping (YAML would silently keep the last one); remove or rename one of them"
        )
    if isinstance(exc, TooDeep):
        return str(exc)
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


def _check_study_file(path: Path) -> None:
    """A regular file, or a ConfigError: missing (with the studies beside it), or special
    (a FIFO would block the read forever, a device never end)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable, or a NUL byte in the name
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        from agelab.data.sources import special_file_kind

        raise ConfigError(
            str(path), [f"is {special_file_kind(mode)}, not a study file: give the YAML file"]
        )
    if mode is None or stat.S_ISDIR(mode):
        hint = ""
        if path.parent.is_dir():
            near = sorted(p.name for p in path.parent.glob("*.yaml"))
            hint = f"; studies in {path.parent}: {', '.join(near)}" if near else ""
        raise ConfigError(str(path), [f"file not found{hint}"])


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    _check_study_file(path)
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [_yaml_problem(exc)]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text: {exc}"]) from None
    if raw is None:
        raise ConfigError(str(path), ["file is empty; a study needs at least `name:`"])
    _check_size(raw, str(path))  # before anything copies or walks it recursively
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Load, override and validate a study file. Raises :class:`ConfigError`."""
    raw = load_raw(path)
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [f"top level must be a mapping, got {type(raw).__name__}"])
    source = str(path) + (f" with overrides {' '.join(overrides)}" if overrides else "")
    cfg = validate(apply_overrides(raw, overrides or []), source)
    note = overrides_note(overrides or [])
    if note:  # the file's description may no longer be true: say what the command changed
        cfg = cfg.model_copy(update={"description": f"{cfg.description.strip()}\n\n{note}".strip()})
    return cfg


#: Overrides that change neither what a study is nor where it stands in the description:
#: where it is stored and reported, and how fast or loudly it runs.
_NOT_DESCRIBED = ("tracking.", "report.", "name", "description", "train.progress",
                  "train.threads", "train.eval_batch_size", "data.cache_dir",
                  "data.max_resident_gb", "search.warn_cells")  # fmt: skip


def overrides_note(overrides: list[str]) -> str:
    """One line for the study's description naming the command-line overrides that change
    what the study is (``model.backbone=resnet10t``, ``search.seeds=[0]``, a data path), so
    the description that the UI, the parent run and the report show is never only the study
    file's when the command changed the study. Secrets are masked, home paths shortened."""
    shown = [
        f"`{mask_home(mask_uri(text))}`"
        for text in overrides
        if not any(
            (key := parse_override(text)[0]) == p or (p.endswith(".") and key.startswith(p))
            for p in _NOT_DESCRIBED
        )
    ]
    if not shown:
        return ""
    return "Run with command-line overrides (the text above is the study file's): " + ", ".join(
        shown
    )
