"""The bad-input catalogue: one table of everything a user can get wrong, and what agelab says.

Each row builds one bad input under a fresh folder, runs what a user runs (``agelab run``,
``agelab config``, ``agelab data inspect``: the command function itself, as ``agelab``'s
``main`` calls it) or the loader involved, and asserts the error type and the message: the
file (and line, or field) named, and what to do. Rows with ``error=None`` are inputs that
must be *accepted* (or only warned about). After the table: the CLI turns each error type
into one line and exit code 2; property-based tests (hypothesis) on the config loader and
the metrics functions; and the safety checks (no pickle execution, no secrets or home paths
recorded, loopback-only UIs).

Row-level bad-data handling under both ``on_bad`` policies (skip and error) is tested in
``test_sources.py``; here each case goes end to end through ``agelab run``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlflow.tracking import MlflowClient

from agelab import cli
from agelab import metrics as M
from agelab.config import StudyConfig, TrackingConfig, flatten, load_config, validate
from agelab.data.cache import CacheWarning
from agelab.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    StoreError,
    StudyConfigChanged,
)
from agelab.tracking import default_artifact_location
from helpers import REPO
from helpers.images import jpeg_bytes, write_image
from helpers.studies import tiny_study

# ----------------------------------------------------------------------------- harness


@dataclass
class Ctx:
    tmp: Path  # this row's folder
    store: Path  # one tracking root for the whole module (MLflow creates its tables once)

    def study(self, text: str | bytes) -> Path:
        path = self.tmp / "study.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def data_study(self, source: str, path: Path | str, **data) -> Path:
        raw = {
            "name": "catalogue",
            "data": {
                "source": source,
                "path": str(path),
                "image_size": 16,
                "cache_dir": str(self.tmp / "cache"),
                **data,
            },
            "tracking": {"root": str(self.store)},
        }
        if "report" in StudyConfig.model_fields:
            raw["report"] = {"auto": False}
        return self.study(yaml.safe_dump(raw))


def invoke(argv: list[str]) -> int:
    """Run an ``agelab`` command function as ``agelab.cli.main`` does, but let the error
    propagate (main prints it as one line and exits 2: see test_cli_prints_one_line)."""
    args, extra = cli.build_parser().parse_known_args(argv)
    if extra:
        args.overrides = [*args.overrides, *extra]
    return int(args.func(args) or 0)


GOOD = 4


def manifest(ctx: Ctx, *rows: str, header: str = "path,age", good: int = GOOD) -> Path:
    """``ds/labels.csv``: ``good`` valid rows, then ``rows`` (the bad ones, from line
    ``good + 2``); ``images/extra.jpg`` exists but is not listed."""
    root = ctx.tmp / "ds"
    lines = [header]
    for i in range(good):
        write_image(root / "images" / f"img{i}.jpg", seed=i)
        lines.append(f"images/img{i}.jpg,{20 + 10 * i}")
    write_image(root / "images" / "extra.jpg", seed=9)  # unlisted: bad rows may name it
    path = root / "labels.csv"
    path.write_text("\n".join([*lines, *rows]) + "\n")
    return path


def with_file(rel: str, content: bytes, age: str = "30") -> Callable[[Ctx], Path]:
    """A manifest whose last row (line GOOD + 2) lists ``rel`` holding ``content``."""

    def build(ctx: Ctx) -> Path:
        path = manifest(ctx, f"{rel},{age}")
        (path.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        (path.parent / rel).write_bytes(content)
        return path

    return build


def run_config(text: str | bytes, *overrides: str, command: str = "run") -> Callable:
    def act(ctx: Ctx) -> int:
        study = ctx.study(fill(text, ctx) if isinstance(text, str) else text)
        return invoke([command, str(study), *(["--quiet"] if command == "run" else []), *overrides])

    return act


def run_data(build: Callable[[Ctx], Path], source: str = "csv", **data) -> Callable[[Ctx], int]:
    return lambda ctx: invoke(["run", str(ctx.data_study(source, build(ctx), **data)), "--quiet"])


def run_rows(*rows: str, header: str = "path,age", **data) -> Callable[[Ctx], int]:
    return run_data(lambda ctx: manifest(ctx, *rows, header=header), **data)


def run_manifest_bytes(content: bytes, **data) -> Callable[[Ctx], int]:
    def build(ctx: Ctx) -> Path:
        path = manifest(ctx, good=0)
        path.write_bytes(content)
        return path

    return run_data(build, **data)


def run_tracking(**tracking) -> Callable[[Ctx], int]:
    def act(ctx: Ctx) -> int:
        raw = {"name": "catalogue", "tracking": {"root": str(ctx.store), **tracking}}
        return invoke(["run", str(ctx.study(yaml.safe_dump(raw))), "--quiet"])

    return act


@dataclass
class Bad:
    item: str  # the line of the issue's catalogue this row belongs to
    what: str  # this input
    act: Callable[[Ctx], object]  # builds the input and runs the command on it
    error: type[Exception] | None  # None: accepted; the output must say ``says``
    says: tuple[str, ...]  # in the message; {tmp}, {study}, {csv} are filled in
    never: tuple[str, ...] = ()  # must not be in the message (secrets)
    within_s: float | None = None  # fails fast: returns within this many seconds
    after: Callable[[Ctx], None] | None = None  # further checks (nothing was executed...)
    command: bool = True  # act runs an agelab command (for the CLI-level test)
    slow: bool = False  # trains a study (more than ~5 s): marked slow


# --------------------------------------------------------------------- special inputs


def alias_bomb() -> str:
    """A "billion laughs" YAML: 9^9 values by aliases of aliases (a few hundred bytes)."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join([*lines, "name: *a8", ""])


def huge_grid() -> str:
    lrs = [round(1e-4 * (i + 1), 6) for i in range(400)]
    return yaml.safe_dump(
        {
            "name": "huge",
            "search": {
                "seeds": [0, 1, 2],
                "space": {"train.lr": lrs, "model.norm": ["batch", "group", "layer", "none"]},
            },
        }
    )


