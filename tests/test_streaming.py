"""Bigger than memory: the shard store (chunked, resumable, atomic, validated), the prefetch
thread (order, errors, shutdown), and training that streams from disk giving the very same
losses and predictions as training on resident images."""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from agelab.config import AugmentConfig, DataConfig, SynthConfig, TrainConfig
from agelab.data import shards as S
from agelab.data.cache import CacheWarning, fingerprint
from agelab.data.load import load_dataset
from agelab.data.prefetch import Prefetcher
from agelab.errors import DataError
from helpers.images import write_image


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("agelab-prefetch")]


def pixels(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def writer(tmp_path: Path, n: int = 10, rows: int = 4, fp: str | None = None) -> S.ShardWriter:
    fp = fp or fingerprint({"test": n})
    return S.ShardWriter(tmp_path, "t-key", fp, n, 8, rows)


# ------------------------------------------------------------------------ shard store


def test_shards_are_written_in_chunks_and_read_back_memory_mapped(tmp_path):
    data = pixels(10)
    w = writer(tmp_path)
    assert w.bounds == [(0, 4), (4, 8), (8, 10)]
    calls = []

    def decode(a, b):
        calls.append((a, b))
        return data[a:b], {"note": a}

    stamps = S.build_in_chunks(w, decode)
    assert calls == [(0, 4), (4, 8), (8, 10)]  # one shard in memory at a time
    store = w.finish(stamps, {"ages": np.arange(10, dtype=np.float32)}, {"k": 1})
    assert all(isinstance(s, np.memmap) for s in store.images.shards)
    assert [len(s) for s in store.images.shards] == [4, 4, 2]
    assert np.array_equal(store.images.gather(np.arange(10)), data)
    assert store.meta == {"k": 1} and store.stamps[1]["facts"] == {"note": 4}
    again = S.open_store(tmp_path, "t-key", w.fp, verify=True)
    assert again is not None and np.array_equal(again.arrays["ages"], np.arange(10))


def test_interrupted_build_is_not_trusted_and_resumes_after_the_last_complete_shard(tmp_path):
    data = pixels(10)

    def crash_at_third(a, b):
        if a == 8:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) while decoding shard 3
        return data[a:b], {}

    with pytest.raises(KeyboardInterrupt):
        S.build_in_chunks(writer(tmp_path), crash_at_third)
    assert S.open_store(tmp_path, "t-key", writer(tmp_path).fp) is None  # no sidecar: no store
    calls = []

    def decode(a, b):
        calls.append(a)
        return data[a:b], {}

    w = writer(tmp_path)
    assert w.done(0) and w.done(1) and w.done(2) is None
    assert w.needed_bytes() == S.decoded_bytes(2, 8)
    store = w.finish(S.build_in_chunks(w, decode), {}, {})
    assert calls == [8]  # shards 1 and 2 were kept
    assert np.array_equal(store.images.gather(np.arange(10)), data)


def test_a_crash_inside_a_shard_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    w = writer(tmp_path)
    real_save = np.save

    def dies_halfway(f, arr, **kw):
        f.write(b"\x93NUMPY half a header")
        raise OSError(5, "I/O error")

    monkeypatch.setattr(np, "save", dies_halfway)
    with pytest.raises(DataError, match="cannot write the shard cache"):
        w.write(0, pixels(4), {})
    monkeypatch.setattr(np, "save", real_save)
    assert not list(w.folder.iterdir())  # the temporary file is gone, nothing else written
    assert w.done(0) is None


@pytest.mark.parametrize("damage", ["truncate", "edit", "stamp", "sidecar", "fingerprint"])
def test_a_damaged_store_warns_and_is_rebuilt_never_trusted(tmp_path, damage):
    data = pixels(10)
    w = writer(tmp_path)
    w.finish(S.build_in_chunks(w, lambda a, b: (data[a:b], {})), {}, {})
    shard = w.folder / "images-00001.npy"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif damage == "edit":  # same size, one byte changed: the modification time gives it away
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 0xFF
        time.sleep(0.01)
        shard.write_bytes(bytes(raw))
    elif damage == "stamp":
        side = json.loads(w.sidecar.read_text())
        side["shards"][1]["sha256"] = "0" * 64
        side["shards"][1]["mtime_ns"] = 0
        w.sidecar.write_text(json.dumps(side))
    elif damage == "sidecar":
        w.sidecar.write_text('{"format": 1, "fingerprint"')
    else:
        side = json.loads(w.sidecar.read_text())
        side["fingerprint"] = "f" * 64
        w.sidecar.write_text(json.dumps(side))
    with pytest.warns(CacheWarning, match="shard cache .* is broken"):
        assert S.open_store(tmp_path, "t-key", w.fp) is None
    calls = []

    def decode(a, b):
        calls.append(a)
        return data[a:b], {}

    w2 = writer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        store = w2.finish(S.build_in_chunks(w2, decode), {}, {})
    assert calls == ([4] if damage in ("truncate", "edit") else [])  # only the broken shard
    assert np.array_equal(store.images.gather(np.arange(10)), data)


