"""Study configuration: the typed schema (:mod:`.schema`) and reading study files with
overrides (:mod:`.load`). Import from here: ``from agelab.config import StudyConfig,
load_config``."""

from agelab.config.load import apply_overrides, load_config, load_raw, parse_override, validate
from agelab.config.schema import (
    AugmentConfig,
    DataConfig,
    LabelNoise,
    MetricsConfig,
    ModelConfig,
    Range,
    ReportConfig,
    SearchConfig,
    SplitConfig,
    StudyConfig,
    SynthConfig,
    TestSourceConfig,
    TrackingConfig,
    TrainConfig,
    flatten,
    has_path,
    set_path,
)
from agelab.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "LabelNoise",
    "MetricsConfig",
    "ModelConfig",
    "Range",
    "ReportConfig",
    "SearchConfig",
    "SplitConfig",
    "StudyConfig",
    "SynthConfig",
    "TestSourceConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "flatten",
    "has_path",
    "load_config",
    "load_raw",
    "parse_override",
    "set_path",
    "validate",
]
