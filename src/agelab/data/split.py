"""Seeded train / calib / test splits: stratified by age band, subject-disjoint.

Assignment is per *group*: all images of one subject form a group (so a person never appears
in two splits); an image without a subject ("") is a group of its own. Byte-identical images
(``duplicates``: copies or hard links of one file) join their groups into one, so a copy of a
test face is never trained on. Each group gets an age band from its median age
(``floor(age / band_width)``).

Groups are visited band by band (youngest first), shuffled within a band by the seed (larger
groups first, so big subjects are placed while there is still room to balance them), and each
goes to the split furthest *below* its target share of the images assigned so far
("largest deficit"). Because the deficits carry over between bands, every band is divided
roughly in the split fractions (stratification) and the overall fractions hold too, to within
about one group. Finally an empty split (possible only with very few groups) takes the
smallest group of the largest split; fewer than three groups is an error.
"""

from __future__ import annotations

import itertools
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from agelab.data.dataset import SPLITS
from agelab.errors import DataError

if TYPE_CHECKING:
    from agelab.config import SplitConfig

#: Bumped whenever the same data and split config can give other splits (then a study's
#: results are not comparable): 1 subject-disjoint stratified; 2 byte-identical duplicate
#: images kept in one split like one subject. Part of a study's identity.
SPLIT_VERSION = 2

#: Warn when a split's share of the images is further than this from its target (only for
#: datasets of at least MIN_IMAGES_TO_WARN images: tiny ones cannot be split finely).
FRACTION_TOLERANCE = 0.1
MIN_IMAGES_TO_WARN = 20


class SplitWarning(UserWarning):
    """Split fractions are far from the requested ones (a few subjects dominate)."""


def _groups(subjects: np.ndarray) -> tuple[np.ndarray, int]:
    """Group id per image: one per distinct non-empty subject, one per subject-less image."""
    names = pd.Series(subjects, dtype=object).fillna("").astype(str)
    unknown = (names == "").to_numpy()
    codes, uniques = pd.factorize(names)  # hash-based: fast even for millions of images
    codes = codes.astype(np.int64)
    n_known = len(uniques)
    # Renumber: known subjects 0..k-1 (by first appearance), then one id per loose image.
    if unknown.any():
        empty_code = int(codes[unknown][0])
        known_codes = codes[~unknown]
        codes[~unknown] = known_codes - (known_codes > empty_code)
        n_known -= 1
        codes[unknown] = n_known + np.arange(int(unknown.sum()))
    return codes, n_known + int(unknown.sum())


def assign_splits(
    ages: np.ndarray,
    subjects: np.ndarray | None,
    cfg: SplitConfig,
    duplicates: np.ndarray | None = None,
    given: np.ndarray | None = None,
) -> np.ndarray:
    """Split label ("train" | "calib" | "conformal" | "test") per image. Deterministic in
    ``cfg.seed``; a split whose share is 0 (``conformal``) gets no image.

    ``duplicates``: a content-group id per image (-1: no twin), from
    :func:`agelab.data.sources.content_groups`; images sharing an id share a split.
    ``given``: a split per image from a fixed protocol ("" where none is given), honoured
    instead of the draw: see :func:`_given_splits`."""
    ages, subjects = _check_inputs(ages, subjects)
    if given is not None and (np.asarray(given) != "").any():
        return _given_splits(ages, subjects, cfg, duplicates, np.asarray(given, dtype=str))
    return _draw(ages, subjects, cfg, _fractions_of(cfg), duplicates)


def _draw(
    ages: np.ndarray,
    subjects: np.ndarray,
    cfg: SplitConfig,
    wanted: np.ndarray,
    duplicates: np.ndarray | None,
) -> np.ndarray:
    """The seeded, stratified, subject-disjoint draw with the shares ``wanted`` (per SPLITS)."""
    n = len(ages)
    group_of, n_groups = _groups(subjects)
    if duplicates is not None:
        group_of, n_groups = _join_duplicates(group_of, n_groups, np.asarray(duplicates))
    fracs = _fit_to_groups(wanted, n_groups)
    active = int((fracs > 0).sum())
    if n_groups < active:
        names = "/".join(s for s, f in zip(SPLITS, fracs, strict=True) if f > 0)
        raise DataError(
            f"cannot make {names} splits from {n} image(s) in {n_groups} "
            f"subject group(s): need at least {active} (a subject stays in one split)"
        )
    sizes, bands = _group_sizes_and_bands(ages, group_of, n_groups, cfg.band_width)
    rng = np.random.default_rng(cfg.seed)
    shuffle = rng.permutation(n_groups)
    # Visit order: band ascending, then size descending, then the seeded shuffle.
    visit = np.lexsort((shuffle, -sizes, bands))
    group_split, counts = _largest_deficit(visit, sizes, tuple(fracs))
    _fill_empty_splits(group_split, counts, sizes, fracs > 0)
    _warn_if_far(counts / n, fracs, n, n_groups)
    labels = np.asarray(SPLITS)[group_split[group_of]]
    return labels.astype("<U9")