def test_not_enough_disk_is_a_clear_error_naming_the_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "_free", lambda folder: 1000)
    w = writer(tmp_path, n=100, rows=40)
    with pytest.raises(DataError) as err:
        S.build_in_chunks(w, lambda a, b: pytest.fail("nothing may be decoded"))
    msg = str(err.value)
    assert str(w.folder) in msg and "19.2 kB" in msg and "1.0 kB is free" in msg
    assert "data.cache_dir" in msg


def test_sharded_images_index_like_a_tensor(tmp_path):
    data = pixels(10)
    w = writer(tmp_path)
    images = w.finish(S.build_in_chunks(w, lambda a, b: (data[a:b], {})), {}, {}).images
    assert images.shape == torch.Size((10, 3, 8, 8)) and images.dtype == torch.uint8
    assert len(images) == 10 and images.nbytes == data.nbytes
    order = np.array([9, 0, 5, 5, 3, 8])  # across shards, repeats, any order
    assert np.array_equal(images.gather(order), data[order])
    assert torch.equal(images[torch.from_numpy(order)], torch.from_numpy(data[order]))
    assert torch.equal(images[2:7], torch.from_numpy(data[2:7]))
    assert torch.equal(images[-1], torch.from_numpy(data[-1]))
    mask = np.arange(10) % 3 == 0
    assert torch.equal(images[mask], torch.from_numpy(data[mask]))
    odd = images.select(np.arange(1, 10, 2))
    assert np.array_equal(odd.gather([0, 4]), data[[1, 9]])
    both = S.join_images(odd, data[:2])  # a streamed source + an in-memory one
    assert isinstance(both, S.ShardedImages) and len(both) == 7
    assert np.array_equal(both.gather([4, 5, 6]), np.stack([data[9], data[0], data[1]]))
    assert np.array_equal(S.join_images(data[:2], data[2:4]), data[:4])
    buf = np.zeros((2, 3, 8, 8), np.uint8)
    assert images.gather([7, 1], out=buf) is buf and np.array_equal(buf, data[[7, 1]])


def test_the_budget_rule():
    assert (
        S.resident_budget(2).bytes == 2e9 and "data.max_resident_gb 2" in S.resident_budget(2).rule
    )
    default = S.resident_budget(None)
    ram = S.available_ram_bytes()
    assert ram is not None and default.bytes == pytest.approx(ram / 2, rel=0.05)
    assert "half the" in default.rule and "available RAM" in default.rule
    b = S.resident_budget(0.001)
    assert b.take(600_000) and not b.take(600_000)  # the sources of one dataset share it


# ------------------------------------------------------------------------- prefetcher


def test_prefetcher_yields_in_order_and_ends_its_thread():
    seen = []

    def slow_square(x):
        seen.append(threading.current_thread().name)
        time.sleep(0.001 * (x % 3))
        return x * x

    with Prefetcher(slow_square, range(20), depth=2) as ahead:
        assert list(ahead) == [x * x for x in range(20)]
        assert next(ahead, "end") == "end"
    assert set(seen) == {"agelab-prefetch"}  # computed on the background thread
    assert not ahead.alive and not prefetch_threads()


def test_prefetcher_raises_the_threads_exception_where_the_item_is_read():
    def fails_at_three(x):
        if x == 3:
            raise ValueError(f"bad item {x}")
        return x

    ahead = Prefetcher(fails_at_three, range(10))
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3") as err:
        next(ahead)
    assert "fails_at_three" in "".join(str(f) for f in err.traceback)  # the thread's traceback
    assert not ahead.alive and next(ahead, "end") == "end"
    ahead.close()