@contextlib.contextmanager
def silent_server():
    """A TCP port that accepts connections and never answers (a hung tracking server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def hung_server(ctx: Ctx) -> int:
    with silent_server() as port:
        return run_tracking(uri=f"http://127.0.0.1:{port}")(ctx)


class _Touch:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_checkpoint(ctx: Ctx) -> object:
    import torch

    from agelab.train import load_checkpoint

    path = ctx.tmp / "evil.pt"
    torch.save({"format": "agelab-checkpoint", "version": 1, "x": _Touch(ctx.tmp / "pwned")}, path)
    return load_checkpoint(path)


def pickled_cache_array(ctx: Ctx) -> object:
    from agelab.data import cache as C

    folder, fp = ctx.tmp / "cache", C.fingerprint("evil")
    key = C.entry_key("evil", fp)
    C.save_entry(folder, key, fp, {"images": np.zeros((2, 3, 4, 4), np.uint8)}, {})
    evil = np.empty(1, dtype=object)
    evil[0] = _Touch(ctx.tmp / "pwned")
    npy = folder / f"{key}.images.npy"
    np.save(npy, evil, allow_pickle=True)  # same name, an object array: pickle inside
    side = json.loads((folder / f"{key}.json").read_text())
    side["arrays"]["images"]["file_bytes"] = npy.stat().st_size  # pass the size check
    (folder / f"{key}.json").write_text(json.dumps(side))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        return C.load_entry(folder, key, fp)


def nothing_executed(ctx: Ctx) -> None:
    assert not (ctx.tmp / "pwned").exists(), "the payload ran"


# ------------------------------------------------------------ secrets, special files


def nothing_leaked(*secrets: str) -> Callable[[Ctx], None]:
    """After a row: no form of a secret (as written, %-encoded, form-encoded) in any file of
    the store (MLflow's database, artifacts, the Optuna journal, reports) or of the row's
    folder, the study file that holds it excepted."""

    def check(ctx: Ctx) -> None:
        forms = set()
        for secret in secrets:
            forms |= {secret, quote(secret, safe=""), quote_plus(secret)}
        needles = {f.encode() for f in forms}
        files = [f for d in (ctx.store, ctx.tmp) if d.exists() for f in d.rglob("*")]
        scanned = 0
        for f in files:
            if f.is_file() and f.name != "study.yaml" and not f.is_symlink():
                data = f.read_bytes()
                scanned += 1
                leaked = [n for n in needles if n in data]
                assert not leaked, f"{f} holds {leaked}"
        assert scanned or not ctx.store.exists(), "nothing was scanned"

    return check


def with_env(act: Callable[[Ctx], object], **env: str) -> Callable[[Ctx], object]:
    """``act`` with environment variables set (restored after)."""

    def run(ctx: Ctx) -> object:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return act(ctx)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return run


def pg(password: str, db: str = "optuna", query: str = "") -> str:
    """A PostgreSQL URI on a closed port (refused at once) with ``password``."""
    return f"postgresql://agelab:{password}@127.0.0.1:9/{db}{query}"


def fifo_listed(ctx: Ctx) -> Path:
    path = manifest(ctx, "images/pipe.jpg,30")
    os.mkfifo(path.parent / "images" / "pipe.jpg")
    return path


def fifo_manifest(ctx: Ctx) -> Path:
    path = manifest(ctx).with_name("pipe.csv")
    os.mkfifo(path)
    return path


def socket_listed(ctx: Ctx) -> Path:
    path = manifest(ctx, "images/sock.jpg,30")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path.parent / "images" / "sock.jpg"))
    sock.close()  # the socket file stays
    return path


def fifo_in_folder(ctx: Ctx) -> Path:
    root = ctx.tmp / "utk"
    for i in range(GOOD):
        write_image(root / f"{20 + i}_0_0_2017010{i}.jpg", seed=i)
    os.mkfifo(root / "30_0_0_20170109.jpg")
    return root


def fifo_study(ctx: Ctx) -> int:
    os.mkfifo(ctx.tmp / "pipe.yaml")
    return invoke(["config", str(ctx.tmp / "pipe.yaml")])


def fgnet_with(name: str) -> Callable[[Ctx], Path]:
    def build(ctx: Ctx) -> Path:
        root = ctx.tmp / "fg"
        for i in range(GOOD):
            write_image(root / f"00{i}A1{i}.JPG", seed=i)
        write_image(root / name, seed=9)
        return root

    return build


def utk_with(name: str) -> Callable[[Ctx], Path]:
    def build(ctx: Ctx) -> Path:
        root = ctx.tmp / "utk"
        for i in range(GOOD):
            write_image(root / f"{20 + i}_0_0_2017010{i}.jpg", seed=i)
        write_image(root / name, seed=9)
        return root

    return build


def inspect_rows(*rows: str, copies: dict[str, str] | None = None, link: bool = False):
    """``agelab data inspect`` of a manifest with ``rows`` appended; ``copies`` maps a new
    file to the listed image it duplicates (a byte copy, or a hard link with ``link``)."""

    def act(ctx: Ctx) -> int:
        path = manifest(ctx, *rows)
        for new, original in (copies or {}).items():
            target = path.parent / new
            if link:
                os.link(path.parent / original, target)
            else:
                shutil.copyfile(path.parent / original, target)
        return invoke(["data", "inspect", "csv", str(path)])

    return act


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def leak_study(ctx: Ctx) -> int:
    """A whole study (one tiny trial and its report) whose Optuna storage URI and description
    carry passwords: accepted, and recorded masked everywhere."""
    storage = (
        f"sqlite:///file:{ctx.tmp}/optuna.db?mode=rwc&password={quote(LEAK_PW, safe='')}&uri=true"
    )
    raw = tiny_study(
        ctx.tmp,
        name="leaky",
        description=f"mirror of postgresql://ana:{LEAK_PW}@db.example/faces",
        data={"image_size": 16, "cache_dir": str(ctx.tmp / "cache"),
              "synthetic": {"n_images": 40, "images_per_subject": 2, "seed": 0}},
        search={"seeds": [0], "space": {"model.norm": ["batch"]}},
        tracking={"root": str(ctx.tmp / "mlruns"), "log_figures": False, "storage": storage},
    )  # fmt: skip
    return invoke(["run", str(ctx.study(yaml.safe_dump(raw, allow_unicode=True))), "--quiet"])


LEAK_PW = "le@k pä/ss:w%rd"


# ------------------------------------------------------------------------------- table

SECRETS = "secrets in URIs, messages and the store"
PATHS = "names that become paths"
STRICT = "strict, finite config values"
AGES = "ages as plain ASCII numbers"
QUOTING = "CSV quoting"
SPECIAL = "special files"
DUPLICATES = "duplicate images"
IDENTITY = "a re-run with another config"
STORES = "corrupt or missing stores"


def tiny_run(*args: str) -> Callable[[Ctx], int]:
    """A tiny study ``ident`` on the row's own store (two cells), run with ``args``."""

    def act(ctx: Ctx) -> int:
        raw = tiny_study(ctx.tmp, "ident", search={"space": {"model.norm": ["batch", "none"]}})
        raw["data"]["cache_dir"] = str(ctx.tmp / "cache")
        raw["report"] = {"auto": False}
        return invoke(["run", str(ctx.study(yaml.safe_dump(raw))), "--quiet", *args])

    return act


def ran_then(*changes: str) -> Callable[[Ctx], int]:
    """The tiny study run once as written, then again with ``changes``."""

    def act(ctx: Ctx) -> int:
        assert tiny_run()(ctx) == 0
        return tiny_run(*changes)(ctx)

    return act


def trained_only_once(ctx: Ctx) -> None:
    """Nothing of the refused run reached the stores: still the first run's two trials."""
    client = MlflowClient(f"sqlite:///{ctx.tmp / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ident").experiment_id])
    assert sorted(r.data.tags["agelab.run_kind"] for r in runs) == ["study", "trial", "trial"]


def garbled_journal(ctx: Ctx) -> int:
    journal = ctx.tmp / "mlruns" / "optuna" / "journal.log"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"op_code": 0, "worker_id": "w", "study_name" oops}\n')
    return tiny_run()(ctx)


def not_a_database(ctx: Ctx) -> int:
    (ctx.tmp / "mlruns").mkdir(parents=True)
    (ctx.tmp / "mlruns" / "mlflow.db").write_bytes(b"this is no SQLite file" * 100)
    return tiny_run()(ctx)


HINT_SKIP = "or set data.on_bad=skip"
LINE = "{csv} line 6"  # the header is line 1, GOOD = 4 good rows, then the bad one
EVIL_YAML = "name: !!python/object/apply:os.system ['touch {tmp}/pwned']\n"

