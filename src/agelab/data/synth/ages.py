"""Ages and labels of the synthetic faces: true ages from an age distribution, and noisy
labels drawn from them (the label noise never changes a pixel: it has its own stream)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from agelab.config import LabelNoise, SynthConfig


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
