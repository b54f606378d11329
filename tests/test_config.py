"""Study config: loading, validation messages, overrides, search-space checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from agelab.config import (
    ConfigError,
    StudyConfig,
    flatten,
    load_config,
    parse_override,
    set_path,
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


def test_the_description_says_which_overrides_changed_the_study(tmp_path: Path) -> None:
    """The #16 case: the file says resnet18 and 3 seeds, the command ran resnet10t and 1
    seed; the description (UI, parent run, report) must not claim the file's study alone.
    Where and how loudly it runs is not the study; a secret in an override is masked."""
    path = write(tmp_path, "name: x\ndescription: resnet18, 3 replicate seeds.\n")
    assert load_config(path).description == "resnet18, 3 replicate seeds."
    quiet = ["tracking.root=/tmp/r", "report.auto=false", "train.progress=false"]
    assert load_config(path, quiet).description == "resnet18, 3 replicate seeds."
    cfg = load_config(path, ["model.backbone=resnet10t", *quiet, "search.seeds=[0]"])
    assert cfg.description == (
        "resnet18, 3 replicate seeds.\n\nRun with command-line overrides (the text above is "
        "the study file's): `model.backbone=resnet10t`, `search.seeds=[0]`"
    )
    assert load_config(path, ["description=mine"]).description == "mine"
    secret = load_config(path, ["data.path=postgresql://ana:hunter2@db/faces"]).description
    assert "hunter2" not in secret and "`data.path=postgresql://ana:***@db/faces`" in secret


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


# ------------------------------------------------------------------ strict, finite inputs


def _float_fields() -> list[str]:
    """Every float (or list-of-floats) field of the config, from the defaults."""
    flat = flatten(validate({"name": "x"}))
    return sorted(
        k
        for k, v in flat.items()
        if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float))
    )


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=str)
def test_every_float_of_the_config_must_be_finite(bad: float) -> None:
    fields = _float_fields()
    assert {"train.warmup_epochs", "metrics.age_bands", "data.synthetic.label_noise.scale"} <= set(
        fields
    )
    defaults = flatten(validate({"name": "x"}))
    for key in fields:
        raw: dict = {"name": "x"}
        value = [defaults[key][0], bad] if isinstance(defaults[key], list) else bad
        set_path(raw, key, value)
        with pytest.raises(ConfigError) as info:
            validate(raw)
        assert key in str(info.value) and "finite number" in str(info.value), key


def _seed_fields() -> list[str]:
    return sorted(k for k in flatten(validate({"name": "x"})) if "seed" in k.split(".")[-1])


def test_every_seed_fits_the_random_generators() -> None:
    fields = _seed_fields()
    assert fields == [
        "data.split.seed",
        "data.synthetic.seed",
        "search.sampler_seed",
        "search.seeds",
        "train.seed",
    ]
    for key in fields:
        for bad, ok in ((-1, 0), (2**32, 2**32 - 1)):
            raw: dict = {"name": "x"}
            set_path(raw, key, [bad] if key == "search.seeds" else bad)
            with pytest.raises(ConfigError, match=f"seed {bad} does not fit"):
                validate(raw)
            set_path(raw, key, [ok] if key == "search.seeds" else ok)
            validate(raw)


def test_duplicate_keys_name_both_places(tmp_path: Path) -> None:
    text = "name: x\nsearch:\n  space:\n    model.norm: [batch]\n    model.norm: [none]\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "duplicate key 'model.norm' at line 5, column 5 (first given at line 4, column 5)" in (
        str(info.value)
    )
    # A merge key's values may be overridden: that is what "<<" is for.
    merged = "defaults: &d {epochs: 2, lr: 0.01}\n"
    cfg_text = "name: x\ntrain:\n  <<: {epochs: 2, lr: 0.01}\n  epochs: 5\n"
    assert load_config(write(tmp_path, cfg_text)).train.epochs == 5
    with pytest.raises(ConfigError, match="defaults: unknown key"):
        load_config(write(tmp_path, merged + cfg_text))


def test_nesting_is_bounded_without_recursion_errors(tmp_path: Path) -> None:
    for levels in (33, 400, 20_000):
        text = "name: x\ndescription: " + "[" * levels + "]" * levels + "\n"
        with pytest.raises(ConfigError, match=r"nested .*more than 32 levels"):
            load_config(write(tmp_path, text))
        with pytest.raises(ConfigError, match=r"nested .*more than 32 levels"):
            load_config(write(tmp_path, "name: x\n"), ["train.lr=" + "[" * levels + "]" * levels])
    # a {...} override that YAML cannot parse stays text, as before
    assert parse_override("description=a: b: c") == ("description", "a: b: c")


@pytest.mark.parametrize(
    ("choices", "twice"),
    [
        (["batch", "none", "batch"], "'batch' twice"),
        ([0.001, 0.01, 1e-3], "0.001 twice"),
        ([2, 2.0], "2.0 twice (as 2)"),
        ([[1, 2], [1, 2]], "[1, 2] twice"),
    ],
)
def test_grid_choices_are_unique(choices: list, twice: str) -> None:
    key = "model.norm" if isinstance(choices[0], str) else "train.lr"
    if isinstance(choices[0], list):
        key = "model.groups"
    with pytest.raises(ConfigError, match=re.escape(f"search.space.{key} lists {twice}")):
        validate({"name": "x", "search": {"space": {key: choices}}})


def test_true_and_1_are_different_grid_values() -> None:
    cfg = validate({"name": "x", "search": {"space": {"model.pretrained": [True, False]}}})
    assert cfg.search.grid_size() == 2


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("demo", True),
        ("My study (v2)", True),
        ("demo.v2", True),
        ("ünïcode", True),
        ("../../x", False),
        ("/abs", False),
        ("a/b", False),
        ("a\\b", False),
        ("..", False),
        (".hidden", False),
        ("", False),
        ("tab\there", False),
        ("x" * 201, False),
    ],
)
def test_experiment_name_is_one_folder_name(name: str, ok: bool) -> None:
    raw = {"name": "x", "tracking": {"experiment": name}}
    if ok:
        assert validate(raw).tracking.experiment == name
    else:
        with pytest.raises(ConfigError, match=r"tracking\.experiment: .* cannot be"):
            validate(raw)


def test_nul_bytes_in_paths_are_refused() -> None:
    for section, key in (("data", "path"), ("data", "cache_dir"), ("tracking", "root")):
        raw = {"name": "x", section: {key: "a\x00b"}}
        with pytest.raises(ConfigError, match=rf"{section}\.{key}: .*holds a NUL byte"):
            validate(raw)
