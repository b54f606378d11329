"""Shared fixtures: tiny study configs on an isolated store, the real-data sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACES_SAMPLE = REPO.parent / "shared" / "data" / "faces-sample"

# Tests never touch the user's mlruns/ or cache, and never wait on a remote server.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("AGELAB_OPTUNA_STORAGE", None)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="module")
def one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def chromium() -> str:
    from browser import find_chromium

    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "Chromium not found (chromium on PATH or /usr/bin/chromium): install the Debian "
            "package `chromium` (`make sysdeps` does it as root)"
        )
    return exe


@pytest.fixture
def faces_sample() -> Path:
    if not (FACES_SAMPLE / "labels.csv").is_file():
        pytest.skip(f"real face sample not found at {FACES_SAMPLE} (it lives beside the repo)")
    return FACES_SAMPLE


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # One cache per test session: tests may share generated data but never the user's.
    cache = tmp_path_factory.getbasetemp() / "agelab-cache"
    monkeypatch.setenv("AGELAB_CACHE_DIR", str(cache))


def tiny_study(root: Path, name: str = "t", **sections) -> dict:
    """A raw study mapping on an isolated store under ``root``: seconds per trial on CPU."""
    raw = {
        "name": name,
        "data": {
            "source": "synthetic",
            "image_size": 32,
            "synthetic": {"n_images": 160, "images_per_subject": 4, "seed": 0},
        },
        "model": {"backbone": "resnet10t"},
        "train": {
            "epochs": 1,
            "batch_size": 32,
            "warmup_epochs": 0,
            "patience": None,
            "progress": False,
            "threads": 1,
            "augment": {"enabled": False},
        },
        "search": {
            "sampler": "grid",
            "seeds": [0],
            "space": {"model.norm": ["batch", "none"], "model.act": ["relu", "tanh"]},
        },
        "tracking": {"root": str(root / "mlruns"), "log_figures": False},
        # The report is written at the end of every study (figures: tests/test_report.py).
        "report": {"figures": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw
