"""A result is always the result of the config it claims (issue #14): study identity and
versions, growing a study, the consistency check, full disks and torn journals.

Real ``agelab`` commands (in-process through ``agelab.cli.main``, or real processes where a
mount namespace or a crash is involved) on real MLflow (SQLite) and Optuna (journal) stores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from agelab.cli import main
from agelab.config import load_config
from agelab.study import open_storage, open_study, storage_url, versions
from agelab.study.identity import S_HASH, changed_fields, identity
from agelab.study.plan import A_KEY, invalid_trials
from agelab.tracking import default_uri
from helpers import REPO
from helpers.invariants import (
    assert_study_consistent,
    consistent_in_a_new_process,
    tail,
    write_study,
)
from helpers.namespaces import UNSHARE, why_no_mount_namespace

TWO_CELLS = {"space": {"model.norm": ["batch", "none"]}}


def run(study: Path, *args: str) -> int:
    return main(["run", str(study), "--quiet", *args])


def run_process(study: Path, *args: str) -> int:
    """In a fresh process: MLflow caches one SQL engine per store URI for the life of a
    process, so a store deleted under it (below) is only seen anew by a new process, as a
    user's next `agelab run` is."""
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "agelab.cli", "run", str(study), "--quiet", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode


def runs_of(cfg_path: Path, overrides: tuple[str, ...] = (), experiment: str | None = None):
    cfg = load_config(cfg_path, list(overrides))
    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name(experiment or cfg.name)
    return client.search_runs([exp.experiment_id], "tags.`agelab.run_kind` = 'trial'")


# ------------------------------------------------------------------------------ identity


def test_identity_ignores_execution_settings_and_growth_but_not_results(tmp_path: Path) -> None:
    base = load_config(write_study(tmp_path, "i", search=TWO_CELLS))
    same = [
        "train.threads=2",
        "train.progress=true",
        "train.device=cpu",
        "train.eval_batch_size=7",
        "tracking.log_figures=true",
        "report.alpha=0.01",
        "description=other words",
        "search.seeds=[0,1,2]",
        "search.space.model.norm=[batch,none,group]",
        "model.norm=layer",  # searched: its value comes from the space
    ]
    ref = identity(base, "fp")
    for override in same:
        cfg = load_config(write_study(tmp_path, "i", search=TWO_CELLS), [override])
        assert identity(cfg, "fp") == ref, override
    for override, field in [
        ("train.epochs=2", "train.epochs"),
        ("train.lr=0.01", "train.lr"),
        ("model.act=tanh", "model.act"),
        ("data.synthetic.seed=1", "data.synthetic.seed"),
        ("data.split.seed=3", "data.split.seed"),
        ("metrics.k_max=10", "metrics.k_max"),
    ]:
        cfg = load_config(write_study(tmp_path, "i", search=TWO_CELLS), [override])
        changed = changed_fields(ref, identity(cfg, "fp"))
        assert [c.split(":")[0] for c in changed] == [field], (override, changed)
    assert changed_fields(ref, identity(base, "other")) == ["data.fingerprint: fp → other"]


@pytest.mark.slow
def test_changed_config_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    study = write_study(tmp_path, "c", search=TWO_CELLS)
    assert run(study) == 0
    before = {r.info.run_id for r in runs_of(study)}
    capsys.readouterr()
    assert run(study, "train.epochs=2", "train.lr=0.002") == 2
    err = capsys.readouterr().err
    assert "study 'c' was run with another config" in err
    assert "train.epochs: 1 → 2" in err and "train.lr: 0.001 → 0.002" in err
    assert "--new-version" in err and "name=<new name>" in err and "Traceback" not in err
    assert {r.info.run_id for r in runs_of(study)} == before  # nothing trained, nothing mixed
    cfg = load_config(study)
    assert len(open_study(cfg, open_storage(storage_url(cfg))).trials) == 2


