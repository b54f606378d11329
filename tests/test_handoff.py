"""The model handed on (issue 17): MLflow Models per trial, the Model Registry, ``agelab
predict`` and ``mlflow models serve``.

Real parts throughout: a real study on the 250-image face sample in a real SQLite MLflow
store, the pyfunc loaded by MLflow from that store, and a real ``mlflow models serve`` on a
loopback port, stopped with every process it started.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from agelab.cli import main
from agelab.config import StudyConfig, validate
from agelab.study import run_study
from agelab.tracking import Tracker
from helpers import FACES_SAMPLE
from helpers.images import jpeg_bytes, write_image
from helpers.studies import tiny_study

TOL = 1e-4  # years: predictions must equal the run's logged ones to this


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Study:
    cfg: StudyConfig
    tracker: Tracker
    trials: list  # the trial runs (MLflow Run objects), by trial number
    root: Path
    tmp: Path

    def artifact(self, run_id: str, name: str) -> Path:
        out = self.tmp / "downloads" / run_id
        path = self.tracker.download_artifact(run_id, name, out)
        assert path is not None, f"run {run_id} has no artifact {name}"
        return path


def _run(tmp: Path, name: str, cache: Path, **sections) -> Study:
    raw = tiny_study(tmp, name=name, **sections)
    raw["tracking"] = {**raw["tracking"], "root": str(tmp / "mlruns")}
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse cache is not set yet
        mp.setenv("AGELAB_CACHE_DIR", str(cache))
        cfg = validate(raw)
        summary = run_study(cfg, quiet=True)
    assert summary.counts["COMPLETE"] == cfg.search.n_total(), summary.counts
    tracker = Tracker(cfg.tracking, cfg.name, create=False)
    trials = [r for r in tracker.search() if r.data.tags.get("agelab.run_kind") == "trial"]
    trials.sort(key=lambda r: int(r.data.tags["agelab.trial_number"]))
    return Study(cfg, tracker, trials, tmp / "mlruns", tmp)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """norm {batch, none} × 2 seeds on the real sample, 32 px, 1 epoch; models by the default
    policy (best), checkpoints too."""
    if not (FACES_SAMPLE / "labels.csv").is_file():
        pytest.skip(f"real face sample not found at {FACES_SAMPLE}")
    return _run(
        tmp_path_factory.mktemp("faces"),
        "faces",
        tmp_path_factory.getbasetemp() / "agelab-cache",
        data={"source": "csv", "path": str(FACES_SAMPLE / "labels.csv"), "image_size": 32},
        search={"sampler": "grid", "seeds": [0, 1], "space": {"model.norm": ["batch", "none"]}},
        tracking={"log_figures": False, "log_checkpoint": True, "log_model": "best"},
    )


def model_id(run) -> str | None:
    return run.data.tags.get("agelab.model_id")


def objective(run) -> float:
    return run.data.metrics["best_calib_mae"]


def expected_champion(trials: list) -> object:
    """Independently of agelab.report: the cell with the lowest mean calib MAE, then its
    replicate with the lowest calib MAE."""
    cells: dict[str, list] = {}
    for r in trials:
        cells.setdefault(r.data.tags["agelab.cell"], []).append(r)
    best = min(cells.values(), key=lambda rs: np.mean([objective(r) for r in rs]))
    return min(best, key=objective)


@pytest.fixture(scope="module")
def registered(faces: Study, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``agelab register faces`` (by study name), then ``agelab predict
    models:/faces@champion labels.csv`` on the whole sample."""
    out = tmp_path_factory.mktemp("predict") / "preds.csv"
    code = main(["register", "faces", "--root", str(faces.root)])
    assert code == 0
    args = ["predict", "models:/faces@champion", str(FACES_SAMPLE / "labels.csv")]
    code_predict = main([*args, "--root", str(faces.root), "--out", str(out), "--quiet"])
    return {"code": code_predict, "table": pd.read_csv(out) if out.is_file() else None}


# ----------------------------------------------------------------- logging (the policy)


