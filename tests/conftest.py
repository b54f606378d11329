"""Shared fixtures: an isolated cache, one torch thread, the real-face sample, Chromium.

Plain helper functions (tiny study configs, image writers, servers) live in ``helpers/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import FACES_SAMPLE, REPO

# Tests never touch the user's mlruns/ or cache, and never wait on a remote server.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("AGELAB_OPTUNA_STORAGE", None)
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``gpu`` tests without a usable CUDA device: skipped with the reason, or — under
    ``AGELAB_REQUIRE_CUDA=1`` (``make test-gpu``) — failed, so a GPU machine whose driver
    torch cannot use never passes its GPU tests by skipping them."""
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    from agelab.device import cuda_unusable_reason

    reason = cuda_unusable_reason() or "torch sees no CUDA GPU on this machine"
    if os.environ.get("AGELAB_REQUIRE_CUDA", "") not in ("", "0"):
        pytest.fail(f"AGELAB_REQUIRE_CUDA is set (make test-gpu) but {reason}", pytrace=False)
    pytest.skip(f"CUDA not available: {reason}")


@pytest.fixture(scope="module")
def one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def chromium(tmp_path: Path, request: pytest.FixtureRequest):
    """Headless Chromium under Selenium (a WebDriver), or a skip saying what to install.

    When the test fails, the page it was on goes to ``test-artifacts/<test>-failure.png/.txt``.
    """
    import contextlib

    from helpers.browser import missing, page_text, start_chromium

    reason = missing()
    if reason:
        pytest.skip(reason)
    driver = start_chromium(tmp_path / "chromium-profile", tmp_path / "chromedriver.log")
    failed_before = request.session.testsfailed
    try:
        yield driver
    finally:
        if request.session.testsfailed > failed_before:
            with contextlib.suppress(Exception):
                shot = REPO / "test-artifacts" / f"{request.node.name}-failure.png"
                shot.parent.mkdir(exist_ok=True)
                driver.save_screenshot(str(shot))
                shot.with_suffix(".txt").write_text(page_text(driver))
        driver.quit()


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
