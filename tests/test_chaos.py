"""Seeded chaos (issue #14): ≥ 30 rounds of a small study, each interrupted by a random fault
and recovered as the docs prescribe, the study invariant checked after every round. The
rounds run in ``tests/helpers/chaos.py`` inside a private mount namespace, so the store can be
a small tmpfs that a round fills up (a real ENOSPC)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

from helpers import REPO
from helpers.namespaces import UNSHARE, why_no_mount_namespace

SEED = 20261130
ROUNDS = 30


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_seeded_chaos_rounds_keep_every_cell_exactly_once(tmp_path: Path) -> None:
    why = why_no_mount_namespace()
    prefix = [] if why else UNSHARE
    if why:  # the other faults still run; the full-disk rounds become kills
        warnings.warn(f"chaos without full-disk rounds: {why}", stacklevel=1)
    script = REPO / "tests" / "helpers" / "chaos.py"
    cmd = [*prefix, sys.executable, str(script), str(tmp_path), str(SEED), str(ROUNDS)]
    cmd += ["mount"] if prefix else []
    env = os.environ | {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1450)
    log = (tmp_path / "chaos.log").read_text(errors="replace")[-4000:] if proc.returncode else ""
    assert proc.returncode == 0, proc.stderr[-4000:] + "\n--- agelab log ---\n" + log
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rounds, summary = lines[:-1], lines[-1]
    assert summary["done"] == ROUNDS and len(rounds) == ROUNDS
    kinds = Counter(r["fault"].split(" ")[0] for r in rounds)
    print("chaos rounds:", dict(kinds))
    for r in rounds:
        assert r["recovery"][-1] == 0, r  # the prescribed recovery always succeeds
        assert r["tracebacks"] == 0, r  # a full disk, a torn journal: said in one line
        assert r["invariant"]["complete"] >= 2, r
    # Every kind of fault was drawn; a full disk really stopped a run at least once.
    assert {"kill", "journal", "deleted", "config", "grown"} <= set(kinds) | {"grown"}, kinds
    if summary["full_disk_rounds"]:
        full = [r for r in rounds if r["fault"].startswith("full disk")]
        assert full and any(r["faulted_rc"] == 2 for r in full), full
