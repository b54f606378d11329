"""The launchers in deploy/: the Slurm array script runs for real (its body, with the
variables Slurm would set), the Docker Compose file is checked against the real CLIs (no
Docker here: docs/scaling.md says it is untested)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from agelab.cli import build_parser, main
from agelab.config import validate
from agelab.study import open_storage, open_study, storage_url
from helpers import REPO
from helpers.studies import tiny_study

SBATCH = REPO / "deploy" / "slurm.sbatch"
COMPOSE = REPO / "deploy" / "compose.yaml"


def shared_stores(tmp_path: Path) -> dict[str, str]:
    """The two stores as a cluster's nodes get them: by environment (here: tmp files)."""
    root = tmp_path / "mlruns"
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "AGELAB_OPTUNA_STORAGE": f"journal:{root / 'optuna' / 'journal.log'}",
    }


# ------------------------------------------------------------------------------ Slurm


def sbatch_directives() -> list[str]:
    """``#SBATCH`` lines as sbatch reads them: up to the first command of the script."""
    found = []
    for line in SBATCH.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            found.append(line.split(maxsplit=1)[1])
    return found


def test_sbatch_asks_one_gpu_per_array_task() -> None:
    directives = sbatch_directives()
    assert "--gres=gpu:1" in directives
    assert any(d.startswith("--array=") for d in directives)
    text = SBATCH.read_text()
    assert 'exec agelab run "$study" --join --quiet "$@"' in text
    flags = set(re.findall(r"(?<=\s)--[a-z-]+", text.split("exec agelab run", 1)[1]))
    assert flags <= run_flags()


def test_sbatch_refuses_to_start_without_shared_stores(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in shared_stores(tmp_path)}
    done = subprocess.run(
        ["bash", str(SBATCH), "study.yaml"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert "MLFLOW_TRACKING_URI: export the shared MLflow store before sbatch" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sbatch_task_joins_a_planned_study(tmp_path: Path, monkeypatch, capsys) -> None:
    """Plan with the documented command, then one array task (Slurm's variables set by hand,
    started in another folder) runs the whole queue as a --join worker."""
    raw = tiny_study(tmp_path, report={"auto": False})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    stores = shared_stores(tmp_path)
    for key, value in stores.items():
        monkeypatch.setenv(key, value)
    assert main(["run", str(path), "--n-trials", "0", "--quiet"]) == 0  # plan, run nothing
    assert "4 planned trial(s), 0 complete, 4 newly queued" in capsys.readouterr().out
    cfg = validate(raw)
    study = open_study(cfg, open_storage(storage_url(cfg)))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 4

    slurm = {
        "SLURM_JOB_ID": "4243",
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_PER_TASK": "1",
        "CUDA_VISIBLE_DEVICES": "0",  # what --gres=gpu:1 grants (no GPU here: runs on CPU)
    }
    elsewhere = tmp_path / "node"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(
        ["bash", str(SBATCH), str(path)],
        env=env | stores | slurm | {"PATH": "/usr/bin:/bin"},  # agelab comes from the venv
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "agelab worker: job 4242 task 1 on " in done.stdout
    assert "CUDA_VISIBLE_DEVICES=0" in done.stdout

    study = open_study(cfg, open_storage(storage_url(cfg)))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    client = MlflowClient(stores["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags["agelab.run_kind"] == "trial"]
    assert len(trials) == 4 and {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.tags["agelab.cuda_visible_devices"] for r in trials} == {"0"}
    assert not list(elsewhere.iterdir())  # the task ran from the checkout, not from cwd


# ---------------------------------------------------------------------------- Compose


def run_flags() -> set[str]:
    """Every option string ``agelab run --help`` lists."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s for a in sub.choices["run"]._actions for s in a.option_strings}


def default(value: str) -> str:
    """``${VAR:-default}`` as Compose fills it in with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_plan_once_then_workers_join(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"db", "mlflow", "plan", "worker"}
    plan, worker = services["plan"]["command"], services["worker"]["command"]
    for command in (plan, worker):
        assert command[0] == "run" and (REPO / default(command[1])).is_file()
        assert {c for c in command if c.startswith("--")} <= run_flags()
    assert "--join" not in plan and plan[plan.index("--n-trials") + 1] == "0"
    assert "--join" in worker
    assert services["worker"]["depends_on"]["plan"]["condition"] == (
        "service_completed_successfully"
    )
    assert int(default(str(services["worker"]["deploy"]["replicas"]))) >= 2
    commented = re.search(r"#\s+command: (\[.*\])", COMPOSE.read_text())  # the GPU variant
    gpu_flags = {f for f in yaml.safe_load(commented[1]) if f.startswith("--")}
    assert "--workers-per-gpu" in gpu_flags and gpu_flags <= run_flags()


def test_compose_stores_point_at_its_own_services(compose: dict) -> None:
    services = compose["services"]
    env = services["worker"]["environment"]
    assert env == services["plan"]["environment"]
    tracking = re.fullmatch(r"http://(\w+):(\d+)", env["MLFLOW_TRACKING_URI"])
    server = services["mlflow"]["command"]
    assert tracking[1] == "mlflow" and server[server.index("--port") + 1] == tracking[2]
    assert f"mlflow:{tracking[2]}" in server[server.index("--allowed-hosts") + 1].split(",")
    storage = default(env["AGELAB_OPTUNA_STORAGE"])
    optuna = re.fullmatch(r"postgresql\+psycopg2://(\w+):.+@db:5432/(\w+)", storage)
    db_env = services["db"]["environment"]
    assert optuna[1] == db_env["POSTGRES_USER"]
    init = (REPO / "deploy" / "postgres-init.sql").read_text()
    assert f"CREATE DATABASE {optuna[2]} OWNER {optuna[1]};" in init
    backend = default(server[server.index("--backend-store-uri") + 1])
    assert backend.endswith(f"@db:5432/{db_env['POSTGRES_DB']}")
    assert optuna[2] != db_env["POSTGRES_DB"]  # two databases: both keep alembic_version


def test_compose_mlflow_server_command_parses_with_mlflow(compose: dict) -> None:
    """The server's flags, parsed by MLflow's own command (not run)."""
    from mlflow.cli import server

    mlflow = compose["services"]["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"] and mlflow["command"][0] == "server"
    args = [default(a) for a in mlflow["command"][1:]]
    ctx = server.make_context("server", args)
    assert ctx.params["serve_artifacts"] and ctx.params["host"] == "0.0.0.0"
    assert ctx.params["backend_store_uri"].startswith("postgresql+psycopg2://")
    volume = mlflow["volumes"][0].split(":")
    assert volume[1] == ctx.params["artifacts_destination"]


def test_dockerfile_copies_what_exists(compose: dict) -> None:
    build = compose["x-image"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    dockerfile = (context / build["dockerfile"]).read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            sources = [s for s in shlex.split(line)[1:-1] if not s.startswith("--")]
            assert all((context / s).exists() for s in sources), line
    assert 'ENTRYPOINT ["agelab"]' in dockerfile
