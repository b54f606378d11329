"""The one command-line entry:
``agelab run|report|register|predict|data|ui|dashboard|bench|config``.

Heavy imports (torch, timm, mlflow, optuna) happen inside the command that needs them, so
``agelab --help`` answers at once. Errors a user can fix (bad config, bad data) print one
clear message and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
from pathlib import Path

from agelab import __version__

EXIT_USER_ERROR = 2


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.epochs=2 data.path=/data/UTKFace",
    )


def _load(study: str | None, overrides: list[str]):
    from agelab.config import apply_overrides, load_config, validate

    if study is None:
        return validate(apply_overrides({"name": "adhoc"}, overrides), "(defaults)")
    return load_config(study, overrides)


# ------------------------------------------------------------------------------ commands


def _terminate_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    # SIGTERM (timeout, systemd, docker stop, a cluster's preemption) stops the study as
    # Ctrl-C does: the trial in flight is re-queued and its run closed, not left RUNNING.
    previous = signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    try:
        return _run_and_report(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_and_report(args: argparse.Namespace) -> int:
    from agelab.study import run_study

    cfg = _load(args.study, args.overrides)
    summary = run_study(
        cfg,
        workers=args.workers,
        n_trials=args.n_trials,
        join=args.join,
        quiet=args.quiet,
        new_version=args.new_version,
        gpus=args.gpus,
        workers_per_gpu=args.workers_per_gpu,
    )
    if cfg.report.auto and summary.counts["COMPLETE"]:
        _report_after_study(summary.config)
    return 0 if summary.ok else 1


def _report_after_study(cfg) -> None:
    """The ablation report of the study so far; a failure here never fails the study."""
    try:
        from agelab.reporting import print_verdict, report_for_config

        result = report_for_config(cfg)
    except Exception as exc:
        from agelab.secrets import mask_uri

        print(
            f"warning: the ablation report failed ({type(exc).__name__}: {mask_uri(exc)}); the "
            f"runs are safe — retry with: agelab report <study file> (study {cfg.name!r})"
        )
        return
    print_verdict(result, f"\nVerdict ({result.html}):")


def cmd_report(args: argparse.Namespace) -> int:
    from agelab.reporting import print_verdict, report_for_config

    cfg = _study_config(args)
    result = report_for_config(cfg, out_dir=Path(args.out) if args.out else None, log=args.log)
    print_verdict(result, f"Ablation report for study {result.study!r}\n\nVerdict:")
    print(f"\nwrote {result.markdown} and {result.html}")
    if args.log and result.parent_run_id:
        print(f"logged under report/ on parent run {result.parent_run_id}")
    return 0


def _study_config(args: argparse.Namespace):
    """A study file (its version resolved by config identity) or an exact study name in the
    store under ``--root`` (or ``$MLFLOW_TRACKING_URI``)."""
    from agelab.config import apply_overrides, validate

    if Path(args.study).suffix in (".yaml", ".yml", ".json") or Path(args.study).is_file():
        from agelab.study import open_storage, storage_url, version_for_report, versioned

        cfg = _load(args.study, args.overrides)
        version, note = version_for_report(open_storage(storage_url(cfg)), cfg)
        if note:
            print(f"note: {note}")
        return versioned(cfg, version)
    raw = {"name": args.study, "tracking": {"root": args.root}}
    return validate(apply_overrides(raw, args.overrides), f"study {args.study!r}")


def cmd_check(args: argparse.Namespace) -> int:
    from agelab.study.check import check_study

    for line in check_study(_study_config(args), repair=not args.dry_run):
        print(line)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from agelab.predict import run_register

    done = run_register(_study_config(args), name=args.name, alias=args.alias or None)
    name, version, alias = done["name"], done["version"], done["alias"]
    tags = done["tags"]
    print(
        f"registered models:/{name}/{version}"
        + (f" (alias {alias}: models:/{name}@{alias})" if alias else "")
        + f" in {done['store']}\n  from run {done['run_id']}: cell {tags['cell']}, replicate "
        f"{tags['replicate']}, calib MAE {tags['calib_mae']}, test MAE {tags['test_mae']}"
    )
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    print(f"predict: agelab predict {uri} IMAGES… --out predictions.csv")
    print(f"serve:   mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5001")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from agelab.config import TrackingConfig
    from agelab.predict import run_predict

    run_predict(
        args.model,
        args.images,
        tracking=TrackingConfig(root=Path(args.root)),
        out=Path(args.out) if args.out else None,
        on_bad=args.on_bad,
        progress=not args.quiet,
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from agelab.secrets import mask_tree

    cfg = _load(args.study, args.overrides)
    print(yaml.safe_dump(mask_tree(cfg.model_dump(mode="json")), sort_keys=False), end="")
    print(f"# valid; {cfg.search.n_total()} trial(s) planned", file=sys.stderr)
    if cfg.search.n_total() > cfg.search.warn_cells:
        import torch

        from agelab.study.estimate import estimate_trial_seconds, size_warning

        gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
        print(size_warning(cfg, *estimate_trial_seconds(cfg, gpu=gpu)), file=sys.stderr)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from agelab.data.export import export_folder
    from agelab.data.load import load_dataset

    cfg = _load(args.study, args.overrides)
    if cfg.data.source != "synthetic":
        print("agelab data synth: data.source must be synthetic", file=sys.stderr)
        return EXIT_USER_ERROR
    data = load_dataset(cfg.data, progress=not args.quiet)
    print(
        f"{len(data)} synthetic faces at {data.image_size}px, fingerprint {data.fingerprint[:12]}, "
        f"label-noise MAE floor {data.info.get('noise_floor_mae', 0.0):.2f} years "
        f"({'cache hit' if data.info.get('cache_hit') else 'generated and cached'})"
    )
    if args.out:
        manifest = export_folder(data, Path(args.out), progress=not args.quiet)
        print(f"wrote images and {manifest} (use with data.source=csv data.path={manifest})")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from agelab.data.synth import contact_sheet, generate

    cfg = _load(args.study, args.overrides)
    synth = cfg.data.synthetic.model_copy(update={"n_images": args.rows * args.cols * 4})
    faces = generate(synth, cfg.data.image_size)
    sheet = contact_sheet(faces, rows=args.rows, cols=args.cols, scale=args.scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out} ({args.rows}×{args.cols} faces, rows sorted by age)")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from agelab.data.inspect import format_inspection, inspect_source

    print(format_inspection(inspect_source(args.source, Path(args.path), max_age=args.max_age)))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from agelab.ui import serve_ui

    return serve_ui(host=args.host, port=args.port, root=Path(args.root), expose=args.expose)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from agelab.ui import serve_dashboard

    return serve_dashboard(
        host=args.host,
        port=args.port,
        root=Path(args.root),
        storage=args.storage,
        expose=args.expose,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    if args.gpu:
        from agelab.bench.gpu import main as gpu_main

        return gpu_main(device=args.device, out_dir=Path(args.out))
    from agelab.bench import main as bench_main

    return bench_main(quick=args.quick, out_dir=Path(args.out))


# ---------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agelab",
        description="Ablation studies for deep age regression: Optuna searches over "
        "normalization, activation and timm backbones, tracked in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"agelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_study_commands(sub)
    _add_data_commands(sub)
    _add_browser_commands(sub)
    _add_handoff_commands(sub)
    p = sub.add_parser("bench", help="benchmarks: training throughput, tracking, data, memory")
    p.add_argument("--quick", action="store_true", help="about 2 minutes on 2 CPU cores")
    p.add_argument("--out", default="bench", help="folder for results.json and results.md")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU path only: fp32/bf16/channels_last/compile, bare-loop fraction, peak "
        "memory, DataLoader and naive ratios -> OUT/gpu.json + gpu.md; refuses without CUDA",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="with --gpu: cpu is a dry run of the same script (no GPU figures)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


def _add_study_commands(sub: argparse._SubParsersAction) -> None:
    """``run``, ``report``, ``config``."""
    p = sub.add_parser("run", help="run (or resume) a study from experiments/*.yaml")
    p.add_argument("study", help="study file, e.g. experiments/demo.yaml")
    _add_overrides(p)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local worker processes (default 1; with --gpus/--workers-per-gpu: GPUs × per GPU); "
        "with GPUs, worker i gets GPU i mod G as its only CUDA device",
    )
    p.add_argument(
        "--gpus",
        type=_gpu_ids,
        default=None,
        metavar="0,2,…",
        help="GPU ids (torch's cuda:N of this process) the workers may use (default: all visible)",
    )
    p.add_argument(
        "--workers-per-gpu",
        type=int,
        default=None,
        metavar="K",
        help="workers sharing each GPU (default 1); without --workers: that many per GPU",
    )
    p.add_argument("--n-trials", type=int, default=None, help="stop this invocation after N trials")
    p.add_argument(
        "--join",
        action="store_true",
        help="join a study prepared elsewhere (other machines): do not plan trials",
    )
    p.add_argument(
        "--new-version",
        action="store_true",
        help="the config changed what a trial computes: keep the study's results and start "
        "its next version (<name>.v2, ...) with this config",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "report", help="ablation report of a study: effects, intervals, tests, verdict"
    )
    p.add_argument("study", help="study file (experiments/demo.yaml) or a study name")
    p.add_argument("--root", default="mlruns", help="store folder when STUDY is a name")
    p.add_argument("--out", default=None, help="folder (default: <root>/reports/<study>)")
    p.add_argument(
        "--no-log",
        dest="log",
        action="store_false",
        help="do not log the report on the study's parent run",
    )
    _add_overrides(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "check", help="compare a study's Optuna trials with its MLflow runs; repair what is safe"
    )
    p.add_argument("study", help="study file (experiments/demo.yaml) or a study name")
    p.add_argument("--root", default="mlruns", help="store folder when STUDY is a name")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    _add_overrides(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("config", help="validate a study file and print the resolved config")
    p.add_argument("study")
    _add_overrides(p)
    p.set_defaults(func=cmd_config)


def _gpu_ids(text: str) -> list[int]:
    """``--gpus 0,2``: comma-separated GPU ids (checked against the visible GPUs later)."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of GPU ids, e.g. 0,2"
        ) from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: GPU ids are 0 or more")
    return ids


