"""Study configuration: YAML files in ``experiments/`` validated into typed objects.

A study file has six sections (``data``, ``model``, ``train``, ``search``, ``tracking``,
``metrics``); every field has a default here and only here. Loading is strict: an
unknown key, a wrong type or an unknown registry name (norm, act, backbone, loss, data
source) is a :class:`ConfigError` naming the file, the field path and the valid choices.

``key=value`` overrides from the command line are applied to the raw mapping *before*
validation, so they are checked by exactly the same rules (``train.epochs=2``,
``search.space.model.norm=[batch,none]``). Values are parsed as YAML scalars/lists.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agelab.errors import ConfigError

# Registry names are checked lazily through these hooks so that importing the config does
# not import torch/timm; each returns the valid names (or raises ValueError itself).


def _check_name(kind: str, value: str) -> str:
    names = registry_names(kind)
    if value not in names:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(names)}")
    return value


def registry_names(kind: str) -> list[str]:
    """Valid names for a registry (``norm``, ``act``, ``loss``, ``source``)."""
    if kind == "norm":
        from agelab.models import NORMS

        return list(NORMS)
    if kind == "act":
        from agelab.models import ACTS

        return list(ACTS)
    if kind == "loss":
        from agelab.losses import LOSSES

        return list(LOSSES)
    if kind == "source":
        from agelab.data import SOURCES

        return list(SOURCES)
    raise KeyError(kind)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------- data


class LabelNoise(Strict):
    """Noise added to synthetic labels; the generator keeps the true age too."""

    kind: Literal["none", "normal", "laplace", "hetero"] = "none"
    scale: float = Field(2.0, ge=0, description="σ (normal), b (laplace), base σ (hetero)")
    hetero_slope: float = Field(0.05, ge=0, description="extra σ per year of age (hetero)")


class SynthConfig(Strict):
    n_images: int = Field(3000, ge=10, le=2_000_000)
    images_per_subject: int = Field(5, ge=1, le=100)
    age_min: float = Field(1.0, ge=0)
    age_max: float = Field(90.0, le=120)
    age_distribution: Literal["uniform", "utkface"] = "uniform"
    label_noise: LabelNoise = LabelNoise()
    occluder_prob: float = Field(0.1, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _ages_ordered(self) -> SynthConfig:
        if self.age_max <= self.age_min:
            raise ValueError(f"age_max ({self.age_max}) must be above age_min ({self.age_min})")
        return self


class SplitConfig(Strict):
    train: float = Field(0.7, gt=0, lt=1)
    calib: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    seed: int = 0
    band_width: float = Field(10.0, gt=0, description="age band width for stratification")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.calib + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + calib + test must sum to 1 (got {total:g})")
        return self


class DataConfig(Strict):
    source: str = "synthetic"
    path: Path | None = Field(None, description="folder (utkface, fgnet) or CSV manifest (csv)")
    image_size: int = Field(64, ge=16, le=512)
    center_crop: float = Field(1.0, gt=0, le=1, description="centre crop fraction (no box)")
    on_bad: Literal["error", "skip"] = "error"
    max_age: float = Field(120.0, gt=0, le=150)
    synthetic: SynthConfig = SynthConfig()
    split: SplitConfig = SplitConfig()
    cache_dir: Path | None = Field(None, description="default: $AGELAB_CACHE_DIR or .cache/agelab")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _check_name("source", v)

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "synthetic" and self.path is None:
            raise ValueError(
                f"data.path is required for source {self.source!r} "
                "(e.g. DATA=/path/to/UTKFace or data.path=/path/labels.csv)"
            )
        return self

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        return Path(os.environ.get("AGELAB_CACHE_DIR", ".cache/agelab"))


# -------------------------------------------------------------------------------- model


class ModelConfig(Strict):
    backbone: str = "resnet10t"
    norm: str = "batch"
    act: str = "relu"
    groups: int = Field(8, ge=1, description="GroupNorm groups (adjusted when not divisible)")
    pretrained: bool = False
    weights: Path | None = Field(None, description="local weights file for pretrained=true")
    drop_rate: float = Field(0.0, ge=0, lt=1)

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str) -> str:
        return _check_name("norm", v)

    @field_validator("act")
    @classmethod
    def _act(cls, v: str) -> str:
        return _check_name("act", v)

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        from agelab.models import resolve_backbone

        resolve_backbone(v)  # raises ValueError with close matches
        return v


# -------------------------------------------------------------------------------- train


class AugmentConfig(Strict):
    enabled: bool = True
    flip: bool = True
    shift: float = Field(0.05, ge=0, le=0.5, description="max shift, fraction of size")
    scale: float = Field(0.05, ge=0, le=0.5, description="max relative zoom")
    rotate: float = Field(5.0, ge=0, le=45, description="max rotation, degrees")
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    eval_batch_size: int = Field(256, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0, le=10)
    warmup_epochs: float = Field(1.0, ge=0)
    loss: str = "l1"
    huber_delta: float = Field(1.0, gt=0, description="in standardized-age units")
    grad_clip: float | None = Field(1.0, gt=0)
    patience: int | None = Field(5, ge=1, description="early stopping on calib MAE")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA")
    channels_last: bool = True
    compile: bool = False
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    seed: int = 0
    progress: bool = True
    augment: AugmentConfig = AugmentConfig()

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        return _check_name("loss", v)


# ------------------------------------------------------------------------------- search


class Range(Strict):
    """A numeric range for random/TPE search (``{low: 1e-4, high: 1e-2, log: true}``)."""

    low: float
    high: float
    log: bool = False
    int: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


SEARCHABLE_SECTIONS = ("data", "model", "train")


class SearchConfig(Strict):
    sampler: Literal["grid", "random", "tpe"] = "grid"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    space: dict[str, list[Any] | Range] = Field(
        default_factory=lambda: {"model.norm": ["batch", "none"], "model.act": ["relu", "tanh"]}
    )
    n_trials: int | None = Field(None, ge=1, description="random/tpe: trials to run")
    sampler_seed: int = 0
    pruner: Literal["none", "median", "hyperband"] = "none"
    warn_cells: int = Field(500, ge=1, description="warn when a grid has more trials")

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"replicate seeds must be distinct (got {v})")
        return v

    @model_validator(mode="after")
    def _space_shape(self) -> SearchConfig:
        for key, choices in self.space.items():
            if key.split(".")[0] not in SEARCHABLE_SECTIONS or "." not in key:
                raise ValueError(
                    f"search.space key {key!r} must be a dotted path into "
                    f"{'/'.join(SEARCHABLE_SECTIONS)} (e.g. model.norm, train.lr)"
                )
            if isinstance(choices, list) and not choices:
                raise ValueError(f"search.space.{key} is an empty list: the grid would be empty")
            if isinstance(choices, Range) and self.sampler == "grid":
                raise ValueError(
                    f"search.space.{key} is a range, but a grid needs a list of values "
                    "(use sampler: random or tpe for ranges)"
                )
        if self.sampler != "grid" and self.n_trials is None:
            raise ValueError(f"search.n_trials is required for sampler {self.sampler!r}")
        return self

    def grid_size(self) -> int:
        n = len(self.seeds)
        for choices in self.space.values():
            n *= len(choices) if isinstance(choices, list) else 1
        return n

    def n_total(self) -> int:
        return self.grid_size() if self.sampler == "grid" else int(self.n_trials or 0)


# ----------------------------------------------------------------------------- tracking


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow URI; default $MLFLOW_TRACKING_URI or SQLite")
    artifact_location: str | None = Field(None, description="default: mlruns/artifacts")
    storage: str | None = Field(None, description="Optuna storage; default journal file")
    experiment: str | None = Field(None, description="MLflow experiment; default study name")
    root: Path = Field(Path("mlruns"), description="folder of the default stores")
    log_figures: bool = True
    log_predictions: bool = True
    log_checkpoint: bool = False


class MetricsConfig(Strict):
    k_max: int = Field(15, ge=1, le=100)
    age_bands: list[float] = Field(
        default_factory=lambda: [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 120]
    )
    conformal_levels: list[float] = Field(default_factory=lambda: [0.8, 0.9, 0.95])

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if len(v) < 2 or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("age_bands must be at least two strictly increasing edges")
        return v

    @field_validator("conformal_levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < x < 1 for x in v):
            raise ValueError("conformal_levels must be in (0, 1), e.g. [0.8, 0.9, 0.95]")
        return v


class ReportConfig(Strict):
    auto: bool = Field(True, description="write the ablation report when a study invocation ends")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="family-wise error rate (Holm)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of every interval")
    figures: bool = Field(True, description="embed figures (CS curves need log_figures runs)")


# -------------------------------------------------------------------------------- study


class StudyConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()
    metrics: MetricsConfig = MetricsConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _space_values_valid(self) -> StudyConfig:
        # Every choice in the search space must itself be a valid value of its field:
        # validate each one by applying it to a copy of the config.
        base = self.model_dump(exclude={"search"})
        for key, choices in self.search.space.items():
            if not _has_path(base, key):
                raise ValueError(f"search.space key {key!r} is not a field of the study config")
            values = choices if isinstance(choices, list) else [choices.low, choices.high]
            for value in values:
                trial = copy.deepcopy(base)
                _set_path(trial, key, value)
                try:
                    StudyConfig.model_validate(
                        {**trial, "name": self.name, "search": {"space": {}}}
                    )
                except ValidationError as exc:
                    first = exc.errors()[0]
                    raise ValueError(
                        f"search.space.{key}: value {value!r}: {first['msg']}"
                    ) from None
        return self

    def with_params(self, params: dict[str, Any]) -> StudyConfig:
        """A copy with dotted-path params applied (one trial's settings), validated."""
        raw = self.model_dump()
        for key, value in params.items():
            _set_path(raw, key, value)
        return StudyConfig.model_validate(raw)


# ------------------------------------------------------------------------ study size

#: Rough training speeds (images/s at 64 px, resnet10t-sized nets) behind the time estimate
#: of a big study: the CPU figure is this project's 2-core benchmark (README, Performance);
#: `agelab bench` measures your machine. Other sizes scale with the pixel count.
CPU_IMAGES_PER_S = 80.0
GPU_IMAGES_PER_S = 8000.0
TRIAL_OVERHEAD_S = 5.0  # build, final evaluation, diagnostics, logging
ASSUMED_REAL_IMAGES = 10_000


def estimate_trial_seconds(
    cfg: StudyConfig, *, gpu: bool = False, n_images: int | None = None
) -> tuple[float, str]:
    """(seconds per trial, how that was estimated) before anything has run."""
    assumed = n_images is None and cfg.data.source != "synthetic"
    if n_images is None:
        n_images = cfg.data.synthetic.n_images if not assumed else ASSUMED_REAL_IMAGES
    rate = (GPU_IMAGES_PER_S if gpu else CPU_IMAGES_PER_S) * (64 / cfg.data.image_size) ** 2
    split = cfg.data.split
    # Per epoch: the train split forward+backward, the calib split forward (~1/3 the cost).
    seen = n_images * (split.train + split.calib / 3) * cfg.train.epochs
    basis = (
        f"rough estimate: ~{rate:,.0f} training images/s on {'a GPU' if gpu else 'CPU'} at "
        f"{cfg.data.image_size} px, {n_images:,} images{' (assumed)' if assumed else ''}, "
        f"{cfg.train.epochs} epochs; `agelab bench` measures this machine"
    )
    return seen / rate + TRIAL_OVERHEAD_S, basis


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def size_warning(cfg: StudyConfig, seconds_per_trial: float, basis: str) -> str | None:
    """The warning for a study with more trials than ``search.warn_cells`` (else None):
    the trial and cell counts, and how long that would take."""
    search = cfg.search
    total = search.n_total()
    if total <= search.warn_cells:
        return None
    shape = (
        f"{total // len(search.seeds):,} cells × {len(search.seeds)} seed(s)"
        if search.sampler == "grid"
        else f"search.n_trials = {total:,}"
    )
    return (
        f"warning: {total:,} trials planned ({shape}), more than search.warn_cells = "
        f"{search.warn_cells:,}: about {format_duration(total * seconds_per_trial)} with one "
        f"worker at ~{format_duration(seconds_per_trial)} per trial ({basis}). Shrink "
        "search.space or search.seeds, spread it over workers (--workers N, or --join on "
        "more machines), or raise search.warn_cells to silence this."
    )


# ------------------------------------------------------------------------------ loading


def _has_path(raw: dict, dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


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
                _set_path(raw, key, value)
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


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"train.lr": 0.001, ...} (for MLflow params)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not name.startswith("search.space"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
