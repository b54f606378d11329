"""Decoded-tensor cache: hits, invalidation, corruption → rebuild, atomic and concurrent writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from agelab.config import DataConfig, SynthConfig
from agelab.data import cache as C
from agelab.data.load import load_dataset
from helpers.images import write_image

SRC = Path(__file__).resolve().parents[1] / "src"


def make_csv_dataset(root: Path, n: int = 6) -> Path:
    lines = ["path,age,subject"]
    for i in range(n):
        write_image(root / "img" / f"{i}.jpg", seed=i)
        lines.append(f"img/{i}.jpg,{10 + 7 * i},p{i}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def make_utk_dataset(root: Path, n: int = 5) -> Path:
    for i in range(n):
        write_image(root / f"{20 + i}_0_1_2017010{i}.jpg.chip.jpg", seed=i)
    return root


def cfg_for(path: Path, cache: Path, source: str = "csv", **kw) -> DataConfig:
    return DataConfig(source=source, path=path, image_size=16, cache_dir=cache, **kw)


def load(cfg: DataConfig):
    return load_dataset(cfg, progress=False)


# ------------------------------------------------------------------------ entry level


@pytest.fixture
def entry(tmp_path):
    arrays = {
        "images": np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4),
        "ages": np.array([3.5, 70.0], dtype=np.float32),
    }
    fp = C.fingerprint({"test": 1})
    key = C.entry_key("t", fp)
    side = C.save_entry(tmp_path, key, fp, arrays, {"note": "x"})
    return tmp_path, key, fp, arrays, side


def test_roundtrip_and_layout(entry):
    folder, key, fp, arrays, side = entry
    got = C.load_entry(folder, key, fp)
    assert got is not None and got.meta == {"note": "x"}
    for name, arr in arrays.items():
        assert np.array_equal(got.arrays[name], arr) and got.arrays[name].dtype == arr.dtype
    meta = json.loads(side.read_text())
    assert meta["arrays"]["images"]["shape"] == [2, 3, 4, 4]
    assert len(meta["arrays"]["images"]["sha256"]) == 64
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{key}.ages.npy",
        f"{key}.images.npy",
        f"{key}.json",
    ]  # no temp files left


def test_miss_is_silent(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.load_entry(tmp_path, "nothing", "0" * 64) is None


def test_fingerprint_is_order_independent_and_content_sensitive():
    assert C.fingerprint({"a": 1, "b": 2}) == C.fingerprint({"b": 2, "a": 1})
    assert C.fingerprint({"a": 1}) != C.fingerprint({"a": 2})


def _truncate(folder, key):
    f = folder / f"{key}.images.npy"
    f.write_bytes(f.read_bytes()[:-10])


def _garbage(folder, key):
    f = folder / f"{key}.images.npy"
    f.write_bytes(os.urandom(f.stat().st_size))


def _flip_byte(folder, key):
    f = folder / f"{key}.images.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, same header: only the checksum can tell
    f.write_bytes(bytes(data))


def _wrong_shape(folder, key):
    np.save(folder / f"{key}.images.npy", np.zeros((3, 3, 4, 4), np.uint8))


def _pickle(folder, key):
    np.save(folder / f"{key}.images.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _missing_array(folder, key):
    (folder / f"{key}.ages.npy").unlink()


def _edit_sidecar(mutate):
    def apply(folder, key):
        side = folder / f"{key}.json"
        meta = json.loads(side.read_text())
        mutate(meta)
        side.write_text(json.dumps(meta))

    return apply


def _sidecar_garbage(folder, key):
    (folder / f"{key}.json").write_text('{"format": 1, "arrays": {')


CORRUPTIONS = {
    "truncated npy": (_truncate, "truncated"),
    "garbage npy": (_garbage, "does not load"),
    "flipped byte": (_flip_byte, "checksum"),
    "wrong shape": (_wrong_shape, "expected"),
    "pickled object array": (_pickle, r"bytes, expected|does not load"),
    "array file missing": (_missing_array, "missing"),
    "sidecar not json": (_sidecar_garbage, "not valid JSON"),
    "sidecar shape edited": (
        _edit_sidecar(lambda m: m["arrays"]["images"].update(shape=[9, 3, 4, 4])),
        "expected",
    ),
    "sidecar sha edited": (
        _edit_sidecar(lambda m: m["arrays"]["ages"].update(sha256="0" * 64)),
        "checksum",
    ),
    "sidecar fingerprint edited": (
        _edit_sidecar(lambda m: m.update(fingerprint="f" * 64)),
        "fingerprint",
    ),
    "sidecar format changed": (_edit_sidecar(lambda m: m.update(format=999)), "format"),
    "sidecar table removed": (_edit_sidecar(lambda m: m.pop("arrays")), "array table"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_entry_warns_and_misses(entry, case):
    folder, key, fp, _, _ = entry
    corrupt, needle = CORRUPTIONS[case]
    corrupt(folder, key)
    with pytest.warns(C.CacheWarning, match=needle):
        assert C.load_entry(folder, key, fp) is None


def test_crash_mid_write_leaves_no_valid_looking_entry(tmp_path, monkeypatch):
    fp = C.fingerprint("crash")
    key = C.entry_key("t", fp)
    real_save = np.save

    def dying_save(f, arr, **kw):
        real_save(f, arr[: len(arr) // 2], **kw)  # half the data is written, then "crash"
        raise KeyboardInterrupt

    monkeypatch.setattr(C.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        C.save_entry(tmp_path, key, fp, {"images": np.ones((8, 3, 4, 4), np.uint8)}, {})
    assert list(tmp_path.iterdir()) == []  # temp file removed, nothing under the real name
    assert C.load_entry(tmp_path, key, fp) is None


def test_stale_temp_files_are_cleaned(tmp_path):
    stale = tmp_path / ".x.images.npy.abc.tmp"
    stale.write_bytes(b"half")
    fresh = tmp_path / ".y.images.npy.def.tmp"
    fresh.write_bytes(b"being written")
    old = time.time() - 3 * 24 * 3600
    os.utime(stale, (old, old))
    fp = C.fingerprint("t")
    C.save_entry(tmp_path, C.entry_key("t", fp), fp, {"a": np.zeros(2)}, {})
    assert not stale.exists() and fresh.exists()  # a live writer's temp file is left alone


WRITER = """
import sys, time, pathlib, numpy as np
sys.path.insert(0, {src!r})
from agelab.data import cache as C
arr = np.arange(64 * 3 * 32 * 32, dtype=np.uint64).reshape(64, 3, 32, 32).astype(np.uint8)
fp = C.fingerprint("concurrent")
folder = pathlib.Path({folder!r})
(folder / f"ready{{sys.argv[1]}}").touch()
while not (folder / "go").exists():  # start both writers at the same moment
    time.sleep(0.002)