# fmt: off
CATALOGUE = [
    # ------------------------------------------------------------ study files (YAML)
    Bad("malformed YAML", "unclosed bracket", run_config("name: x\ntrain: {epochs: 3\n"),
        ConfigError, ("{study}", "malformed YAML at line 3", "flow mapping started at line 2",
                      "close brackets and quotes")),
    Bad("malformed YAML", "tab indentation", run_config("name: x\ntrain:\n\tepochs: 3\n"),
        ConfigError, ("{study}", "malformed YAML at line 3", "'\\t'", "spaces, not tabs")),
    Bad("malformed YAML", "empty file", run_config(""), ConfigError,
        ("{study}", "file is empty", "a study needs at least `name:`")),
    Bad("malformed YAML", "a list, not a mapping", run_config("- just\n- a list\n"),
        ConfigError, ("{study}", "top level must be a mapping")),
    Bad("malformed YAML", "not UTF-8", run_config(b"name: caf\xe9\n"), ConfigError,
        ("{study}", "not UTF-8 text")),
    Bad("malformed YAML", "alias bomb (billion laughs)", run_config(alias_bomb()), ConfigError,
        ("{study}", "more than 100,000 values", "YAML aliases"), within_s=5),
    Bad("malformed YAML", "study file missing",
        lambda ctx: (ctx.study("name: a\n"), invoke(["run", str(ctx.tmp / "b.yaml")])),
        ConfigError, ("{tmp}/b.yaml", "file not found; studies in {tmp}: study.yaml")),
    Bad("malformed YAML", "several problems at once",
        run_config("name: x\ntrain: {epochs: 0, lr: -1}\n"), ConfigError,
        ("train.epochs", "train.lr")),
    Bad("unknown keys", "misspelt field", run_config("name: x\ntrain: {epoch: 3}\n"),
        ConfigError, ("{study}", "train.epoch: unknown key; valid keys here:", "epochs")),
    Bad("unknown keys", "misspelt section", run_config("name: x\ntrian: {}\n"), ConfigError,
        ("{study}", "trian: unknown key; valid keys here: name")),
    Bad("unknown keys", "in an override", run_config("name: x\n", "train.epoch=3"),
        ConfigError, ("{study} with overrides train.epoch=3", "train.epoch: unknown key")),
    Bad("unknown keys", "search space key not a field",
        run_config("name: x\nsearch: {space: {model.colour: [red]}}\n"), ConfigError,
        ("search.space key 'model.colour' is not a field",)),
    Bad("unknown keys", "search space key outside data/model/train",
        run_config("name: x\nsearch: {space: {tracking.root: [a]}}\n"), ConfigError,
        ("must be a dotted path into data/model/train",)),
    Bad("wrong types", "text for an integer", run_config("name: x\ntrain: {epochs: many}\n"),
        ConfigError, ("{study}", "train.epochs", "valid integer", "(got 'many')")),
    Bad("wrong types", "a list for a number", run_config("name: x\ntrain: {lr: [0.1]}\n"),
        ConfigError, ("train.lr", "valid number")),
    Bad("wrong types", "a number for a list", run_config("name: x\nsearch: {seeds: 3}\n"),
        ConfigError, ("search.seeds", "valid list")),
    Bad("wrong types", "override into a value", run_config("name: x\n", "name.x=1"),
        ConfigError, ("'name.x=1'", "'name' is a value, not a section")),
    Bad("wrong types", "override not key=value", run_config("name: x\n", "epochs2"),
        ConfigError, ("'epochs2' is not key=value (e.g. train.epochs=2)",)),
    Bad("wrong types", "study name with spaces", run_config("name: bad name!\n"), ConfigError,
        ("name", "pattern")),
    Bad("wrong types", "name missing", run_config("description: no name\n"), ConfigError,
        ("name: required field is missing",)),
    Bad("wrong types", "a range in a grid",
        run_config("name: x\nsearch: {space: {train.lr: {low: 0.001, high: 0.01}}}\n"),
        ConfigError, ("a grid needs a list of values", "use sampler: random or tpe")),
    Bad("wrong types", "random search without n_trials",
        run_config("name: x\nsearch: {sampler: random, space: {train.lr: [0.1]}}\n"),
        ConfigError, ("search.n_trials is required for sampler 'random'",)),
    Bad("wrong types", "splits not summing to 1",
        run_config("name: x\ndata: {split: {train: 0.8, calib: 0.3, test: 0.1}}\n"),
        ConfigError, ("train + calib + conformal + test must sum to 1",)),
    Bad("wrong types", "duplicate replicate seeds",
        run_config("name: x\nsearch: {seeds: [1, 1]}\n"), ConfigError,
        ("replicate seeds must be distinct",)),
    Bad("unknown backbone/norm/act/source", "backbone",
        run_config("name: x\nmodel: {backbone: resnet19}\n"), ConfigError,
        ("model.backbone", "unknown backbone 'resnet19'; close matches: resnet18")),
    Bad("unknown backbone/norm/act/source", "norm",
        run_config("name: x\nmodel: {norm: batchnorm}\n"), ConfigError,
        ("model.norm", "unknown norm 'batchnorm'; valid choices:", "group")),
    Bad("unknown backbone/norm/act/source", "act", run_config("name: x\nmodel: {act: swish}\n"),
        ConfigError, ("model.act", "unknown act 'swish'; valid choices:", "tanh")),
    Bad("unknown backbone/norm/act/source", "source",
        run_config("name: x\ndata: {source: imdb}\n"), ConfigError,
        ("data.source", "unknown source 'imdb'; valid choices:", "utkface")),
    Bad("unknown backbone/norm/act/source", "loss", run_config("name: x\ntrain: {loss: mape}\n"),
        ConfigError, ("train.loss", "unknown loss 'mape'", "dex")),
    Bad("unknown backbone/norm/act/source", "a bad value inside the search space",
        run_config("name: x\nsearch: {space: {model.norm: [batch, bogus]}}\n"), ConfigError,
        ("search.space.model.norm: value 'bogus'", "unknown norm")),
    Bad("empty or huge grids", "an empty choice list",
        run_config("name: x\nsearch: {space: {model.norm: []}}\n"), ConfigError,
        ("search.space.model.norm is an empty list: the grid would be empty",)),
    Bad("empty or huge grids", "no seeds", run_config("name: x\nsearch: {seeds: []}\n"),
        ConfigError, ("search.seeds", "at least 1")),
    Bad("empty or huge grids", "4,800 trials: a warning with the count and the time",
        run_config(huge_grid(), command="config"), None,
        ("warning: 4,800 trials planned (1,600 cells × 3 seed(s))", "search.warn_cells = 500",
         "days with one worker at ~", "per trial (rough estimate",
         "Shrink search.space or search.seeds", "--workers N")),
    Bad("non-positive epochs/batch", "epochs 0", run_config("name: x\ntrain: {epochs: 0}\n"),
        ConfigError, ("train.epochs", "greater than or equal to 1", "(got 0)")),
    Bad("non-positive epochs/batch", "batch 0", run_config("name: x\ntrain: {batch_size: 0}\n"),
        ConfigError, ("train.batch_size", "greater than or equal to 1")),
    Bad("non-positive epochs/batch", "batch -4", run_config("name: x\n", "train.batch_size=-4"),
        ConfigError, ("train.batch_size", "greater than or equal to 1", "(got -4)")),
    Bad("lr out of range", "lr 5", run_config("name: x\ntrain: {lr: 5}\n"), ConfigError,
        ("train.lr", "less than or equal to 1")),
    Bad("lr out of range", "lr 0", run_config("name: x\ntrain: {lr: 0}\n"), ConfigError,
        ("train.lr", "greater than 0")),
    Bad("lr out of range", "lr -0.001 in a search range",
        run_config("name: x\nsearch: {sampler: random, n_trials: 2, "
                   "space: {train.lr: {low: -0.001, high: 0.01}}}\n"), ConfigError,
        ("search.space.train.lr: value -0.001", "greater than 0")),
    # ----------------------------------------------------------------------- data
    Bad("data path missing", "csv source without data.path",
        run_config("name: x\ndata: {source: csv}\n"), ConfigError,
        ("data.path is required for source 'csv'", "data.path=/path/labels.csv")),
    Bad("data path missing", "manifest not there", run_data(lambda ctx: ctx.tmp / "nope.csv"),
        DataError, ("manifest {tmp}/nope.csv does not exist (check data.path)",)),
    Bad("data path missing", "image folder not there",
        run_data(lambda ctx: ctx.tmp / "UTKFace", "utkface"), DataError,
        ("utkface folder {tmp}/UTKFace does not exist (check data.path)",)),
    Bad("data path missing", "a folder given for a manifest",
        run_data(lambda ctx: manifest(ctx).parent), DataError,
        ("{tmp}/ds is a folder", "use data.path={tmp}/ds/labels.csv")),
    Bad("empty dataset", "header only", run_data(lambda ctx: manifest(ctx, good=0)), DataError,
        ("{csv} has a header but no rows",)),
    Bad("empty dataset", "zero-byte manifest", run_manifest_bytes(b""), DataError,
        ("{csv} is empty; a manifest needs a header line (path,age)",)),
    Bad("empty dataset", "empty image folder",
        run_data(lambda ctx: (ctx.tmp / "UTKFace").mkdir() or ctx.tmp / "UTKFace", "utkface"),
        DataError, ("no utkface images in {tmp}/UTKFace", "expected names like",
                    "(found: no files)")),
    Bad("all rows bad", "every file missing (on_bad=skip)",
        run_data(lambda ctx: manifest(ctx, "a.jpg,3", "b.jpg,4", good=0), on_bad="skip"),
        DataError, ("no usable images in {csv}: all 2 row(s) are bad", "2 × missing file",
                    "e.g. {csv} line 2 (a.jpg)")),
    Bad("all rows bad", "every image undecodable (on_bad=skip)",
        run_data(lambda ctx: html_pages(ctx, "a.jpg", "b.jpg"), on_bad="skip"),
        DataError, ("no usable images in {csv}: all 2 row(s) are bad", "2 × not an image")),
    Bad("corrupt/zero-byte/truncated images", "zero-byte", run_data(with_file("images/z.jpg", b"")),
        DataError, (LINE + " (images/z.jpg)", "zero-byte file", "re-copy or re-download",
                    HINT_SKIP)),
    Bad("corrupt/zero-byte/truncated images", "truncated JPEG",
        run_data(with_file("images/cut.jpg", jpeg_bytes()[:300])), DataError,
        (LINE + " (images/cut.jpg)", "truncated image", "ends early", HINT_SKIP)),
    Bad("corrupt/zero-byte/truncated images", "corrupt JPEG body",
        run_data(with_file("images/bad.jpg", jpeg_bytes()[:200] + bytes(range(256)) * 12)),
        DataError, (LINE + " (images/bad.jpg)", "unreadable or corrupt image", HINT_SKIP)),
    Bad("non-image files with image extensions", "text saved as .jpg",
        run_data(with_file("images/notes.jpg", b"this is not a picture\n")), DataError,
        (LINE + " (images/notes.jpg)", "not an image", "replace it with the real image")),
    Bad("non-image files with image extensions", "an HTML error page saved as .png",
        run_data(with_file("images/page.png", b"<!doctype html><h1>403 Forbidden</h1>")),
        DataError, (LINE + " (images/page.png)", "not an image")),
    Bad("ages out of range", "negative", run_rows("images/extra.jpg,-2"), DataError,
        (LINE, "negative age", "age -2 is below 0", "fix the label")),
    Bad("ages out of range", "above max_age", run_rows("images/extra.jpg,121"), DataError,
        (LINE, "age above max_age", "max_age=120", "raise data.max_age if the age is real")),
    Bad("ages out of range", "not a number", run_rows("images/extra.jpg,thirty"), DataError,
        (LINE, "age is not a number", "'thirty'")),
    Bad("ages out of range", "NaN", run_rows("images/extra.jpg,nan"), DataError,
        (LINE, "'nan' is not a finite number")),
    Bad("ages out of range", "empty", run_rows("images/extra.jpg,"), DataError,
        (LINE, "missing age", "fill in the age or remove the row")),
    Bad("ages out of range", "UTKFace name with age 130",
        run_data(lambda ctx: (write_image(ctx.tmp / "utk" / "130_0_0_20170101.jpg"),
                              ctx.tmp / "utk")[1], "utkface"),
        DataError, ("130_0_0_20170101.jpg", "age 130 is above max_age=120")),
    Bad("CSV with BOM / wrong delimiter / missing columns", "UTF-8 BOM (Excel): accepted",
        lambda ctx: invoke(["data", "inspect", "csv", str(bom_manifest(ctx))]), None,
        ("usable: 4   bad: 0",)),
    Bad("CSV with BOM / wrong delimiter / missing columns", "UTF-16 (with its BOM)",
        run_manifest_bytes("path,age\na.jpg,3\n".encode("utf-16")), DataError,
        ("{csv} is UTF-16 text; save it as UTF-8 CSV",)),
    Bad("CSV with BOM / wrong delimiter / missing columns", "semicolons",
        run_manifest_bytes(b"path;age\nimages/a.jpg;3\n"), DataError,
        ("{csv} is separated by semicolons, not commas", "sep=';'")),
    Bad("CSV with BOM / wrong delimiter / missing columns", "tabs",
        run_manifest_bytes(b"path\tage\nimages/a.jpg\t3\n"), DataError,
        ("{csv} is separated by tabs, not commas",)),
    Bad("CSV with BOM / wrong delimiter / missing columns", "age column missing",
        run_manifest_bytes(b"path,years\na.jpg,3\n"), DataError,
        ("{csv} is missing column(s) age; found columns: 'path', 'years'",
         "Required: path, age")),
    Bad("CSV with BOM / wrong delimiter / missing columns", "no header line",
        run_manifest_bytes(b"a.jpg,3\nb.jpg,4\n"), DataError,
        ("first line looks like data: add a header line such as path,age,subject",)),
    Bad("CSV with BOM / wrong delimiter / missing columns", "an unquoted comma in a path",
        run_rows("images/a,b.jpg,30"), DataError,
        (LINE, "wrong number of fields", "quote fields that contain commas")),
    Bad("paths escaping the root", "../../etc/passwd", run_rows("../" * 30 + "etc/passwd,30"),
        DataError, (LINE, "path escapes the dataset root", "resolves to /etc/passwd, outside",
                    "keep images inside the dataset folder")),
    Bad("paths escaping the root", "absolute /etc/passwd", run_rows("/etc/passwd,30"),
        DataError, (LINE, "absolute path '/etc/passwd'; write it relative to {tmp}/ds")),
    Bad("paths escaping the root", "a symlink out of the folder",
        run_data(lambda ctx: symlink_out(ctx)), DataError,
        (LINE, "'images/link.jpg' is a symlink to", "outside")),
    # ------------------------------------------------------------------ the stores
    Bad("unwritable store", "tracking.root under a file", lambda ctx: blocked_store(ctx),
        StoreError, ("cannot write to the tracking folder {tmp}/blocker/mlruns",
                     "Free some space or fix its permissions", "tracking.root")),
    Bad("tracking URI unreachable", "HTTP server refusing",
        run_tracking(uri="http://user:secret@127.0.0.1:9"), StoreError,
        ("MLflow tracking server http://user:***@127.0.0.1:9 is unreachable",
         "unset MLFLOW_TRACKING_URI"), never=("secret",), within_s=10),
    Bad("tracking URI unreachable", "HTTP server never answering", hung_server, StoreError,
        ("MLflow tracking server http://127.0.0.1:", "is unreachable", "timed out"),
        within_s=10),
    Bad("tracking URI unreachable", "PostgreSQL store refusing (password with '/')",
        run_tracking(uri="postgresql+psycopg2://agelab:pa/ss@127.0.0.1:9/mlflow"), StoreError,
        ("MLflow tracking store postgresql+psycopg2://agelab:***@127.0.0.1:9/mlflow is "
         "unreachable (127.0.0.1:9: Connection refused)", "start the database"),
        never=("pa/ss",), within_s=10),
    Bad("tracking URI unreachable", "Optuna storage on PostgreSQL refusing",
        run_tracking(storage="postgresql://agelab:s3cret@127.0.0.1:9/optuna"), StoreError,
        ("Optuna storage postgresql://agelab:***@127.0.0.1:9/optuna is unreachable",),
        never=("s3cret",), within_s=10),
    # --------------------------------------------------------------- unsafe files
    Bad("unsafe files", "YAML with a python tag", run_config(EVIL_YAML), ConfigError,
        ("{study}", "YAML tag not allowed", "python/object/apply:os.system", "remove the !tag"),
        after=nothing_executed),
    Bad("unsafe files", "checkpoint carrying a pickled callable", pickled_checkpoint,
        CheckpointError,
        ("checkpoint {tmp}/evil.pt is corrupt or not a torch file", "Weights only"),
        after=nothing_executed, command=False),
    Bad("unsafe files", "cached array replaced by a pickled object array",
        pickled_cache_array, CacheWarning,
        ("is corrupt", "does not load", "allow_pickle=False", "rebuilding"),
        after=nothing_executed, command=False),
    # ------------------------------------------------- secrets (URIs of every shape)
    Bad(SECRETS, "storage password with spaces and unicode",
        run_tracking(storage=pg("pa ss wörd")), StoreError,
        ("Optuna storage postgresql://agelab:***@127.0.0.1:9/optuna is unreachable",),
        never=("pa ss", "wörd", "pa%20ss"), within_s=10, after=nothing_leaked("pa ss wörd")),
    Bad(SECRETS, "tracking-server password with a space (urllib echoes the URL)",
        run_tracking(uri="http://ana:pa ss-h1dden@127.0.0.1:9"), StoreError,
        ("MLflow tracking server http://ana:***@127.0.0.1:9 is unreachable",),
        never=("pa ss", "h1dden"), within_s=10, after=nothing_leaked("pa ss-h1dden")),
    Bad(SECRETS, "password of non-ASCII letters", run_tracking(storage=pg("pässwörd€")),
        StoreError, ("postgresql://agelab:***@127.0.0.1:9/optuna is unreachable",),
        never=("pässwörd€", "p%C3%A4ssw"), within_s=10, after=nothing_leaked("pässwörd€")),
    Bad(SECRETS, "%-escaped password", run_tracking(storage=pg("p%40ss%2Fw0rd")), StoreError,
        ("postgresql://agelab:***@127.0.0.1:9/optuna is unreachable",),
        never=("p%40ss%2Fw0rd", "p@ss/w0rd"), within_s=10, after=nothing_leaked("p@ss/w0rd")),
    Bad(SECRETS, "unencoded '@' in the password", run_tracking(storage=pg("h@ck3d!")),
        StoreError, ("postgresql://agelab:***@127.0.0.1:9/optuna: the password holds an '@'",
                     "write it as %40"), never=("h@ck3d",), within_s=10),
    Bad(SECRETS, "?password= query parameter",
        run_tracking(storage="postgresql://agelab@127.0.0.1:9/optuna?password=qu3ry-pw"),
        StoreError, ("postgresql://agelab@127.0.0.1:9/optuna?password=*** is unreachable",),
        never=("qu3ry-pw",), within_s=10, after=nothing_leaked("qu3ry-pw")),
    Bad(SECRETS, "?sslpassword= beside a password",
        run_tracking(storage=pg("pw-0ne", query="?sslmode=require&sslpassword=k3y-pw")),
        StoreError, ("postgresql://agelab:***@127.0.0.1:9/optuna?sslmode=require&sslpassword=***",),
        never=("k3y-pw", "pw-0ne"), within_s=10, after=nothing_leaked("k3y-pw", "pw-0ne")),
    Bad(SECRETS, "token as the user of an HTTPS URI",
        run_tracking(uri="https://ghp_T0kenValue@127.0.0.1:9"), StoreError,
        ("MLflow tracking server https://***@127.0.0.1:9 is unreachable",),
        never=("ghp_T0kenValue",), within_s=10, after=nothing_leaked("ghp_T0kenValue")),
    Bad(SECRETS, "?token= and api_key= in an HTTP URI",
        run_tracking(uri="http://127.0.0.1:9/?token=t0k-value&api_key=ap1-value"), StoreError,
        ("MLflow tracking server http://127.0.0.1:9/?token=***&api_key=*** is unreachable",),
        never=("t0k-value", "ap1-value"), within_s=10),
    Bad(SECRETS, "$MLFLOW_TRACKING_URI with a password",
        with_env(run_tracking(), MLFLOW_TRACKING_URI="postgresql+psycopg2://agelab:env pw!@"
                 "127.0.0.1:9/mlflow"), StoreError,
        ("MLflow tracking store postgresql+psycopg2://agelab:***@127.0.0.1:9/mlflow is "
         "unreachable",), never=("env pw",), within_s=10, after=nothing_leaked("env pw!")),
    Bad(SECRETS, "$AGELAB_OPTUNA_STORAGE with a password",
        with_env(run_tracking(), AGELAB_OPTUNA_STORAGE=pg("env%20pw0rd")), StoreError,
        ("Optuna storage postgresql://agelab:***@127.0.0.1:9/optuna is unreachable",),
        never=("env%20pw0rd", "env pw0rd"), within_s=10),
    Bad(SECRETS, "password in a URI SQLAlchemy cannot parse",
        run_tracking(storage="postgresql://agelab:p4rse-pw@127.0.0.1:notaport/optuna"),
        StoreError, ("Optuna storage postgresql://agelab:***@127.0.0.1:notaport/optuna is not "
                     "a valid database URI",), never=("p4rse-pw",), within_s=10),
    Bad(SECRETS, "a whole study with passwords in its storage URI and description",
        leak_study, None, ("password=***",), never=(LEAK_PW, quote(LEAK_PW, safe="")),
        after=nothing_leaked(LEAK_PW), slow=True),
    # ------------------------------------------------------ names that become paths
    Bad(PATHS, "tracking.experiment=../../x",
        run_config("name: x\n", "tracking.experiment=../../x"), ConfigError,
        ("tracking.experiment: '../../x' cannot be an experiment name",
         "without / or \\", "not starting with '.'"),
        after=lambda ctx: not (ctx.tmp.parent / "x").exists() or pytest.fail("escaped")),
    Bad(PATHS, "an absolute experiment name",
        run_config("name: x\ntracking: {experiment: /tmp/elsewhere}\n"), ConfigError,
        ("tracking.experiment: '/tmp/elsewhere' cannot be",)),
    Bad(PATHS, "a folder inside the experiment name",
        run_config("name: x\ntracking: {experiment: team/x}\n"), ConfigError,
        ("tracking.experiment: 'team/x' cannot be",)),
    Bad(PATHS, "experiment '..'", run_config("name: x\ntracking: {experiment: '..'}\n"),
        ConfigError, ("tracking.experiment: '..' cannot be",)),
    Bad(PATHS, "a hidden experiment name",
        run_config("name: x\ntracking: {experiment: .hidden}\n"), ConfigError,
        ("tracking.experiment: '.hidden' cannot be",)),
    Bad(PATHS, "a newline in the experiment name",
        run_config('name: x\ntracking: {experiment: "a\\nb"}\n'), ConfigError,
        ("tracking.experiment: 'a\\nb' cannot be", "control characters")),
    Bad(PATHS, "spaces and brackets in an experiment name: accepted",
        run_config("name: x\ntracking: {experiment: My study (v2)}\n", command="config"), None,
        ("experiment: My study (v2)",)),
    Bad(PATHS, "agelab report with a path for the study name",
        lambda ctx: invoke(["report", "../../x", "--root", str(ctx.store)]), ConfigError,
        ("study '../../x'", "name: String should match pattern")),
    Bad(PATHS, "an experiment folder built from a name that skipped validation",
        lambda ctx: default_artifact_location(TrackingConfig(root=ctx.tmp), "../../x"),
        ConfigError, ("tracking.experiment", "'../../x' cannot be an MLflow experiment's"),
        command=False),
    Bad(PATHS, "a NUL byte in data.path", run_config('name: x\ndata: {path: "a\\0b.csv"}\n'),
        ConfigError, ("data.path: 'a\\x00b.csv' holds a NUL byte",)),
    # ------------------------------------------------------------- strict config
    Bad(STRICT, "a key given twice", run_config("name: x\ntrain:\n  epochs: 2\n  epochs: 3\n"),
        ConfigError, ("{study}", "duplicate key 'epochs' at line 4, column 3 (first given at "
                      "line 3, column 3)", "remove or rename one of them")),
    Bad(STRICT, "a section given twice", run_config("name: x\ntrain: {}\nname: y\n"),
        ConfigError, ("duplicate key 'name' at line 3, column 1 (first given at line 1",)),
    Bad(STRICT, "a key twice in a flow mapping",
        run_config("name: x\ntrain: {lr: 0.1, lr: 0.01}\n"), ConfigError,
        ("duplicate key 'lr' at line 2, column 18",)),
    Bad(STRICT, "a key twice in an override value",
        run_config("name: x\n", "model={norm: batch, norm: none}"), ConfigError,
        ("(command line)", "duplicate key 'norm'")),
    Bad(STRICT, "a merge key overridden: accepted",
        run_config("name: x\ntrain:\n  <<: {epochs: 2, lr: 0.01}\n  epochs: 3\n",
                   command="config"), None, ("epochs: 3", "lr: 0.01")),
    Bad(STRICT, "nesting 5,000 levels deep", run_config(f"name: x\ntrain: {deep(5000)}\n"),
        ConfigError, ("{study}", "nested far more than 32 levels deep"), within_s=5),
    Bad(STRICT, "nesting 40 levels deep", run_config(f"name: x\ndata: {deep(40)}\n"),
        ConfigError, ("data: nested more than 32 levels deep",)),
    Bad(STRICT, "nesting 5,000 levels deep in an override",
        run_config("name: x\n", f"train.lr={deep(5000)}"), ConfigError,
        ("train.lr: nested far more than 32 levels deep",), within_s=5),
    Bad(STRICT, "infinite warm-up", run_config("name: x\ntrain: {warmup_epochs: .inf}\n"),
        ConfigError, ("train.warmup_epochs: Input should be a finite number (got inf)",)),
    Bad(STRICT, "infinite label-noise scale",
        run_config("name: x\ndata: {synthetic: {label_noise: {kind: normal, scale: .inf}}}\n"),
        ConfigError, ("data.synthetic.label_noise.scale: Input should be a finite number",)),
    Bad(STRICT, "an infinite age band edge",
        run_config("name: x\nmetrics: {age_bands: [0, 50, .inf]}\n"), ConfigError,
        ("metrics.age_bands.2: Input should be a finite number",)),
    Bad(STRICT, "NaN learning rate", run_config("name: x\n", "train.lr=.nan"), ConfigError,
        ("train.lr: Input should be a finite number",)),
    Bad(STRICT, "an infinite end of a search range",
        run_config("name: x\nsearch: {sampler: random, n_trials: 2, "
                   "space: {train.lr: {low: 0.001, high: .inf}}}\n"), ConfigError,
        ("search.space.train.lr.high: Input should be a finite number",)),
    Bad(STRICT, "infinite stratification band",
        run_config("name: x\ndata: {split: {band_width: .inf}}\n"), ConfigError,
        ("data.split.band_width: Input should be a finite number",)),
    Bad(STRICT, "infinite gradient clip", run_config("name: x\ntrain: {grad_clip: .inf}\n"),
        ConfigError, ("train.grad_clip: Input should be a finite number",)),
    Bad(STRICT, "an infinite value in a grid",
        run_config("name: x\nsearch: {space: {train.lr: [0.001, .inf]}}\n"), ConfigError,
        ("search.space.train.lr: value inf: Input should be a finite number",)),
    Bad(STRICT, "negative seed", run_config("name: x\n", "train.seed=-1"), ConfigError,
        ("train.seed: seed -1 does not fit the random generators: use 0 … 4,294,967,295",)),
    Bad(STRICT, "split seed of 2**32",
        run_config("name: x\ndata: {split: {seed: 4294967296}}\n"), ConfigError,
        ("data.split.seed: seed 4294967296 does not fit",)),
    Bad(STRICT, "a replicate seed of 2**40",
        run_config("name: x\nsearch: {seeds: [0, 1099511627776]}\n"), ConfigError,
        ("search.seeds.1: seed 1099511627776 does not fit",)),
    Bad(STRICT, "negative sampler seed", run_config("name: x\n", "search.sampler_seed=-7"),
        ConfigError, ("search.sampler_seed: seed -7 does not fit",)),
    Bad(STRICT, "synthetic-data seed of 2**64",
        run_config("name: x\ndata: {synthetic: {seed: 18446744073709551616}}\n"), ConfigError,
        ("data.synthetic.seed: seed 18446744073709551616 does not fit",)),
    Bad(STRICT, "the largest 32-bit seed: accepted",
        run_config("name: x\n", "train.seed=4294967295", command="config"), None,
        ("seed: 4294967295",)),
    Bad(STRICT, "a grid value twice", run_config("name: x\n",
        "search.space.model.norm=[batch, batch]"), ConfigError,
        ("search.space.model.norm lists 'batch' twice", "train the same cell twice")),
    Bad(STRICT, "one grid value written two ways",
        run_config("name: x\nsearch: {space: {train.lr: [0.001, 1.0e-3]}}\n"), ConfigError,
        ("search.space.train.lr lists 0.001 twice",)),
    Bad(STRICT, "2 and 2.0 in a grid",
        run_config("name: x\nsearch: {space: {train.epochs: [2, 2.0]}}\n"), ConfigError,
        ("search.space.train.epochs lists 2.0 twice (as 2)",)),
    # ----------------------------------------------------------- ages as written
    Bad(AGES, "Arabic-Indic digits", run_rows("images/extra.jpg,٣٠"), DataError,
        (LINE, "age is not a number", "'٣٠' is not a plain decimal number (non-ASCII digits)",
         "digits 0-9")),
    Bad(AGES, "full-width digits", run_rows("images/extra.jpg,３０"), DataError,
        (LINE, "'３０' is not a plain decimal number (non-ASCII digits)",)),
    Bad(AGES, "exponent notation", run_rows("images/extra.jpg,1e1"), DataError,
        (LINE, "'1e1' is not a plain decimal number (exponent notation)",)),
    Bad(AGES, "digit separator", run_rows("images/extra.jpg,3_0"), DataError,
        (LINE, "'3_0' is not a plain decimal number (digit separators)",)),
    Bad(AGES, "decimal comma", run_rows('images/extra.jpg,"30,5"'), DataError,
        (LINE, "'30,5' is not a plain decimal number (digit separators)",)),
    Bad(AGES, "infinity", run_rows("images/extra.jpg,inf"), DataError,
        (LINE, "'inf' is not a finite number",)),
    Bad(AGES, "a plus sign", run_rows("images/extra.jpg,+30"), DataError,
        (LINE, "'+30' is not a plain decimal number (a plus sign)",)),
    Bad(AGES, "hexadecimal", run_rows("images/extra.jpg,0x1E"), DataError,
        (LINE, "'0x1E' is not a plain decimal number",)),
    Bad(AGES, "400 digits", run_rows("images/extra.jpg," + "9" * 400), DataError,
        (LINE, "age above max_age", "age 999999999999999999999999999999999999999…")),
    Bad(AGES, "spaces around a CSV age: accepted",
        inspect_rows("images/extra.jpg,  30 "), None, ("usable: 5   bad: 0",)),
    Bad(AGES, "UTKFace name with an exponent",
        run_data(utk_with("1e1_0_0_20170109.jpg"), "utkface"), DataError,
        ("1e1_0_0_20170109.jpg", "'1e1' is not a plain decimal number")),
    Bad(AGES, "FG-NET name with Arabic-Indic digits",
        run_data(fgnet_with("009A٣٠.JPG"), "fgnet"), DataError,
        ("009A٣٠.JPG", "name does not match pattern")),
    # ---------------------------------------------------------------- CSV quoting
    Bad(QUOTING, "a quote left open in the middle",
        run_rows('"images/extra.jpg,30', "images/img0.jpg,31", "images/img1.jpg,32"), DataError,
        (LINE + ": bad quoting: a quote opened here is never closed (it runs to the end, "
         "line 8)", "every row after it would be misread")),
    Bad(QUOTING, "a quote closed lines later",
        run_rows('images/extra.jpg,"30', 'images/img0.jpg",31'), DataError,
        (LINE + ": bad quoting: a quote opened in column 'age' closes only on line 7",)),
    Bad(QUOTING, "text after a closing quote", run_rows('"images/extra".jpg,30'), DataError,
        (LINE + ": bad quoting: the quoting is malformed", "expected after")),
    Bad(QUOTING, "a quote left open, under on_bad=skip",
        run_rows('"images/extra.jpg,30', "images/img0.jpg,31", on_bad="skip"), DataError,
        (LINE + ": bad quoting",)),
    # -------------------------------------------------------------- special files
    Bad(SPECIAL, "a FIFO as the manifest", run_data(fifo_manifest), DataError,
        ("manifest {tmp}/ds/pipe.csv is a FIFO (named pipe), not a file",
         "give the CSV file itself"), within_s=5),
    Bad(SPECIAL, "a FIFO listed as an image", run_data(fifo_listed), DataError,
        (LINE + " (images/pipe.jpg): not a regular file", "is a FIFO (named pipe)",
         "list image files only"), within_s=5),
    Bad(SPECIAL, "a FIFO named like a UTKFace image", run_data(fifo_in_folder, "utkface"),
        DataError, ("30_0_0_20170109.jpg: not a regular file", "FIFO"), within_s=5),
    Bad(SPECIAL, "a FIFO listed, under on_bad=skip: skipped",
        lambda ctx: invoke(["data", "inspect", "csv", str(fifo_listed(ctx))]), None,
        ("usable: 4   bad: 1", "1 × not a regular file"), within_s=10),
    Bad(SPECIAL, "a socket listed as an image", run_data(socket_listed), DataError,
        (LINE + " (images/sock.jpg): not a regular file", "is a socket"), within_s=5),
    Bad(SPECIAL, "a character device as the manifest", run_data(lambda ctx: Path("/dev/zero")),
        DataError, ("manifest /dev/zero is a character device, not a file",), within_s=5),
    Bad(SPECIAL, "a FIFO as the study file", fifo_study, ConfigError,
        ("{tmp}/pipe.yaml", "is a FIFO (named pipe), not a study file"), within_s=5),
    Bad(SPECIAL, "a NUL byte in a CSV path", run_rows("images/ex\0tra.jpg,30"), DataError,
        (LINE, "NUL byte in path", "'images/ex\\x00tra.jpg' holds a NUL byte"), within_s=5),
    # ---------------------------------------------------------- duplicate images
    Bad(DUPLICATES, "a copied image: counted, kept in one split",
        inspect_rows("images/copy.jpg,20", copies={"images/copy.jpg": "images/img0.jpg"}),
        None, ("usable: 5", "1 duplicate image(s): byte-identical copies in 1 group(s)",
               "kept in one split", "images/img0.jpg = images/copy.jpg")),
    Bad(DUPLICATES, "a hard link: counted",
        inspect_rows("images/link.jpg,20", copies={"images/link.jpg": "images/img0.jpg"},
                     link=True), None, ("1 duplicate image(s)",)),
    Bad(DUPLICATES, "copies with different ages",
        inspect_rows("images/copy.jpg,55", copies={"images/copy.jpg": "images/img1.jpg"}),
        None, ("1 group(s) carry different ages: check those labels", "(ages 30, 55)")),
    # ---------------------------------------------------------------- identity and stores
    Bad(IDENTITY, "training setting changed", ran_then("train.epochs=2", "train.lr=0.002"),
        StudyConfigChanged, ("study 'ident' was run with another config",
        "train.epochs: 1 → 2", "train.lr: 0.001 → 0.002", "--new-version", "name=<new name>"),
        after=trained_only_once, slow=True),
    Bad(IDENTITY, "different data", ran_then("data.synthetic.seed=5"), StudyConfigChanged,
        ("data.synthetic.seed: 0 → 5", "data.fingerprint:"), after=trained_only_once, slow=True),
    Bad(IDENTITY, "--join a study nobody started", tiny_run("--join"), StoreError,
        ("no study 'ident' to join", "start it with `agelab run` on one machine first")),
    Bad(IDENTITY, "--join with --new-version", tiny_run("--join", "--new-version"), ConfigError,
        ("--new-version and --join exclude each other",)),
    Bad(STORES, "Optuna journal with a garbled record", garbled_journal, StoreError,
        ("the Optuna journal {tmp}/mlruns/optuna/journal.log is corrupt at line 1",
         "Restore a backup", "move it aside")),
    Bad(STORES, "MLflow store that is not a database", not_a_database, StoreError,
        ("the MLflow store {tmp}/mlruns/mlflow.db is corrupt", "move it aside",
         "re-runs the cells whose runs are gone")),
    Bad(STORES, "check of a study that does not exist",
        lambda ctx: invoke(["check", "nobody", "--root", str(ctx.tmp / "mlruns")]), StoreError,
        ("no study 'nobody' in the Optuna storage", "versions are <name>.v2")),
]
# fmt: on


