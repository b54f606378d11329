"""The two browsers over a study: MLflow's UI (runs, metrics, figures) and optuna-dashboard
(the search). Both bind to loopback unless the user explicitly exposes them: neither has
authentication, and anyone who reaches them can read and change the runs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

from agelab.config import StudyConfig, TrackingConfig
from agelab.secrets import mask_uri
from agelab.tracking import default_uri

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind_allowed(host: str, expose: bool, who: str) -> bool:
    """UIs bind to loopback unless the user explicitly exposes them (they have no auth)."""
    if host in LOOPBACK or expose:
        return True
    print(
        f"{who}: refusing to bind {host}: it has no authentication and anyone who reaches it "
        "can read and change your runs. Pass --expose to do it anyway.",
        file=sys.stderr,
    )
    return False


def serve_ui(*, host: str, port: int, root: Path, expose: bool) -> int:
    """``mlflow ui`` over the default store, on loopback unless ``expose`` is given."""
    if not bind_allowed(host, expose, "agelab ui"):
        return 2
    uri = default_uri(TrackingConfig(root=root))
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        (root / "artifacts").resolve().as_uri(),
        "--host",
        host,
        "--port",
        str(port),
    ]
    print(f"MLflow UI on http://{host}:{port}  (store {mask_uri(uri)}; Ctrl-C stops)")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def serve_dashboard(*, host: str, port: int, root: Path, storage: str | None, expose: bool) -> int:
    """optuna-dashboard over the study storage (default: the journal under ``root``)."""
    if not bind_allowed(host, expose, "agelab dashboard"):
        return 2
    from optuna_dashboard import run_server

    from agelab.study import open_storage, storage_url

    url = storage or storage_url(StudyConfig(name="x", tracking={"root": root}))
    print(f"optuna-dashboard on http://{host}:{port}  (storage {mask_uri(url)}; Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        run_server(open_storage(url), host=host, port=port)
    return 0
