"""The command line: help, config errors, data commands (in-process, real files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agelab.cli import main
from agelab.config import DataConfig
from agelab.data.load import load_dataset

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_subcommands(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "config", "data", "ui", "dashboard", "bench"):
        assert command in out


def test_bad_config_exits_2_naming_file_and_fields(capsys) -> None:
    code = main(
        ["config", str(REPO / "experiments/demo.yaml"), "model.norm=batchnorm", "train.epochs=0"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "demo.yaml" in err and "model.norm: unknown norm 'batchnorm'" in err
    assert "train.epochs" in err


def _user_errors() -> list[type]:
    from agelab import errors

    found = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.UserError)
    ]
    assert len(found) >= 8, found  # the base and its kinds
    return found


@pytest.mark.parametrize("kind", _user_errors(), ids=lambda c: c.__name__)
def test_every_user_error_is_one_line_and_exit_2(kind: type, monkeypatch, capsys) -> None:
    from agelab import cli

    made = {
        "ConfigError": lambda: kind("study.yaml", ["bad thing"]),
        "StudyConfigChanged": lambda: kind("demo", ["train.epochs: 6 → 3"], ["a bad idea"]),
    }
    error = made.get(kind.__name__, lambda: kind("bad"))()

    def fails(_args):
        raise error

    monkeypatch.setattr(cli, "cmd_config", fails)
    assert main(["config", str(REPO / "experiments/smoke.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agelab: ") and "bad" in err and "Traceback" not in err


def test_anything_else_is_a_bug_and_keeps_its_traceback(monkeypatch) -> None:
    from agelab import cli

    def bug(_args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_config", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["config", str(REPO / "experiments/smoke.yaml")])


def test_config_prints_resolved_study(capsys) -> None:
    assert main(["config", str(REPO / "experiments/smoke.yaml"), "train.epochs=3"]) == 0
    captured = capsys.readouterr()
    assert "epochs: 3" in captured.out and "4 trial(s) planned" in captured.err


def test_synth_export_round_trips_through_csv_source(tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert (
        main(
            [
                "data",
                "synth",
                "--quiet",
                "--out",
                str(out),
                "data.image_size=32",
                "data.synthetic.n_images=40",
            ]
        )
        == 0
    )
    data = load_dataset(
        DataConfig(
            source="csv", path=out / "labels.csv", image_size=32, cache_dir=tmp_path / "cache"
        ),
        progress=False,
    )
    synth = load_dataset(
        DataConfig(image_size=32, synthetic={"n_images": 40}, cache_dir=tmp_path / "cache"),
        progress=False,
    )
    assert len(data) == 40
    # PNG export is lossless: the csv path decodes exactly the generated pixels.
    assert np.array_equal(data.images.numpy(), synth.images.numpy())
    np.testing.assert_allclose(data.ages, synth.ages, atol=1e-3)


def test_preview_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    assert (
        main(
            [
                "data",
                "preview",
                "--rows",
                "2",
                "--cols",
                "3",
                "--out",
                str(out),
                "data.image_size=32",
            ]
        )
        == 0
    )
    with Image.open(out) as img:
        assert img.width >= 3 * 32 and img.height >= 2 * 32


def test_inspect_real_sample(faces_sample: Path, capsys) -> None:
    assert main(["data", "inspect", "csv", str(faces_sample / "labels.csv")]) == 0
    out = capsys.readouterr().out
    assert "rows/files: 250" in out and "no bad rows" in out


def test_ui_refuses_public_bind_without_expose(capsys) -> None:
    assert main(["ui", "--host", "0.0.0.0"]) == 2
    assert "--expose" in capsys.readouterr().err


def test_dashboard_serves_the_study_storage(tmp_path: Path) -> None:
    """optuna-dashboard over agelab's journal storage answers on loopback."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import optuna

    from agelab.study import open_storage

    journal = tmp_path / "journal.log"
    optuna.create_study(storage=open_storage(f"journal:{journal}"), study_name="dash")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agelab.cli",
            "dashboard",
            "--port",
            str(port),
            "--storage",
            f"journal:{journal}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.load(r)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        assert [s["study_name"] for s in body["study_summaries"]] == ["dash"]
    finally:
        proc.kill()
        proc.wait()
