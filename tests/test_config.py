"""Study config: loading, validation messages, overrides, search-space checks."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agelab.config import (
    ConfigError,
    StudyConfig,
    apply_overrides,
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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\ntrain: {epoch: 3}\n", ["train.epoch: unknown key", "epochs"]),
        ("name: x\ntrian: {}\n", ["trian: unknown key", "valid keys here: name"]),
        ("name: x\ntrain: {epochs: many}\n", ["train.epochs", "valid integer", "'many'"]),
        ("name: x\ntrain: {epochs: 0}\n", ["train.epochs", "greater than or equal to 1"]),
        ("name: x\ntrain: {batch_size: -4}\n", ["train.batch_size"]),
        ("name: x\ntrain: {lr: 5}\n", ["train.lr", "less than or equal to 1"]),
        (
            "name: x\nmodel: {norm: batchnorm}\n",
            ["model.norm", "unknown norm 'batchnorm'", "group"],
        ),
        ("name: x\nmodel: {act: swish}\n", ["model.act", "unknown act 'swish'", "tanh"]),
        ("name: x\nmodel: {backbone: resnet19}\n", ["model.backbone", "resnet19"]),
        ("name: x\ntrain: {loss: mape}\n", ["train.loss", "unknown loss 'mape'", "dex"]),
        ("name: x\ndata: {source: imdb}\n", ["data.source", "unknown source 'imdb'", "utkface"]),
        ("name: x\ndata: {source: csv}\n", ["data.path is required"]),
        ("name: x\nsearch: {space: {model.norm: []}}\n", ["empty list"]),
        (
            "name: x\nsearch: {space: {model.norm: [batch, bogus]}}\n",
            ["search.space.model.norm", "'bogus'", "unknown norm"],
        ),
        (
            "name: x\nsearch: {space: {train.lr: {low: 0.001, high: 0.01}}}\n",
            ["a grid needs a list"],
        ),
        (
            "name: x\nsearch: {sampler: random, space: {train.lr: [0.1]}}\n",
            ["n_trials is required"],
        ),
        ("name: x\nsearch: {space: {model.colour: [red]}}\n", ["not a field"]),
        ("name: x\nsearch: {seeds: [1, 1]}\n", ["distinct"]),
        ("name: x\nsearch: {seeds: []}\n", ["search.seeds"]),
        ("name: x\ndata: {split: {train: 0.8, calib: 0.3, test: 0.1}}\n", ["sum to 1"]),
        ("name: bad name!\n", ["name", "pattern"]),
        ("description: no name\n", ["name: required field is missing"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
        ("name: x\ntrain: {epochs: 3\n", ["malformed YAML", "line"]),
        ("", ["file is empty"]),
    ],
)
def test_bad_configs_name_field_and_fix(tmp_path: Path, text: str, expected: list[str]) -> None:
    message = error_of(tmp_path, text)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_several_problems_reported_together(tmp_path: Path) -> None:
    message = error_of(tmp_path, "name: x\ntrain: {epochs: 0, lr: -1}\n")
    assert "train.epochs" in message and "train.lr" in message


def test_missing_file_lists_neighbours(tmp_path: Path) -> None:
    write(tmp_path, "name: a\n", "a.yaml")
    with pytest.raises(ConfigError, match=r"file not found; studies in .*a\.yaml"):
        load_config(tmp_path / "b.yaml")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    message = error_of(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    assert "malformed YAML" in message


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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "name",
                        "train",
                        "model",
                        "data",
                        "epochs",
                        "lr",
                        "norm",
                        "search",
                        "space",
                        "x",
                    ]
                ),
                inner,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_loader_never_crashes_on_arbitrary_input(raw) -> None:
    """Any YAML-shaped input either validates or raises ConfigError — nothing else."""
    with contextlib.suppress(ConfigError):
        validate(apply_overrides(raw, []) if isinstance(raw, dict) else raw, "(fuzz)")


def test_roundtrip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(REPO / "experiments" / "demo.yaml")
    path = write(tmp_path, yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(path) == cfg
    assert isinstance(cfg, StudyConfig)