for _ in range(40):
    C.save_entry(folder / "cache", C.entry_key("c", fp), fp, {{"images": arr}},
                 {{"who": sys.argv[1]}})
"""


def test_concurrent_builders_never_corrupt(tmp_path):
    code = WRITER.format(src=str(SRC), folder=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)]) for i in range(2)]
    deadline = time.time() + 30
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    expected = np.arange(64 * 3 * 32 * 32, dtype=np.uint64).reshape(64, 3, 32, 32).astype(np.uint8)
    fp = C.fingerprint("concurrent")
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CacheWarning)  # any corrupt read fails the test
        while any(p.poll() is None for p in procs):
            got = C.load_entry(cache, C.entry_key("c", fp), fp)
            if got is not None:  # readers see a whole entry or none, never a broken one
                assert np.array_equal(got.arrays["images"], expected)
        assert [p.wait() for p in procs] == [0, 0]
        final = C.load_entry(cache, C.entry_key("c", fp), fp)
    assert final is not None and final.meta["who"] in ("0", "1")
    assert not list(cache.glob(".*.tmp"))


# --------------------------------------------------------------------- dataset level


def test_real_data_hit_then_invalidation(tmp_path):
    manifest = make_csv_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    first = load(cfg_for(manifest, cache))
    assert first.info["cache_hit"] is False and Path(first.info["cache_file"]).is_file()
    again = load(cfg_for(manifest, cache))
    assert again.info["cache_hit"] is True and again.fingerprint == first.fingerprint
    assert np.array_equal(again.images.numpy(), first.images.numpy())

    # Touch a file (same bytes, new mtime): a different fingerprint → rebuild.
    img = tmp_path / "ds" / "img" / "2.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = load(cfg_for(manifest, cache))
    assert touched.info["cache_hit"] is False and touched.fingerprint != first.fingerprint

    # Change a label.
    manifest.write_text(manifest.read_text().replace("img/0.jpg,10,", "img/0.jpg,11,"))
    relabelled = load(cfg_for(manifest, cache))
    assert relabelled.info["cache_hit"] is False
    assert relabelled.fingerprint not in (first.fingerprint, touched.fingerprint)

    # Decoding options are part of the key too.
    other = load(cfg_for(manifest, cache, center_crop=0.8))
    assert other.info["cache_hit"] is False and other.fingerprint != relabelled.fingerprint


def test_folder_added_and_removed_file_invalidates(tmp_path):
    root = make_utk_dataset(tmp_path / "utk")
    cache = tmp_path / "cache"
    base = load(cfg_for(root, cache, "utkface"))
    write_image(root / "55_1_1_20170109.jpg", seed=99)
    added = load(cfg_for(root, cache, "utkface"))
    assert added.info["cache_hit"] is False and len(added) == len(base) + 1
    (root / "55_1_1_20170109.jpg").unlink()
    removed = load(cfg_for(root, cache, "utkface"))
    # Back to the original file set: the original entry is still valid and is reused.
    assert removed.info["cache_hit"] is True and removed.fingerprint == base.fingerprint


@pytest.mark.parametrize("damage", ["truncate", "garbage", "sidecar"])
def test_corrupt_dataset_cache_is_rebuilt_with_warning(tmp_path, damage):
    manifest = make_csv_dataset(tmp_path / "ds")
    cache = tmp_path / "cache"
    first = load(cfg_for(manifest, cache))
    side = Path(first.info["cache_file"])
    npy = side.with_name(side.name.replace(".json", ".images.npy"))
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])
    elif damage == "garbage":
        npy.write_bytes(b"\x93NUMPY garbage" * 50)
    else:
        meta = json.loads(side.read_text())
        meta["arrays"]["images"]["shape"][0] += 1
        side.write_text(json.dumps(meta))
    with pytest.warns(C.CacheWarning, match="corrupt"):
        rebuilt = load(cfg_for(manifest, cache))
    assert rebuilt.info["cache_hit"] is False
    assert np.array_equal(rebuilt.images.numpy(), first.images.numpy())
    assert load(cfg_for(manifest, cache)).info["cache_hit"] is True  # healthy again


def test_bad_rows_found_while_decoding_are_cached_and_still_enforced(tmp_path):
    manifest = make_csv_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "img" / "5.jpg").write_text("not a jpeg")
    cache = tmp_path / "cache"
    skipped = load(cfg_for(manifest, cache, on_bad="skip"))
    assert skipped.info["n_bad"] == 1 and len(skipped) == 5
    hit = load(cfg_for(manifest, cache, on_bad="skip"))
    assert hit.info["cache_hit"] is True and hit.info["bad_rows"] == skipped.info["bad_rows"]
    from agelab.errors import DataError

    with pytest.raises(DataError, match=r"5\.jpg"):  # error policy on a cached skip-build
        load(cfg_for(manifest, cache, on_bad="error"))


def test_unwritable_cache_only_warns(tmp_path):
    manifest = make_csv_dataset(tmp_path / "ds")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    with pytest.warns(C.CacheWarning, match="could not write"):
        data = load(cfg_for(manifest, blocker / "sub"))
    assert len(data) == 6 and data.info["cache_file"] is None


def test_synthetic_is_cached_by_config(tmp_path):
    cache = tmp_path / "cache"
    synth = SynthConfig(n_images=12, images_per_subject=3, seed=1)
    cfg = DataConfig(image_size=16, synthetic=synth, cache_dir=cache)
    first = load(cfg)
    hit = load(cfg)
    assert (first.info["cache_hit"], hit.info["cache_hit"]) == (False, True)
    assert np.array_equal(first.images.numpy(), hit.images.numpy())
    assert np.array_equal(first.true_ages, hit.true_ages)
    assert hit.info["noise_floor_mae"] == first.info["noise_floor_mae"]
    other = load(cfg.model_copy(update={"synthetic": synth.model_copy(update={"seed": 2})}))
    assert other.info["cache_hit"] is False and other.fingerprint != first.fingerprint
    bigger = load(cfg.model_copy(update={"image_size": 20}))
    assert bigger.info["cache_hit"] is False and bigger.image_size == 20
