"""A study's identity: the part of its config that decides what a trial computes.

Every trial is bound to the identity of the config it ran with (a hash, stored on the Optuna
study and trial and tagged on every MLflow run), so a result is always the result of the
config it claims:

* **Growing is allowed.** For planned samplers (grid, random), ``search.seeds``,
  ``search.space`` and ``search.n_trials`` only add (or drop) cells: they are not part of
  the identity, and a re-run plans just the new cells.
* **Changing is refused.** Anything else that changes a result (data, model, training,
  metrics settings, the dataset's content) makes a different study. A re-run stops before
  training and lists the changed fields; ``--new-version`` starts ``<name>.v2`` (the old
  version stays intact), or the config gets a new ``name``.
* **Execution settings are free**: where and how a trial runs or what is displayed
  (``train.device``, ``threads``, ``progress``, ``compile``, ``channels_last``,
  ``eval_batch_size``, ``data.path``, ``cache_dir`` and ``max_resident_gb`` — the dataset
  fingerprint stands for the data's content —, ``tracking.*``, ``report.*``, ``description``).

Versions are Optuna studies named ``<name>`` (version 1), ``<name>.v2``, ``<name>.v3`` …; each
has its own MLflow experiment of the same name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from agelab.config import StudyConfig, flatten
from agelab.data.split import SPLIT_VERSION
from agelab.errors import ConfigError, StoreError, StudyConfigChanged

#: Study user attributes.
S_IDENTITY, S_HASH, S_BASE, S_VERSION = "identity", "identity_hash", "base_name", "version"
S_EXPERIMENT = "mlflow_experiment"

#: Fields (dotted, or a prefix ending in ".") that never change what a trial computes.
EXECUTION_ONLY = (
    "name",
    "description",
    "tracking.",
    "report.",
    "data.path",
    "data.test.path",
    "data.cache_dir",
    "data.max_resident_gb",
    "train.progress",
    "train.threads",
    "train.device",
    "train.compile",
    "train.channels_last",
    "train.eval_batch_size",
    "search.warn_cells",
)
#: For grid and random studies these add or drop cells without changing any result.
CELL_SETTINGS = ("search.seeds", "search.space", "search.n_trials")


def identity(cfg: StudyConfig, data_fingerprint: str) -> dict[str, Any]:
    """The settings that decide a trial's result, flattened, plus the dataset fingerprint,
    the split algorithm's version, the numeric precision training runs in on this machine,
    and the content (not the path) of a pretrained weights file.

    A field the search space sets is left out too: its value comes from the space."""
    planned = cfg.search.sampler in ("grid", "random")
    skip = EXECUTION_ONLY + (CELL_SETTINGS if planned else ("search.n_trials",))
    if cfg.search.sampler == "grid":
        skip += ("search.sampler_seed",)  # a grid draws nothing
    searched = set(cfg.search.space)
    out = {
        key: value
        for key, value in flatten(cfg).items()
        if not _listed(key, skip) and key not in searched
    }
    # (TPE keeps search.space and search.seeds: its history depends on them.)
    out["data.fingerprint"] = data_fingerprint
    out["data.split_version"] = SPLIT_VERSION
    out["train.precision"] = precision(cfg)
    if cfg.model.weights is not None and "model.weights" not in searched:
        out["model.weights"] = file_digest(Path(cfg.model.weights).expanduser())
    return out


def precision(cfg: StudyConfig) -> str:
    """``bf16`` where training autocasts (``train.amp`` on a CUDA device; ``train.amp: bf16``
    anywhere), else ``fp32``: a GPU worker joining a CPU study would otherwise mix bf16
    results into it."""
    if cfg.train.amp == "bf16":
        return "bf16"
    if not cfg.train.amp or cfg.train.device == "cpu":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes (moving the file keeps it; changing it does not)."""
    if not path.is_file():
        return f"missing:{path}"
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def _listed(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def identity_hash(ident: dict[str, Any]) -> str:
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``train.epochs: 6 → 3`` lines, one per field that differs (added/removed included)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(not set)"), new.get(key, "(not set)")
        if a != b:
            lines.append(f"{key}: {_short(a)} → {_short(b)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- versions

_VERSION = re.compile(r"^(?P<base>.+)\.v(?P<k>[2-9]|[1-9]\d+)$")


def version_name(base: str, k: int) -> str:
    return base if k == 1 else f"{base}.v{k}"


def versions(storage: optuna.storages.BaseStorage, base: str) -> dict[int, str]:
    """The existing versions of study ``base``: {1: base, 2: base.v2, …}."""
    out = {}
    for name in optuna.get_all_study_names(storage):
        if name == base:
            out[1] = name
        elif (m := _VERSION.match(name)) and m["base"] == base:
            out[int(m["k"])] = name
    return dict(sorted(out.items()))


@dataclass
class Binding:
    """Which version of a study a config runs in, and its identity."""

    name: str  # the Optuna study and MLflow experiment name of that version
    version: int
    identity: dict[str, Any]
    hash: str
    created: bool = False  # a new version (or a new study)
    adopted: bool = False  # an existing study that had no identity yet


def stored_identity(study: optuna.Study) -> dict[str, Any] | None:
    raw = study.user_attrs.get(S_IDENTITY)
    return json.loads(raw) if isinstance(raw, str) else raw


def bind(
    study: optuna.Study, base: str, version: int, ident: dict[str, Any], experiment: str
) -> None:
    """Record the identity (and the MLflow experiment that holds the runs) on the study."""
    study.set_user_attr(S_IDENTITY, json.dumps(ident, sort_keys=True, default=str))
    study.set_user_attr(S_HASH, identity_hash(ident))
    study.set_user_attr(S_BASE, base)
    study.set_user_attr(S_VERSION, version)
    study.set_user_attr(S_EXPERIMENT, experiment)


def check_experiment(study: optuna.Study, experiment: str) -> None:
    """The study's runs live in one MLflow experiment: a config pointing elsewhere would
    find none of them and redo every cell, so it is refused."""
    was = study.user_attrs.get(S_EXPERIMENT)
    if was is not None and was != experiment:
        raise ConfigError(
            f"study {study.study_name!r}",
            [
                f"tracking.experiment: its runs are in MLflow experiment {was!r}, this config "
                f"logs to {experiment!r}; set tracking.experiment={was} (or remove it if that "
                "is the study's name), or start a new version with --new-version"
            ],
        )


def legacy_changes(
    ident: dict[str, Any], params: dict[str, str], tags: dict[str, str]
) -> list[str]:
    """``field: old → new`` for identity fields whose value differs from a parent run's
    logged params (strings, as :func:`agelab.secrets.scrub` wrote them)."""
    from agelab.secrets import scrub

    old = dict(params) | {"data.fingerprint": tags.get("agelab.dataset_fingerprint")}
    return [
        f"{key}: {_short(old[key])} → {_short(value)}"
        for key, value in sorted(ident.items())
        if old.get(key) is not None and old[key] != scrub(value)
    ]


def choose_version(
    found: dict[int, dict[str, Any] | None],
    base: str,
    ident: dict[str, Any],
    *,
    new_version: bool,
    join: bool,
) -> tuple[int, bool]:
    """(version to use, whether to create it) from each existing version's identity.

    The version whose identity equals the config's is continued (the latest such); a study
    whose latest version has no identity yet (made before agelab recorded one, or empty) is
    adopted. Otherwise the change is refused with what changed and the ways forward."""
    h = identity_hash(ident)
    matching = [k for k, old in found.items() if old is not None and identity_hash(old) == h]
    latest = max(found, default=0)
    if new_version:
        if join:
            raise ConfigError("(command line)", ["--new-version and --join exclude each other"])
        return latest + 1, True
    if matching:
        return max(matching), False
    if latest == 0:
        if join:
            raise StoreError(
                f"no study {base!r} to join: start it with `agelab run` on one machine first"
            )
        return 1, True
    if found[latest] is None:
        return latest, False  # adopt: bind it to this config
    raise config_changed(base, latest, found[latest], ident)


def config_changed(
    base: str,
    latest: int,
    old: dict[str, Any],
    new: dict[str, Any],
    *,
    changes: list[str] | None = None,
) -> StudyConfigChanged:
    name, nxt = version_name(base, latest), version_name(base, latest + 1)
    return StudyConfigChanged(
        name,
        changes if changes is not None else changed_fields(old, new),
        [
            f"to keep {name!r} and start version {latest + 1} ({nxt!r}) with this config: "
            "add --new-version (make: ARGS=--new-version)",
            "or give this config its own study: name=<new name>",
            f"or undo the change to continue {name!r} (adding seeds or grid values is fine)",
        ],
    )


def version_for_report(
    storage: optuna.storages.BaseStorage, cfg: StudyConfig
) -> tuple[int, str | None]:
    """Which version of study ``cfg.name`` a report of this config reads: the latest whose
    identity matches the config's (the dataset fingerprint aside: reading a report must not
    decode a dataset), else the latest, with a note saying so."""
    names = versions(storage, cfg.name)
    if not names:
        return 1, None
    wanted = identity(cfg, "")
    wanted.pop("data.fingerprint")
    matching = []
    for k, name in names.items():
        old = stored_identity(optuna.load_study(study_name=name, storage=storage)) or {}
        old.pop("data.fingerprint", None)
        if old == wanted:
            matching.append(k)
    if matching:
        return max(matching), None
    latest = max(names)
    return latest, (
        f"this config matches no version of study {cfg.name!r}: the report is of the latest, "
        f"{version_name(cfg.name, latest)!r}"
    )
