"""One trial, start to finish: build → fit → predict → diagnose → record in MLflow.

The study hands it a config with the trial's params applied and the replicate seed in
``train.seed``; the numbers are a function of (that config, the data), deterministic on CPU.
Everything the trial produced goes to its MLflow run (tags, final metrics, artifacts) through
the :class:`~agelab.tracking.Tracker` it is given; per-epoch metrics go through the caller's
``on_epoch``. Selection uses the **calib** MAE only; test metrics are recorded but never
returned to the optimiser.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agelab.config import StudyConfig, flatten
from agelab.data.dataset import SPLITS, FaceDataset
from agelab.errors import TrainingDiverged, TrialFailed
from agelab.tracking import Tracker
from agelab.tracking.datasets import data_source, split_datasets


@dataclass
class TrialResult:
    value: float  # calib MAE, what the optimiser minimises
    metrics: dict[str, float]  # test metrics (stable names, see agelab.metrics.METRIC_DOCS)


_OOM_PATTERNS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM (``torch.OutOfMemoryError``), Python's ``MemoryError``, or the CPU
    allocator's plain ``RuntimeError("... DefaultCPUAllocator: can't allocate memory ...")``."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(p in text for p in _OOM_PATTERNS)


def out_of_memory_reason(exc: BaseException, cfg: StudyConfig) -> str:
    """``out of memory: <what failed>; <what to try>`` for the trial's fail reason."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    detail = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", detail)
    return (
        f"out of memory: {detail[:300]} (batch {cfg.train.batch_size}, "
        f"{cfg.data.image_size} px, {cfg.model.backbone}); lower train.batch_size or "
        "data.image_size, use a smaller backbone, or run fewer workers at once"
    )


def build_trial_model(cfg: StudyConfig, image_size: int):
    """The trial's model and census: backbone/norm/act from ``cfg.model``, the head sized for
    ``cfg.train.loss``, initialised from ``cfg.train.seed``."""
    from agelab.models import build_model_from_config

    return build_model_from_config(
        cfg.model,
        image_size,
        cfg.train.loss,
        huber_delta=cfg.train.huber_delta,
        max_age=cfg.data.max_age,
        seed=cfg.train.seed,
    )


def device_tags(device: str) -> dict[str, str]:
    """Where a trial trains: ``agelab.gpu`` = ``"<id> (<name>)"`` on CUDA, the id as the
    machine knows it (the worker's ``CUDA_VISIBLE_DEVICES`` entry, else torch's index), or
    ``"cpu"``; with ``agelab.cuda_visible_devices``, the worker's own, when it has one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    tags = {} if visible is None else {"agelab.cuda_visible_devices": visible}
    if device == "cpu" or not torch.cuda.is_available():
        return tags | {"agelab.gpu": "cpu"}
    index = torch.cuda.current_device()
    entries = [e.strip() for e in visible.split(",")] if visible else []
    gpu = entries[index] if index < len(entries) else str(index)
    return tags | {"agelab.gpu": f"{gpu} ({torch.cuda.get_device_name(index)})"}


def first_conv_weight(model: torch.nn.Module) -> np.ndarray | None:
    """Weights of the first 2-D convolution that sees the image (the matched filters)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            return module.weight.detach().float().cpu().numpy()
    return None