def _add_handoff_commands(sub: argparse._SubParsersAction) -> None:
    """``register`` and ``predict``: the study's model handed on (docs/handoff.md)."""
    p = sub.add_parser(
        "register", help="register a study's best model in the MLflow Model Registry"
    )
    p.add_argument("study", help="study file (experiments/demo.yaml) or a study name")
    p.add_argument("--name", default=None, help="registered model name (default: the study's)")
    p.add_argument(
        "--alias", default="champion", help="alias of the new version (default champion; '' none)"
    )
    p.add_argument("--root", default="mlruns", help="store folder when STUDY is a name")
    _add_overrides(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("predict", help="ages (and intervals) of images from a trained model")
    p.add_argument(
        "model", help="a run id, models:/NAME@ALIAS or models:/NAME/VERSION, or a checkpoint"
    )
    p.add_argument("images", nargs="+", help="image files, folders, or a CSV manifest")
    p.add_argument("--out", default=None, help="CSV to write (default: the table on stdout)")
    p.add_argument(
        "--on-bad",
        choices=("error", "skip"),
        default="error",
        help="a bad image stops (error, default) or is skipped and listed (skip)",
    )
    p.add_argument("--root", default="mlruns", help="store folder (or $MLFLOW_TRACKING_URI)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """``data synth|preview|inspect``."""
    data = sub.add_parser("data", help="synthetic data and real-data inspection")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("synth", help="generate (and cache) the synthetic faces of a study")
    p.add_argument("--study", default=None, help="study file (default: built-in defaults)")
    p.add_argument("--out", default=None, help="also export PNG files + labels.csv to this folder")
    p.add_argument("--quiet", action="store_true")
    _add_overrides(p)
    p.set_defaults(func=cmd_data_synth)
    p = dsub.add_parser("preview", help="write a PNG contact sheet of synthetic faces")
    p.add_argument("--study", default=None)
    p.add_argument("--out", default="synthetic_preview.png")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--cols", type=int, default=12)
    p.add_argument("--scale", type=int, default=1, help="pixel upscaling of each tile")
    _add_overrides(p)
    p.set_defaults(func=cmd_data_preview)
    p = dsub.add_parser("inspect", help="counts, age histogram, image sizes, bad rows")
    p.add_argument("source", help="utkface | fgnet | csv")
    p.add_argument("path", help="dataset folder (utkface, fgnet) or manifest CSV (csv)")
    p.add_argument("--max-age", type=float, default=120.0)
    p.set_defaults(func=cmd_data_inspect)


def _add_browser_commands(sub: argparse._SubParsersAction) -> None:
    """``ui`` and ``dashboard``: the same loopback-only options."""
    for name, helptext, port in (
        ("ui", "MLflow UI over the default store (127.0.0.1 only)", 5000),
        ("dashboard", "optuna-dashboard over the study storage (127.0.0.1 only)", 8080),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=port)
        p.add_argument("--root", default="mlruns", help="folder of the default stores")
        p.add_argument(
            "--expose",
            action="store_true",
            help="allow a non-loopback --host (anyone who can reach it sees and can "
            "change your runs: there is no authentication)",
        )
        if name == "dashboard":
            p.add_argument("--storage", default=None, help="Optuna storage URL (default: journal)")
        p.set_defaults(func=cmd_ui if name == "ui" else cmd_dashboard)


def main(argv: list[str] | None = None) -> int:
    from agelab.errors import UserError, transient_cause
    from agelab.secrets import mask_uri

    # MLflow's usage telemetry is on by default; agelab's commands (and the UI they serve)
    # send none unless the user opted in: MLFLOW_DISABLE_TELEMETRY=false (docs/reliability.md).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    # Overrides may follow flags (``run x.yaml --quiet train.epochs=2``), which plain
    # argparse positionals do not allow: collect the key=value leftovers here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except UserError as exc:  # anything else is a bug and keeps its traceback
        print(f"agelab: {mask_uri(exc)}", file=sys.stderr)  # never a password, whatever raised
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print(f"\nagelab: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `agelab … | head`: the reader left; the work is in the stores
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes stdout at exit)
        return 0
    except Exception as exc:  # a full disk or a lost database is not a bug either
        cause = transient_cause(exc)
        if cause is None:
            raise
        print(
            f"agelab: stopped by the machine or a store: {cause}. Fix that (free space, fix "
            "permissions, restart the database), then run the same command again",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR


def entry() -> None:
    """The ``agelab`` command. After Ctrl-C, leave at once (exit handlers run, outputs
    flushed) instead of spending seconds unloading torch and MLflow: the message is out and
    everything is resumable. (Not in :func:`main`: tests call it in-process.)"""
    code = main()
    if code == 130:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