def _given_splits(
    ages: np.ndarray,
    subjects: np.ndarray,
    cfg: SplitConfig,
    duplicates: np.ndarray | None,
    given: np.ndarray,
) -> np.ndarray:
    """A fixed protocol. When it names calib rows, every row's split is the given one; when
    it gives only the test (or train and test), the test stays as given and the rest is
    drawn into train / calib / conformal with their configured shares (seeded, stratified,
    subject-disjoint), so replicates can still vary that part."""
    if (given == "calib").any():
        blank = np.flatnonzero(given == "")
        if len(blank):
            raise DataError(
                f"the manifest gives calib rows but no split for {len(blank)} row(s): give "
                "every row a split (train, calib, conformal, test), or only the test rows"
            )
        return given.astype("<U9")
    labels = np.full(len(ages), "test", dtype="<U9")
    rest = np.flatnonzero(given != "test")
    if not len(rest):
        raise DataError("every row is given as test: nothing is left to train on")
    wanted = _fractions_of(cfg)
    wanted[SPLITS.index("test")] = 0.0
    dup = None if duplicates is None else np.asarray(duplicates)[rest]
    labels[rest] = _draw(ages[rest], subjects[rest], cfg, wanted / wanted.sum(), dup)
    return labels


def protocol_checks(split: np.ndarray, subjects: np.ndarray, duplicates: np.ndarray) -> dict:
    """What a given protocol may break and the draw never does: subjects, and byte-identical
    images, that sit in more than one split. Counted, for the data summary."""
    out = {}
    for name, ids in (("subjects", subjects), ("duplicate_groups", duplicates)):
        ids = np.asarray(ids)
        keep = (ids != "") if ids.dtype.kind in "UO" else (ids >= 0)
        pairs = {(i, s) for i, s in zip(ids[keep].tolist(), split[keep].tolist(), strict=True)}
        spread = [i for i, n in Counter(i for i, _ in pairs).items() if n > 1]
        out[f"{name}_in_several_splits"] = len(spread)
    return out


def _fractions_of(cfg: SplitConfig) -> np.ndarray:
    return np.array([getattr(cfg, name) for name in SPLITS], dtype=float)


def _fit_to_groups(fracs: np.ndarray, n_groups: int) -> np.ndarray:
    """Target share per split. Too few subject groups for a conformal split as well: its
    share goes back to calib (intervals calibrated there, as with conformal: 0), said once."""
    fracs = fracs.copy()
    conformal, calib = SPLITS.index("conformal"), SPLITS.index("calib")
    if fracs[conformal] > 0 and n_groups < int((fracs > 0).sum()):
        warnings.warn(
            f"only {n_groups} subject group(s): no conformal split; conformal intervals are "
            "calibrated on the calib split, which selection also uses",
            SplitWarning,
            stacklevel=4,
        )
        fracs[calib] += fracs[conformal]
        fracs[conformal] = 0.0
    return fracs


