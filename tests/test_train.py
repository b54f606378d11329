"""Trainer: learning on synthetic faces, no-norm training, divergence, early stopping,
callbacks, determinism, checkpoints, augmentation, the CUDA path and the micro-benchmark.
CPU tests use 32 px images, a few hundred images at most and 1–4 epochs."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from agelab import train as train_mod
from agelab.config import AugmentConfig, SplitConfig, SynthConfig, TrainConfig
from agelab.data.dataset import FaceDataset
from agelab.errors import CheckpointError, TrainingDiverged
from agelab.models import build_model
from agelab.train import (
    augment_batch,
    fit,
    load_checkpoint,
    param_groups,
    predict,
    save_checkpoint,
)

# Tiny models run fastest on one thread on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def synthetic(n: int = 2000, size: int = 32, seed: int = 0) -> FaceDataset:
    """Synthetic faces, one per subject, split by subject (generated once per session).

    One image per subject: at a fixed image count, more distinct faces teach a small net much
    faster than five views of fewer faces."""
    from agelab.data.split import assign_splits
    from agelab.data.synth import generate

    faces = generate(SynthConfig(n_images=n, images_per_subject=1, seed=seed), size)
    split = assign_splits(faces.ages, faces.subjects, SplitConfig())
    return FaceDataset(
        images=torch.from_numpy(faces.images),
        ages=faces.ages,
        subjects=faces.subjects.astype(str),
        split=split,
        fingerprint=f"test-{n}-{size}-{seed}",
        source="synthetic",
        true_ages=faces.true_ages,
    )


def random_data(n_train: int = 48, n_calib: int = 16, size: int = 32) -> FaceDataset:
    rng = np.random.default_rng(0)
    n = n_train + n_calib
    return FaceDataset(
        images=torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), np.uint8)),
        ages=rng.uniform(1, 90, n).astype(np.float32),
        subjects=np.array([str(i) for i in range(n)]),
        split=np.array(["train"] * n_train + ["calib"] * n_calib),
        fingerprint="random",
        source="test",
    )


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 1, "batch_size": 16, "progress": False, "patience": None, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_fit_learns_synthetic_ages_well_below_the_mean_predictor():
    data = synthetic()
    train, calib = data.indices("train"), data.indices("calib")
    mean_predictor_mae = float(np.abs(data.ages[calib] - data.ages[train].mean()).mean())
    # timm's test_resnet: a real ResNet (same build path as resnet10t/18) small enough to see
    # 5600 images in ~12 s on one CPU core. (~0.6 of the mean predictor's MAE in 4 epochs.)
    model, _ = build_model("test_resnet", "batch", "relu", img_size=32, seed=0)
    seen = []
    result = fit(
        model,
        data,
        cfg(epochs=4, batch_size=32, lr=6e-3, augment=AugmentConfig(enabled=False)),
        callbacks=[lambda epoch, m: seen.append((epoch, m))],
    )

    assert result.best_calib_mae < 0.75 * mean_predictor_mae, (result.history, mean_predictor_mae)
    assert [e for e, _ in seen] == [1, 2, 3, 4]
    assert set(seen[0][1]) == {
        "epoch",
        "train_loss",
        "calib_mae",
        "lr",
        "epoch_seconds",
        "images_per_second",
    }
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.device == "cpu" and result.images_per_second > 0 and result.seconds > 0
    # Best weights restored: predictions reproduce the best calib MAE.
    pred = predict(model, data.images[torch.from_numpy(calib)], batch_size=64)
    assert math.isclose(
        float(np.abs(pred - data.ages[calib]).mean()), result.best_calib_mae, rel_tol=1e-4
    )


def test_norm_none_resnet18_training_loss_falls():
    data = synthetic()
    model, census = build_model("resnet18", "none", "relu", img_size=32, seed=0)
    assert census["norm_kinds"] == {"none": 20} and census["init"]["skipinit_gains"] == 8
    small = FaceDataset(
        images=data.images[:80],
        ages=data.ages[:80],
        subjects=data.subjects[:80],
        split=np.array(["train"] * 64 + ["calib"] * 16),
        fingerprint="small",
        source="synthetic",
    )
    result = fit(
        model, small, cfg(epochs=5, lr=3e-3, loss="l2", augment=AugmentConfig(enabled=False))
    )
    losses = [h["train_loss"] for h in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    gains = [m.gain.item() for m in model.modules() if type(m).__name__ == "SkipInit"]
    assert any(g != 0.0 for g in gains)  # the residual branches have started to contribute


def test_dex_loss_trains_and_predicts_in_range():
    from agelab.config import ModelConfig
    from agelab.models import build_model_from_config

    model, _ = build_model_from_config(
        ModelConfig(backbone="mobilenetv3_small_100"), 32, "dex", max_age=100, seed=0
    )
    data = random_data()
    result = fit(model, data, cfg(), loss_name="dex")
    assert math.isfinite(result.best_calib_mae) and model.loss.name == "dex"
    pred = predict(model, data.images.numpy())
    assert pred.shape == (len(data),) and ((pred >= 0) & (pred <= 100)).all()
    with pytest.raises(ValueError, match="out_dim"):
        fit(build_model("regnetx_002", "batch", "relu", img_size=32)[0], data, cfg(loss="dex"))


# ---------------------------------------------------------------------- failures, control


def test_nan_weight_raises_training_diverged_at_the_first_step():
    model, _ = build_model("regnetx_002", "batch", "relu", img_size=32, seed=0)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as exc:
        fit(model, random_data(), cfg(lr=1e-3, warmup_epochs=0))
    assert (exc.value.epoch, exc.value.step) == (1, 1)
    assert exc.value.lr == pytest.approx(1e-3)
    assert "epoch 1, step 1" in str(exc.value) and "lr 0.001" in str(exc.value)


def test_huge_learning_rate_diverges_with_location():
    model, _ = build_model("regnetx_002", "none", "relu", img_size=32, seed=0)
    with pytest.raises(TrainingDiverged) as exc:
        fit(
            model,
            random_data(),
            cfg(epochs=3, lr=1.0, weight_decay=0.0, grad_clip=None, warmup_epochs=0, loss="l2"),
        )
    err = exc.value
    assert err.epoch >= 1 and err.step >= 1 and err.lr > 0
    assert f"epoch {err.epoch}, step {err.step}" in str(err)


def test_callback_exception_propagates_unchanged():
    class Prune(Exception):
        pass

    def prune(epoch, metrics):
        assert metrics["epoch"] == epoch
        raise Prune(epoch)

    model, _ = build_model("regnetx_002", "batch", "relu", img_size=32, seed=0)
    with pytest.raises(Prune) as exc:
        fit(model, random_data(), cfg(epochs=3), callbacks=[prune])
    assert exc.value.args == (1,)


def test_early_stopping_and_best_epoch(monkeypatch):
    maes = iter([5.0, 4.0, 6.0, 7.0, 3.0])
    monkeypatch.setattr(train_mod, "_calib_mae", lambda *a, **k: torch.tensor(next(maes)))
    model, _ = build_model("regnetx_002", "batch", "relu", img_size=32, seed=0)
    result = fit(model, random_data(), cfg(epochs=5, patience=2))
    assert result.stopped_early and len(result.history) == 4
    assert (result.best_epoch, result.best_calib_mae) == (2, 4.0)


def test_threads_setting_is_scoped_to_fit():
    torch.set_num_threads(2)
    try:
        model, _ = build_model("test_resnet", "batch", "relu", img_size=32, seed=0)
        seen = []
        fit(
            model,
            random_data(),
            cfg(threads=1),
            callbacks=[lambda e, m: seen.append(torch.get_num_threads())],
        )
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


# -------------------------------------------------------------------------- determinism


def _seeded_run(seed: int) -> np.ndarray:
    model, _ = build_model("test_resnet", "batch", "silu", img_size=32, seed=seed, drop_rate=0.2)
    data = random_data()
    fit(model, data, cfg(seed=seed, epochs=2))  # augmentation and dropout on
    return predict(model, data.images)


def test_same_seed_same_predictions_on_cpu():
    a, b = _seeded_run(0), _seeded_run(0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _seeded_run(1))


def test_augment_batch_is_batched_seeded_and_bounded():
    x = torch.rand(8, 3, 32, 32)
    on = AugmentConfig()
    a = augment_batch(x, on, torch.Generator().manual_seed(0))
    b = augment_batch(x, on, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 1
    off = AugmentConfig(flip=False, shift=0, scale=0, rotate=0, brightness=0, contrast=0)
    assert torch.equal(augment_batch(x, off, torch.Generator()), x)
    # Flip only: each image is either itself or exactly its mirror.
    flip = off.model_copy(update={"flip": True})
    y = augment_batch(x, flip, torch.Generator().manual_seed(3))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    # Geometric path with only a flip drawn: grid_sample reproduces the mirror closely.
    geo = flip.model_copy(update={"shift": 1e-9})
    z = augment_batch(x, geo, torch.Generator().manual_seed(3))
    assert torch.allclose(z, y, atol=1e-4)


def test_schedule_and_weight_decay_groups():
    f = train_mod._lr_factor
    assert [round(f(s, 4, 20), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, 4, 20) == 1.0 and f(12, 4, 20) == pytest.approx(0.5) and f(20, 4, 20) == 0.0
    model, _ = build_model("vit_tiny_patch16", "layer", "gelu", img_size=32)
    decay, no_decay = param_groups(model, 0.05)
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.backbone.pos_embed) in ids and id(model.backbone.cls_token) in ids


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    from agelab.config import ModelConfig
    from agelab.models import build_model_from_config

    data = random_data()
    for loss in ("huber", "dex"):
        model, census = build_model_from_config(
            ModelConfig(backbone="regnetx_002", norm="group"), 32, loss, max_age=95, seed=0
        )
        fit(model, data, cfg(loss=loss))
        path = save_checkpoint(
            tmp_path / f"{loss}.pt", model, {"train": cfg(loss=loss), "where": tmp_path}, census
        )
        loaded, meta = load_checkpoint(path)
        assert np.array_equal(predict(model, data.images), predict(loaded, data.images))
        assert meta["model"] == model.spec and meta["loss"]["name"] == loss
        assert meta["census"]["norm_kinds"] == census["norm_kinds"]
        assert meta["config"]["train"]["loss"] == loss and meta["config"]["where"] == str(tmp_path)


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        load_checkpoint(garbage)

    model, census = build_model("regnetx_002", "batch", "relu", img_size=32, seed=0)
    good = save_checkpoint(tmp_path / "good.pt", model, {}, census)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt"):
        load_checkpoint(truncated)

    payload = torch.load(good, weights_only=True)
    payload["model"]["norm"] = "group"  # weights of a batch-norm net under a group-norm spec
    mismatched = tmp_path / "mismatched.pt"
    torch.save(payload, mismatched)
    with pytest.raises(CheckpointError, match=r"mismatched\.pt.*does not match"):
        load_checkpoint(mismatched)

    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an agelab checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


# ---------------------------------------------------------------------------- benchmark


def test_bench_fit_vs_bare_reports_ratio():
    from agelab.bench import bench_fit_vs_bare

    r = bench_fit_vs_bare(
        "regnetx_002",
        image_size=32,
        n_images=32,
        batch_size=16,
        repeats=1,
        device="cpu",
        verbose=False,
    )
    assert r["device"] == "cpu" and r["threads"] >= 1 and r["ratio"] > 0
    assert r["fit_images_per_second"]["median"] > 0 and r["bare_images_per_second"]["min"] > 0


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_bf16_channels_last_compile_path():
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available: the bf16 / channels_last / torch.compile path needs a GPU")
    data = synthetic(n=200)
    model, _ = build_model("resnet10t", "batch", "relu", img_size=32, seed=0)
    result = fit(
        model,
        data,
        cfg(device="cuda", epochs=2, batch_size=32, amp=True, channels_last=True, compile=True),
    )
    assert result.device.startswith("cuda") and math.isfinite(result.best_calib_mae)
    assert next(model.parameters()).is_cuda
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    pred = predict(model, data.images)
    assert pred.shape == (len(data),) and np.isfinite(pred).all()
    # Divergence is still located on CUDA (device-side flag read every N steps).
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as exc:
        fit(model, data, cfg(device="cuda", batch_size=32))
    assert (exc.value.epoch, exc.value.step) == (1, 1)