def evaluate_trial(
    cfg: StudyConfig,
    data: FaceDataset,
    tracker: Tracker,
    run_id: str,
    on_epoch: Callable[[int, dict[str, float]], None],
    *,
    quiet: bool = False,
    keep_model: Callable[[float], bool] | None = None,
) -> TrialResult:
    """Train the trial's model, diagnose its test predictions, record all of it on run
    ``run_id``; returns the calib MAE (the objective) and the final metrics. When
    ``keep_model(calib MAE)`` says so (``tracking.log_model``, decided by the study), the
    trained model is logged as the run's MLflow Model too."""
    tracker.log_datasets(run_id, split_datasets(cfg.name, data_source(cfg.data), data))
    tracker.set_tags(run_id, device_tags(cfg.train.device))
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    if cuda:  # peak_cuda_memory_gb is this trial's, not the worker's earlier trials'
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()  # fit_seconds: build, census and fit (not the final prediction)
    model, census = build_trial_model(cfg, data.image_size)
    tracker.set_tags(run_id, {f"census.{k}": v for k, v in flatten(census).items() if v != {}})
    result, pred, fitted_at = _train(model, data, cfg, on_epoch, quiet)
    fit_seconds = fitted_at - t0
    diag, final = _diagnose(cfg, data, pred)
    from agelab.metrics import calibration_split

    final |= {
        "fit_seconds": fit_seconds,
        "best_epoch": float(result.best_epoch),
        "train_images_per_second": float(result.images_per_second),
    }
    if cuda:  # GB = 10^9 bytes, as MLflow's system metrics count
        final["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    tracker.log_metrics(run_id, final, step=int(result.best_epoch))
    tracker.set_tags(
        run_id,
        {
            "agelab.verdict": diag.verdict,
            "agelab.verdict_reason": diag.verdict_reason,
            "agelab.device": str(result.device),
            # resident-device | resident-host | streaming (docs/data.md#bigger-than-memory)
            "agelab.data_path": result.data_path,
            # where the conformal intervals were calibrated: conformal | calib (fallback)
            "agelab.conformal_calibrated_on": calibration_split(final["n_conformal_split"]),
        },
    )
    with tempfile.TemporaryDirectory(prefix="agelab-trial-") as tmp:
        _write_artifacts(Path(tmp), cfg, data, pred, model, census, result.history, diag)
        tracker.log_artifacts(run_id, Path(tmp))
    if keep_model is not None and keep_model(final["calib_mae"]):
        _log_model(tracker, run_id, cfg, data, model, census, diag, int(result.best_epoch))
    return TrialResult(value=final["calib_mae"], metrics=final)


def _train(model, data: FaceDataset, cfg: StudyConfig, on_epoch, quiet: bool):
    """Fit (best calib epoch restored) and predict every image: (fit result, predictions,
    the time fitting ended). A divergence or an out-of-memory error becomes
    :class:`TrialFailed` with what to change."""
    from agelab.train import fit, predict

    train_cfg = cfg.train.model_copy(update={"progress": cfg.train.progress and not quiet})
    try:
        result = fit(model, data, train_cfg, callbacks=[on_epoch])
        fitted_at = time.time()
        pred = predict(  # amp as in training: the backbone's precision; ages are fp32
            model,
            data.images,
            batch_size=cfg.train.eval_batch_size,
            device=result.device,
            amp=cfg.train.amp,
        )
    except TrainingDiverged as exc:
        raise TrialFailed(f"diverged: {exc}") from exc
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise TrialFailed(out_of_memory_reason(exc, cfg)) from exc
    return result, pred, fitted_at


def _calibration_idx(data: FaceDataset) -> np.ndarray:
    """The faces conformal intervals are calibrated on: the conformal split, or calib when
    it has too few (see :func:`agelab.metrics.calibration_split`)."""
    from agelab.metrics import calibration_split

    return data.indices(calibration_split(len(data.indices("conformal"))))


def _diagnose(cfg: StudyConfig, data: FaceDataset, pred: np.ndarray):
    """Test-split diagnostics (conformal intervals calibrated on the conformal split) and the
    final metrics: the diagnostics' scalars, the objective, each split's size, the noise
    floor (synthetic)."""
    from agelab import metrics as M

    calib_idx, test_idx = data.indices("calib"), data.indices("test")
    # Conformal intervals are calibrated on points that chose nothing (not the epoch, not the
    # trial): exchangeable with the test faces. Without a conformal share, on calib.
    conformal_idx = _calibration_idx(data)
    y, p = data.ages.astype(np.float64), pred.astype(np.float64)
    diag = M.evaluate(
        y[test_idx],
        p[test_idx],
        y[conformal_idx],
        p[conformal_idx],
        k_max=cfg.metrics.k_max,
        age_bands=cfg.metrics.age_bands,
        conformal_levels=tuple(cfg.metrics.conformal_levels),
        seed=cfg.train.seed,
    )
    calib_mae = float(np.mean(np.abs(p[calib_idx] - y[calib_idx])))
    final = dict(diag.scalars)
    # The objective under its own name too: MLflow's "latest" calib_mae is the last
    # epoch's (highest step), not this one from the restored best weights.
    final |= {"calib_mae": calib_mae, "best_calib_mae": calib_mae}
    final |= {f"n_{name}_split": float(len(data.indices(name))) for name in SPLITS}
    if data.true_ages is not None:  # synthetic: how far from the label-noise floor
        final["noise_floor_mae"] = float(np.mean(np.abs(y[test_idx] - data.true_ages[test_idx])))
        final["mae_vs_true_age"] = float(np.mean(np.abs(p[test_idx] - data.true_ages[test_idx])))
    return diag, final


def _write_artifacts(
    out: Path, cfg: StudyConfig, data: FaceDataset, pred: np.ndarray, model, census, history, diag
) -> None:
    """The trial's files: config, census, history, diagnostics, curves, predictions,
    figures and (optionally) the checkpoint."""
    from agelab import plots
    from agelab.secrets import mask_tree

    # Artifacts leave memory: the config's store URIs carry passwords (masked, as in params).
    config = mask_tree(cfg.model_dump(mode="json"))
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "census.json").write_text(json.dumps(census, indent=2, default=str))
    (out / "history.json").write_text(json.dumps(history, indent=2))
    (out / "diagnostics.json").write_text(
        _strict_json(
            {
                "verdict": diag.verdict,
                "reason": diag.verdict_reason,
                "notes": diag.notes,
                "scalars": diag.scalars,
            }
        )
    )
    diag.cs_curve.to_csv(out / "cs_curve.csv", index=False)
    diag.bands.to_csv(out / "age_bands.csv", index=False)
    if cfg.tracking.log_predictions:
        _predictions_table(data, pred).to_csv(out / "predictions.csv", index=False)
    if cfg.tracking.log_figures:
        test_idx = data.indices("test")
        figs = plots.figures_for(
            diag,
            data.ages.astype(np.float64)[test_idx],
            pred.astype(np.float64)[test_idx],
            first_layer_weights=first_conv_weight(model),
            seed=cfg.train.seed,
        )
        for name, fig in figs.items():
            plots.save_png(fig, out / "figures" / f"{name}.png")
    if cfg.tracking.log_checkpoint:
        from agelab.train import save_checkpoint

        save_checkpoint(out / "model.pt", model, config, census)


