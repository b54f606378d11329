"""The study configuration schema: typed sections with every default in one place.

A study file has these sections: ``data``, ``model``, ``train``, ``search``, ``tracking``,
``metrics``, ``report``. Every field has its default here and only here. Validation is strict:
an unknown key, a wrong type or an unknown registry name (norm, act, backbone, loss, data
source) is an error naming the field and the valid choices. Reading YAML files and
``key=value`` overrides is :mod:`agelab.config.load`.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agelab.errors import ConfigError
from agelab.secrets import register_uri


def _check_name(kind: str, value: str, names: Iterable[str]) -> str:
    """``value`` if it is a registry name, else a ValueError listing the valid ones.

    Each validator imports its registry (agelab.models, agelab.losses, agelab.data.sources)
    when it runs, so importing the config does not import torch or timm."""
    names = list(names)
    if value not in names:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(names)}")
    return value


class Strict(BaseModel):
    # allow_inf_nan=False: every float of a study must be finite (an infinite warm-up, noise
    # scale, age band or range would otherwise fail in every trial instead of here, once).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )


#: Seeds go to numpy, torch and Optuna's samplers; numpy's legacy seeding (and so Optuna's)
#: takes 0 … 2**32 - 1 only.
SEED_MAX = 2**32 - 1


def _check_seed(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(
            f"seed {value} does not fit the random generators: use 0 … {SEED_MAX:,} "
            "(numpy, torch and Optuna take 32-bit seeds)"
        )
    return value


Seed = Annotated[int, AfterValidator(_check_seed)]


def _no_nul(value: Path | None) -> Path | None:
    # The OS refuses such a path with a ValueError deep inside whatever opens it first.
    if value is not None and "\x00" in str(value):
        raise ValueError(f"{str(value)!r} holds a NUL byte (\\x00), which no file name can")
    return value


#: A file or folder path given by the user (it may be anywhere: it is theirs).
UserPath = Annotated[Path, AfterValidator(_no_nul)]


def _registered_source(v: str) -> str:
    from agelab.data.sources import SOURCES  # the registry is checked, not imported, here

    return _check_name("source", v, SOURCES)


#: A data source name from the registry (``data.source``, ``data.test.source``).
SourceName = Annotated[str, AfterValidator(_registered_source)]

# One folder name: no separators, no control characters, not "." / ".." / a hidden name.
_PATH_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f.][^/\\\x00-\x1f\x7f]{0,199}$")


def check_path_name(value: str, becomes: str) -> str:
    """``value`` if it is safe as one folder name inside its root, else a ValueError saying
    what it would become (``becomes``: e.g. "the folder tracking.root/artifacts/<name>")."""
    if not _PATH_NAME.match(value):
        raise ValueError(
            f"{value!r} cannot be {becomes}: use a plain name of at most 200 characters "
            "without / or \\, not starting with '.' and without control characters"
        )
    return value


def contained_name(value: str, becomes: str, field: str) -> str:
    """:func:`check_path_name` where a name is used rather than validated (a name that did
    not come through a config): a :class:`~agelab.errors.ConfigError` naming ``field``."""
    try:
        return check_path_name(value, becomes)
    except ValueError as exc:
        raise ConfigError(field, [str(exc)]) from None


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
    seed: Seed = 0

    @model_validator(mode="after")
    def _ages_ordered(self) -> SynthConfig:
        if self.age_max <= self.age_min:
            raise ValueError(f"age_max ({self.age_max}) must be above age_min ({self.age_min})")
        return self


class SplitConfig(Strict):
    """Subject-disjoint shares of the data. ``calib`` chooses (the objective, the best epoch);
    ``conformal`` only calibrates the conformal intervals, on points no choice has seen, so
    their coverage guarantee holds (0: calibrate on ``calib``, which selection has seen)."""

    train: float = Field(0.7, gt=0, lt=1)
    calib: float = Field(0.1, gt=0, lt=1, description="objective and best-epoch selection")
    conformal: float = Field(0.05, ge=0, lt=1, description="conformal calibration only")
    test: float = Field(0.15, gt=0, lt=1)
    seed: Seed = 0
    band_width: float = Field(10.0, gt=0, description="age band width for stratification")
    fold: str | None = Field(
        None, description="with a manifest 'fold' column: the fold that is the test split"
    )

    @field_validator("fold", mode="before")
    @classmethod
    def _fold_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.calib + self.conformal + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"train + calib + conformal + test must sum to 1 (got {total:g}; conformal is "
                f"{self.conformal:g}: set data.split.conformal=0 to calibrate intervals on "
                "calib instead)"
            )
        return self


class TestSourceConfig(Strict):
    """A second source whose every image is the test split (cross-dataset evaluation): the
    main source then gives train, calib and conformal only. Decoded like the main source."""

    source: SourceName
    path: UserPath | None = Field(None, description="folder or CSV manifest of the test faces")
    on_bad: Literal["error", "skip"] | None = Field(None, description="default: data.on_bad")

    @model_validator(mode="after")
    def _path_needed(self) -> TestSourceConfig:
        if self.source != "synthetic" and self.path is None:
            raise ValueError(f"data.test.path is required for source {self.source!r}")
        if self.source == "synthetic":
            raise ValueError(
                "data.test: a synthetic test set would be drawn by the same generator as the "
                "training faces; use a real source (utkface, fgnet, csv)"
            )
        return self


class DataConfig(Strict):
    source: SourceName = "synthetic"
    path: UserPath | None = Field(None, description="folder (utkface, fgnet) or CSV manifest (csv)")
    image_size: int = Field(64, ge=16, le=512)
    center_crop: float = Field(1.0, gt=0, le=1, description="centre crop fraction (no box)")
    on_bad: Literal["error", "skip"] = "error"
    max_age: float = Field(120.0, gt=0, le=150)
    synthetic: SynthConfig = SynthConfig()
    split: SplitConfig = SplitConfig()
    test: TestSourceConfig | None = Field(
        None, description="a second source used as the test split (cross-dataset evaluation)"
    )
    cache_dir: UserPath | None = Field(
        None, description="default: $AGELAB_CACHE_DIR or .cache/agelab"
    )
    max_resident_gb: float | None = Field(
        None,
        ge=0,
        description="decoded images larger than this (GB) stream from memory-mapped shards "
        "in cache_dir instead of being held in RAM; default: half the available RAM; "
        "0 always streams",
    )

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
    weights: UserPath | None = Field(None, description="local weights file for pretrained=true")
    drop_rate: float = Field(0.0, ge=0, lt=1)

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str) -> str:
        from agelab.models import NORMS

        return _check_name("norm", v, NORMS)

    @field_validator("act")
    @classmethod
    def _act(cls, v: str) -> str:
        from agelab.models import ACTS

        return _check_name("act", v, ACTS)

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
    amp: bool | Literal["bf16"] = Field(
        True,
        description="bf16 autocast: true = on CUDA (the CPU trains in fp32), bf16 = on the "
        "CPU too (with channels_last), false = fp32 everywhere; the head, ages and metrics "
        "are fp32 either way",
    )
    channels_last: bool = True
    compile: bool = False
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    seed: Seed = 0
    progress: bool = True
    augment: AugmentConfig = AugmentConfig()

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        from agelab.losses import LOSSES

        return _check_name("loss", v, LOSSES)


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
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    space: dict[str, list[Any] | Range] = Field(
        default_factory=lambda: {"model.norm": ["batch", "none"], "model.act": ["relu", "tanh"]}
    )
    n_trials: int | None = Field(None, ge=1, description="random/tpe: trials to run")
    sampler_seed: Seed = 0
    pruner: Literal["none", "median", "hyperband"] = "none"
    warn_cells: int = Field(500, ge=1, description="warn when a grid has more trials")
    replicate_varies: list[Literal["init", "split"]] = Field(
        default_factory=lambda: ["init", "split"],
        min_length=1,
        description="what a replicate seed changes: init (weights, batch order, augmentation) "
        "and/or split (data.split.seed + seed); every cell of a replicate shares both",
    )

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"replicate seeds must be distinct (got {v})")
        return v

    @field_validator("replicate_varies")
    @classmethod
    def _unique_sources(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"list each source of variation once (got {v})")
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
            if isinstance(choices, list):
                _unique_choices(key, choices)
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


def _choice_key(value: Any) -> str:
    """Equal grid values compare equal: 0.001 and 1e-3, 2 and 2.0 (not True and 1)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"number:{float(value)!r}"
    return json.dumps(value, sort_keys=True, default=repr)


