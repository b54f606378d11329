"""Splits: subject-disjoint (property-based), deterministic, stratified, sane on tiny data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agelab.config import SplitConfig
from agelab.data.split import SplitWarning, assign_splits, split_summary
from agelab.errors import DataError

SPLITS = ("train", "calib", "conformal", "test")


def layout(n_subjects: int, per_subject: int, n_loose: int = 0, seed: int = 0):
    """Ages and subjects: n_subjects people with per_subject images, plus subject-less ones."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 90, n_subjects)
    ages = np.concatenate(
        [
            np.repeat(base, per_subject) + rng.uniform(0, 3, n_subjects * per_subject),
            rng.uniform(0, 90, n_loose),
        ]
    )
    subjects = np.array(
        [f"p{i}" for i in range(n_subjects) for _ in range(per_subject)] + [""] * n_loose
    )
    return ages, subjects


def assert_disjoint(split, subjects):
    owner: dict[str, str] = {}
    for s, part in zip(subjects, split, strict=True):
        if s:
            assert owner.setdefault(s, part) == part, f"subject {s} in {owner[s]} and {part}"


@st.composite
def layouts(draw):
    n_groups = draw(st.integers(3, 40))
    sizes = draw(st.lists(st.integers(1, 8), min_size=n_groups, max_size=n_groups))
    known = draw(st.lists(st.booleans(), min_size=n_groups, max_size=n_groups))
    ages, subjects = [], []
    for g, (size, has_subject) in enumerate(zip(sizes, known, strict=True)):
        centre = draw(st.floats(0, 100))
        for k in range(size if has_subject else 1):
            ages.append(centre + k * 0.5)
            subjects.append(f"s{g}" if has_subject else "")
    train = draw(st.floats(0.4, 0.8))
    calib_share = draw(st.floats(0.2, 0.8))
    calib = (1 - train) * calib_share
    conformal = draw(st.sampled_from([0.0, 0.05, 0.1])) * (1 - train - calib) / 0.2
    cfg = SplitConfig(
        train=train,
        calib=calib,
        conformal=conformal,
        test=1 - train - calib - conformal,
        seed=draw(st.integers(0, 2**31)),
        band_width=draw(st.sampled_from([5.0, 10.0, 20.0])),
    )
    return np.array(ages), np.array(subjects), cfg


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_subject_disjoint_and_all_splits_nonempty(data):
    ages, subjects, cfg = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SplitWarning)
        split = assign_splits(ages, subjects, cfg)
    n_groups = len(set(subjects[subjects != ""])) + int((subjects == "").sum())
    wanted = {s for s in SPLITS if getattr(cfg, s) > 0}
    if n_groups < len(wanted):  # no room for a conformal split: calib serves both
        wanted.discard("conformal")
    assert split.shape == ages.shape and set(split) == wanted
    assert_disjoint(split, subjects)


def test_deterministic_and_seed_dependent():
    ages, subjects = layout(60, 4, n_loose=50)
    a = assign_splits(ages, subjects, SplitConfig(seed=3))
    b = assign_splits(ages, subjects, SplitConfig(seed=3))
    c = assign_splits(ages, subjects, SplitConfig(seed=4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(("n_subjects", "per_subject", "tol"), [(1000, 1, 0.01), (200, 5, 0.03)])
def test_fractions_hold(n_subjects, per_subject, tol):
    ages, subjects = layout(n_subjects, per_subject)
    cfg = SplitConfig(train=0.6, calib=0.2, conformal=0.05, test=0.15, seed=1)
    split = assign_splits(ages, subjects, cfg)
    for name, want in zip(SPLITS, (0.6, 0.2, 0.05, 0.15), strict=True):
        assert abs(np.mean(split == name) - want) <= tol


def test_stratified_by_age_band():
    rng = np.random.default_rng(0)
    ages = np.concatenate([rng.uniform(lo, lo + 10, 100) for lo in range(0, 90, 10)])
    split = assign_splits(ages, np.full(len(ages), ""), SplitConfig(seed=7))
    for lo in range(0, 90, 10):
        band = split[(ages >= lo) & (ages < lo + 10)]
        assert abs(np.mean(band == "train") - 0.7) <= 0.02
        assert abs(np.mean(band == "test") - 0.15) <= 0.02


def test_subjects_are_banded_by_median_age():
    # One subject spans ages 10..70 (median 40): it lands in one split, as a whole.
    ages = np.concatenate([[10, 40, 70], np.linspace(0, 90, 60)])
    subjects = np.array(["long"] * 3 + [""] * 60)
    split = assign_splits(ages, subjects, SplitConfig())
    assert len(set(split[:3])) == 1


@pytest.mark.parametrize("n", [3, 4, 10])
def test_small_datasets_get_nonempty_calib_and_test(n):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SplitWarning)
        split = assign_splits(np.linspace(1, 80, n), np.full(n, ""), SplitConfig())
    assert all((split == name).sum() >= 1 for name in ("train", "calib", "test"))
    # Three images cannot also make a conformal split: calib serves both, and it is said.
    assert ((split == "conformal").sum() >= 1) == (n >= 4)
    said = any("no conformal split" in str(w.message) for w in caught)
    assert said == (n < 4)


def test_conformal_zero_gives_the_three_splits_of_before():
    ages, subjects = layout(80, 3, n_loose=40)
    cfg = SplitConfig(train=0.7, calib=0.15, conformal=0.0, test=0.15, seed=2)
    split = assign_splits(ages, subjects, cfg)
    assert set(split) == {"train", "calib", "test"}
    assert abs(np.mean(split == "calib") - 0.15) <= 0.03


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(DataError, match="need at least 3"):
        assign_splits(np.array([10.0, 20.0]), np.array(["", ""]), SplitConfig())
    with pytest.raises(DataError, match=r"2 subject group\(s\)"):
        assign_splits(np.arange(20.0), np.array(["a"] * 10 + ["b"] * 10), SplitConfig())


def test_unbalanced_subjects_warn():
    ages = np.arange(102, dtype=float) % 80
    subjects = np.array(["big"] * 100 + ["x", "y"])
    with pytest.warns(SplitWarning, match="fractions are off"):  # and no conformal split
        split = assign_splits(ages, subjects, SplitConfig())
    assert_disjoint(split, subjects)


def test_summary():
    ages, subjects = layout(30, 3)
    split = assign_splits(ages, subjects, SplitConfig())
    summary = split_summary(split, ages, subjects)
    assert sum(v["n"] for v in summary.values()) == 90
    assert sum(v["subjects"] for v in summary.values()) == 30