@pytest.mark.slow
def test_new_version_keeps_the_old_one_and_each_config_finds_its_version(tmp_path: Path) -> None:
    study = write_study(tmp_path, "v", search=TWO_CELLS)
    assert run(study) == 0
    assert run(study, "train.epochs=2", "--new-version") == 0
    cfg = load_config(study)
    storage = open_storage(storage_url(cfg))
    assert versions(storage, "v") == {1: "v", 2: "v.v2"}
    assert len(runs_of(study)) == 2 and len(runs_of(study, experiment="v.v2")) == 2
    # Back to the first config: version 1 continues (nothing to do); then the second again.
    assert run(study, "search.seeds=[0,1]") == 0
    assert run(study, "train.epochs=2") == 0
    assert len(runs_of(study)) == 4 and len(runs_of(study, experiment="v.v2")) == 2
    h1 = open_study(cfg, storage).user_attrs[S_HASH]
    assert {r.data.tags["agelab.config_hash"] for r in runs_of(study)} == {h1}
    assert_study_consistent(study, ("search.seeds=[0,1]",))
    assert_study_consistent(study, ("train.epochs=2",))
    # The report of each config reads its own version.
    out = tmp_path / "r2"
    assert main(["report", str(study), "train.epochs=2", "--out", str(out), "--no-log"]) == 0
    assert "Based on 2 completed trial(s)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_growing_a_study_runs_only_the_new_cells(tmp_path: Path, capsys) -> None:
    """The README's `make demo ARGS="search.seeds=[0,1,2,3,4]"`: more seeds, then one more
    grid value, then fewer seeds again — never an Optuna "dynamic value space" error."""
    study = write_study(tmp_path, "g", search=TWO_CELLS)
    assert run(study) == 0
    first = {r.info.run_id for r in runs_of(study)}
    capsys.readouterr()
    assert run(study, "search.seeds=[0,1]") == 0
    assert "4 planned trial(s), 2 complete, 2 newly queued" in capsys.readouterr().out
    assert len(runs_of(study)) == 4 and first <= {r.info.run_id for r in runs_of(study)}
    grown = ("search.seeds=[0,1]", "search.space.model.norm=[batch,none,group]")
    assert run(study, *grown) == 0
    assert len(runs_of(study)) == 6
    assert_study_consistent(study, grown)
    # The description the UI and the report show says what the command changed.
    client = MlflowClient(default_uri(load_config(study).tracking))
    exp = client.get_experiment_by_name("g")
    (last,) = client.search_runs(
        [exp.experiment_id], "tags.`agelab.run_kind` = 'study'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    described = last.data.tags["agelab.description"]
    assert "`search.seeds=[0,1]`, `search.space.model.norm=[batch,none,group]`" in described
    capsys.readouterr()
    assert run(study) == 0  # seeds [0] and two norms again: nothing to train
    out = capsys.readouterr().out
    assert "2 planned trial(s), 2 complete, 0 newly queued" in out
    assert "4 complete trial(s) outside this plan kept" in out
    assert main(["report", str(study), "--out", str(tmp_path / "r"), "--no-log"]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Left out: 4 trial(s) outside the current search space or seeds" in report


@pytest.mark.slow
def test_another_experiment_or_a_legacy_study_of_another_config_is_refused(
    tmp_path: Path, capsys
) -> None:
    study = write_study(tmp_path, "x", search=TWO_CELLS)
    assert run(study) == 0
    capsys.readouterr()
    # Its runs are in experiment "x": logging elsewhere would find none and redo every cell.
    assert run(study, "tracking.experiment=elsewhere") == 2
    assert "its runs are in MLflow experiment 'x'" in capsys.readouterr().err
    # A study made before identities were recorded is adopted only by its first config.
    cfg = load_config(study)
    open_study(cfg, open_storage(storage_url(cfg))).set_user_attr("identity", None)
    assert run(study, "train.epochs=2") == 2
    assert "train.epochs: 1 → 2" in capsys.readouterr().err
    assert run(study) == 0
    assert "made before agelab recorded configs" in capsys.readouterr().out
    assert assert_study_consistent(study)["complete"] == 2


@pytest.mark.slow
def test_output_cut_by_head_stops_nothing(tmp_path: Path) -> None:
    study = write_study(tmp_path, "pipe", search=TWO_CELLS)
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    cmd = f"{sys.executable} -m agelab.cli run {study} --quiet | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert assert_study_consistent(study)["complete"] == 2


# ----------------------------------------------------------------- the two stores agree


@pytest.mark.slow
def test_check_requeues_lost_results_and_sets_orphans_aside(tmp_path: Path, capsys) -> None:
    study = write_study(tmp_path, "k", search=TWO_CELLS)
    assert run(study) == 0
    cfg = load_config(study)
    runs = sorted(runs_of(study), key=lambda r: r.data.tags["agelab.plan_key"])
    # One run loses its artifact folder, the other run is deleted from MLflow.
    artifacts = Path(runs[0].info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts)
    MlflowClient(default_uri(cfg.tracking)).delete_run(runs[1].info.run_id)
    capsys.readouterr()
    assert main(["check", str(study), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "2 finding(s) (dry run: nothing changed)" in dry and "lacks its artifacts" in dry
    assert "is gone" in dry
    study_obj = open_study(cfg, open_storage(storage_url(cfg)))
    assert invalid_trials(study_obj) == {}
    assert run(study) == 0  # the run repairs first, then trains the two cells again
    out = capsys.readouterr().out
    assert "check: 2 finding(s):" in out and "its cell is queued again" in out
    summary = assert_study_consistent(study)
    assert summary["complete"] == 2 and summary["killed_runs"] == 1  # the INVALID one, kept
    assert main(["check", str(study)]) == 0
    assert "Optuna and MLflow agree" in capsys.readouterr().out


@pytest.mark.slow
def test_lost_journal_and_lost_mlflow_store_are_repaired_by_rerunning(tmp_path: Path) -> None:
    study = write_study(tmp_path, "lost", search=TWO_CELLS)
    assert run(study) == 0
    cfg = load_config(study)
    root = cfg.tracking.root
    # The Optuna journal is lost: the study starts over, the old runs are set aside.
    (root / "optuna" / "journal.log").unlink()
    assert run(study) == 0
    summary = assert_study_consistent(study)
    assert summary == {"complete": 2, "killed_runs": 2, "runs": 6}
    orphans = [r for r in runs_of(study) if r.data.tags.get("agelab.state") == "ORPHAN"]
    assert len(orphans) == 2
    # The MLflow store is lost: every COMPLETE trial is re-run into the new store.
    (root / "mlflow.db").unlink()
    assert run_process(study) == 0
    assert consistent_in_a_new_process(study)["complete"] == 2


def test_torn_journal_tail_is_repaired_with_a_backup_and_bad_records_refused(
    tmp_path: Path, capsys
) -> None:
    cfg = load_config(write_study(tmp_path, "j", search=TWO_CELLS))
    open_study(cfg, open_storage(storage_url(cfg)))
    journal = cfg.tracking.root / "optuna" / "journal.log"
    good = journal.read_bytes()
    journal.write_bytes(good + b'{"op_code": 5, "worker_id": "x", "trial')  # cut by a crash
    capsys.readouterr()
    study = open_study(cfg, open_storage(storage_url(cfg)))
    repaired = journal.read_bytes()
    assert repaired.startswith(good) and b'"trial' not in repaired[len(good) :]
    backups = list(journal.parent.glob("journal.log.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes().startswith(good)
    assert "dropped a record cut short by a crash" in capsys.readouterr().out
    study.set_user_attr("still", "usable")  # appends cleanly after the repair
    # A process that already has the journal open repairs a tail torn later by another
    # process before its own next append (it would glue its record onto the torn one).
    journal.write_bytes(journal.read_bytes() + b'{"op_code": 9, "cut')
    study.set_user_attr("live", "writer")
    assert open_study(cfg, open_storage(storage_url(cfg))).user_attrs["live"] == "writer"
    assert len(list(journal.parent.glob("journal.log.bak-*"))) >= 1
    lines = journal.read_bytes().splitlines()
    journal.write_bytes(b"\n".join([lines[0], b"{not json", *lines[1:]]) + b"\n")
    assert main(["check", "j", "--root", str(cfg.tracking.root)]) == 2
    err = capsys.readouterr().err
    assert f"the Optuna journal {journal} is corrupt at line 2" in err
    assert "Restore a backup" in err and "Traceback" not in err


def test_corrupt_mlflow_database_names_the_file(tmp_path: Path, capsys) -> None:
    study = write_study(tmp_path, "db", search=TWO_CELLS)
    root = load_config(study).tracking.root
    root.mkdir(parents=True, exist_ok=True)
    (root / "mlflow.db").write_bytes(os.urandom(4096))
    assert run(study) == 2
    err = capsys.readouterr().err
    assert f"the MLflow store {(root / 'mlflow.db').resolve()} is corrupt" in err
    assert "move it aside" in err and "Traceback" not in err


# ------------------------------------------------------------------ the machine fails


FILL_AFTER_FIRST_TRIAL = r"""
set -u
mount -t tmpfs -o size=12m tmpfs "$STORE"
( "$@" > "$LOG" 2>&1; echo "exit $?" >> "$LOG" ) &
run=$!
for i in $(seq 1 600); do grep -q "trial   0" "$LOG" 2>/dev/null && break; sleep 0.1; done
dd if=/dev/zero of="$STORE/filler" bs=64k 2>/dev/null
wait $run
rm "$STORE/filler"
"$@" >> "$LOG.again" 2>&1
echo "exit $?" >> "$LOG.again"
"""


@pytest.mark.slow
def test_a_full_disk_mid_study_stops_in_one_line_and_loses_no_cell(tmp_path: Path) -> None:
    """A real ENOSPC (a 12 MB tmpfs filled after the first trial): the run stops with one
    line naming the cause and exit 2, the stopped trial is not a failure of its cell, and
    the same command after freeing space completes every cell exactly once."""
    why = why_no_mount_namespace()
    if why:
        pytest.skip(why)
    study = write_study(tmp_path / "s", "full", search={"seeds": [0, 1], **TWO_CELLS})
    store = load_config(study).tracking.root
    store.mkdir(parents=True)
    log = tmp_path / "run.log"
    argv = [sys.executable, "-m", "agelab.cli", "run", str(study)]
    env = os.environ | {"STORE": str(store), "LOG": str(log), "PYTHONPATH": str(REPO / "src")}
    cmd = [*UNSHARE, "sh", "-c"]
    subprocess.run([*cmd, FILL_AFTER_FIRST_TRIAL, "sh", *argv], env=env, timeout=600, check=True)
    first, again = log.read_text(), Path(f"{log}.again").read_text()
    assert first.rstrip().endswith("exit 2"), tail(log)
    stop = [line for line in first.splitlines() if line.startswith("agelab: stopped")]
    assert len(stop) == 1 and "full" in stop[0] and "run the same command again" in stop[0]
    assert "Traceback" not in first, tail(log)
    assert again.rstrip().endswith("exit 0"), again[-3000:]
    # The store lived in the namespace's tmpfs: check the invariant from inside it again.
    assert "4 of 4 planned trial(s) complete" in again


def test_a_store_error_is_named_by_the_drivers_words_before_mlflows_wrapper() -> None:
    """MLflow's SQL store wraps a full SQLite disk as TEMPORARILY_UNAVAILABLE: the stop line
    must say the disk is full (what to fix), not that a tracking server is down."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from agelab.errors import transient_cause

    full = MlflowException(
        "(raised as a result of Query-invoked autoflush)\n"
        "(sqlite3.OperationalError) database or disk is full",
        error_code=TEMPORARILY_UNAVAILABLE,
    )
    assert "database or disk is full" in (transient_cause(full) or "")
    down = MlflowException("API request failed", error_code=TEMPORARILY_UNAVAILABLE)
    assert "tracking server is unavailable" in (transient_cause(down) or "")
    assert transient_cause(MlflowException("bad parameter")) is None


@pytest.mark.slow
def test_two_invocations_on_one_study_both_exit_0(tmp_path: Path) -> None:
    study = write_study(tmp_path, "two", search={"seeds": [0, 1], **TWO_CELLS})
    env = os.environ | {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "agelab.cli", "run", str(study), "--quiet"]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert assert_study_consistent(study)["complete"] == 4
    cfg = load_config(study)
    trials = open_study(cfg, open_storage(storage_url(cfg))).get_trials()
    keys = [t.user_attrs[A_KEY] for t in trials if t.state == TrialState.COMPLETE]
    assert len(keys) == len(set(keys)) == 4
