"""Procedural synthetic faces: the default data set, drawn by agelab itself.

No face data set can be downloaded in the default setting, so agelab draws cartoon faces
whose age can be read the way it is read from real photographs: from many weak cues at
several scales, each a smooth function of age with person-to-person variation, under
nuisance factors that have nothing to do with age.

Age cues (each a smooth function of age, plus per-subject offsets)
    * head and face proportions — a child's cranium is large against the face, the eyes sit
      low in the head and are large and round, nose/mouth/chin are small, cheeks are full
      and rosy; the face lengthens towards adult proportions through the teens
      (``maturity``, with a per-subject timing offset);
    * hair — sparse, thin hair on babies; greying as a salt-and-pepper strand mask whose
      grey fraction is a logistic in age with a per-subject onset, speed and final level
      (and some subjects dye their hair); eyebrows grey later; a receding hairline
      (temples first, then the crown) for subjects with a balding propensity;
    * skin — forehead lines that grow in number and contrast, crow's feet, nasolabial
      folds, marionette lines, under-eye bags, neck lines, age spots and blotchy skin,
      thinner lips, drooping eyelids and mouth corners, a sagging jaw line, slightly
      longer nose and larger ears; all driven by a per-subject "skin age";
    * beard stubble on some adult male subjects (absent before puberty).

Nuisance factors (independent of age)
    skin tone, hair colour and style (length, fringe, volume), iris colour, face shape,
    clothing colour, expression (smile), gaze, pose (rotation, shift, scale), lighting
    (direction, intensity, colour temperature, 3-D shading of the head), background
    (colour, gradient, blotchy texture), defocus blur, sensor noise, and — with
    probability ``occluder_prob`` — an occluder: sunglasses, a face mask or a random patch.

Subjects
    Image ``i`` belongs to subject ``i // images_per_subject``; a subject's fixed traits
    (skin tone, hair colour, face shape, greying onset, balding and skin-ageing rates, …)
    are shared by all its images, which are drawn at independent ages from the age
    distribution (so the marginal age distribution is exact), as in FG-NET/MORPH where one
    person appears at several ages. Subject-disjoint splits therefore matter.

Drawing is vectorized: chunks of :func:`chunk_size` images (about 2¹⁸ pixels) are rendered
at once in torch as implicit shapes on a coordinate grid (ellipses and boxes as approximate
signed distance fields, lines as distance-to-curve bands, anti-aliased by a one-pixel
linear ramp); local features (eyes, mouth, wrinkles…) are only evaluated in the pixel
window that holds them. Chunks run on a small thread pool, torch single-threaded in each.
All per-image parameters come from a numpy ``Generator`` seeded by ``cfg.seed``; pixel
noise comes from a ``torch.Generator`` seeded per chunk, so the same config gives
byte-identical images, whatever the number of threads. Separate random streams are used
for ages, subject traits, per-image nuisances and label noise, so changing the label
noise does not change a single pixel.

Run ``python -m agelab.data.synth --bench`` for a speed figure and
``python -m agelab.data.synth --preview out.png`` for a contact sheet.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agelab.config import LabelNoise, SynthConfig

# Bump when a change alters the generated images or labels: it is part of the cache key.
VERSION = "1"

__all__ = [
    "VERSION",
    "SynthFaces",
    "add_label_noise",
    "bench_generate",
    "chunk_size",
    "contact_sheet",
    "generate",
    "sample_ages",
]


@dataclass
class SynthFaces:
    """A generated data set (see :func:`generate`)."""

    images: np.ndarray  # uint8 [N, 3, H, W], C-contiguous
    ages: np.ndarray  # float32 [N] — label (true age + label noise, clipped at 0)
    true_ages: np.ndarray  # float32 [N]
    subjects: np.ndarray  # int64 [N] subject ids
    noise_floor_mae: float  # mean |ages - true_ages|: the irreducible MAE against noisy labels

    def __len__(self) -> int:
        return len(self.ages)


# ----------------------------------------------------------------------------- helpers


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _lerp(a, b, t):
    return a + (b - a) * t


def _palette(
    rng: np.random.Generator, colours: np.ndarray, probs: np.ndarray, n: int, jitter: float
) -> np.ndarray:
    """n colours picked from a palette (rows of ``colours``) with per-channel jitter."""
    idx = rng.choice(len(colours), size=n, p=probs / probs.sum())
    out = colours[idx] * (1.0 + jitter * rng.standard_normal((n, 3)))
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------- ages


def sample_ages(cfg: SynthConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """True ages (float64) from ``cfg.age_distribution`` within [age_min, age_max].

    ``uniform``: uniform on [age_min, age_max].
    ``utkface``: a mixture shaped like UTKFace's histogram — a bump of babies and toddlers
    (mostly 1–4), some children and teens, a big young-adult mode peaking near 26, a broad
    middle-aged component and a thin elderly tail. Draws outside the range are redrawn
    (so no mass piles up at the bounds); after 50 rounds any left are clipped.
    """
    lo, hi = float(cfg.age_min), float(cfg.age_max)
    if cfg.age_distribution == "uniform":
        return rng.uniform(lo, hi, n)

    def draw(k: int) -> np.ndarray:
        comp = rng.choice(5, size=k, p=[0.10, 0.08, 0.47, 0.27, 0.08])
        babies = 0.3 + rng.gamma(1.6, 1.3, k)  # mode ≈ 1, most below 5
        children = rng.uniform(4.0, 18.0, k)
        young = rng.lognormal(math.log(27.5), 0.21, k)  # mode ≈ 26, most 20–40
        middle = rng.normal(50.0, 11.0, k)
        old = 62.0 + rng.gamma(2.0, 7.5, k)  # 65–90, few past 100
        return np.choose(comp, [babies, children, young, middle, old])

    ages = draw(n)
    for _ in range(50):
        bad = np.flatnonzero((ages < lo) | (ages > hi))
        if bad.size == 0:
            break
        ages[bad] = draw(bad.size)
    return np.clip(ages, lo, hi)


def add_label_noise(
    true_ages: np.ndarray, noise: LabelNoise, rng: np.random.Generator
) -> np.ndarray:
    """Noisy labels: none, normal(σ=scale), laplace(b=scale) or hetero (normal with
    σ = scale + hetero_slope·age). Labels are clipped at 0."""
    n = len(true_ages)
    if noise.kind == "none" or (noise.scale == 0 and noise.kind != "hetero"):
        return true_ages.copy()
    if noise.kind == "normal":
        eps = rng.normal(0.0, noise.scale, n)
    elif noise.kind == "laplace":
        eps = rng.laplace(0.0, noise.scale, n)
    elif noise.kind == "hetero":
        eps = rng.standard_normal(n) * (noise.scale + noise.hetero_slope * true_ages)
    else:  # pragma: no cover - the config validates the kind
        raise ValueError(f"unknown label noise kind {noise.kind!r}")
    return np.maximum(true_ages + eps, 0.0)


# ----------------------------------------------------------------- per-image parameters

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


def _subject_traits(n_subj: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fixed per-person traits: identity (nuisance) and personal ageing rates (cue)."""
    t: dict[str, np.ndarray] = {}
    male = rng.random(n_subj) < 0.5
    t["male"] = male.astype(np.float64)
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

    # Adult face shape (identity): multiplicative factors around 1.
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

    # Hair style: length (where the back hair ends, face units), fringe, volume.
    long_p = np.where(male, 0.1, 0.75)
    is_long = rng.random(n_subj) < long_p
    t["hair_len"] = np.where(
        is_long, rng.uniform(0.25, 1.1, n_subj), rng.uniform(-0.35, -0.05, n_subj)
    )
    t["fringe"] = (rng.random(n_subj) < np.where(male, 0.15, 0.35)) * rng.uniform(0.1, 0.25, n_subj)
    t["hair_vol"] = rng.uniform(0.02, 0.09, n_subj)

    # Personal ageing (the cues' per-subject variation).
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
    return t


