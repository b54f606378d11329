"""MLflow Models of agelab runs: logging a trial's model, loading one, the Model Registry.

A trial's model is an MLflow 3 *logged model* (``models:/<model_id>``, linked to the trial's
run and shown on its "Logged models" tab) in pyfunc format, saved as **models from code**:
the model's code is the file :mod:`agelab.tracking.pyfunc_model` (MLflow keeps a copy with
the model and runs it to load), its weights an agelab checkpoint read with
``torch.load(weights_only=True)``, its preprocessing and conformal intervals JSON files.
Nothing of it is pickled. See ``docs/handoff.md``.

The run carries the model's id as the tag ``agelab.model_id``; the Registry's versions point
at ``models:/<model_id>`` (:func:`register`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agelab.errors import ModelError
from agelab.secrets import scrub
from agelab.tracking.store import env_kept, global_tracking_uri

if TYPE_CHECKING:
    from agelab.tracking.store import Tracker

#: The model's code: MLflow saves a copy with every model and executes it to load it.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_NAME = "model"  # the logged model's name within its run
MODEL_TYPE = "agelab-age-regressor"
TAG_MODEL_ID = "agelab.model_id"  # on the run: its logged model
#: The image input's columns (all optional; a row needs ``image`` or ``path``).
INPUT_COLUMNS = (("path", "string"), ("image", "string"))
BOX_COLUMNS = ("x", "y", "w", "h")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?$")


class ModelNotFound(ModelError):
    """A run, registered model, version or alias that has no MLflow Model; the message says
    why and what to do."""


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """No artifact progress bars, no "registered model" chatter while agelab works."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with env_kept("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
            yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------- logging