def _unique_choices(key: str, choices: list[Any]) -> None:
    seen: dict[str, Any] = {}
    for value in choices:
        canon = _choice_key(value)
        if canon in seen:
            first = seen[canon]
            same = "" if first == value and type(first) is type(value) else f" (as {first!r})"
            raise ValueError(
                f"search.space.{key} lists {value!r} twice{same}: each value is one cell of "
                "the grid, and a repeated one would train the same cell twice; remove it"
            )
        seen[canon] = value


# ----------------------------------------------------------------------------- tracking


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow URI; default $MLFLOW_TRACKING_URI or SQLite")
    artifact_location: str | None = Field(None, description="default: mlruns/artifacts")
    storage: str | None = Field(None, description="Optuna storage; default journal file")
    experiment: str | None = Field(None, description="MLflow experiment; default study name")
    root: UserPath = Field(Path("mlruns"), description="folder of the default stores")
    log_figures: bool = True
    log_predictions: bool = True
    log_checkpoint: bool = False
    log_model: Literal["none", "best", "all"] = Field(
        "best",
        description="MLflow Model per trial: best = a trial that beats every earlier replicate "
        "of its cell (so each cell's best has one), all = every completed trial, none",
    )
    system_metrics: bool = Field(
        False,
        description="MLflow system metrics (system/…: CPU, memory, disk, network; GPUs with "
        "nvidia-ml-py) on every trial run, every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s "
        "(default 10)",
    )

    @field_validator("experiment")
    @classmethod
    def _experiment_is_a_name(cls, v: str | None) -> str | None:
        # The experiment's artifacts go to tracking.root/artifacts/<experiment> (or
        # artifact_location/<experiment>): a path in the name would put them elsewhere.
        if v is not None:
            check_path_name(v, "an experiment name (it becomes the folder artifacts/<name>)")
        return v

    @model_validator(mode="after")
    def _register_secrets(self) -> TrackingConfig:
        # Passwords in these URIs are masked in everything agelab writes from now on.
        for uri in (self.uri, self.storage, self.artifact_location):
            register_uri(uri)
        return self


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
    auto: bool = Field(
        True, description="`agelab run` writes the ablation report when the study ends"
    )
    alpha: float = Field(0.05, gt=0, lt=0.5, description="family-wise error rate (Holm)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of every interval")
    figures: bool = Field(True, description="embed figures (CS curves need log_figures runs)")
    min_effect: float = Field(
        0.25,
        gt=0,
        description="years: for each undecided paired test, about how many seeds would detect "
        "a difference this large",
    )
    power: float = Field(
        0.8, gt=0.5, lt=1, description="power of the detectable-difference statements"
    )


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
            if not has_path(base, key):
                raise ValueError(f"search.space key {key!r} is not a field of the study config")
            values = choices if isinstance(choices, list) else [choices.low, choices.high]
            for value in values:
                trial = copy.deepcopy(base)
                set_path(trial, key, value)
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
            set_path(raw, key, value)
        return StudyConfig.model_validate(raw)


# --------------------------------------------------------------------- dotted paths


def has_path(raw: dict, dotted: str) -> bool:
    """Whether ``dotted`` (``train.lr``) names a key of the nested mapping ``raw``."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted`` = ``a.b.c``, creating missing sections."""
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