def _join_duplicates(
    group_of: np.ndarray, n_groups: int, duplicates: np.ndarray
) -> tuple[np.ndarray, int]:
    """Merge the groups of images that are copies of each other (union-find over the few
    groups involved); group numbers keep their order, so without duplicates nothing moves."""
    if len(duplicates) != len(group_of):
        raise ValueError(f"{len(duplicates)} duplicate ids for {len(group_of)} images")
    twins = duplicates >= 0
    if not twins.any():
        return group_of, n_groups
    parent = np.arange(n_groups)

    def root(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = int(parent[g])
        return g

    order = np.argsort(duplicates[twins], kind="stable")
    ids, groups = duplicates[twins][order], group_of[twins][order]
    for start, stop in _runs(ids):
        first = root(int(groups[start]))
        for g in groups[start + 1 : stop].tolist():
            other = root(g)
            first, other = min(first, other), max(first, other)
            parent[other] = first
    for g in np.flatnonzero(parent != np.arange(n_groups)).tolist():
        parent[g] = root(g)
    _, renumbered = np.unique(parent, return_inverse=True)
    return renumbered[group_of], int(renumbered.max()) + 1


def _runs(sorted_ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal values in a sorted array."""
    edges = np.flatnonzero(np.diff(sorted_ids)) + 1
    bounds = [0, *edges.tolist(), len(sorted_ids)]
    return list(itertools.pairwise(bounds))


def _check_inputs(ages: np.ndarray, subjects: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    ages = np.asarray(ages, dtype=np.float64)
    n = len(ages)
    if subjects is None:
        subjects = np.full(n, "", dtype=object)
    subjects = np.asarray(subjects, dtype=object)
    if len(subjects) != n:
        raise ValueError(f"{len(subjects)} subjects for {n} ages")
    if not np.all(np.isfinite(ages)):
        raise ValueError("ages must be finite to split")
    return ages, subjects


def _group_sizes_and_bands(
    ages: np.ndarray, group_of: np.ndarray, n_groups: int, band_width: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group size and age band (of the median age; vectorised: sort by group, then age,
    and take the middle)."""
    order = np.lexsort((ages, group_of))
    sorted_ages = ages[order]
    sizes = np.bincount(group_of, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    medians = (sorted_ages[starts + (sizes - 1) // 2] + sorted_ages[starts + sizes // 2]) / 2
    return sizes, np.floor(medians / band_width).astype(np.int64)


def _largest_deficit(
    visit: np.ndarray, sizes: np.ndarray, fracs: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Each group, in visit order, to the split furthest below its target share so far.
    Returns the split index per group and the image count per split. A split whose share is
    0 never wins: the deficits sum to the group's size, so some other one is positive."""
    # Plain Python floats in the loop: ~1 µs per group, where numpy would be ~20.
    totals = [0] * len(fracs)
    assigned = 0
    choices = []
    size_list = sizes.tolist()
    for g in visit.tolist():
        size = size_list[g]
        after = assigned + size
        deficits = [f * after - t for f, t in zip(fracs, totals, strict=True)]
        choice = deficits.index(max(deficits))  # ties → the earlier split in SPLITS
        choices.append(choice)
        totals[choice] += size
        assigned = after
    group_split = np.empty(len(sizes), dtype=np.int64)
    group_split[visit] = choices
    return group_split, np.array(totals, dtype=np.float64)


def _fill_empty_splits(
    group_split: np.ndarray, counts: np.ndarray, sizes: np.ndarray, active: np.ndarray
) -> None:
    """Very small inputs can leave a split empty: move the smallest group of the largest
    split there (in place on both arrays). Splits with a share of 0 (``active`` False) stay
    empty."""
    for j in range(len(SPLITS)):
        if counts[j] > 0 or not active[j]:
            continue
        donors = [k for k in range(len(SPLITS)) if np.sum(group_split == k) > 1]
        donor = max(donors, key=lambda k: counts[k])
        candidates = np.flatnonzero(group_split == donor)
        g = candidates[np.argmin(sizes[candidates])]
        group_split[g] = j
        counts[donor] -= sizes[g]
        counts[j] += sizes[g]


def _warn_if_far(shares: np.ndarray, fractions: np.ndarray, n: int, n_groups: int) -> None:
    far = [
        f"{name} {share:.2f} (wanted {want:.2f})"
        for name, share, want in zip(SPLITS, shares, fractions, strict=True)
        if abs(share - want) > FRACTION_TOLERANCE
    ]
    if far and n >= MIN_IMAGES_TO_WARN:
        warnings.warn(
            f"split fractions are off: {', '.join(far)} — {n_groups} subject groups for {n} "
            "images are too few or too unequal to split finely",
            SplitWarning,
            stacklevel=3,
        )


def split_summary(split: np.ndarray, ages: np.ndarray, subjects: np.ndarray) -> dict[str, Any]:
    """Counts, shares, subjects and mean age per split (for FaceDataset.info)."""
    out: dict[str, Any] = {}
    n = len(split)
    for name in SPLITS:
        mask = split == name
        subj = {s for s in subjects[mask] if s}
        out[name] = {
            "n": int(mask.sum()),
            "fraction": round(float(mask.sum()) / n, 4) if n else 0.0,
            "subjects": len(subj),
            "age_mean": round(float(ages[mask].mean()), 2) if mask.any() else None,
        }
    return out