def signature(levels: Sequence[float]):
    """Input: ``path`` / ``image`` (strings) and a face box, all optional; output: ``age``
    and the interval bounds of ``levels``."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    from agelab.metrics.checks import pct

    inputs = [ColSpec(kind, name, required=False) for name, kind in INPUT_COLUMNS]
    inputs += [ColSpec("double", name, required=False) for name in BOX_COLUMNS]
    outputs = [ColSpec("double", "age")]
    outputs += [
        ColSpec("double", f"{side}_{pct(lv)}") for lv in levels for side in ("lower", "upper")
    ]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def png_base64(pixels: np.ndarray) -> str:
    """A uint8 [3, H, W] image as base64 of a PNG file (what a request's ``image`` holds)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def requirements() -> list[str]:
    """What the model needs installed (``pip_requirements``; with ``--env-manager local``
    the current environment is used as it is)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("agelab", "mlflow", "torch", "timm", "numpy", "pandas", "pillow"):
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{name}=={version(name)}")
    return out


@dataclass
class ModelFiles:
    """What :func:`log_model` logs besides the code: the checkpoint, and two JSON files."""

    checkpoint: Path
    preprocessing: dict[str, Any]
    conformal: dict[str, Any]
    example: np.ndarray  # uint8 [N, 3, S, S]: the input example (as base64 PNG files)


def log_model(
    tracker: Tracker, run_id: str, files: ModelFiles, *, step: int = 0, tags: dict | None = None
) -> str:
    """Log ``files`` as the MLflow Model of run ``run_id`` (a logged model linked to the run,
    its metrics at ``step``); returns the model id, also set as the run's tag
    ``agelab.model_id``."""
    import mlflow
    from mlflow.models import Model

    levels = [c["level"] for c in files.conformal.get("levels", []) if c.get("q") is not None]
    model = tracker._call(
        tracker.client.create_logged_model,
        tracker.experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        tags={k: scrub(v) for k, v in (tags or {}).items()},
        model_type=MODEL_TYPE,
    )
    example = {"image": [png_base64(p) for p in files.example]}
    with tempfile.TemporaryDirectory(prefix="agelab-model-") as tmp, _quiet_mlflow():
        # MLflow records where the files came from: a temporary folder, not the install's.
        code = Path(shutil.copy(MODEL_CODE, Path(tmp) / MODEL_CODE.name))
        pre, conf = Path(tmp) / "preprocessing.json", Path(tmp) / "conformal.json"
        pre.write_text(json.dumps(files.preprocessing, indent=2))
        conf.write_text(json.dumps(files.conformal, indent=2, allow_nan=False))
        with global_tracking_uri(tracker.uri), _failed_on_error(tracker, model.model_id):
            tracker._call(
                Model.log,
                artifact_path=None,  # deprecated, yet positional: name= names the model
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=model.model_id,
                step=step,
                python_model=str(code),
                artifacts={
                    "weights": str(files.checkpoint),
                    "preprocessing": str(pre),
                    "conformal": str(conf),
                },
                signature=signature(levels),
                input_example=_frame(example),
                pip_requirements=requirements(),
            )
    tracker._call(tracker.client.finalize_logged_model, model.model_id, "READY")
    tracker.set_tags(run_id, {TAG_MODEL_ID: model.model_id})
    return model.model_id


@contextlib.contextmanager
def _failed_on_error(tracker: Tracker, model_id: str) -> Iterator[None]:
    """A model whose files did not make it is marked FAILED (best effort), not left PENDING."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.client.finalize_logged_model(model_id, "FAILED")
        raise


def _frame(columns: dict[str, list]):
    import pandas as pd

    return pd.DataFrame(columns)


# ---------------------------------------------------------------------------- loading


def open_store(tracking) -> Tracker:
    """The store of ``tracking`` (``TrackingConfig``) for runs by id, in any experiment, and
    its Model Registry: a :class:`Tracker` on the experiment every MLflow store has."""
    from agelab.tracking.store import Tracker

    return Tracker(tracking, "Default", create=False)


def model_of_run(tracker: Tracker, run_id: str) -> str | None:
    """The id of a run's logged model (the latest one), or None when it logged none."""
    run = tracker.get_run(run_id)
    if run is None:
        return None
    tagged = run.data.tags.get(TAG_MODEL_ID)
    if tagged:
        return tagged
    outputs = getattr(run, "outputs", None)
    models = sorted(getattr(outputs, "model_outputs", None) or [], key=lambda m: m.step)
    return models[-1].model_id if models else None


def resolve_uri(tracker: Tracker, spec: str) -> str:
    """``models:/name@alias``, ``models:/name/3``, ``models:/<model_id>`` or a run id of this
    store → a model URI that exists; :class:`ModelNotFound` says what is missing."""
    if spec.startswith("models:/"):
        _check_model_uri(tracker, spec)
        return spec
    run = tracker.get_run(spec) if re.fullmatch(r"[0-9a-f]{32}", spec) else None
    if run is None:
        raise ModelNotFound(
            f"{spec!r} is not a run id of {tracker.display_uri}, a models:/ URI or a checkpoint "
            "file; give a trial run's id (MLflow UI, run page), models:/NAME@ALIAS after "
            "agelab register, or a model.pt"
        )
    model_id = model_of_run(tracker, spec)
    if model_id is None:
        raise ModelNotFound(no_model_message(spec, run.info.run_name))
    return f"models:/{model_id}"


def no_model_message(run_id: str, run_name: str | None = None) -> str:
    what = f"run {run_id}" + (f" ({run_name})" if run_name else "")
    return (
        f"{what} has no logged MLflow Model: with tracking.log_model=best (the default) only a "
        "trial that beat every earlier replicate of its cell logs one, and none with "
        "tracking.log_model=none. Re-run that trial's study with tracking.log_model=all in a "
        "new store or version (agelab run STUDY tracking.log_model=all --new-version), or "
        "choose a run that has one (its tag agelab.model_id)"
    )


def _check_model_uri(tracker: Tracker, uri: str) -> None:
    """A registered ``models:/name[@alias|/version]`` must exist: say which part does not."""
    from mlflow.exceptions import MlflowException

    m = _MODEL_URI.match(uri)
    if m is None:
        raise ModelNotFound(
            f"{uri!r} is not a model URI: write models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    name, alias, version = m["name"], m["alias"], m["version"]
    client = tracker.client
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif version:
            client.get_model_version(name, version)
        elif not name.startswith("m-"):
            client.get_registered_model(name)
        else:
            client.get_logged_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        have = ", ".join(sorted(r.name for r in client.search_registered_models())) or "none"
        part = f"alias {alias!r} of " if alias else f"version {version} of " if version else ""
        raise ModelNotFound(
            f"no {part}registered model {name!r} in {tracker.display_uri} (registered models: "
            f"{have}); register one with agelab register STUDY --name {name}"
        ) from None


def load_pyfunc(tracker: Tracker, uri: str):
    """The pyfunc model at ``uri`` (this store's tracking and registry): MLflow downloads it
    and executes its code file (a copy of :mod:`agelab.tracking.pyfunc_model`)."""
    import mlflow

    with global_tracking_uri(tracker.uri), _quiet_mlflow():
        return mlflow.pyfunc.load_model(uri)


def load_predictor(tracker: Tracker, spec: str):
    """``(predictor, model_uri)``: the :class:`~agelab.tracking.pyfunc_model.AgePredictor`
    inside the MLflow Model named by ``spec`` (see :func:`resolve_uri`)."""
    uri = resolve_uri(tracker, spec)
    model = load_pyfunc(tracker, uri)
    return model.unwrap_python_model().predictor, uri


# --------------------------------------------------------------------------- registry


def register(
    tracker: Tracker,
    run_id: str,
    name: str,
    *,
    alias: str | None = None,
    tags: dict[str, Any] | None = None,
    description: str | None = None,
):
    """A new version of registered model ``name`` (created when new) from run ``run_id``'s
    logged model, with ``tags`` and ``alias`` moved to it; returns the ModelVersion."""
    from mlflow.exceptions import MlflowException

    if alias:
        alias_ok(alias)
    model_id = model_of_run(tracker, run_id)
    if model_id is None:
        run = tracker.get_run(run_id)
        raise ModelNotFound(no_model_message(run_id, run.info.run_name if run else None))
    client = tracker.client
    tags = {k: scrub(v)[:5000] for k, v in (tags or {}).items()}
    try:
        tracker._call(client.create_registered_model, name, description=description)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # The registry resolves the source models:/<id> through the global tracking URI.
    with global_tracking_uri(tracker.uri), _quiet_mlflow():
        version = tracker._call(
            client.create_model_version,
            name,
            f"models:/{model_id}",
            run_id=run_id,
            tags=tags,
            description=description,
            model_id=model_id,
        )
    if alias:
        tracker._call(client.set_registered_model_alias, name, alias, version.version)
    return version


def alias_ok(alias: str) -> str:
    """An alias MLflow takes (checked before a version is made for it): letters, digits,
    ``_`` and ``-``; not ``latest`` nor ``v<number>``, which name versions."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    try:
        validation._validate_model_alias_name(alias)
        validation._validate_model_alias_name_reserved(alias)
    except MlflowException as exc:
        raise ModelError(
            f"{alias!r} cannot be an alias ({exc.message.splitlines()[0][:200]}); choose "
            "another --alias, e.g. champion"
        ) from None
    return alias


def registered_name_ok(name: str) -> str:
    """A registered model's name as MLflow and a ``models:/`` URI take it."""
    if not name or "/" in name or "@" in name or name != name.strip() or len(name) > 256:
        raise ModelError(
            f"{name!r} cannot name a registered model: use letters, digits, '.', '-', '_' "
            "(no '/', no '@'), e.g. --name age-regressor"
        )
    return name
