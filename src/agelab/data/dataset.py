"""The dataset every trial trains on: decoded uint8 images plus labels and splits (the images
in memory, or memory-mapped from disk when they are bigger than ``data.max_resident_gb``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agelab.data.shards import ShardedImages

#: train: fit; calib: the objective and best-epoch selection; conformal: conformal calibration
#: only (may be empty, see SplitConfig.conformal); test: reported, never chosen on.
SPLITS = ("train", "calib", "conformal", "test")


@dataclass
class FaceDataset:
    """Decoded images and labels, ready to be moved to the device once.

    images     uint8 tensor [N, 3, H, W] (CPU, contiguous), or :class:`ShardedImages` (the
               same shape, memory-mapped shards on disk: bigger than data.max_resident_gb;
               indexing it gives tensors)
    ages       float32 [N] — the labels models learn from and are scored against
    subjects   str [N] — person id ("" where unknown); splits keep a subject in one split
    split      str [N] — "train" | "calib" | "conformal" | "test"
    true_ages  float32 [N] or None — noise-free ages (synthetic data only)
    paths      str [N] or None — source file of each image (real data)
    fingerprint  content hash of the source data and decoding options (cache key, MLflow tag)
    info       free-form facts for tracking (source, bad-row summary, duplicate images,
               noise floor, …)
    """

    images: torch.Tensor | ShardedImages
    ages: np.ndarray
    subjects: np.ndarray
    split: np.ndarray
    fingerprint: str
    source: str
    true_ages: np.ndarray | None = None
    paths: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ages)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [N,3,H,W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        for name in ("subjects", "split", "true_ages", "paths"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} ages")
        if self.images.shape[0] != n:
            raise ValueError(f"{self.images.shape[0]} images for {n} ages")

    def __len__(self) -> int:
        return len(self.ages)

    @property
    def streaming(self) -> bool:
        """True when the images stay on disk (memory-mapped shards), not in RAM."""
        return isinstance(self.images, ShardedImages)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def indices(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == name)

    def part(self, name: str) -> tuple[torch.Tensor, np.ndarray]:
        """(images, ages) of one split."""
        idx = self.indices(name)
        return self.images[torch.from_numpy(idx)], self.ages[idx]