def test_prefetcher_close_stops_a_thread_waiting_on_a_full_queue():
    made = []
    ahead = Prefetcher(lambda x: made.append(x) or x, range(10_000), depth=2)
    assert next(ahead) == 0
    time.sleep(0.1)  # the thread has filled the queue and waits for room
    assert ahead.alive and len(made) <= 4
    t0 = time.perf_counter()
    ahead.close()
    assert time.perf_counter() - t0 < 1.0 and not ahead.alive and not prefetch_threads()
    assert len(made) <= 5 and next(ahead, "end") == "end"
    ahead.close()  # idempotent


def test_prefetcher_dropped_without_close_stops_by_itself():
    ahead = Prefetcher(lambda x: x, range(10_000), depth=1)
    thread = ahead._thread
    del ahead
    thread.join(timeout=2)
    assert not thread.is_alive()


# --------------------------------------------------------------------------- training


def _faces(tmp_path: Path, streamed: bool, n: int = 80, **kw):
    data = DataConfig(
        image_size=32,
        synthetic=SynthConfig(n_images=n, images_per_subject=2, seed=3),
        cache_dir=tmp_path / ("streamed" if streamed else "resident"),
        max_resident_gb=0 if streamed else None,
        **kw,
    )
    return load_dataset(data, progress=False)


def test_streaming_trains_exactly_like_resident(tmp_path, monkeypatch, one_torch_thread, capfd):
    """Same seed → same batches → same augmentation → same losses and predictions."""
    from agelab.models import build_model
    from agelab.train import fit, predict

    monkeypatch.setattr(S, "SHARD_BYTES", 17 * 3 * 32 * 32)  # 17 images a shard: 5 shards
    resident, streamed = _faces(tmp_path, False), _faces(tmp_path, True)
    assert "streaming from" in capfd.readouterr().err
    assert not resident.streaming and streamed.streaming
    assert len(streamed.images.shards) == 5
    assert resident.fingerprint == streamed.fingerprint  # one dataset, two ways to hold it
    assert np.array_equal(resident.split, streamed.split)
    assert streamed.info["residency"]["path"] == "streaming"
    assert resident.info["residency"]["path"] == "resident"
    cfg = TrainConfig(
        epochs=2, batch_size=16, eval_batch_size=24, progress=False, patience=None,
        device="cpu", augment=AugmentConfig(enabled=True),
    )  # fmt: skip
    runs = []
    for data in (resident, streamed):
        model, _ = build_model("test_resnet", "batch", "relu", img_size=32, seed=0)
        result = fit(model, data, cfg)
        runs.append((result, predict(model, data.images, batch_size=48)))
    (r_res, p_res), (r_str, p_str) = runs
    assert (r_res.data_path, r_str.data_path) == ("resident-host", "streaming")
    for key in ("train_loss", "calib_mae"):
        assert [h[key] for h in r_res.history] == [h[key] for h in r_str.history], key
    assert np.array_equal(p_res, p_str)
    assert not prefetch_threads()


def test_a_failing_fit_leaves_no_prefetch_thread(tmp_path, one_torch_thread):
    from agelab.models import build_model
    from agelab.train import fit

    data = _faces(tmp_path, True, n=80)
    model, _ = build_model("test_resnet", "batch", "relu", img_size=32, seed=0)

    def stop(epoch, metrics):
        raise RuntimeError("pruned")

    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, patience=None, device="cpu")
    with pytest.raises(RuntimeError, match="pruned"):
        fit(model, data, cfg, callbacks=[stop])
    assert not prefetch_threads()


# ------------------------------------------------------------------------------ loading