def _image_params(
    ages: np.ndarray,
    subjects: np.ndarray,
    traits: dict[str, np.ndarray],
    occluder_prob: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Every number the renderer needs, per image: geometry from age cues, then nuisances.

    Face coordinates: x to the right, y down, the head roughly spans [-0.8, 0.8]; the image
    spans [-1, 1] before the pose transform.
    """
    n = len(ages)
    S = {k: v[subjects] for k, v in traits.items()}
    male = S["male"]
    age = ages.astype(np.float64)
    p: dict[str, np.ndarray] = {}

    # --- growth: maturity 0 (newborn) → 1 (adult), a smooth saturating function of age.
    dev_age = np.maximum(age + S["dev_shift"], 0.0)
    m = 1.0 - np.exp(-((dev_age / 8.5) ** 1.4))
    # Late-life changes driven by a personal "skin age".
    skin_age = age * S["skin_rate"]
    sag = _smoothstep(skin_age, 45.0, 90.0)

    # Head: the cranium ellipse is big and round for children; the jaw/face ellipse below
    # it grows longer (chin moves down) with maturity, and sags/widens with old age.
    p["cr_cy"] = _lerp(-0.13, -0.17, m)
    p["cr_a"] = _lerp(0.64, 0.54, m)
    p["cr_b"] = _lerp(0.65, 0.60, m)
    p["jaw_cy"] = _lerp(0.13, 0.10, m)
    p["jaw_a"] = _lerp(0.57, 0.47, m) * _lerp(1.0, S["jaw_w"], m) + 0.03 * sag
    p["jaw_b"] = _lerp(0.54, 0.66, m) * _lerp(1.0, S["face_len"], m) + 0.02 * sag
    chin = p["jaw_cy"] + p["jaw_b"]

    # Eyes: low in the head and large for children; adult eyes sit at mid-head.
    p["eye_y"] = _lerp(0.13, -0.02, m)
    p["eye_x"] = _lerp(0.215, 0.205, m) * S["eye_sep"]
    p["eye_a"] = _lerp(0.105, 0.094, m) * S["eye_size"]
    p["eye_b"] = _lerp(0.070, 0.046, m) * S["eye_size"]
    p["iris_r"] = _lerp(0.062, 0.044, m) * S["eye_size"]
    # Upper lid: fraction of the eye height covered (droops with age).
    p["lid"] = 0.05 + 0.07 * m + 0.32 * _smoothstep(skin_age, 40.0, 90.0) + rng.uniform(0, 0.1, n)
    # Nose and mouth positions follow the (lengthening) lower face; the nose keeps
    # growing a little in old age.
    face_h = chin - p["eye_y"]
    p["nose_y"] = p["eye_y"] + face_h * _lerp(0.33, 0.38, m) + 0.02 * sag
    p["nose_w"] = _lerp(0.045, 0.065, m) * S["nose_w"]
    p["mouth_y"] = p["eye_y"] + face_h * _lerp(0.61, 0.62, m)
    p["mouth_w"] = _lerp(0.10, 0.155, m) * S["mouth_w"]
    p["lip_t"] = _lerp(0.022, 0.026, m) * S["lip_t"] * (1 - 0.45 * sag)
    smile = np.clip(rng.normal(0.25, 0.45, n), -0.4, 1.0)  # expression (nuisance)
    p["mouth_curve"] = 0.03 * sag - 0.035 * smile  # >0: corners down
    # Ears grow slowly through life.
    p["ear_x"] = p["cr_a"] * _lerp(0.97, 0.93, m)
    p["ear_y"] = p["eye_y"] + 0.05
    p["ear_a"] = 0.065 * S["ear"] * (1 + 0.1 * sag)
    p["ear_b"] = _lerp(0.10, 0.13, m) * S["ear"] * (1 + 0.12 * sag)
    p["neck_w"] = _lerp(0.22, 0.27, m) + 0.03 * male * m
    p["chin"] = chin
    p["shoulder_a"] = _lerp(0.75, 1.05, m)

    # Eyebrows: faint on babies, grey later than the hair.
    p["brow_y"] = p["eye_y"] - p["eye_b"] - _lerp(0.055, 0.075, m)
    p["brow_x"] = p["eye_x"] + 0.01
    p["brow_w"] = p["eye_a"] * 1.25
    p["brow_t"] = _lerp(0.010, 0.016, m) * S["brow_t"]
    p["brow_arch"] = S["brow_arch"]
    p["brow_alpha"] = _lerp(0.25, 0.95, m)

    # Hair: density (babies have sparse hair), hairline (receding), greying.
    p["hair_dens"] = _lerp(0.15, 1.0, _smoothstep(age, 0.0, 5.0))
    recede = S["bald"] * _smoothstep(age, S["bald_onset"], S["bald_onset"] + 35.0)
    base_line = p["cr_cy"] - p["cr_b"] * 0.5 + S["fringe"] * m
    p["hair_h0"] = base_line - 0.55 * recede  # the hairline's height at the midline
    p["hair_side"] = _lerp(-0.05, 0.0, recede) + 0.03 * rng.standard_normal(n)  # at |x|=0.5
    p["hair_temple"] = 0.16 * np.clip(recede * 2.0, 0, 1) * (1 - recede)  # M-shaped recession
    p["hair_vol"] = S["hair_vol"] * (1 - 0.85 * recede) * p["hair_dens"]
    p["hair_len"] = np.where(age < 3, np.minimum(S["hair_len"], -0.2), S["hair_len"])
    grey = S["grey_max"] * _sigmoid((age - S["grey_onset"]) / (S["grey_width"] / 2.0))
    # Some people dye their hair (in most of their photos): the hair cue is gone, the
    # eyebrows and skin still tell.
    dyed = (rng.random(n) < 0.8) * S["dyes"]
    grey = grey * (1.0 - 0.9 * dyed)
    p["grey"] = grey
    p["brow_grey"] = _sigmoid((age - S["grey_onset"] - 12.0) / (S["grey_width"] / 2.0))
    p["beard"] = (
        S["beard"] * _smoothstep(age, 14.0, 24.0) * (rng.random(n) < 0.7) * rng.uniform(0.4, 1.0, n)
    )

    # Skin ageing: each wrinkle family has its own onset age; 0 = absent, 1 = full.
    p["w_fore"] = _smoothstep(skin_age, 22.0, 72.0)
    p["w_crow"] = _smoothstep(skin_age, 28.0, 75.0)
    p["w_naso"] = _smoothstep(skin_age, 20.0, 78.0)
    p["w_mario"] = _smoothstep(skin_age, 45.0, 85.0)
    p["w_bags"] = _smoothstep(skin_age, 38.0, 85.0)
    p["w_neck"] = _smoothstep(skin_age, 40.0, 85.0)
    p["spots"] = _smoothstep(skin_age, 48.0, 92.0) * S["spots"]
    p["smile"] = smile
    p["blush"] = 0.25 * (1 - m) + 0.06 * rng.random(n)  # rosy cheeks on children

    # --- nuisances -------------------------------------------------------------------
    # Pose: in-plane rotation, shift, scale.
    rot = np.clip(rng.normal(0.0, 0.12, n), -0.35, 0.35)
    p["cos"], p["sin"] = np.cos(rot), np.sin(rot)
    p["shift_x"] = rng.uniform(-0.1, 0.1, n)
    p["shift_y"] = rng.uniform(-0.08, 0.1, n)
    p["scale"] = np.exp(np.clip(rng.normal(0.0, 0.08, n), -0.2, 0.2))
    p["gaze_x"] = rng.normal(0.0, 0.012, n)
    p["gaze_y"] = rng.normal(0.0, 0.006, n)
    # Lighting: unit direction (mostly frontal), ambient/diffuse mix, intensity, tint.
    az = rng.uniform(0, 2 * np.pi, n)
    el = rng.uniform(0.35, 1.0, n)  # sideways component of the light
    p["light_x"] = el * np.cos(az) * 0.8
    p["light_y"] = el * np.sin(az) * 0.8
    p["light_z"] = np.sqrt(np.maximum(1.0 - p["light_x"] ** 2 - p["light_y"] ** 2, 0.05))
    p["diffuse"] = rng.uniform(0.25, 0.6, n)
    p["intensity"] = rng.uniform(0.55, 1.25, n)
    # White balance: mostly along the warm/cool axis, a little green/magenta.
    temp = rng.normal(0.0, 0.08, (n, 1)) * np.array([1.0, 0.1, -1.0])
    p["tint"] = np.exp(temp + 0.025 * rng.standard_normal((n, 3)))
    # Background: base colour + linear gradient + blotchy low-frequency texture.
    p["bg"] = rng.uniform(0.1, 0.9, (n, 3)) * rng.uniform(0.5, 1.0, (n, 1)) + rng.uniform(
        0.0, 0.3, (n, 1)
    )
    p["bg_gx"] = rng.normal(0.0, 0.15, n)
    p["bg_gy"] = rng.normal(0.0, 0.15, n)
    p["bg_tex"] = rng.uniform(0.0, 0.2, n) * (rng.random(n) < 0.6)
    p["shirt"] = rng.uniform(0.05, 0.9, (n, 3))
    # Camera: defocus (box blur mix) on some images, sensor noise on all.
    p["blur"] = (rng.random(n) < 0.25) * rng.uniform(0.2, 0.8, n)
    p["noise"] = rng.uniform(0.004, 0.04, n)
    # Occluder: 0 none, 1 sunglasses, 2 face mask, 3 random patch.
    occ = rng.random(n) < occluder_prob
    p["occ"] = occ * rng.choice([1, 2, 3], size=n, p=[0.4, 0.25, 0.35])
    p["occ_col"] = np.where(
        (p["occ"] == 1)[:, None], rng.uniform(0.02, 0.15, (n, 3)), rng.uniform(0.1, 0.95, (n, 3))
    )
    p["occ_cx"] = rng.uniform(-0.6, 0.6, n)
    p["occ_cy"] = rng.uniform(-0.6, 0.6, n)
    p["occ_hw"] = rng.uniform(0.1, 0.35, n)
    p["occ_hh"] = rng.uniform(0.1, 0.35, n)

    # Colours that depend on the subject and the age cues.
    p["skin"] = S["skin"]
    p["lip"] = S["lip"]
    p["iris"] = S["iris"]
    grey_target = _lerp(
        np.array([0.52, 0.52, 0.53]), np.array([0.86, 0.86, 0.85]), (grey**2)[:, None]
    )
    p["hair_base"] = S["hair"]
    p["hair_grey"] = grey_target
    p["brow_col"] = _lerp(S["hair"] * 0.85, grey_target, (p["brow_grey"] * 0.8)[:, None])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in p.items()}


# ------------------------------------------------------------------------------ drawing
#
# Shapes are implicit: a signed distance d (face units, negative inside) becomes
# anti-aliased coverage through a linear ramp one pixel wide, clamp(0.5 − d/px, 0, 1).
# Tensors are [B, h, w] — a chunk of images, or a window of rows/columns of it — and
# per-image parameters are [B, 1, 1] (colours [B, 3, 1, 1]) that broadcast. Helpers whose
# name ends in "_" work in place on their first argument (a temporary), which keeps the
# memory traffic, the cost that matters here, low.


def _n_tex(size: int) -> int:
    """Textures per bank (each image picks some by index; see _textures): 64, fewer for
    big images so that the banks stay below ~100 MB."""
    return int(min(64, max(8, (1 << 22) // (size * size))))


def _cov_(d: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Coverage from a signed distance; ``inv`` = 1 / ramp width. In place on ``d``."""
    return d.mul_(-inv).add_(0.5).clamp_(0.0, 1.0)


def _band_(dist: torch.Tensor, half, inv: torch.Tensor) -> torch.Tensor:
    """Coverage of a line of half-width ``half`` from the distance to its centre curve."""
    return _cov_(dist.abs_().sub_(half), inv)


def _below(t: torch.Tensor, hi, soft: float) -> torch.Tensor:
    """Soft indicator of t < hi, with a linear ramp ``soft`` wide."""
    return (hi - t).mul_(1.0 / soft).clamp_(0, 1)


def _win(t: torch.Tensor, lo, hi, soft: float) -> torch.Tensor:
    """Soft indicator of lo < t < hi, with linear ramps ``soft`` wide."""
    return ((t - lo) * (1.0 / soft)).clamp_(0, 1).mul_(((hi - t) * (1.0 / soft)).clamp_(0, 1))


def _ell_fast(x, y, cx, cy, a, b) -> torch.Tensor:
    """Cheap signed-distance proxy for a roundish ellipse: (k² − 1)·min(a, b)/2, with k the
    ellipse norm. Exact in the limit at a circle's edge; the edge ramp of an elongated
    ellipse is softer along its long axis (by the aspect ratio)."""
    dx = (x if cx is None else x - cx) * (1.0 / a)
    dy = (y - cy).mul_(1.0 / b)
    return dx.mul_(dx).addcmul_(dy, dy).sub_(1.0).mul_(0.5 * torch.minimum(a, b))


def _ellipse(x, y, cx, cy, a, b) -> torch.Tensor:
    """Approximate signed distance to an ellipse, (k − 1)/|∇k| — good for thin ellipses."""
    ia, ib = 1.0 / a, 1.0 / b
    dx = (x - cx).mul_(ia)
    dy = (y - cy).mul_(ib)
    k = (dx * dx).addcmul_(dy, dy).add_(1e-8).sqrt_()
    gx, gy = dx.mul_(ia), dy.mul_(ib)
    grad = gx.mul_(gx).addcmul_(gy, gy).add_(1e-8).sqrt_()
    return (k - 1.0).mul_(k).div_(grad)


def _textures(size: int, seed: int) -> dict[str, torch.Tensor]:
    """Banks of random textures at image size; each image picks some by index.

    coarse: smooth blobs (5×5 cells), std 1 — background texture.
    fine:   smaller blobs (14×14 cells), std 1 — skin blotches and age spots.
    streak: vertical streaks (fine across, longer along; two octaves), ranked to uniform
            [0, 1] — hair strands: a strand is grey where its value is below the grey
            fraction, so the grey share of the hair equals the grey fraction.
    chroma: per-channel white noise, std 1 — the (weaker) colour part of sensor noise.
    """
    gen = torch.Generator().manual_seed(seed)
    n_tex = _n_tex(size)

    def smooth(rows: int, cols: int) -> torch.Tensor:
        z = torch.randn(n_tex, 1, rows, cols, generator=gen)
        t = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        t = t - t.mean(dim=(1, 2), keepdim=True)
        return (t / t.std(dim=(1, 2), keepdim=True)).contiguous()

    streak = smooth(max(3, size // 10), max(8, round(size / 1.2)))  # long thin strands
    streak = (streak + 0.3 * smooth(max(2, size // 16), max(4, size // 4))).view(n_tex, -1)
    ranks = torch.empty_like(streak)
    order = streak.argsort(dim=1)
    ranks.scatter_(
        1, order, torch.arange(streak.shape[1], dtype=torch.float32).expand_as(streak).contiguous()
    )
    return {
        "coarse": smooth(5, 5),
        "fine": smooth(14, 14),
        "chroma": torch.randn(n_tex, 3, size, size, generator=gen),
        "streak": (ranks / (streak.shape[1] - 1)).view(n_tex, size, size),
    }


def _render(
    P: dict[str, torch.Tensor],
    size: int,
    win: dict[str, tuple[int, int, int, int]],
    tex: dict[str, torch.Tensor],
    gen: torch.Generator,
) -> torch.Tensor:
    """Draw one chunk → uint8 [B, 3, size, size].

    P: per-image parameters ([B,1,1], colours [B,3,1,1], texture picks [B] int64);
    win: pixel windows (r0, r1, c0, c1) of the local features for this chunk;
    tex: texture banks; gen: the chunk's pixel-noise generator.
    """
    g = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    # Pose: face coordinates x = (cos·(u − sx) + sin·(v − sy)) / scale, y likewise.
    ca, sb = P["cos"] / P["scale"], P["sin"] / P["scale"]
    ox = -(ca * P["shift_x"] + sb * P["shift_y"])
    oy = -(ca * P["shift_y"] - sb * P["shift_x"])
    inv = P["inv_px"]  # 1 / (one pixel in face units)
    inv_soft = inv / 1.5  # slightly soft edges for hair and clothing
    lw = P["lw"]  # half-width of a wrinkle line

    def coords(r0: int, r1: int, c0: int, c1: int):
        uu, vv = g[c0:c1].view(1, 1, -1), g[r0:r1].view(1, -1, 1)
        x = (ca * uu + ox) + sb * vv
        y = (ca * vv + oy) - sb * uu
        return x, y, x.abs()  # most features are left/right symmetric: draw on |x|

    x, y, xs = coords(0, size, 0, size)
    u, v = g.view(1, 1, size), g.view(1, size, 1)

    # ---- background: colour × (1 + linear gradient + blotchy texture), image coordinates
    field = (P["bg_gx"] * u + 1.0) + P["bg_gy"] * v
    field.addcmul_(tex["coarse"][P["i_coarse"]], P["bg_tex"])
    img = P["bg"] * field.unsqueeze(1)

    # ---- shoulders (clothing), in the rows below the chin
    r0, r1, c0, c1 = win["body"]
    d_sh = _ell_fast(
        x[:, r0:r1, c0:c1],
        y[:, r0:r1, c0:c1],
        None,
        P["chin"] + 0.78,
        P["shoulder_a"],
        P["shoulder_b"],
    )
    img[:, :, r0:r1, c0:c1].lerp_(P["shirt"], _cov_(d_sh, inv_soft).unsqueeze(1))

    # ---- hair colour: strands (streak texture), greyed strand by strand (salt and pepper)
    thr = tex["streak"][P["i_streak"]]
    grey_m = thr.neg_().add_(P["grey"]).mul_(6.0).add_(0.5).clamp_(0.0, 1.0)
    hair_rgb = torch.lerp(P["hair_base"], P["hair_grey"], grey_m.unsqueeze(1))
    strand = tex["streak"][P["i_streak2"]].mul_(0.3).add_(0.72)  # strand shading
    hair_rgb.mul_(strand.unsqueeze(1))

    # ---- back hair: volume around the cranium, and long hair falling behind the neck
    vol = P["hair_vol"]
    back = _cov_(
        _ell_fast(x, y, None, P["cr_cy"] + 0.02, P["cr_a"] + vol, P["cr_b"] + vol), inv_soft
    )
    d_long = torch.maximum(xs - (P["cr_a"] + 0.7 * vol), y - P["hair_len"])
    d_long = torch.maximum(d_long, P["cr_cy"] - y)
    back = torch.maximum(back, _cov_(d_long, inv_soft)).mul_(P["hair_dens"])
    img.lerp_(hair_rgb, back.unsqueeze(1))

    # ---- skin: head = cranium ∪ jaw/face ellipse; ears and neck share the skin colour
    d_cr = _ell_fast(x, y, None, P["cr_cy"], P["cr_a"], P["cr_b"])
    d_jaw = _ell_fast(x, y, None, P["jaw_cy"], P["jaw_a"], P["jaw_b"])
    head = _cov_(torch.minimum(d_cr, d_jaw), inv)
    neck = _cov_(torch.maximum(xs - P["neck_w"], P["jaw_cy"] - y), inv)
    skin_m = torch.maximum(head, neck)
    r0, r1, c0, c1 = win["ears"]
    ear = _ell_fast(
        xs[:, r0:r1, c0:c1], y[:, r0:r1, c0:c1], P["ear_x"], P["ear_y"], P["ear_a"], P["ear_b"]
    )
    sk = skin_m[:, r0:r1, c0:c1]
    torch.maximum(sk, _cov_(ear, inv), out=sk)
    # `dark` multiplies the skin colour by (1 − dark): shadows, wrinkles, folds, spots.
    dark = head.neg().add_(1.0).mul_(neck).mul_(0.22)  # the neck is in the jaw's shadow
    # Age spots and blotchy pigmentation: a smooth texture, its peaks thresholded.
    blot = tex["fine"][P["i_fine"]]
    spots = (blot - 1.3).mul_(3.0).clamp_(0.0, 1.0).mul_(0.25).add_(blot, alpha=0.06)
    dark.addcmul_(spots, P["spots"])

    # Forehead window. Forehead lines: parallel curves above the brows; their number
    # (1 → 4) and contrast grow with age. t counts line spacings upwards from the brows.
    r0, r1, c0, c1 = win["forehead"]
    xf, yf, xsf = coords(r0, r1, c0, c1)
    spacing = P["spacing"]
    yy = yf - 0.25 * xf * xf + 0.012 * torch.sin(9.0 * xf + P["phase"])
    t = (P["brow_y"] - 0.04 - yy).mul_(1.0 / spacing)
    k = torch.round(t)
    line_a = (P["n_lines"] + 1.0 - k).clamp_(0.0, 1.0).mul_(k >= 1)
    fore = _band_((t - k).mul_(spacing), lw, inv).mul_(line_a)
    fore.mul_(_below(xsf, P["fore_len"], 0.08))
    dark[:, r0:r1, c0:c1].addcmul_(fore, P["c_fore"])

    # Eye window: crow's feet, eye bags, lid creases (later: brows and eyes).
    r0, r1, c0, c1 = win["eyes"]
    xu, yu, xsu = coords(r0, r1, c0, c1)
    dk = dark[:, r0:r1, c0:c1]
    # Crow's feet: 1–3 short rays fanning out from the outer eye corner.
    dxc = xsu - (P["eye_x"] + P["eye_a"] + 0.015)
    dy = yu - P["eye_y"]
    crow = _band_(dy.clone(), lw, inv)
    more = _band_(dy + 0.5 * dxc, lw, inv).add_(_band_(dy - 0.5 * dxc, lw, inv))
    crow.addcmul_(more, P["crow_more"]).mul_(_win(dxc, 0.0, P["crow_len"], 0.02))
    dk.addcmul_(crow, P["c_crow"])
    # Under-eye bags: an arc below each eye.
    dxe = xsu - P["eye_x"]
    bag = _band_(dy - P["eye_b"] * 1.7 - 1.2 * dxe * dxe, 1.3 * lw, inv)
    bag.mul_(_below(dxe.abs(), P["eye_a"], 0.03))
    dk.addcmul_(bag, P["c_bags"])
    # Upper-lid crease: an arc above the eye, drawn as a soft shadow.
    d_crease = _ellipse(
        xsu, yu, P["eye_x"], P["eye_y"] - 0.005, 1.05 * P["eye_a"], 1.55 * P["eye_b"]
    )
    dk.add_(_band_(d_crease, 0.8 * lw, inv).mul_(dy < 0).mul_(0.22))

    # Lower face window: nose, nasolabial folds, marionette lines.
    r0, r1, c0, c1 = win["lower"]
    _, yl, xsl = coords(r0, r1, c0, c1)
    dk = dark[:, r0:r1, c0:c1]
    # Nasolabial folds: from the nose wing curving down past the mouth corner; deeper with
    # age and with a smile.
    y0, y1 = P["nose_y"] - 0.04, P["mouth_y"] + 0.07
    fy = (yl - y0).mul_(1.0 / (y1 - y0))
    fold_x = (P["nose_w"] + 0.045) + (P["mouth_w"] - P["nose_w"]) * fy - 0.03 * fy * fy
    naso = _band_(xsl - fold_x, 1.2 * lw, inv).mul_(_win(fy, 0.0, 1.0, 0.15))
    dk.addcmul_(naso, P["c_naso"])
    # Marionette lines: from the mouth corners down towards the jaw.
    my = yl - P["mouth_y"]
    mario = _band_(xsl - P["mouth_w"] - 0.012 - 0.12 * my, lw, inv)
    dk.addcmul_(mario.mul_(_win(my, 0.02, 0.17, 0.03)), P["c_mario"])
    # Nose: nostrils and the shaded sides of the bridge (the nose lengthens with age).
    nost = _cov_(_ellipse(xsl, yl, P["nose_w"], P["nose_y"], P["nost_a"], P["nost_b"]), inv)
    dk.add_(nost.mul_(0.55))
    bridge_x = 0.055 + (P["nose_w"] - 0.03) * ((yl - P["eye_y"]) / (P["nose_y"] - P["eye_y"]))
    bridge = _band_(xsl - bridge_x, 1.5 * lw, inv)
    dk.add_(bridge.mul_(_win(yl, P["eye_y"] + 0.04, P["nose_y"] - 0.02, 0.04)).mul_(0.1))

    # Neck window: a jowl / double-chin line under the chin, and neck lines.
    r0, r1, c0, c1 = win["neck"]
    xn, yn, xsn = coords(r0, r1, c0, c1)
    dk = dark[:, r0:r1, c0:c1]
    dj = _band_(yn - P["chin"] + 0.06 + 0.5 * xn * xn, 1.5 * lw, inv)
    dk.addcmul_(dj.mul_(_below(xsn, 0.22, 0.06)), P["c_jowl"])
    tn = (yn - P["chin"] - 0.05).mul_(1.0 / 0.06)
    kn = torch.round(tn)
    nl = _band_((tn - kn).mul_(0.06), lw, inv).mul_(_win(tn, 0.5, 2.5, 0.3))
    nl.mul_(_below(xsn, P["neck_w"] - 0.05, 0.05)).mul_(1.0 - head[:, r0:r1, c0:c1])
    dk.addcmul_(nl, P["c_neck"])

    # Skin colour = tone × (1 − dark), composited over everything drawn so far.
    shade = dark.clamp_(max=0.8).neg_().add_(1.0).unsqueeze(1)
    img.lerp_(P["skin"] * shade, skin_m.unsqueeze(1))

    # Rosy cheeks (children): a soft red glow on the cheeks.
    r0, r1, c0, c1 = win["lower"]
    cheek = ((xsl - P["eye_x"]) ** 2).add_((yl - P["nose_y"]) ** 2).mul_(-1.0 / 0.012).exp_()
    cheek.mul_(P["blush"]).mul_(skin_m[:, r0:r1, c0:c1])
    img[:, :, r0:r1, c0:c1].lerp_(P["blush_col"], cheek.unsqueeze(1))

    # ---- front hair: inside the cranium above the hairline. The hairline is a parabola
    # through hair_h0 (midline) and hair_side (at |x| = 0.5) with M-shaped temple recession.
    line = torch.addcmul(P["hair_h0"], xs * xs, (P["hair_side"] - P["hair_h0"]) * 4.0)
    bump = ((xs - 0.22) * (1.0 / 0.11)) ** 2
    bump = bump.neg_().add_(1.0).clamp_(min=0.0)
    line.addcmul_(bump.mul_(bump), P["hair_temple"], value=-1.0)
    d_front = torch.maximum(d_cr.sub_(0.02), y - line)
    front = _cov_(d_front, P["inv_hairline"]).mul_(P["hair_dens"])
    img.lerp_(hair_rgb, front.unsqueeze(1))

    # Beard stubble: the lower face of some adult men, hair-coloured and greying with it.
    r0, r1, c0, c1 = win["jaw"]
    _, yj, _ = coords(r0, r1, c0, c1)
    d_beard = torch.maximum(d_jaw[:, r0:r1, c0:c1] + 0.015, P["nose_y"] + 0.05 - yj)
    beard = _cov_(d_beard, 1.0 / (0.04 + 1.0 / inv)).mul_(P["beard"])
    beard.mul_(strand[:, r0:r1, c0:c1] - 0.3)
    img[:, :, r0:r1, c0:c1].lerp_(hair_rgb[:, :, r0:r1, c0:c1], beard.unsqueeze(1))

    # ---- eyebrows and eyes (eye window)
    r0, r1, c0, c1 = win["eyes"]
    iw = img[:, :, r0:r1, c0:c1]
    bx = (xsu - P["brow_x"]).mul_(1.0 / P["brow_w"])
    brow_c = P["brow_y"] - P["brow_arch"] * (1.0 - bx * bx)
    brow = _band_(yu - brow_c, P["brow_t"] * (1.0 - 0.5 * bx.abs()), inv)
    brow.mul_(_win(bx, -1.0, 1.0, 0.25)).mul_(P["brow_alpha"])
    iw.lerp_(P["brow_col"], brow.unsqueeze(1))
    # Eyes: sclera, iris (gaze-shifted), pupil, highlight; the upper lid covers the top.
    d_eye = _ellipse(xsu, yu, P["eye_x"], P["eye_y"], P["eye_a"], P["eye_b"])
    in_eye = _cov_(d_eye.clone(), inv)
    lid_y = P["eye_y"] - P["eye_b"] + 2.0 * P["eye_b"] * P["lid"]
    eye = in_eye * _cov_(lid_y - yu, inv)
    xg = (xu - P["gaze_x"]).abs_().sub_(P["eye_x"])
    yg = yu - (P["eye_y"] + P["gaze_y"])
    r = (xg * xg).addcmul_(yg, yg).sqrt_()
    iris = _cov_(r - P["iris_r"], inv)
    pupil = _cov_(r - 0.45 * P["iris_r"], inv)
    hx, hy = xg.add_(0.35 * P["iris_r"]), yg.add_(0.35 * P["iris_r"])
    hl = _cov_(hx.mul_(hx).addcmul_(hy, hy).sqrt_().sub_(0.18 * P["iris_r"]), inv)
    eye_rgb = torch.lerp(P["sclera"], P["iris"], iris.unsqueeze(1))
    eye_rgb.mul_(pupil.mul_(-0.85).add_(1.0).unsqueeze(1)).lerp_(P["glint"], hl.unsqueeze(1))
    iw.lerp_(eye_rgb, eye.unsqueeze(1))
    # Lash line along the lid edge.
    lash = _band_(yu - lid_y, 1.2 * lw, inv).mul_(in_eye).mul_(0.75)
    iw.lerp_(P["lash"], lash.unsqueeze(1))

    # ---- mouth (lower window): lips as a lens around the mouth line, whose corners droop
    # with age (and rise with a smile); lips thin with age.
    r0, r1, c0, c1 = win["lower"]
    iw = img[:, :, r0:r1, c0:c1]
    mx = xsl * (1.0 / P["mouth_w"])
    dyl = yl - (P["mouth_y"] + P["mouth_curve"] * mx * mx)
    half = (1.0 - mx * mx).clamp_(min=0.0).sqrt_().mul_(P["lip_t"])
    half.mul_((dyl * 100.0).clamp_(-1.0, 1.0).mul_(0.3).add_(1.0))  # fuller lower lip
    lips = _cov_(torch.maximum(dyl.abs() - half, xsl - P["mouth_w"]), inv)
    iw.lerp_(P["lip"], lips.unsqueeze(1))
    mline = _band_(dyl, 0.8 * lw, inv).mul_(_below(mx, 1.02, 0.1)).mul_(0.7)
    iw.lerp_(P["lip"] * 0.35, mline.unsqueeze(1))

    # ---- occluders (drawn only on the images that have one)
    sel = torch.nonzero(P["occ"].view(-1) > 0).view(-1)
    if sel.numel():
        o = {
            k: P[k][sel]
            for k in (
                "occ",
                "occ_cx",
                "occ_cy",
                "occ_hw",
                "occ_hh",
                "occ_col",
                "eye_x",
                "eye_y",
                "eye_a",
                "eye_b",
                "nose_y",
                "chin",
                "jaw_a",
                "inv_px",
            )
        }
        xo, yo, xso = x[sel], y[sel], xs[sel]
        # Sunglasses: two round lenses and a bridge.
        lens = _ellipse(xso, yo, o["eye_x"], o["eye_y"], o["eye_a"] * 1.45, o["eye_b"] * 2.3)
        bridge_d = torch.maximum((yo - o["eye_y"] + 0.02).abs_().sub_(0.012), xso - o["eye_x"])
        d_glass = torch.minimum(lens, bridge_d)
        # Face mask: from below the nose bridge to below the chin, jaw-wide.
        d_mask = torch.maximum(
            torch.maximum(xso - o["jaw_a"] * 0.95, o["nose_y"] - 0.09 - yo),
            _ellipse(
                xo, yo, 0.0, o["nose_y"] + 0.1, o["jaw_a"] * 1.05, o["chin"] - o["nose_y"] + 0.1
            ),
        )
        # Random patch (a hand, a microphone, a caption box…).
        d_rect = torch.maximum(
            (xo - o["occ_cx"]).abs_().sub_(o["occ_hw"]), (yo - o["occ_cy"]).abs_().sub_(o["occ_hh"])
        )
        kind = o["occ"]
        d_occ = torch.where(kind == 1, d_glass, torch.where(kind == 2, d_mask, d_rect))
        sub = img[sel]
        sub.lerp_(o["occ_col"], _cov_(d_occ, o["inv_px"]).unsqueeze(1))
        img[sel] = sub

    # ---- lighting: Lambert shading of an ellipsoid head plus ambient light. The light's
    # intensity and the 0–255 range are in light_gain/base, its colour is already in every
    # colour. The background gets the flat (frontal) term.
    nx = x.mul_(P["inv_nx"])
    ny = y.mul_(1.0 / 0.95)
    nz = (nx * nx).addcmul_(ny, ny).neg_().add_(1.0).clamp_(min=0.0).sqrt_()
    lam = nx.mul_(P["light_x"]).addcmul_(ny, P["light_y"]).addcmul_(nz, P["light_z"])
    fg = torch.maximum(skin_m, torch.maximum(front, back))
    light = torch.lerp(P["flat"], lam.clamp_(min=0.0), fg)
    light.mul_(P["light_gain"]).add_(P["light_base"])
    img.mul_(light.unsqueeze(1))

    # ---- camera: defocus blur on some images, then sensor noise, then 8-bit quantization
    bsel = torch.nonzero(P["blur"].view(-1) > 0).view(-1)
    if bsel.numel():
        sub = img[bsel]
        padded = F.pad(sub, (1, 1, 1, 1), mode="replicate")
        bl = (padded[..., :-2, :] + padded[..., 1:-1, :]).add_(padded[..., 2:, :])
        bl = (bl[..., :-2] + bl[..., 1:-1]).add_(bl[..., 2:]).mul_(1.0 / 9.0)
        sub.lerp_(bl, P["blur"][bsel].unsqueeze(1))
        img[bsel] = sub
    # Sensor noise: fresh luminance noise, plus weaker chroma noise picked from a bank.
    sigma = P["noise"].unsqueeze(1)
    img.addcmul_(torch.randn((img.shape[0], 1, size, size), generator=gen), sigma)
    img.addcmul_(tex["chroma"][P["i_chroma"]], sigma * 0.5)
    return img.clamp_(0.0, 255.0).to(torch.uint8)  # truncation: 8-bit quantization


def _to_torch(p: dict[str, np.ndarray], s: np.ndarray) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in p.items():
        t = torch.from_numpy(v[s])
        if k.startswith("i_"):
            out[k] = t.long()
        else:
            out[k] = t.view(-1, 3, 1, 1) if t.ndim == 2 else t.view(-1, 1, 1)
    return out


def _pixel_box(
    p: dict[str, np.ndarray],
    s: np.ndarray,
    size: int,
    x_half: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
) -> tuple[int, int, int, int]:
    """Rows/cols (r0, r1, c0, c1) covering the face-coordinate boxes |x| ≤ x_half,
    y0 ≤ y ≤ y1 of every image of a chunk, after each image's pose."""
    c, sn, sc = p["cos"][s], p["sin"][s], p["scale"][s]
    xb = np.stack([-x_half[s], x_half[s], -x_half[s], x_half[s]])
    yb = np.stack([y0[s], y0[s], y1[s], y1[s]])
    uu = (p["shift_x"][s] + sc * (c * xb - sn * yb) + 1.0) * (size / 2.0)
    vv = (p["shift_y"][s] + sc * (sn * xb + c * yb) + 1.0) * (size / 2.0)
    r0 = int(np.clip(np.floor(vv.min()) - 2, 0, size - 1))
    c0 = int(np.clip(np.floor(uu.min()) - 2, 0, size - 1))
    r1 = int(np.clip(np.ceil(vv.max()) + 2, r0 + 1, size))
    c1 = int(np.clip(np.ceil(uu.max()) + 2, c0 + 1, size))
    return r0, r1, c0, c1


def _render_params(p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> None:
    """Add the size-dependent and derived values the renderer reads (in place)."""
    n = len(p["cos"])
    f32 = np.float32
    px = 2.0 / (size * p["scale"])  # one pixel in face units
    p["inv_px"] = (1.0 / px).astype(f32)
    p["inv_hairline"] = (1.0 / np.maximum(px, 0.02)).astype(f32)  # soft hairline
    p["lw"] = np.maximum(0.55 * px, 0.007).astype(f32)  # wrinkle half-width, ≥ ~1 px wide
    p["spacing"] = np.maximum(2.6 * px, 0.045).astype(f32)  # between forehead lines
    # Wrinkle contrasts (fraction of darkening) and extents from the age cues.
    p["n_lines"] = (4.2 * p["w_fore"]).astype(f32)
    p["c_fore"] = (0.3 * np.sqrt(p["w_fore"])).astype(f32)
    p["fore_len"] = (0.18 + 0.14 * p["w_fore"]).astype(f32)
    p["c_crow"] = (0.32 * p["w_crow"]).astype(f32)
    p["crow_more"] = np.clip(2.0 * p["w_crow"] - 0.6, 0, 1).astype(f32)
    p["crow_len"] = (0.05 + 0.06 * p["w_crow"]).astype(f32)
    p["c_bags"] = (0.25 * p["w_bags"]).astype(f32)
    p["c_naso"] = (0.28 * p["w_naso"] + 0.08 * np.maximum(p["smile"], 0)).astype(f32)
    p["c_mario"] = (0.3 * p["w_mario"]).astype(f32)
    p["c_jowl"] = (0.22 * p["w_mario"]).astype(f32)
    p["c_neck"] = (0.25 * p["w_neck"]).astype(f32)
    p["nost_a"] = np.full(n, 0.028, f32)
    p["nost_b"] = np.full(n, 0.016, f32)
    p["shoulder_b"] = np.full(n, 0.62, f32)
    p["inv_nx"] = (1.0 / (1.1 * p["cr_a"])).astype(f32)
    # Lighting: light = base + gain · (flat or Lambert term), times intensity.
    p["flat"] = (0.9 * p["light_z"]).astype(f32)
    p["light_gain"] = (255.0 * 1.25 * p["diffuse"] * p["intensity"]).astype(f32)
    p["light_base"] = (255.0 * (1.0 - p["diffuse"]) * p["intensity"]).astype(f32)
    p["noise"] = (255.0 * p["noise"]).astype(f32)
    # Constant colours, and colours derived from the subject's.
    p["sclera"] = np.tile(np.array([0.93, 0.92, 0.90], f32), (n, 1))
    p["glint"] = np.ones((n, 3), f32)
    p["lash"] = np.tile(np.array([0.08, 0.06, 0.06], f32), (n, 1))
    p["blush_col"] = np.clip(p["skin"] * np.array([1.08, 0.72, 0.72]) + [0.06, 0, 0], 0, 1).astype(
        f32
    )
    # The light's colour (white balance) multiplies every colour.
    for name in (
        "bg",
        "shirt",
        "hair_base",
        "hair_grey",
        "skin",
        "blush_col",
        "brow_col",
        "sclera",
        "glint",
        "iris",
        "lash",
        "lip",
        "occ_col",
    ):
        p[name] = (p[name] * p["tint"]).astype(f32)
    del p["tint"]
    # Texture picks.
    for name in ("i_coarse", "i_fine", "i_streak", "i_streak2", "i_chroma"):
        p[name] = rng.integers(0, _n_tex(size), n).astype(np.int64)


def _windows(p: dict[str, np.ndarray], s: np.ndarray, size: int) -> dict[str, tuple]:
    """Pixel windows of the local features for one chunk (see _render)."""
    fore_top = p["brow_y"] - 0.08 - 5.5 * p["spacing"]
    eyes_top = p["brow_y"] - p["brow_arch"] - p["brow_t"] - 0.03
    eyes_bot = p["eye_y"] + 1.7 * p["eye_b"] + 1.2 * p["eye_a"] ** 2 + p["lw"] + 0.03
    lower_x = np.maximum(p["mouth_w"] + 0.15, p["eye_x"] + 0.2)
    lower_top = np.minimum(p["eye_y"] + 0.03, p["nose_y"] - 0.2)
    return {
        "forehead": _pixel_box(p, s, size, p["fore_len"] + 0.1, fore_top, p["brow_y"]),
        "eyes": _pixel_box(p, s, size, p["eye_x"] + p["eye_a"] + 0.16, eyes_top, eyes_bot),
        "lower": _pixel_box(p, s, size, lower_x, lower_top, p["mouth_y"] + 0.2),
        "jaw": _pixel_box(p, s, size, p["jaw_a"] + 0.05, p["nose_y"], p["chin"] + 0.06),
        "body": _pixel_box(p, s, size, p["shoulder_a"] + 0.1, p["chin"] + 0.1, p["chin"] + 3.0),
        "ears": _pixel_box(
            p,
            s,
            size,
            p["ear_x"] + p["ear_a"] + 0.02,
            p["ear_y"] - p["ear_b"] - 0.02,
            p["ear_y"] + p["ear_b"] + 0.02,
        ),
        "neck": _pixel_box(
            p, s, size, np.maximum(0.3, p["neck_w"]) + 0.05, p["chin"] - 0.12, p["chin"] + 0.26
        ),
    }


# ---------------------------------------------------------------------------- generate


def chunk_size(image_size: int) -> int:
    """Images rendered at once: about 2¹⁸ pixels, so the working set stays in cache.

    Part of the determinism contract: the pixel noise is drawn per chunk."""
    return max(1, (1 << 18) // (image_size * image_size))


def generate(
    cfg: SynthConfig, image_size: int, *, progress: bool = False, workers: int | None = None
) -> SynthFaces:
    """Draw ``cfg.n_images`` faces of ``image_size``² pixels; deterministic in ``cfg``.

    Returns images uint8 [N, 3, H, W], labels (true age + label noise), true ages,
    subject ids and the noise floor (mean |label − true age|).

    Chunks are rendered on ``workers`` threads (default: ``torch.get_num_threads()``), each
    running torch single-threaded; the images do not depend on the number of workers or
    on torch's thread setting, which is restored afterwards.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (got {image_size})")
    n = int(cfg.n_images)
    ips = int(cfg.images_per_subject)
    n_subj = math.ceil(n / ips)
    # Independent streams: ages, subject traits, per-image nuisances, label noise, pixels.
    ss_ages, ss_subj, ss_img, ss_label, ss_pix = np.random.SeedSequence(
        [int(cfg.seed) & 0xFFFFFFFF, 0x5A6E7]
    ).spawn(5)
    true_ages = sample_ages(cfg, n, np.random.default_rng(ss_ages))
    subjects = np.arange(n, dtype=np.int64) // ips
    traits = _subject_traits(n_subj, np.random.default_rng(ss_subj))
    img_rng = np.random.default_rng(ss_img)
    params = _image_params(true_ages, subjects, traits, float(cfg.occluder_prob), img_rng)
    params["phase"] = (traits["grey_onset"][subjects] % 6.2832).astype(np.float32)
    _render_params(params, image_size, img_rng)
    labels = add_label_noise(true_ages, cfg.label_noise, np.random.default_rng(ss_label))
    pix_seed = int(ss_pix.generate_state(1, np.uint64)[0] >> 1)
    tex = _textures(image_size, pix_seed)

    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    step = chunk_size(image_size)
    starts = list(range(0, n, step))
    # Chunks hold images of similar head rotation, so the pixel windows of the local
    # features (which must cover every image of a chunk) stay tight.
    order = np.argsort(params["sin"], kind="stable")

    def job(ci: int) -> None:
        idx = order[starts[ci] : starts[ci] + step]
        gen = torch.Generator().manual_seed(pix_seed + 1 + ci)
        with torch.inference_mode():
            out = _render(
                _to_torch(params, idx), image_size, _windows(params, idx, image_size), tex, gen
            )
        images[idx] = out.numpy()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc=f"synthetic faces {image_size}px", unit="chunk")
    prev_threads = torch.get_num_threads()
    n_workers = max(1, min(workers or prev_threads, len(starts)))
    torch.set_num_threads(1)  # one chunk per core beats splitting every small op
    try:
        with ThreadPoolExecutor(n_workers) as pool:
            for fut in [pool.submit(job, ci) for ci in range(len(starts))]:
                fut.result()
                if bar is not None:
                    bar.update(1)
    finally:
        torch.set_num_threads(prev_threads)
        if bar is not None:
            bar.close()
    true32 = true_ages.astype(np.float32)
    ages32 = labels.astype(np.float32)
    floor = float(np.mean(np.abs(ages32.astype(np.float64) - true32))) if n else 0.0
    return SynthFaces(
        images=images, ages=ages32, true_ages=true32, subjects=subjects, noise_floor_mae=floor
    )


# ------------------------------------------------------------------------- inspection


def contact_sheet(faces: SynthFaces, *, rows: int = 8, cols: int = 12, scale: int = 1):
    """A grid of faces, young (top left) to old (bottom right), each tile captioned with
    its true age (and the noisy label in brackets where it differs by ≥ 0.5 year).

    Tiles are picked at evenly spaced age ranks, so every row spans an age band.
    Returns a ``PIL.Image.Image``.
    """
    from PIL import Image, ImageDraw, ImageFont

    n = len(faces.ages)
    if n == 0:
        raise ValueError("no faces to show")
    k = min(rows * cols, n)
    cols = min(cols, k)
    rows = math.ceil(k / cols)
    order = np.argsort(faces.true_ages, kind="stable")
    pick = order[np.round(np.linspace(0, n - 1, k)).astype(int)]
    h, w = faces.images.shape[2] * scale, faces.images.shape[3] * scale
    font = ImageFont.load_default()
    cap = 12
    sheet = Image.new("RGB", (cols * w, rows * (h + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, i in enumerate(pick):
        r, c = divmod(j, cols)
        tile = Image.fromarray(np.ascontiguousarray(faces.images[i].transpose(1, 2, 0)))
        if scale != 1:
            tile = tile.resize((w, h), Image.NEAREST)
        x0, y0 = c * w, r * (h + cap)
        sheet.paste(tile, (x0, y0))
        text = f"{faces.true_ages[i]:.0f}"
        if abs(float(faces.ages[i]) - float(faces.true_ages[i])) >= 0.5:
            text += f" ({faces.ages[i]:.0f})"
        draw.text((x0 + 2, y0 + h), text, fill=(0, 0, 0), font=font)
    return sheet


def bench_generate(
    n: int = 10_000, size: int = 64, *, threads: int | None = None, seed: int = 0
) -> float:
    """Images per second for generating ``n`` faces at ``size``² (wall clock)."""
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cfg = SynthConfig(n_images=max(n, 10), seed=seed)
        t0 = time.perf_counter()
        generate(cfg, size)
        return cfg.n_images / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m agelab.data.synth", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--bench", action="store_true", help="time generation, print images/s")
    ap.add_argument("--preview", metavar="PNG", help="write a contact sheet")
    ap.add_argument(
        "-n", type=int, default=None, help="images (default: 10000 for --bench, 2000 for --preview)"
    )
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=8, help="preview rows (age bands)")
    ap.add_argument("--cols", type=int, default=12, help="preview columns")
    ap.add_argument("--scale", type=int, default=1, help="preview tile magnification")
    args = ap.parse_args(argv)
    if not (args.bench or args.preview):
        ap.error("give --bench and/or --preview PNG")
    if args.bench:
        n = args.n or 10_000
        rate = bench_generate(n, args.size, threads=args.threads, seed=args.seed)
        print(
            f"{rate:.0f} images/s ({n} images at {args.size}x{args.size}, "
            f"{args.threads or torch.get_num_threads()} threads): {n / rate:.2f} s"
        )
    if args.preview:
        faces = generate(SynthConfig(n_images=max(args.n or 2000, 10), seed=args.seed), args.size)
        sheet = contact_sheet(faces, rows=args.rows, cols=args.cols, scale=args.scale)
        sheet.save(args.preview, optimize=True)
        print(f"wrote {args.preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
