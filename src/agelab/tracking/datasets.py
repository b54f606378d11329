"""What a run trained and was scored on, as MLflow dataset inputs (the UI's Datasets column).

A run's datasets are small pandas tables of the manifest rows (``index``, ``age``,
``subject``, and ``path`` for real data), never the images: MLflow keeps only their name,
source, digest, schema and profile, and one ``log_inputs`` call records all of a run's.

* **name** ``<study>-<split>`` for a trial's splits (context tag ``train`` / ``calib`` /
  ``conformal`` / ``test``), ``<study>`` for the whole dataset on the study's parent run
  (context ``all``).
* **digest** the dataset fingerprint's first 12 hex digits, then for a split its name and
  8 hex digits of its members (replicates that vary the split get distinct digests):
  ``3f2a9c0d1b7e-train-5d41402a``; the whole dataset's is the 12 digits alone.
* **source** the data path (home shortened to ``~``, passwords masked), or
  ``synthetic:<seed>`` for the built-in synthetic faces.
* **profile** rows, subjects, the age summary and the full fingerprint.

Only the tables are built here from plain arrays; the caller owns the data.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from agelab.secrets import scrub

if TYPE_CHECKING:
    import pandas as pd

    from agelab.config import DataConfig

#: A trial's splits, in the order its run lists them (the MLflow context tag of each).
SPLIT_CONTEXTS = ("train", "calib", "conformal", "test")
#: The context tag of the whole dataset (the study's parent run).
WHOLE_CONTEXT = "all"
FINGERPRINT_DIGITS = 12


class SplitData(Protocol):
    """What :func:`split_datasets` reads of a dataset (``agelab.data.FaceDataset`` fits)."""

    ages: np.ndarray
    subjects: np.ndarray
    split: np.ndarray
    paths: np.ndarray | None
    fingerprint: str


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset input of a run, ready to log (:meth:`agelab.tracking.Tracker.log_datasets`)."""

    name: str
    context: str
    digest: str
    source: str
    table: pd.DataFrame
    profile: dict[str, Any]


def data_source(cfg: DataConfig) -> str:
    """Where the data comes from, as a run may record it: ``synthetic:<seed>`` or the path."""
    if cfg.path is None:
        return f"{cfg.source}:{cfg.synthetic.seed}"
    return scrub(str(cfg.path))


def manifest_table(
    index: np.ndarray, ages: np.ndarray, subjects: np.ndarray, paths: np.ndarray | None
) -> pd.DataFrame:
    """The manifest rows of a dataset (or a split of it): row index, age, subject, path."""
    import pandas as pd

    table = pd.DataFrame(
        {
            "index": np.asarray(index, dtype=np.int64),
            "age": np.asarray(ages, dtype=np.float64),
            "subject": np.asarray(subjects).astype(str),
        }
    )
    if paths is not None:
        table["path"] = np.asarray(paths).astype(str)
    return table


def profile(table: pd.DataFrame, fingerprint: str) -> dict[str, Any]:
    """Size and age summary of a manifest table (what the UI shows as the profile)."""
    ages = table["age"].to_numpy(dtype=np.float64)
    summary: dict[str, Any] = {
        "num_rows": len(table),
        "num_subjects": int(table["subject"].replace("", np.nan).nunique()),
    }
    if len(ages):
        summary |= {
            "age_min": round(float(ages.min()), 3),
            "age_median": round(float(np.median(ages)), 3),
            "age_mean": round(float(ages.mean()), 3),
            "age_max": round(float(ages.max()), 3),
            "age_std": round(float(ages.std()), 3),
        }
    return summary | {"fingerprint": fingerprint}


def members_digest(index: np.ndarray) -> str:
    """8 hex digits naming which rows a split holds."""
    return hashlib.sha256(np.asarray(index, dtype=np.int64).tobytes()).hexdigest()[:8]


def split_datasets(study: str, source: str, data: SplitData) -> list[DatasetRecord]:
    """A trial's non-empty splits, one record each (train, calib, conformal, test)."""
    fp = data.fingerprint
    records = []
    for split in SPLIT_CONTEXTS:
        index = np.flatnonzero(np.asarray(data.split) == split)
        if not len(index):
            continue  # conformal: 0
        paths = None if data.paths is None else data.paths[index]
        table = manifest_table(index, data.ages[index], data.subjects[index], paths)
        digest = f"{fp[:FINGERPRINT_DIGITS]}-{split}-{members_digest(index)}"
        records.append(
            DatasetRecord(f"{study}-{split}", split, digest, source, table, profile(table, fp))
        )
    return records


def whole_dataset(study: str, source: str, data: SplitData) -> DatasetRecord:
    """The whole dataset, before any split (the study's parent run)."""
    index = np.arange(len(data.ages))
    table = manifest_table(index, data.ages, data.subjects, data.paths)
    fp = data.fingerprint
    return DatasetRecord(
        study, WHOLE_CONTEXT, fp[:FINGERPRINT_DIGITS], source, table, profile(table, fp)
    )


def dataset_inputs(records: Sequence[DatasetRecord]) -> list:
    """MLflow ``DatasetInput`` entities of ``records`` (names and sources scrubbed)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source, table_dataset = _classes()
    inputs = []
    for rec in records:
        dataset = table_dataset(
            rec.table, source(scrub(rec.source)), scrub(rec.name), rec.digest, rec.profile
        )
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=rec.context)]
        with warnings.catch_warnings():  # about models fed missing integers: not a dataset's
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column")
            entity = dataset._to_mlflow_entity()
        inputs.append(DatasetInput(dataset=entity, tags=tags))
    return inputs


@functools.cache
def _classes() -> tuple[type, type]:
    """MLflow's dataset classes subclassed for agelab; built on first use (mlflow is imported
    lazily, as everywhere in :mod:`agelab.tracking`)."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.pandas_dataset import PandasDataset

    class Source(DatasetSource):
        """A path or ``synthetic:<seed>``, shown by the UI as a local source's URI."""

        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "local"

        def load(self, **kwargs):
            raise NotImplementedError("agelab loads its data itself (agelab.data)")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any):
            raise NotImplementedError

        def to_dict(self) -> dict[str, str]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[str, str]):
            return cls(source_dict["uri"])

    class TableDataset(PandasDataset):
        """A pandas dataset whose profile is agelab's (size and age summary)."""

        def __init__(self, df, source, name, digest, summary):
            self._summary = summary
            super().__init__(df, source, targets="age", name=name, digest=digest)

        @property
        def profile(self) -> dict[str, Any]:
            return self._summary

    return Source, TableDataset