def _csv(root: Path, n: int, bad: int | None = None, seed: int = 0) -> Path:
    lines = ["path,age,subject"]
    for i in range(n):
        if i == bad:
            (root / "img" / f"{i}.jpg").write_bytes(b"not an image")
        else:
            write_image(root / "img" / f"{i}.jpg", seed=seed + i)
        lines.append(f"img/{i}.jpg,{10 + i},p{seed + i}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_real_data_streams_decoded_in_shards_with_bad_rows_skipped(tmp_path, monkeypatch):
    import agelab.data.load as L

    (tmp_path / "img").mkdir()
    manifest = _csv(tmp_path, 23, bad=6)
    monkeypatch.setattr(S, "SHARD_BYTES", 5 * 3 * 16 * 16)  # 5 rows a shard

    def cfg(budget, cache):
        return DataConfig(source="csv", path=manifest, image_size=16, on_bad="skip",
                          cache_dir=tmp_path / cache, max_resident_gb=budget)  # fmt: skip

    resident = load_dataset(cfg(None, "a"), progress=False)
    decoded = []
    real = L.decode_many
    monkeypatch.setattr(
        L, "decode_many", lambda files, *a, **k: decoded.append(len(files)) or real(files, *a, **k)
    )
    streamed = load_dataset(cfg(0.00001, "b"), progress=False)
    assert decoded == [5, 5, 5, 5, 3]  # one shard at a time
    assert streamed.streaming and len(streamed) == 22 == len(resident)
    assert torch.equal(streamed.images[:], resident.images)
    assert streamed.info["bad_rows"] == resident.info["bad_rows"]
    assert streamed.info["n_bad"] == 1 and not streamed.info["cache_hit"]
    assert streamed.fingerprint == resident.fingerprint
    again = load_dataset(cfg(0.00001, "b"), progress=False)
    assert again.info["cache_hit"] and decoded == [5, 5, 5, 5, 3]  # nothing decoded again
    with pytest.raises(DataError, match="not an image"):  # on_bad=error still names the file
        load_dataset(cfg(0.00001, "b").model_copy(update={"on_bad": "error"}), progress=False)


def test_a_test_source_shares_the_budget_and_streams_when_it_no_longer_fits(tmp_path, capfd):
    (tmp_path / "main" / "img").mkdir(parents=True)
    (tmp_path / "other" / "img").mkdir(parents=True)
    main, other = _csv(tmp_path / "main", 23), _csv(tmp_path / "other", 10, seed=100)
    test = {"source": "csv", "path": other}

    def cfg(budget, cache):
        return DataConfig(source="csv", path=main, image_size=16, cache_dir=tmp_path / cache,
                          max_resident_gb=budget, test=test)  # fmt: skip

    resident = load_dataset(cfg(None, "a"), progress=False)
    mixed = load_dataset(cfg(0.00002, "b"), progress=False)  # 20 kB: the main source's 17.7 fit
    err = capfd.readouterr().err
    assert "test source 7.7 kB decoded > the 2.3 kB left of data.max_resident_gb 2e-05" in err
    assert mixed.info["residency"]["path"] == "resident"
    assert mixed.info["test_source"]["residency"]["path"] == "streaming"
    assert mixed.streaming and torch.equal(mixed.images[:], resident.images)
    assert np.array_equal(mixed.split, resident.split) and (mixed.split == "test").sum() == 10


def test_export_of_a_streamed_dataset(tmp_path):
    from PIL import Image

    from agelab.data.export import export_folder

    data = _faces(tmp_path, True, n=12)
    manifest = export_folder(data, tmp_path / "out", progress=False)
    assert len(manifest.read_text().splitlines()) == 13
    png = np.asarray(Image.open(tmp_path / "out" / "images" / "000011.png"))
    assert np.array_equal(png, data.images[11].permute(1, 2, 0).numpy())


def test_max_resident_gb_does_not_change_the_study_identity():
    from agelab.config import validate
    from agelab.study.identity import identity

    base = {"name": "x", "search": {"space": {"model.norm": ["batch"]}}}
    a = identity(validate(base), "fp")
    b = identity(validate({**base, "data": {"max_resident_gb": 0.5}}), "fp")
    assert a == b


@pytest.mark.slow
def test_a_study_trial_streams_and_says_so(tmp_path, capfd):
    """A dataset over data.max_resident_gb trains end to end through a real study trial."""
    from mlflow.tracking import MlflowClient

    from agelab.config import validate
    from agelab.study import run_study
    from agelab.tracking import default_uri
    from helpers.studies import tiny_study

    raw = tiny_study(
        tmp_path,
        data={"max_resident_gb": 0.0002, "cache_dir": str(tmp_path / "cache")},
        search={"space": {"model.norm": ["batch"], "model.act": ["relu"]}},
        report={"auto": False},
    )
    cfg = validate(raw)
    summary = run_study(cfg, quiet=True)
    assert summary.counts["COMPLETE"] == 1
    assert "decoded > data.max_resident_gb 0.0002: streaming from" in capfd.readouterr().err
    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.name)
    trials = [
        r for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("agelab.run_kind") == "trial"
    ]  # fmt: skip
    assert len(trials) == 1 and trials[0].data.tags["agelab.data_path"] == "streaming"
    assert np.isfinite(trials[0].data.metrics["mae"])
    assert list((tmp_path / "cache").glob("*.shards/images-*.npy"))
    assert not prefetch_threads()