@pytest.mark.slow
def test_best_policy_logs_a_model_when_a_replicate_beats_its_cell(faces: Study) -> None:
    best_so_far: dict[str, float] = {}
    for run in faces.trials:  # in trial order: the order the worker decided in
        cell, value = run.data.tags["agelab.cell"], objective(run)
        beats = value < best_so_far.get(cell, math.inf)
        assert (model_id(run) is not None) == beats, (cell, value, best_so_far)
        best_so_far[cell] = min(value, best_so_far.get(cell, math.inf))
    cells = {r.data.tags["agelab.cell"] for r in faces.trials}
    n_models = sum(model_id(r) is not None for r in faces.trials)
    assert len(cells) <= n_models <= 2 * len(cells)
    for cell in cells:  # every cell's best replicate can be handed on
        best = min((r for r in faces.trials if r.data.tags["agelab.cell"] == cell), key=objective)
        assert model_id(best) is not None


@pytest.mark.slow
def test_the_logged_model_is_code_weights_and_json_nothing_pickled(faces: Study) -> None:
    run = next(r for r in faces.trials if model_id(r))
    client = faces.tracker.client
    logged = client.get_logged_model(model_id(run))
    assert logged.source_run_id == run.info.run_id and str(logged.status) == "READY"
    assert logged.tags["agelab.dataset_fingerprint"]
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [
        logged.model_id
    ]
    folder = Path(logged.artifact_location.removeprefix("file://"))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "artifacts/model.pt", "artifacts/preprocessing.json",
            "artifacts/conformal.json", "input_example.json"} <= files  # fmt: skip
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor  # the key of a cloudpickled model
    assert str(Path(__file__).parents[1]) not in (folder / "MLmodel").read_text()
    outputs = [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])]
    conformal = json.loads((folder / "artifacts/conformal.json").read_text())
    finite = [c for c in conformal["levels"] if c["q"] is not None]
    assert outputs == ["age"] + [
        f"{side}_{c['level'] * 100:.10g}" for c in finite for side in ("lower", "upper")
    ]
    for c in finite:  # the run's own intervals: the width it logged is 2q
        width = run.data.metrics[f"conformal_{c['level'] * 100:.10g}_width"]
        assert 2 * c["q"] == pytest.approx(width, rel=1e-6)
    pre = json.loads((folder / "artifacts/preprocessing.json").read_text())
    assert pre["image_size"] == 32 and pre["normalisation"]["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "expected"), [("all", 2), ("none", 0)])
def test_all_and_none_policies(
    policy: str, expected: int, tmp_path: Path, tmp_path_factory, capsys
) -> None:
    study = _run(
        tmp_path,
        f"p{policy}",
        tmp_path_factory.getbasetemp() / "agelab-cache",
        search={"sampler": "grid", "seeds": [0, 1], "space": {"model.norm": ["batch"]}},
        tracking={"log_figures": False, "log_predictions": False, "log_model": policy},
    )
    assert sum(model_id(r) is not None for r in study.trials) == expected
    if policy == "none":  # nothing to hand on: say why and how, on one line
        capsys.readouterr()
        assert main(["register", study.cfg.name, "--root", str(study.root)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "has no logged MLflow Model" in err, err
        assert "tracking.log_model=all" in err and "tracking.log_model=none" in err
        run_id = study.trials[0].info.run_id
        image = str(write_image(tmp_path / "face.jpg", (40, 40)))
        assert main(["predict", run_id, image, "--root", str(study.root)]) == 2
        assert f"run {run_id}" in capsys.readouterr().err


# -------------------------------------------------------------------- registry, predict


@pytest.mark.slow
def test_register_names_the_best_cells_best_replicate(faces: Study, registered: dict) -> None:
    client = faces.tracker.client
    version = client.get_model_version_by_alias("faces", "champion")
    champ = expected_champion(faces.trials)
    assert version.run_id == champ.info.run_id
    assert version.source == f"models:/{model_id(champ)}"  # the run's logged model
    tags, m = version.tags, champ.data.metrics
    assert tags["cell"] == champ.data.tags["agelab.cell"].replace("model.", "")
    assert float(tags["calib_mae"]) == pytest.approx(m["best_calib_mae"], abs=1e-4)
    assert float(tags["test_mae"]) == pytest.approx(m["mae"], abs=1e-4)
    assert float(tags["coverage_at_mae"]) == pytest.approx(m["coverage_at_mae"], abs=1e-4)
    assert float(tags["conformal_90_width"]) == pytest.approx(m["conformal_90_width"], abs=1e-4)
    assert tags["config_hash"] == champ.data.tags["agelab.config_hash"]
    logged = client.get_logged_model(model_id(champ))
    assert tags["dataset_fingerprint"] == logged.tags["agelab.dataset_fingerprint"]
    # Registering again makes version 2 and moves the alias to it.
    assert main(["register", "faces", "--root", str(faces.root)]) == 0
    assert str(client.get_model_version_by_alias("faces", "champion").version) == "2"


@pytest.mark.slow
def test_predict_reproduces_the_logged_predictions(faces: Study, registered: dict) -> None:
    assert registered["code"] == 0
    table = registered["table"]
    champ = expected_champion(faces.trials)
    logged = pd.read_csv(faces.artifact(champ.info.run_id, "predictions.csv"))
    assert len(table) == len(logged) == 250
    both = table.merge(logged, on="path", suffixes=("", "_logged"), validate="one_to_one")
    assert len(both) == 250
    np.testing.assert_allclose(both["age"], both["prediction"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(both["true_age"], both["true_age_logged"])
    np.testing.assert_allclose(both["residual"], both["age"] - both["true_age"], atol=1e-9)
    half = champ.data.metrics["conformal_90_width"] / 2
    np.testing.assert_allclose(both["upper_90"] - both["age"], half, rtol=1e-6)
    np.testing.assert_allclose(both["age"] - both["lower_90"], half, rtol=1e-6)


@pytest.mark.slow
def test_predict_by_run_id_on_a_folder_and_by_checkpoint(faces: Study, tmp_path: Path) -> None:
    run = next(r for r in faces.trials if model_id(r))
    logged = pd.read_csv(faces.artifact(run.info.run_id, "predictions.csv"))
    logged["name"] = logged["path"].map(lambda p: Path(p).name)
    folder = FACES_SAMPLE / "images"
    by_run, by_ckpt = tmp_path / "run.csv", tmp_path / "ckpt.csv"
    ckpt = faces.artifact(run.info.run_id, "model.pt")
    root = ["--root", str(faces.root), "--quiet"]
    assert main(["predict", run.info.run_id, str(folder), "--out", str(by_run), *root]) == 0
    assert main(["predict", str(ckpt), str(folder), "--out", str(by_ckpt), "--quiet"]) == 0
    for out, intervals in ((by_run, True), (by_ckpt, False)):
        table = pd.read_csv(out)
        assert len(table) == 250 and "true_age" not in table  # a folder has no ages
        assert ("lower_90" in table) == intervals  # a bare checkpoint has no intervals
        table["name"] = table["path"].map(lambda p: Path(p).name)
        both = table.merge(logged, on="name", validate="one_to_one")
        np.testing.assert_allclose(both["age"], both["prediction"], atol=TOL, rtol=0)


@pytest.mark.slow
def test_predict_names_a_model_that_is_not_there(faces: Study, registered: dict, capsys) -> None:
    root = ["--root", str(faces.root)]
    capsys.readouterr()
    assert main(["predict", "models:/nope@champion", str(FACES_SAMPLE), *root]) == 2
    err = capsys.readouterr().err
    assert "no alias 'champion' of registered model 'nope'" in err and "faces" in err
    assert main(["predict", "0" * 32, str(FACES_SAMPLE), *root]) == 2
    assert "is not a run id of" in capsys.readouterr().err


# ------------------------------------------------- the predictor without a study (fast)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """An untrained resnet10t at 32 px as a checkpoint (what tracking.log_checkpoint logs)."""
    from agelab.models import build_model
    from agelab.train import save_checkpoint

    model, census = build_model("resnet10t", "batch", "relu", img_size=32, seed=0)
    config = {"data": {"image_size": 32, "center_crop": 1.0}}
    return save_checkpoint(tmp_path / "model.pt", model, config, census)


def test_every_input_form_matches_training_prediction(checkpoint: Path, faces_sample) -> None:
    """Files, base64 files, decoded arrays and HWC arrays give train.predict's ages for the
    images training's decoder produced."""
    from PIL import Image

    from agelab.data.images import decode_many
    from agelab.tracking.pyfunc_model import AgePredictor
    from agelab.train import load_checkpoint, predict

    files = sorted((faces_sample / "images").iterdir())[:12]
    decoded = decode_many(files, 32).images
    model, _ = load_checkpoint(checkpoint)
    expected = predict(model, decoded, device="cpu")
    p = AgePredictor.from_checkpoint(checkpoint)
    b64 = [base64.b64encode(f.read_bytes()).decode() for f in files]
    hwc = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert hwc.shape[1:3] != (32, 32)  # resized by the predictor, as a file would be
    for given in (
        pd.DataFrame({"path": [str(f) for f in files]}),
        pd.DataFrame({"image": b64}),
        pd.DataFrame({"path": [None] * len(files), "image": b64}),
        decoded,
        hwc,
    ):
        out = p.predict(given)
        assert list(out.columns) == ["age"]
        np.testing.assert_allclose(out["age"], expected, atol=TOL, rtol=0)


def test_bad_requests_are_named(checkpoint: Path, tmp_path: Path) -> None:
    from agelab.errors import DataError
    from agelab.tracking.pyfunc_model import AgePredictor

    p = AgePredictor.from_checkpoint(checkpoint)
    cases = [
        (pd.DataFrame({"image": ["not base64!"]}), "row 0: column image is not base64"),
        (pd.DataFrame({"image": [base64.b64encode(b"hello").decode()]}), "not an image"),
        (pd.DataFrame({"image": [base64.b64encode(jpeg_bytes()[:200]).decode()]}), "truncated"),
        (pd.DataFrame({"file": ["x.jpg"]}), "needs a column 'path'"),
        (pd.DataFrame({"path": [str(tmp_path / "gone.jpg")]}), "gone.jpg"),
        (np.zeros((2, 3, 8, 8), dtype=np.float32), "must be uint8"),
    ]
    for given, message in cases:
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            p.predict(given)


def _folder_with_bad_images(tmp_path: Path, faces_sample: Path) -> Path:
    folder = tmp_path / "photos"
    good = sorted((faces_sample / "images").iterdir())[:3]
    for f in good:
        (folder / f.name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "b_truncated.jpg").write_bytes(jpeg_bytes()[:150])
    (folder / "c_empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, and not named like one: left alone")
    write_image(folder / "sub" / "d_small.png", (40, 30))
    return folder


def test_bad_images_follow_on_bad(checkpoint: Path, tmp_path: Path, faces_sample, capsys):
    folder = _folder_with_bad_images(tmp_path, faces_sample)
    out = tmp_path / "preds.csv"
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    # File checks run before any image is decoded (as when a dataset loads).
    assert "c_empty.jpg: zero-byte file" in err and "--on-bad skip" in err
    assert not out.exists()
    (folder / "c_empty.jpg").rename(tmp_path / "c_empty.jpg")
    assert main(["predict", str(checkpoint), str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "b_truncated.jpg: truncated image" in err and "re-copy" in err, err
    assert not out.exists()
    (tmp_path / "c_empty.jpg").rename(folder / "c_empty.jpg")
    args = ["predict", str(checkpoint), str(folder), "--out", str(out), "--on-bad", "skip"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad row(s)" in err and "c_empty.jpg" in err and "truncated" in err
    table = pd.read_csv(out)
    assert [Path(p).name for p in table["path"]] == [
        *(f.name for f in sorted((faces_sample / "images").iterdir())[:3]),
        "d_small.png",
    ]
    assert table["age"].notna().all()


def test_manifests_with_and_without_ages(checkpoint: Path, tmp_path: Path, faces_sample, capsys):
    rows = pd.read_csv(faces_sample / "labels.csv").head(5)
    with_ages, paths_only = tmp_path / "with.csv", tmp_path / "paths.csv"
    for rel in rows["path"]:  # a manifest's images live under its folder
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((faces_sample / rel).read_bytes())
    rows.to_csv(with_ages, index=False)
    rows[["path"]].to_csv(paths_only, index=False)
    for manifest, has_ages in ((with_ages, True), (paths_only, False)):
        out = tmp_path / f"{manifest.stem}.preds.csv"
        assert main(["predict", str(checkpoint), str(manifest), "--out", str(out)]) == 0
        table = pd.read_csv(out)
        assert table["path"].tolist() == rows["path"].tolist()
        assert ("true_age" in table and "residual" in table) == has_ages
        if has_ages:
            np.testing.assert_array_equal(table["true_age"], rows["age"].astype(float))
    # A manifest's bad row is the manifest reader's message, with this command's way out.
    rows.loc[1, "path"] = "missing.jpg"
    rows.to_csv(with_ages, index=False)
    capsys.readouterr()
    assert main(["predict", str(checkpoint), str(with_ages)]) == 2
    err = capsys.readouterr().err
    assert "with.csv line 3 (missing.jpg): missing file" in err and "--on-bad skip" in err


def test_register_refuses_reserved_alias_and_bad_name(tmp_path: Path, capsys) -> None:
    from agelab.errors import ModelError
    from agelab.tracking.models import alias_ok, registered_name_ok

    for bad in ("v1", "latest", "a b"):
        with pytest.raises(ModelError, match="cannot be an alias"):
            alias_ok(bad)
    assert alias_ok("champion") == "champion"
    with pytest.raises(ModelError, match="cannot name a registered model"):
        registered_name_ok("a/b")


def test_pointing_mlflow_at_a_store_puts_the_environment_back(tmp_path: Path, monkeypatch):
    """MLflow's model functions read a global URI; agelab points it at a store for a moment
    and restores both the global and $MLFLOW_TRACKING_URI (which agelab's default reads)."""
    import mlflow

    from agelab.tracking import global_tracking_uri

    store = f"sqlite:///{tmp_path / 'x.db'}"
    for env in ("sqlite:////elsewhere/mlflow.db", None):
        if env is None:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
        before = mlflow.get_tracking_uri()
        with global_tracking_uri(store):
            assert mlflow.get_tracking_uri() == store
        assert os.environ.get("MLFLOW_TRACKING_URI") == env
        assert mlflow.get_tracking_uri() == before


def test_a_missing_checkpoint_is_named(tmp_path: Path, faces_sample, capsys) -> None:
    capsys.readouterr()
    gone = tmp_path / "model.pt"
    assert main(["predict", str(gone), str(faces_sample / "images"), "--root", str(tmp_path)]) == 2
    assert f"checkpoint {gone} does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- serving


def _descendants(pid: int) -> dict[int, str]:
    """Every living descendant of ``pid`` (pid → command line), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            found[child] = cmd.decode(errors="replace")
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return {"status": resp.status, **json.loads(resp.read())}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, **json.loads(exc.read())}


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"mlflow models serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer {url} in {timeout:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_serves_the_champion_on_loopback(
    faces: Study, registered: dict, tmp_path: Path
) -> None:
    import port_for

    from agelab.tracking import default_uri
    from agelab.ui import stop_group

    port = port_for.select_random()
    venv_bin = str(Path(sys.executable).parent)  # uvicorn, which serve starts by name
    env = os.environ | {
        "MLFLOW_TRACKING_URI": default_uri(faces.cfg.tracking),
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    cmd = [os.path.join(venv_bin, "mlflow"), "models", "serve", "-m", "models:/faces@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=fh, start_new_session=True)
    started: dict[int, str] = {}
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/ping", log)
        started = _descendants(proc.pid)
        assert any("uvicorn" in c for c in started.values()), started
        table = registered["table"].head(5)
        images = [base64.b64encode((FACES_SAMPLE / p).read_bytes()).decode() for p in table["path"]]
        body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}}
        answer = _post(f"http://127.0.0.1:{port}/invocations", body)
        assert answer["status"] == 200, answer
        served = pd.DataFrame(answer["predictions"])
        np.testing.assert_allclose(served["age"], table["age"], atol=TOL, rtol=0)
        np.testing.assert_allclose(served["upper_90"], table["upper_90"], atol=TOL, rtol=0)
        bad = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["image"], "data": [["not base64!"]]}},
        )
        assert bad["status"] == 400 and "column image is not base64" in json.dumps(bad)
    finally:
        stop_group(proc)  # SIGTERM to its process group, SIGKILL to what is left
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in started):
        time.sleep(0.2)
    assert not [c for p, c in started.items() if _alive(p)], "left running"
    with_group = [
        p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _pgid(p) == proc.pid
    ]
    assert not [p for p in with_group if _alive(p)], with_group


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None
