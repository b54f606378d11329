"""Helpers shared by the tests (import them as ``from helpers import …``; pytest puts
``tests/`` on the path). Fixtures live in ``conftest.py``; plain functions live here:

* this module — paths: the repository and the real-face sample beside it;
* :mod:`helpers.studies` — tiny study configs on an isolated store;
* :mod:`helpers.images` — small image files written for data tests;
* :mod:`helpers.browser` — headless Chromium under Selenium;
* :mod:`helpers.postgres` — a PostgreSQL server under pytest-postgresql.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FACES_SAMPLE = REPO.parent / "shared" / "data" / "faces-sample"
