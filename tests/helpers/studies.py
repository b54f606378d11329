"""Tiny study configs on an isolated store: seconds per trial on CPU."""

from __future__ import annotations

from pathlib import Path


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
        # No MLflow Models (seconds each): tests of the hand-off set log_model themselves.
        "tracking": {"root": str(root / "mlruns"), "log_figures": False, "log_model": "none"},
        # The report is written at the end of every study (figures: tests/test_report.py).
        "report": {"figures": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw
