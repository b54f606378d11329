"""Seeded chaos: a small study interrupted by a random fault each round, then recovered the
way docs/reliability.md prescribes, and checked against the study invariant.

Faults: SIGKILL at a random kill point (``agelab.faults``), a full disk (the store is a small
tmpfs in a private mount namespace, filled to a random level), a torn or rolled-back Optuna
journal tail, a deleted run artifact folder, and a config change (a new version of the
study, or going back to an earlier one) or a study grown by a seed. Recovery is always
"run the same command again" (``--new-version`` the first time a changed config is run,
after freeing space for a full disk). After every round: each planned cell of the current
config COMPLETE exactly once in Optuna, with exactly one FINISHED MLflow run carrying that
config's hash and its metrics, nothing RUNNING, no secret in the store
(:func:`helpers.invariants.assert_study_consistent`).

Run as ``unshare --mount python tests/helpers/chaos.py ROOT SEED ROUNDS mount`` (the test
does); prints one JSON line per round and a final summary. Without mount rights (no
``mount`` argument) the full-disk rounds are replaced by kills.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.invariants import assert_study_consistent, write_study
from helpers.zygote import Zygote

SECRET = "s3cr3t-chaos-pw"
#: Kill points and how often a run that trains one cell passes each (3 steps an epoch;
#: epoch and final metrics, then the parent's counts).
HITS = {
    "train.step": 3,
    "mlflow.log_metrics": 3,
    "mlflow.log_artifacts": 1,
    "study.tell.before": 1,
    "study.tell.after": 1,
}
FAULTS = ("kill", "kill", "full_disk", "torn_journal", "lost_artifacts", "change_config")
#: The configs a round may switch between (each is its own version of the study).
VARIANTS = ((), ("train.lr=0.002",))


class Chaos:
    def __init__(self, root: Path, seed: int, mount: bool) -> None:
        self.root, self.rng = root, random.Random(seed)
        self.store = root / "store"
        self.mounted = _mount_tmpfs(self.store) if mount else None
        self.study = write_study(
            root,
            "chaos",
            search={"space": {"model.norm": ["batch", "none"]}},
            tracking={"root": str(self.store / "mlruns")},
            description=f"chaos study; a password that must not leak: postgresql://u:{SECRET}@db/x",
        )
        self.variant, self.seeds, self.seen = 0, [0], {0}
        self.zygote = Zygote()
        self.log = root / "chaos.log"

    # ------------------------------------------------------------------------ running
    def overrides(self) -> tuple[str, ...]:
        return (*VARIANTS[self.variant], f"search.seeds={self.seeds}")

    def agelab(self, *extra: str, env: dict | None = None) -> int | None:
        argv = ["run", str(self.study), "--quiet", *self.overrides(), *extra]
        return self.zygote.run(argv, self.log, env)

    def recover(self, first: tuple[str, ...] = ()) -> list[int | None]:
        """The prescribed recovery: the same command again, until it succeeds (≤ 3 times)."""
        codes = [self.agelab(*first)]
        while codes[-1] != 0 and len(codes) < 3:
            codes.append(self.agelab())
        return codes

    # ------------------------------------------------------------------------- faults
    def kill(self) -> dict:
        point = self.rng.choice(sorted(HITS))
        hit = self.rng.randint(1, HITS[point])
        self._work_to_do()
        rc = self.agelab(env={"AGELAB_KILL_AT": f"{point}:{hit}"})
        return {"fault": f"kill {point}:{hit}", "faulted_rc": rc, "recovery": self.recover()}

    def full_disk(self) -> dict:
        if not self.mounted:
            return self.kill()
        filler = self.store / "filler"
        free = shutil.disk_usage(self.store).free
        self._work_to_do()
        leave = self.rng.randint(72, 320) * 1024  # past the 64 KiB write probe, not a trial
        with filler.open("wb") as fh:
            fh.write(b"\0" * max(0, free - leave))
        rc = self.agelab()
        filler.unlink()  # the recovery: free space, run again
        return {"fault": f"full disk ({leave // 1024} KiB left)", "faulted_rc": rc,
                "recovery": self.recover()}  # fmt: skip

    def torn_journal(self) -> dict:
        journal = self.store / "mlruns" / "optuna" / "journal.log"
        cut = self.rng.randint(1, 400)
        data = journal.read_bytes()
        journal.write_bytes(data[: max(0, len(data) - cut)])
        return {"fault": f"journal tail cut by {cut} bytes", "recovery": self.recover()}

    def lost_artifacts(self) -> dict:
        victim = self._delete_artifacts()
        return {"fault": f"deleted {victim}'s artifacts", "recovery": self.recover()}

    def _delete_artifacts(self) -> str:
        """Delete a random run's artifact folder (its cell is then trained again)."""
        folders = sorted((self.store / "mlruns" / "artifacts").glob("*/*/artifacts"))
        victim = self.rng.choice(folders)
        shutil.rmtree(victim)
        return victim.parent.name

    def change_config(self) -> dict:
        if self.rng.random() < 0.5:
            self.variant = 1 - self.variant
            first = () if self.variant in self.seen else ("--new-version",)
            self.seen.add(self.variant)
            what = f"config variant {self.variant}" + (" (new version)" if first else "")
        else:
            self.seeds = [*self.seeds, len(self.seeds)]
            first, what = (), f"grown to seeds {self.seeds}"
        return {"fault": what, "recovery": self.recover(first)}

    def _work_to_do(self) -> None:
        """A fault must land on a run that trains: grow the study by a seed now and then
        (at most 3), else send one cell back by deleting a run's artifacts."""
        if len(self.seeds) < 3 and self.rng.random() < 0.2:
            self.seeds = [*self.seeds, len(self.seeds)]
        else:
            self._delete_artifacts()

    # -------------------------------------------------------------------------- rounds
    def round(self, i: int) -> dict:
        fault = self.rng.choice(FAULTS)
        start = self.log.stat().st_size if self.log.exists() else 0
        out = {"round": i, **getattr(self, fault)()}
        with self.log.open(errors="replace") as fh:
            fh.seek(start)
            out["tracebacks"] = fh.read().count("Traceback")  # a failure is one line
        out["invariant"] = assert_study_consistent(self.study, self.overrides(), (SECRET,))
        return out


def _mount_tmpfs(store: Path) -> str | None:
    store.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(store)],
        capture_output=True, text=True,
    )  # fmt: skip
    return "tmpfs" if proc.returncode == 0 else None


def main(root: Path, seed: int, rounds: int, mount: bool) -> int:
    """``mount``: only inside a private mount namespace (the tmpfs must not reach the host)."""
    chaos = Chaos(root, seed, mount)
    assert chaos.agelab() == 0, "the first, undisturbed run failed"
    try:
        for i in range(rounds):
            print(json.dumps(chaos.round(i)), flush=True)
    finally:
        chaos.zygote.close()
    print(json.dumps({"done": rounds, "full_disk_rounds": bool(chaos.mounted)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), "mount" in sys.argv[4:]))