def bom_manifest(ctx: Ctx) -> Path:
    path = manifest(ctx)
    path.write_bytes(path.read_text().replace("\n", "\r\n").encode("utf-8-sig"))
    return path


def html_pages(ctx: Ctx, *names: str) -> Path:
    path = manifest(ctx, *(f"{n},{30 + i}" for i, n in enumerate(names)), good=0)
    for name in names:
        (path.parent / name).write_bytes(b"<!doctype html><h1>404 Not Found</h1>")
    return path


def symlink_out(ctx: Ctx) -> Path:
    path = manifest(ctx, "images/link.jpg,30")
    write_image(ctx.tmp / "elsewhere.jpg")
    (path.parent / "images" / "link.jpg").symlink_to(ctx.tmp / "elsewhere.jpg")
    return path


def blocked_store(ctx: Ctx) -> int:
    blocker = ctx.tmp / "blocker"
    blocker.write_text("a file where the store folder should be")
    raw = {"name": "catalogue", "tracking": {"root": str(blocker / "mlruns")}}
    return invoke(["run", str(ctx.study(yaml.safe_dump(raw))), "--quiet"])


def fill(text: str, ctx: Ctx) -> str:
    return (
        text.replace("{csv}", str(ctx.tmp / "ds" / "labels.csv"))
        .replace("{study}", str(ctx.tmp / "study.yaml"))
        .replace("{tmp}", str(ctx.tmp))
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("catalogue-store") / "mlruns"


def row_id(row: Bad) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{row.item} {row.what}".lower()).strip("-")


def run_row(row: Bad, ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> str:
    """The message (or, for accepted inputs, the output) of one row."""
    t0 = time.monotonic()
    if row.error is None:
        row.act(ctx)
        out = capsys.readouterr()
        text = out.out + out.err
    else:
        with pytest.raises(row.error) as info:
            row.act(ctx)
        text = str(info.value)
    if row.within_s is not None:
        assert time.monotonic() - t0 < row.within_s, "did not fail fast"
    return text


def _marked(row: Bad):
    """Rows that wait out a server's silence take their timeout: marked slow."""
    slow = row.act is hung_server or row.slow
    return pytest.param(row, id=row_id(row), marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("row", [_marked(r) for r in CATALOGUE])
def test_bad_input(row: Bad, tmp_path: Path, store: Path, capsys) -> None:
    ctx = Ctx(tmp_path, store)
    text = run_row(row, ctx, capsys)
    for fragment in row.says:
        assert fill(fragment, ctx) in text, f"{fill(fragment, ctx)!r} not in:\n{text}"
    for secret in row.never:
        assert secret not in text
    if row.after:
        row.after(ctx)


def test_catalogue_covers_the_issue_list() -> None:
    """Every kind of bad input the reliability issue lists has at least one row."""
    items = {
        "malformed YAML",
        "unknown keys",
        "wrong types",
        "unknown backbone/norm/act/source",
        "empty or huge grids",
        "non-positive epochs/batch",
        "lr out of range",
        "data path missing",
        "empty dataset",
        "all rows bad",
        "corrupt/zero-byte/truncated images",
        "non-image files with image extensions",
        "ages out of range",
        "CSV with BOM / wrong delimiter / missing columns",
        "paths escaping the root",
        "unwritable store",
        "tracking URI unreachable",
        "unsafe files",
        # issue 14
        SECRETS,
        PATHS,
        STRICT,
        AGES,
        QUOTING,
        SPECIAL,
        DUPLICATES,
        IDENTITY,
        STORES,
    }
    assert {row.item for row in CATALOGUE} == items
    assert len({row_id(r) for r in CATALOGUE}) == len(CATALOGUE)
    print(f"{len(CATALOGUE)} bad inputs in {len(items)} kinds")


# One row per error type: what `agelab` itself prints.
CLI_ROWS = [
    next(r for r in CATALOGUE if r.error is t and r.command and r.within_s is None)
    for t in (ConfigError, DataError, StoreError)
]


@pytest.mark.parametrize("row", CLI_ROWS, ids=row_id)
def test_cli_prints_one_line_and_exits_2(
    row: Bad, tmp_path: Path, store: Path, capsys, monkeypatch
) -> None:
    """``agelab`` turns each user-fixable error type into its message and exit code 2."""
    ctx = Ctx(tmp_path, store)
    argv: list[str] = []
    # Build the row's input and record its command line instead of running it...
    monkeypatch.setattr(sys.modules[__name__], "invoke", lambda args: argv.extend(args) or 0)
    row.act(ctx)
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(argv) == 2  # ...then run it as the `agelab` command does
    err = capsys.readouterr().err
    assert err.startswith("agelab: ") and "Traceback" not in err
    for fragment in row.says:
        assert fill(fragment, ctx) in err


# ------------------------------------------------------------ property-based: config

FIELDS = sorted(flatten(validate({"name": "x"})))
SECTIONS = sorted({k.split(".")[0] for k in FIELDS} | {"name", "description"})
LEAVES = sorted({k.split(".")[-1] for k in FIELDS})

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["batch", "relu", "csv", "grid", "resnet10t", "1e-3", "-1", "[]"])
)
yamlish = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(SECTIONS + LEAVES) | st.text(max_size=6), inner, max_size=5
        )
    ),
    max_leaves=20,
)
overrides = st.lists(
    st.tuples(
        st.sampled_from(FIELDS) | st.text(max_size=12),
        st.text(max_size=12) | st.sampled_from(["0", "-3", "[a, b]", "{x: 1}", "null", "'", "1e9"]),
    ).map(lambda kv: f"{kv[0]}={kv[1]}"),
    max_size=3,
)


