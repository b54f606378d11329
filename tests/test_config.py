"""Study config: loading, validation messages, overrides, search-space checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agelab.config import (
    ConfigError,
    StudyConfig,
    flatten,
    load_config,
    parse_override,
    validate,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "study", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_studies_are_valid(study: Path) -> None:
    cfg = load_config(study)
    assert cfg.name == study.stem
    assert cfg.search.n_total() >= 1


def test_defaults_only_need_a_name() -> None:
    cfg = validate({"name": "x"})
    assert cfg.train.epochs == 10 and cfg.data.source == "synthetic"
    assert cfg.search.grid_size() == 4  # 2 norms × 2 acts × 1 seed


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert str(path) in message  # every message names the file
    return message


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\n")
    cfg = load_config(
        path,
        [
            "train.epochs=2",
            "data.path=/x",
            "search.space.model.norm=[group]",
            "train.grad_clip=null",
        ],
    )
    assert cfg.train.epochs == 2 and str(cfg.data.path) == "/x"
    assert cfg.search.space["model.norm"] == ["group"] and cfg.train.grad_clip is None
    message = error_of(tmp_path, "name: x\n", ["train.epochs=abc"])
    assert "with overrides train.epochs=abc" in message and "train.epochs" in message
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("epochs2")


def test_with_params_applies_a_trial() -> None:
    cfg = validate({"name": "x"})
    trial = cfg.with_params({"model.norm": "group", "train.lr": 0.01})
    assert trial.model.norm == "group" and trial.train.lr == 0.01
    assert cfg.model.norm == "batch"  # the study config is untouched


def test_grid_size_counts_seeds_and_choices() -> None:
    cfg = validate(
        {
            "name": "x",
            "search": {
                "seeds": [0, 1, 2],
                "space": {
                    "model.norm": ["batch", "group", "layer", "none"],
                    "model.act": ["relu", "tanh"],
                },
            },
        }
    )
    assert cfg.search.grid_size() == 24


def test_flatten_for_params() -> None:
    flat = flatten(validate({"name": "x"}))
    assert flat["train.lr"] == 0.001 and flat["data.synthetic.label_noise.kind"] == "none"
    assert "search.space" in flat


def test_roundtrip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(REPO / "experiments" / "demo.yaml")
    path = write(tmp_path, yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(path) == cfg
    assert isinstance(cfg, StudyConfig)