def _log_model(
    tracker: Tracker, run_id: str, cfg: StudyConfig, data: FaceDataset, model, census, diag, step
) -> None:
    """The trial's MLflow Model (see :mod:`agelab.tracking.models`): weights as a checkpoint,
    the preprocessing training used and the fitted conformal intervals as JSON."""
    from agelab.secrets import mask_tree
    from agelab.tracking.models import ModelFiles, log_model
    from agelab.train import save_checkpoint

    config = mask_tree(cfg.model_dump(mode="json"))
    with tempfile.TemporaryDirectory(prefix="agelab-model-") as tmp:
        files = ModelFiles(
            checkpoint=save_checkpoint(Path(tmp) / "model.pt", model, config, census),
            preprocessing=_preprocessing(cfg, data),
            conformal=_conformal(diag, data),
            example=data.images[: min(2, len(data))].numpy(),
        )
        log_model(tracker, run_id, files, step=step,
                  tags={"agelab.dataset_fingerprint": data.fingerprint})  # fmt: skip


def _preprocessing(cfg: StudyConfig, data: FaceDataset) -> dict:
    """How an image becomes the model's input, exactly as in training."""
    from agelab.data.images import DECODER_VERSION
    from agelab.train import IMAGENET_MEAN, IMAGENET_STD

    return {
        "image_size": data.image_size,
        "center_crop": cfg.data.center_crop,
        "decoder": "agelab.data.images.decode_image",
        "decoder_version": DECODER_VERSION,
        "steps": "decode, EXIF orientation, RGB (alpha over grey), square crop (face box or "
        "center_crop of the shorter side), Lanczos resize to image_size",
        "layout": "uint8 RGB [N, 3, image_size, image_size]",
        "normalisation": {"scale": "1/255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "precision": "float32",
        "dataset": {"source": cfg.data.source, "fingerprint": data.fingerprint},
    }


def _conformal(diag, data: FaceDataset) -> dict:
    """The run's split-conformal intervals (level → half-width q, by band too); an unbounded
    q (too few calibration faces for the level) is null."""

    def finite(values):
        return [float(v) if np.isfinite(v) else None for v in values]

    from agelab.metrics import calibration_split

    split = calibration_split(len(data.indices("conformal")))
    levels = [
        {
            "level": float(level),
            "q": finite([ci.q])[0],
            "n_calib": int(ci.n_calib),
            "band_edges": list(ci.band_edges),
            "band_q": finite(ci.band_q),
            "band_n": list(ci.band_n),
        }
        for level, ci in sorted(diag.conformal.items())
    ]
    return {"method": "split-conformal: age ± q, q a quantile of |residual|",
            "calibrated_on": split, "levels": levels}  # fmt: skip


def _predictions_table(data: FaceDataset, pred: np.ndarray) -> pd.DataFrame:
    """One row per image; text cells (subjects, paths come from the user's data) cannot run
    as spreadsheet formulas (:mod:`agelab.csvsafe`)."""
    from agelab.csvsafe import safe_frame

    y, p = data.ages.astype(np.float64), pred.astype(np.float64)
    table = pd.DataFrame(
        {"split": data.split, "true_age": y, "prediction": p, "residual": p - y,
         "subject": data.subjects}
    )  # fmt: skip
    if data.paths is not None:
        table["path"] = data.paths
    if data.true_ages is not None:
        table["noise_free_age"] = data.true_ages
    return safe_frame(table)


def _strict_json(obj) -> str:
    """JSON that strict parsers accept: NaN/inf (undefined statistics) become null."""

    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2, default=float, allow_nan=False)