def _load_or_config_error(text: bytes, ov: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="agelab-fuzz-") as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_bytes(text)
        try:
            cfg = load_config(path, ov)
        except ConfigError as exc:
            assert str(path) in str(exc) or "(command line)" in str(exc)
        else:
            assert isinstance(cfg, StudyConfig)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.fixed_dictionaries({"name": st.sampled_from(["x", "bad name", ""])}, optional={})
    | st.dictionaries(st.sampled_from(SECTIONS), yamlish, max_size=4),
    sections=st.dictionaries(st.sampled_from(SECTIONS[:6]), yamlish, max_size=3),
    ov=overrides,
)
def test_config_loader_only_raises_config_error(raw, sections, ov) -> None:
    """Any YAML mapping, with any overrides: a StudyConfig or a ConfigError, nothing else."""
    text = yaml.safe_dump({**raw, **sections}, allow_unicode=True).encode()
    _load_or_config_error(text, ov)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_loader_survives_any_bytes(text: bytes) -> None:
    _load_or_config_error(b"name: x\n" + text, [])


# ----------------------------------------------------------- property-based: metrics

DOCUMENTED = re.compile(
    r"is None|must be numeric|1-D array|is empty|non-finite|beyond|length mismatch|"
    r"too few points|was given without|must hold at least 2"
)
wild = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
ages = st.floats(-1e7, 1e7, allow_nan=False, allow_infinity=False)
vectors = st.integers(0, 12).flatmap(
    lambda n: hnp.arrays(np.float64, n, elements=st.one_of(ages, wild))
) | hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(2, 3)), elements=ages)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=vectors,
    p=vectors,
    calib=st.booleans(),
    fn=st.sampled_from(
        [
            "evaluate",
            "point_metrics",
            "coverage_summary",
            "cs_curve",
            "normality",
            "age_band_table",
            "conformal_intervals",
        ]
    ),
)
def test_metrics_only_raise_documented_errors(t, p, calib, fn) -> None:
    """Random, extreme, non-finite, empty, mismatched or 2-D inputs to every public metrics
    function: a result, or a ValueError with one of the documented messages."""
    calls = {
        "evaluate": lambda: M.evaluate(t, p, *((t[::-1], p[::-1]) if calib else (None, None))),
        "point_metrics": lambda: M.point_metrics(t, p),
        "coverage_summary": lambda: M.coverage_summary(p - t if t.shape == p.shape else p),
        "cs_curve": lambda: M.cs_curve(p),
        "normality": lambda: M.normality(p, t if calib else None),
        "age_band_table": lambda: M.age_band_table(t, p),
        "conformal_intervals": lambda: M.conformal_intervals(t, p, t, p),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in p - t: the input
        try:
            result = calls[fn]()
        except ValueError as exc:
            assert DOCUMENTED.search(str(exc)), f"{fn}: undocumented error {exc}"
            return
    if fn == "evaluate":
        assert all(type(v) is float for v in result.scalars.values())


# ------------------------------------------------------------------------------ safety

SRC = REPO / "src" / "agelab"


def test_loaders_in_the_source_never_unpickle() -> None:
    """torch.load only with weights_only=True, np.load only with allow_pickle=False, YAML
    only with safe_load, and no pickle/marshal/shelve/eval on files at all."""
    unsafe, loads = [], 0
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"\b(torch\.load|np\.load|numpy\.load)\(", text):
            call, depth = m.group(0), 1
            for ch in text[m.end() :]:  # the call up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(ch, 0)
                call += ch
                if depth == 0:
                    break
            loads += 1
            safe = "weights_only=True" if m.group(1) == "torch.load" else "allow_pickle=False"
            if safe not in call:
                unsafe.append(f"{path.name}: {call}")
        for pattern in (
            r"yaml\.(load|unsafe_load|full_load)\(",
            r"yaml\.(Unsafe|Full)?Loader\b",
            r"\bimport (pickle|marshal|shelve|dill|cloudpickle)\b",
            r"\b(pickle|joblib)\.load",
            r"(?<![\w.])eval\(",
        ):
            unsafe += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not unsafe, unsafe
    # train.py, models/weights.py (torch), data/cache.py (numpy): the check has targets
    assert loads >= 3


