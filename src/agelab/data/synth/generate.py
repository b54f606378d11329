"""``generate``: a ``SynthConfig`` → :class:`SynthFaces`, rendered in chunks on a thread pool.

All per-image parameters come from a numpy ``Generator`` seeded by ``cfg.seed``; pixel noise
comes from a ``torch.Generator`` seeded per chunk, so the same config gives byte-identical
images, whatever the number of threads. Separate random streams are used for ages, subject
traits, per-image nuisances and label noise, so changing the label noise does not change a
single pixel.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agelab.data.synth.ages import add_label_noise, sample_ages
from agelab.data.synth.params import Params, image_params, render_params, to_torch, windows
from agelab.data.synth.render import render
from agelab.data.synth.shapes import textures
from agelab.data.synth.traits import subject_traits

if TYPE_CHECKING:
    from agelab.config import SynthConfig


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


def chunk_size(image_size: int) -> int:
    """Images rendered at once: about 2¹⁸ pixels, so the working set stays in cache.

    Part of the determinism contract: the pixel noise is drawn per chunk."""
    return max(1, (1 << 18) // (image_size * image_size))


def generate(
    cfg: SynthConfig,
    image_size: int,
    *,
    progress: bool = False,
    workers: int | None = None,
    out: Any = None,
) -> SynthFaces:
    """Draw ``cfg.n_images`` faces of ``image_size``² pixels; deterministic in ``cfg``.

    Returns images uint8 [N, 3, H, W], labels (true age + label noise), true ages,
    subject ids and the noise floor (mean |label − true age|).

    Chunks are rendered on ``workers`` threads (default: ``torch.get_num_threads()``), each
    running torch single-threaded; the images do not depend on the number of workers or
    on torch's thread setting, which is restored afterwards.

    ``out``: where the pixels go instead of a new array — anything ``out[index] = images``
    writes to, shaped ``[N, 3, H, W]`` (the shard store of a dataset bigger than memory,
    :class:`agelab.data.shards.ShardWriter`); it is then the returned ``images``.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (got {image_size})")
    n = int(cfg.n_images)
    ips = int(cfg.images_per_subject)
    # Independent streams: ages, subject traits, per-image nuisances, label noise, pixels.
    ss_ages, ss_subj, ss_img, ss_label, ss_pix = np.random.SeedSequence(
        [int(cfg.seed) & 0xFFFFFFFF, 0x5A6E7]
    ).spawn(5)
    true_ages = sample_ages(cfg, n, np.random.default_rng(ss_ages))
    subjects = np.arange(n, dtype=np.int64) // ips
    traits = subject_traits(math.ceil(n / ips), np.random.default_rng(ss_subj))
    img_rng = np.random.default_rng(ss_img)
    params = image_params(true_ages, subjects, traits, float(cfg.occluder_prob), img_rng)
    params["phase"] = (traits["grey_onset"][subjects] % 6.2832).astype(np.float32)
    render_params(params, image_size, img_rng)
    labels = add_label_noise(true_ages, cfg.label_noise, np.random.default_rng(ss_label))
    pix_seed = int(ss_pix.generate_state(1, np.uint64)[0] >> 1)
    images = _render_all(
        params, n, image_size, pix_seed, progress=progress, workers=workers, out=out
    )
    true32 = true_ages.astype(np.float32)
    ages32 = labels.astype(np.float32)
    floor = float(np.mean(np.abs(ages32.astype(np.float64) - true32))) if n else 0.0
    return SynthFaces(
        images=images, ages=ages32, true_ages=true32, subjects=subjects, noise_floor_mae=floor
    )


def _render_all(
    params: Params,
    n: int,
    size: int,
    pix_seed: int,
    *,
    progress: bool,
    workers: int | None,
    out: Any = None,
) -> np.ndarray:
    """Render every chunk on a thread pool, torch single-threaded in each → uint8 [N,3,S,S]
    (into ``out`` when given)."""
    tex = textures(size, pix_seed)
    images = np.empty((n, 3, size, size), dtype=np.uint8) if out is None else out
    step = chunk_size(size)
    starts = list(range(0, n, step))
    # Chunks hold images of similar head rotation, so the pixel windows of the local
    # features (which must cover every image of a chunk) stay tight.
    order = np.argsort(params["sin"], kind="stable")

    def job(ci: int) -> None:
        idx = order[starts[ci] : starts[ci] + step]
        gen = torch.Generator().manual_seed(pix_seed + 1 + ci)
        with torch.inference_mode():
            out = render(to_torch(params, idx), size, windows(params, idx, size), tex, gen)
        images[idx] = out.numpy()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc=f"synthetic faces {size}px", unit="chunk")
    prev_threads = torch.get_num_threads()
    n_workers = max(1, min(workers or prev_threads, len(starts)))
    torch.set_num_threads(1)  # one chunk per core beats splitting every small op
    pool = ThreadPoolExecutor(n_workers)
    try:
        for fut in [pool.submit(job, ci) for ci in range(len(starts))]:
            fut.result()
            if bar is not None:
                bar.update(1)
    finally:
        # Ctrl-C (or a failed chunk) must not wait for every queued chunk, as leaving a
        # ``with`` block would: drop the queue, wait only for the chunks already running
        # (about 2^18 pixels each, milliseconds), so nothing writes into ``images`` later.
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(prev_threads)
        if bar is not None:
            bar.close()
    return images
