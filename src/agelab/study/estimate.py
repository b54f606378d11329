"""How long a study will take, before it runs: a rough estimate and the big-study warning."""

from __future__ import annotations

from agelab.config import StudyConfig

#: Rough training speeds (images/s at 64 px, resnet10t-sized nets) behind the time estimate
#: of a big study: the CPU figure is this project's 2-core benchmark (docs/benchmarks.md);
#: `agelab bench` measures your machine. Other sizes scale with the pixel count.
CPU_IMAGES_PER_S = 80.0
GPU_IMAGES_PER_S = 8000.0
TRIAL_OVERHEAD_S = 5.0  # build, final evaluation, diagnostics, logging
ASSUMED_REAL_IMAGES = 10_000


def estimate_trial_seconds(
    cfg: StudyConfig, *, gpu: bool = False, n_images: int | None = None
) -> tuple[float, str]:
    """(seconds per trial, how that was estimated) before anything has run."""
    assumed = n_images is None and cfg.data.source != "synthetic"
    if n_images is None:
        n_images = cfg.data.synthetic.n_images if not assumed else ASSUMED_REAL_IMAGES
    rate = (GPU_IMAGES_PER_S if gpu else CPU_IMAGES_PER_S) * (64 / cfg.data.image_size) ** 2
    split = cfg.data.split
    # Per epoch: the train split forward+backward, the calib split forward (~1/3 the cost).
    seen = n_images * (split.train + split.calib / 3) * cfg.train.epochs
    basis = (
        f"rough estimate: ~{rate:,.0f} training images/s on {'a GPU' if gpu else 'CPU'} at "
        f"{cfg.data.image_size} px, {n_images:,} images{' (assumed)' if assumed else ''}, "
        f"{cfg.train.epochs} epochs; `agelab bench` measures this machine"
    )
    return seen / rate + TRIAL_OVERHEAD_S, basis


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def size_warning(cfg: StudyConfig, seconds_per_trial: float, basis: str) -> str | None:
    """The warning for a study with more trials than ``search.warn_cells`` (else None):
    the trial and cell counts, and how long that would take."""
    search = cfg.search
    total = search.n_total()
    if total <= search.warn_cells:
        return None
    shape = (
        f"{total // len(search.seeds):,} cells × {len(search.seeds)} seed(s)"
        if search.sampler == "grid"
        else f"search.n_trials = {total:,}"
    )
    return (
        f"warning: {total:,} trials planned ({shape}), more than search.warn_cells = "
        f"{search.warn_cells:,}: about {format_duration(total * seconds_per_trial)} with one "
        f"worker at ~{format_duration(seconds_per_trial)} per trial ({basis}). Shrink "
        "search.space or search.seeds, spread it over workers (--workers N, or --join on "
        "more machines), or raise search.warn_cells to silence this."
    )