def test_params_and_tags_hold_no_home_path_or_password(tmp_path: Path, monkeypatch) -> None:
    """A real SQLite MLflow store: a study under the home folder with passwords in its
    store URIs records ~/... and *** only (params, tags and run names)."""
    from mlflow.tracking import MlflowClient

    from agelab.tracking import Tracker, default_uri

    home = tmp_path / "home" / "ana"
    monkeypatch.setenv("HOME", str(home))
    password = "pa/ss:w@rd"
    cfg = validate(
        {
            "name": "secrets",
            "data": {"cache_dir": str(home / "cache"), "path": str(home / "faces")},
            "tracking": {
                "root": str(home / "mlruns"),
                "storage": f"postgresql+psycopg2://ana:{password}@db.example/optuna",
                "artifact_location": f"s3://ana:{password}@minio/bucket",
            },
        }
    )
    tracker = Tracker(cfg.tracking, cfg.name)
    run = tracker.start_run(
        f"run in {home}",
        tags={"optuna.storage": cfg.tracking.storage, "agelab.cache": str(home / "cache")},
    )
    tracker.log_params(run, flatten(cfg))
    tracker.set_tags(run, {"agelab.data": f"{home}/faces", "note": f"see {home}"})
    got = MlflowClient(default_uri(cfg.tracking)).get_run(run)
    recorded = {**got.data.params, **got.data.tags}
    leaks = {k: v for k, v in recorded.items() if str(home) in v or "w@rd" in v or "pa/ss" in v}
    assert not leaks, leaks
    assert recorded["tracking.root"] == "~/mlruns"
    assert recorded["data.cache_dir"] == "~/cache" and recorded["note"] == "see ~"
    assert recorded["tracking.storage"] == "postgresql+psycopg2://ana:***@db.example/optuna"
    assert recorded["tracking.artifact_location"] == "s3://ana:***@minio/bucket"


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("postgresql://u:pa/ss@host/db", "postgresql://u:***@host/db"),
        (
            "postgresql+psycopg2://u:p@ss:w/rd@h:5432/db?ssl=1",
            "postgresql+psycopg2://u:***@h:5432/db?ssl=1",
        ),
        ("mysql://u@h/db", "mysql://u@h/db"),
        ("http://u:pw@127.0.0.1:5000", "http://u:***@127.0.0.1:5000"),
        ("http://127.0.0.1:5000/x@y", "http://127.0.0.1:5000/x@y"),
        ("sqlite:////home/a/mlflow.db", "sqlite:////home/a/mlflow.db"),
        ("db?user=u&password=pw&x=1", "db?user=u&password=***&x=1"),
        (
            "a postgresql://u:p1@h/a and mysql://v:p2@g/b",
            "a postgresql://u:***@h/a and mysql://v:***@g/b",
        ),
    ],
)
def test_mask_uri(uri: str, masked: str) -> None:
    from agelab.secrets import mask_uri

    assert mask_uri(uri) == masked


def test_uis_bind_loopback_unless_exposed(capsys) -> None:
    """`make ui` / `make dashboard` default to 127.0.0.1; another host needs --expose."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^HOST\s*\?=\s*127\.0\.0\.1$", makefile, re.M)
    for command in ("ui", "dashboard"):
        assert cli.main([command, "--host", "0.0.0.0"]) == 2
        assert "refusing to bind 0.0.0.0" in capsys.readouterr().err
        args = cli.build_parser().parse_args([command])
        assert args.host == "127.0.0.1" and not args.expose
