"""Names that become paths stay inside their root, or are refused naming the field.

``tracking.experiment`` becomes ``<tracking.root>/artifacts/<experiment>`` (or
``<artifact_location>/<experiment>``); the study name becomes ``optuna/<name>.plan.lock`` and
``reports/<name>``. Before, ``tracking.experiment=../../x`` put a study's artifacts outside
``tracking.root``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from mlflow.tracking import MlflowClient

from agelab.config import TrackingConfig, validate
from agelab.config.schema import contained_name
from agelab.errors import ConfigError
from agelab.tracking import Tracker, default_artifact_location, default_uri

ESCAPES = ["../../x", "../x", "/tmp/x", "a/../../b", "..", ".", "sub/x", "x\\..\\y", "a\x00b"]


@pytest.mark.parametrize("name", ESCAPES)
def test_an_experiment_name_cannot_leave_the_artifact_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"tracking\.experiment: .* cannot be"):
        validate({"name": "x", "tracking": {"root": str(tmp_path), "experiment": name}})
    # A name that never went through a config (code calling the tracker) is checked at use,
    # with an artifact_location prefix too.
    for cfg in (
        TrackingConfig(root=tmp_path),
        TrackingConfig(root=tmp_path, artifact_location="s3://bucket/prefix"),
    ):
        with pytest.raises(ConfigError, match=r"tracking\.experiment"):
            default_artifact_location(cfg, name)
    assert not list(tmp_path.parent.glob("x")), "nothing was created outside"


@pytest.mark.slow  # MLflow creates its tables: several seconds on a busy 2-core machine
def test_a_real_experiment_keeps_its_artifacts_inside_the_root(tmp_path: Path) -> None:
    """An unusual but plain name (spaces, brackets, unicode) on a real SQLite store: the
    experiment's artifact folder is <root>/artifacts/<name>."""
    cfg = validate(
        {"name": "x", "tracking": {"root": str(tmp_path / "mlruns"), "experiment": "Mé exp (2)"}}
    )
    tracker = Tracker(cfg.tracking, cfg.tracking.experiment)
    exp = MlflowClient(default_uri(cfg.tracking)).get_experiment(tracker.experiment_id)
    location = Path(unquote(urlparse(exp.artifact_location).path))
    assert location == (tmp_path / "mlruns" / "artifacts" / "Mé exp (2)").resolve()


def test_names_used_as_folders_are_checked_at_use() -> None:
    assert contained_name("demo.v2", "a report folder", "study name") == "demo.v2"
    for bad in ESCAPES:
        with pytest.raises(ConfigError, match="invalid study config study name"):
            contained_name(bad, "a report folder", "study name")


@pytest.mark.parametrize("name", ["../x", "/x", "a/b", ".x", ""])
def test_study_names_are_plain(name: str) -> None:
    """The study name is a folder and a file name (reports/<name>, optuna/<name>.plan.lock):
    its pattern keeps it one plain name."""
    with pytest.raises(ConfigError, match="name"):
        validate({"name": name})
