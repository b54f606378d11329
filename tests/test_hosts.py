"""Several hosts, simulated honestly: each worker runs on a "host" of its own — its own host
name (UTS namespace) and its own pids (PID namespace) — sharing only the stores (the Optuna
journal and the SQLite MLflow store in one folder, as a shared filesystem would).

On another host a pid means nothing (here both hosts' first workers are pid 2), so a trial
whose host differs from the recovering process's can only be judged by its heartbeat:

* a remote worker killed mid-trial is recovered only once its heartbeat is older than
  ``AGELAB_STALE_AFTER``, never before, and its cell then finishes exactly once;
* a slow but live remote worker (one training step lasting several stale timeouts) is never
  recovered while another host's worker starts, plans and runs: its heartbeat is refreshed
  by a thread, not only at the end of each epoch.

Skips with the reason where user namespaces are not allowed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from agelab import faults
from agelab.config import load_config
from agelab.study import A_BEAT, A_HOST, A_PID, A_REASON, A_RUN, open_storage, storage_url
from agelab.study.worker import Heartbeat
from agelab.tracking import TAG_KIND, TAG_WORKER_HOST, default_uri
from helpers.invariants import assert_study_consistent, tail, write_study
from helpers.namespaces import as_host, why_no_host_namespace
from helpers.tracking_server import wait_gone
from helpers.zygote import Zygote

HOSTS = ("hostA", "hostB")


@pytest.fixture
def start_hosts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], dict]]:
    """``start_hosts(stale_after)``: one zygote per simulated host (``agelab`` invocations
    fork from it, on that host) under ``AGELAB_STALE_AFTER=stale_after``. Afterwards nothing
    of either host is left running."""
    why = why_no_host_namespace()
    if why:
        pytest.skip(why)
    zygotes: dict[str, Zygote] = {}

    def start(stale_after: float) -> dict:
        monkeypatch.setenv("AGELAB_STALE_AFTER", str(stale_after))  # before the imports
        with ThreadPoolExecutor(len(HOSTS)) as pool:  # both hosts import at once
            zygotes.update(zip(HOSTS, pool.map(lambda h: Zygote(as_host(h)), HOSTS), strict=True))
        return zygotes

    try:
        yield start
    finally:
        with ThreadPoolExecutor(len(HOSTS)) as pool:  # the zygote is pid 1 of its host:
            list(pool.map(Zygote.close, zygotes.values()))  # everything on it ends with it
        wait_gone([z.proc.pid for z in zygotes.values()], "the simulated hosts")


def pass_pid(zygote: Zygote, pid: int) -> None:
    """Fork throwaway processes on a host until its pids pass ``pid``: from then on ``pid``
    (a worker's pid on another host) is a dead pid on this one, and a check by pid here
    would call that worker dead whether it is or not."""
    while (fork := zygote.start(["--version"], Path(os.devnull))) <= pid:
        assert zygote.wait(fork) == 0
    assert zygote.wait(fork) == 0


def trials(path: Path) -> list[optuna.trial.FrozenTrial]:
    cfg = load_config(path)
    return optuna.load_study(study_name=cfg.name, storage=open_storage(storage_url(cfg))).trials


def on_host(zygotes: dict, host: str, path: Path, log: Path, *extra: str, env=None) -> int:
    """Start ``agelab run`` on ``host``; returns its pid (as the zygote sees it)."""
    return zygotes[host].start(["run", str(path), "--quiet", *extra], log, env)


# ------------------------------------------------------------- a remote worker killed


@pytest.mark.slow
def test_a_killed_remote_worker_is_recovered_only_after_the_stale_timeout(
    start_hosts: Callable[[float], dict], tmp_path: Path
) -> None:
    stale = 20
    hosts = start_hosts(stale)
    path = write_study(tmp_path, "hosts-kill", search={"space": {"model.norm": ["batch", "none"]}})
    log, kills = tmp_path / "agelab.log", tmp_path / "kills.log"
    armed = {faults.ENV_KILL_AT: "train.step:2", faults.ENV_KILL_LOG: str(kills)}

    # hostA plans the study, takes its first trial and dies mid-epoch (SIGKILL: no cleanup).
    rc = hosts["hostA"].wait(on_host(hosts, "hostA", path, log, env=armed))
    assert rc == -9, f"hostA was not killed (exit {rc}):\n{tail(log)}"
    (dead,) = [t for t in trials(path) if t.state == TrialState.RUNNING]
    assert dead.user_attrs[A_HOST] == "hostA"
    beat, pid_a = float(dead.user_attrs[A_BEAT]), int(dead.user_attrs[A_PID])
    pass_pid(hosts["hostB"], pid_a)

    # hostB starts within the timeout. hostA's pid is a dead pid there, and means nothing:
    # only the heartbeat counts, and it is fresh. Not recovered.
    rc = hosts["hostB"].wait(on_host(hosts, "hostB", path, log))
    early = time.time() - beat
    assert early < stale, f"hostB took {early:.0f} s: too slow to check within {stale} s"
    assert rc == 0, tail(log)
    by_number = {t.number: t for t in trials(path)}
    assert by_number[dead.number].state == TrialState.RUNNING, by_number[dead.number]
    assert not [t for t in by_number.values() if t.state == TrialState.FAIL]
    assert "recovered" not in log.read_text()

    # Past the timeout, the next start on hostB recovers it; the cell runs again, once.
    time.sleep(max(0.0, beat + stale + 1 - time.time()))
    rc = hosts["hostB"].wait(on_host(hosts, "hostB", path, log))
    assert rc == 0, tail(log)
    assert "recovered 1 trial(s) left running by a dead worker" in log.read_text()
    failed = [t for t in trials(path) if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [dead.number]
    assert failed[0].user_attrs[A_REASON] == f"worker died (host hostA, pid {pid_a})"
    client = MlflowClient(default_uri(load_config(path).tracking))
    assert client.get_run(dead.user_attrs[A_RUN]).info.status == "KILLED"  # closed by hostB
    # hostA's own invocation (the parent run) has no heartbeat: only hostA can tell that
    # its process is gone, when it next runs agelab.
    runs = client.search_runs(
        [client.get_experiment_by_name("hosts-kill").experiment_id], max_results=100
    )
    left = [r for r in runs if r.info.status == "RUNNING"]
    assert [(r.data.tags[TAG_KIND], r.data.tags[TAG_WORKER_HOST]) for r in left] == [
        ("study", "hostA")
    ]
    rc = hosts["hostA"].wait(on_host(hosts, "hostA", path, log))  # hostA is back
    assert rc == 0, tail(log)
    summary = assert_study_consistent(path)
    assert summary == {"complete": 2, "killed_runs": 1, "runs": 7}, summary


# ------------------------------------------------------------- a slow remote worker


@pytest.mark.slow
def test_a_slow_remote_worker_is_never_recovered_while_another_host_works(
    start_hosts: Callable[[float], dict], tmp_path: Path
) -> None:
    stale, pause = 4, 25
    hosts = start_hosts(stale)
    space = {"model.norm": ["batch", "none", "group"]}
    path = write_study(tmp_path, "hosts-slow", search={"space": space})
    log, events = tmp_path / "agelab.log", tmp_path / "faults.log"
    slow = {faults.ENV_PAUSE_AT: f"train.step:1={pause}", faults.ENV_KILL_LOG: str(events)}

    # hostA takes one trial whose first training step lasts `pause` s: several stale
    # timeouts without an epoch ending.
    pid_a = on_host(hosts, "hostA", path, tmp_path / "hostA.log", "--n-trials", "1", env=slow)
    deadline = time.time() + 120
    while not (events.exists() and "pause" in events.read_text()):
        assert time.time() < deadline, tail(tmp_path / "hostA.log")
        time.sleep(0.2)
    (running,) = [t for t in trials(path) if t.state == TrialState.RUNNING]
    pass_pid(hosts["hostB"], int(running.user_attrs[A_PID]))
    # Wait until an epoch-only heartbeat would be stale; the thread's is not.
    time.sleep(max(0.0, running.datetime_start.timestamp() + stale + 1.5 - time.time()))
    (running,) = [t for t in trials(path) if t.state == TrialState.RUNNING]
    since_start = time.time() - running.datetime_start.timestamp()
    since_beat = time.time() - float(running.user_attrs[A_BEAT])
    assert since_start > stale > since_beat, (since_start, since_beat)

    # hostB starts, recovers what is dead (nothing), plans, runs the other two cells.
    rc = hosts["hostB"].wait(on_host(hosts, "hostB", path, log))
    assert rc == 0, tail(log)
    assert "recovered" not in log.read_text()
    by_number = {t.number: t for t in trials(path)}
    assert by_number[running.number].state == TrialState.RUNNING, "hostB took over the cell"
    assert not [t for t in by_number.values() if t.state == TrialState.FAIL]

    assert hosts["hostA"].wait(pid_a) == 0, tail(tmp_path / "hostA.log")
    done = {t.number: t for t in trials(path)}
    assert done[running.number].state == TrialState.COMPLETE
    assert done[running.number].user_attrs[A_HOST] == "hostA"
    assert sorted(t.user_attrs[A_HOST] for t in done.values()) == ["hostA", "hostB", "hostB"]
    summary = assert_study_consistent(path)
    assert summary == {"complete": 3, "killed_runs": 0, "runs": 5}, summary


# ------------------------------------------------------------------- the tools


def test_the_heartbeat_thread_beats_until_the_block_ends() -> None:
    study = optuna.create_study()
    trial = study.ask()
    with Heartbeat(trial, every=0.02) as beat:
        time.sleep(0.3)
        first = study.trials[0].user_attrs[A_BEAT]
        time.sleep(0.1)
        assert study.trials[0].user_attrs[A_BEAT] > first
    assert not beat._thread.is_alive()
    last = study.trials[0].user_attrs[A_BEAT]
    time.sleep(0.1)
    assert study.trials[0].user_attrs[A_BEAT] == last  # stopped: nothing after the block
    study.tell(trial, 1.0)


def test_the_heartbeat_stops_once_another_process_finished_the_trial() -> None:
    study = optuna.create_study()
    trial = study.ask()
    with Heartbeat(trial, every=0.02) as beat:
        study.tell(trial.number, state=TrialState.FAIL)  # recovered elsewhere, say
        deadline = time.time() + 5
        while beat._thread.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        assert not beat._thread.is_alive()
    assert threading.active_count() >= 1


def test_pause_points_parse_and_sleep(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert faults.parse_pauses("train.step:2=1.5, cache.write=3") == {
        "train.step": (2, 1.5),
        "cache.write": (1, 3.0),
    }
    with pytest.raises(ValueError, match="needs '=<seconds>'"):
        faults.parse_pauses("train.step:2")
    with pytest.raises(ValueError, match="unknown point"):
        faults.parse_pauses("nope=1")
    log = tmp_path / "faults.log"
    monkeypatch.delenv(faults.ENV_KILL_AT, raising=False)
    monkeypatch.setenv(faults.ENV_PAUSE_AT, "study.tell.after:2=0.2")
    monkeypatch.setenv(faults.ENV_KILL_LOG, str(log))
    t0 = time.monotonic()
    faults.kill_point("study.tell.after")
    assert time.monotonic() - t0 < 0.1 and not log.exists()  # the 1st hit: no pause
    faults.kill_point("study.tell.after")
    assert time.monotonic() - t0 >= 0.2
    assert log.read_text().startswith("pause study.tell.after:2 pid ")
