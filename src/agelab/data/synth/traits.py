"""Per-person traits of the synthetic faces, fixed for all images of a subject: identity
(colours, face shape, hair style: nuisances) and personal ageing rates (the cues' person-to-
person variation). Also the small numeric helpers the age cues are built from."""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------- helpers


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def lerp(a, b, t):
    return a + (b - a) * t


def _palette(
    rng: np.random.Generator, colours: np.ndarray, probs: np.ndarray, n: int, jitter: float
) -> np.ndarray:
    """n colours picked from a palette (rows of ``colours``) with per-channel jitter."""
    idx = rng.choice(len(colours), size=n, p=probs / probs.sum())
    out = colours[idx] * (1.0 + jitter * rng.standard_normal((n, 3)))
    return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------- palettes

# Skin tones from light to dark; a subject's tone is a random point on this ramp.
_SKIN_RAMP = np.array(
    [
        [0.97, 0.84, 0.74],
        [0.90, 0.72, 0.60],
        [0.78, 0.58, 0.44],
        [0.62, 0.43, 0.30],
        [0.44, 0.30, 0.21],
        [0.30, 0.20, 0.14],
    ]
)
_HAIR = np.array(
    [
        [0.07, 0.06, 0.06],  # black
        [0.20, 0.13, 0.09],  # dark brown
        [0.40, 0.27, 0.16],  # brown
        [0.78, 0.64, 0.40],  # blond
        [0.58, 0.26, 0.12],  # red
        [0.58, 0.45, 0.30],  # light brown
    ]
)
_IRIS = np.array(
    [
        [0.30, 0.18, 0.10],  # brown
        [0.12, 0.08, 0.06],  # dark brown
        [0.30, 0.45, 0.65],  # blue
        [0.35, 0.45, 0.30],  # green
        [0.45, 0.38, 0.25],  # hazel
    ]
)


def _ramp(tone: np.ndarray, ramp: np.ndarray) -> np.ndarray:
    pos = tone * (len(ramp) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(ramp) - 2)
    f = (pos - i)[:, None]
    return ramp[i] * (1 - f) + ramp[i + 1] * f


# ------------------------------------------------------------------------------- traits
#
# The steps below draw from one generator in a fixed order: reordering them, or the draws
# inside them, changes every face (and the recorded checksums in tests/data).


def subject_traits(n_subj: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fixed per-person traits: identity (nuisance) and personal ageing rates (cue)."""
    t: dict[str, np.ndarray] = {}
    male = rng.random(n_subj) < 0.5
    t["male"] = male.astype(np.float64)
    _colours(t, n_subj, rng)
    _face_shape(t, n_subj, male, rng)
    _hair_style(t, n_subj, male, rng)
    _ageing(t, n_subj, male, rng)
    return t


def _colours(t: dict[str, np.ndarray], n_subj: int, rng: np.random.Generator) -> None:
    """Skin, hair, iris and lip colours."""
    tone = rng.beta(1.4, 1.8, n_subj)
    t["skin"] = np.clip(
        _ramp(tone, _SKIN_RAMP) * (1 + 0.03 * rng.standard_normal((n_subj, 3))), 0, 1
    )
    # Darker skin → mostly black/dark-brown hair; lighter skin → the whole palette.
    hair = np.empty((n_subj, 3))
    dark = tone > 0.55
    p_dark = np.array([0.6, 0.35, 0.05, 0.0, 0.0, 0.0])
    p_light = np.array([0.15, 0.25, 0.25, 0.15, 0.07, 0.13])
    hair[dark] = _palette(rng, _HAIR, p_dark, int(dark.sum()), 0.08)
    hair[~dark] = _palette(rng, _HAIR, p_light, int((~dark).sum()), 0.08)
    t["hair"] = hair
    iris = np.empty((n_subj, 3))
    iris[dark] = _palette(rng, _IRIS, np.array([0.55, 0.4, 0.0, 0.0, 0.05]), int(dark.sum()), 0.1)
    iris[~dark] = _palette(
        rng, _IRIS, np.array([0.3, 0.1, 0.25, 0.15, 0.2]), int((~dark).sum()), 0.1
    )
    t["iris"] = iris
    lip = t["skin"] * np.array([1.0, 0.72, 0.72]) * rng.uniform(0.82, 0.95, (n_subj, 1))
    t["lip"] = np.clip(lip + np.array([0.06, 0.0, 0.0]), 0, 1)


def _face_shape(
    t: dict[str, np.ndarray], n_subj: int, male: np.ndarray, rng: np.random.Generator
) -> None:
    """Adult face shape (identity): multiplicative factors around 1."""
    t["face_len"] = 1 + 0.04 * rng.standard_normal(n_subj)
    t["jaw_w"] = 1 + 0.05 * rng.standard_normal(n_subj) + 0.05 * male
    t["eye_sep"] = 1 + 0.05 * rng.standard_normal(n_subj)
    t["eye_size"] = 1 + 0.07 * rng.standard_normal(n_subj)
    t["nose_w"] = 1 + 0.10 * rng.standard_normal(n_subj)
    t["mouth_w"] = 1 + 0.07 * rng.standard_normal(n_subj)
    t["lip_t"] = 1 + 0.15 * rng.standard_normal(n_subj) - 0.1 * male
    t["brow_t"] = (1 + 0.15 * rng.standard_normal(n_subj)) * np.where(male, 1.25, 0.9)
    t["brow_arch"] = rng.uniform(0.01, 0.04, n_subj)
    t["ear"] = 1 + 0.08 * rng.standard_normal(n_subj)


def _hair_style(
    t: dict[str, np.ndarray], n_subj: int, male: np.ndarray, rng: np.random.Generator
) -> None:
    """Hair style: length (where the back hair ends, face units), fringe, volume."""
    long_p = np.where(male, 0.1, 0.75)
    is_long = rng.random(n_subj) < long_p
    t["hair_len"] = np.where(
        is_long, rng.uniform(0.25, 1.1, n_subj), rng.uniform(-0.35, -0.05, n_subj)
    )
    t["fringe"] = (rng.random(n_subj) < np.where(male, 0.15, 0.35)) * rng.uniform(0.1, 0.25, n_subj)
    t["hair_vol"] = rng.uniform(0.02, 0.09, n_subj)


def _ageing(
    t: dict[str, np.ndarray], n_subj: int, male: np.ndarray, rng: np.random.Generator
) -> None:
    """Personal ageing (the cues' per-subject variation)."""
    t["dev_shift"] = rng.normal(0.0, 0.8, n_subj)  # years ahead/behind in growth
    t["grey_onset"] = rng.normal(48.0, 9.0, n_subj)  # age at half the final grey
    t["grey_width"] = rng.uniform(5.0, 12.0, n_subj)  # years from 27% to 73% of it
    t["grey_max"] = rng.uniform(0.6, 1.0, n_subj)  # how grey the hair finally gets
    balder = rng.random(n_subj) < np.where(male, 0.55, 0.08)
    t["bald"] = balder * np.where(
        male, rng.uniform(0.35, 1.0, n_subj), rng.uniform(0.1, 0.35, n_subj)
    )
    t["bald_onset"] = rng.uniform(18.0, 45.0, n_subj)
    t["skin_rate"] = np.exp(0.13 * rng.standard_normal(n_subj))  # fast/slow skin ageing
    t["beard"] = male * (rng.random(n_subj) < 0.45) * rng.uniform(0.3, 0.9, n_subj)
    t["spots"] = rng.uniform(0.3, 1.0, n_subj)
    t["dyes"] = (rng.random(n_subj) < np.where(male, 0.12, 0.35)).astype(np.float64)
