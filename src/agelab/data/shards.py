"""Bigger than memory: decoded images as fixed-size, memory-mapped uint8 shards on disk.

When the decoded dataset (``N × 3 × S × S`` bytes) is larger than ``data.max_resident_gb``
(default: half the RAM available when the data is loaded, see :func:`resident_budget`), the
images are not held in RAM: they are written once to a shard store beside the decoded-tensor
cache and read back memory-mapped (``numpy.load`` with ``mmap_mode="r"``, ``allow_pickle=False``)::

    <cache_dir>/<key>.shards/images-00000.npy   uint8 [rows, 3, S, S] (np.save format)
    <cache_dir>/<key>.shards/images-00000.json  the shard's stamp: rows, bytes, mtime, sha256,
                                                and what decoding found in its rows
    <cache_dir>/<key>.shards/<name>.npy         the small arrays (labels, which rows decoded)
    <cache_dir>/<key>.shards.json               the commit marker, written last

Every shard holds :func:`rows_per_shard` rows (``SHARD_BYTES``, 256 MiB; the last one holds
the rest), in input order; a row that did not decode is left zero and never indexed.

Safety (the rules of :mod:`.cache`): every file is written to a temporary name, fsynced and
renamed; a shard's stamp is written after the shard, the store's sidecar after everything.
Building is resumable shard by shard: a shard whose stamp matches is kept, so an interrupted
decode of 500,000 images restarts where it stopped. On load the sidecar must match the
fingerprint and every shard its recorded size and ``.npy`` header; a shard whose size or
modification time differs from its stamp is hashed and must match its sha256 (``verify=True``
hashes every shard). Anything else is a :class:`~.cache.CacheWarning` and a rebuild of what
is broken, never a trusted half cache.

:class:`ShardedImages` is what a :class:`~.dataset.FaceDataset` holds instead of a tensor:
``len``, ``shape``, ``dtype``, indexing (a torch tensor of the rows asked for) and
:meth:`ShardedImages.gather` into a given buffer (the trainer's pinned batches).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agelab.data.cache import (
    _HOST,
    CacheWarning,
    _atomic_write,
    _clean_stale_temps,
    _Corrupt,
    _fsync_dir,
    _load_array,
    array_checksum,
    read_sidecar,
    write_array,
)
from agelab.errors import DataError

__all__ = [
    "SHARD_BYTES",
    "ShardStore",
    "ShardWriter",
    "ShardedImages",
    "available_ram_bytes",
    "decoded_bytes",
    "human_bytes",
    "open_store",
    "resident_budget",
    "rows_per_shard",
]

#: Bump when the shard layout changes.
SHARD_FORMAT_VERSION = 1
#: Target bytes per shard file (the last shard of a store is smaller).
SHARD_BYTES = 256 << 20
#: Share of the available RAM the decoded images may take by default.
RAM_FRACTION = 0.5
GB = 1e9


def decoded_bytes(n: int, image_size: int) -> int:
    """Bytes of ``n`` decoded uint8 images of ``image_size``² pixels, 3 channels."""
    return int(n) * 3 * int(image_size) ** 2


def human_bytes(n: float) -> str:
    """``25.3 GB``, ``614.4 MB``, ``12.0 kB`` (decimal units, as data.max_resident_gb)."""
    for unit, size in (("GB", GB), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def rows_per_shard(image_size: int, shard_bytes: int | None = None) -> int:
    return max(1, (shard_bytes or SHARD_BYTES) // decoded_bytes(1, image_size))


def available_ram_bytes() -> int | None:
    """RAM the kernel could hand out now without swapping (``MemAvailable``), or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ImportError, AttributeError):
        import psutil

        return int(psutil.virtual_memory().available)
    return None


@dataclass
class Budget:
    """What decoded images may still take in RAM; the sources of one dataset share it."""

    bytes: float
    rule: str  # "data.max_resident_gb 2" or "data.max_resident_gb 11.8 (half the … RAM)"
    total: float = field(init=False)

    def __post_init__(self) -> None:
        self.total = self.bytes

    def take(self, n_bytes: int) -> bool:
        """True (and the bytes are counted) when ``n_bytes`` fit; False: stream them."""
        if n_bytes > self.bytes:
            return False
        self.bytes -= n_bytes
        return True


def resident_budget(max_resident_gb: float | None) -> Budget:
    """``data.max_resident_gb`` as a :class:`Budget`; None: half the available RAM (all of
    it counted as available when the kernel does not say)."""
    if max_resident_gb is not None:
        return Budget(max_resident_gb * GB, f"data.max_resident_gb {max_resident_gb:g}")
    ram = available_ram_bytes()
    if ram is None:
        return Budget(float("inf"), "data.max_resident_gb unlimited (available RAM unknown)")
    budget = RAM_FRACTION * ram
    return Budget(
        budget,
        f"data.max_resident_gb {budget / GB:.1f} (half the {human_bytes(ram)} of available RAM)",
    )


# ------------------------------------------------------------------------ the array


class ShardedImages:
    """uint8 images ``[N, 3, S, S]`` kept in shards (memory-mapped ``.npy`` files, or arrays),
    seen through ``rows``: image ``i`` is stored row ``rows[i]`` of the shards laid end to
    end. Indexing returns a torch tensor (a copy); nothing is ever read whole."""

    dtype = torch.uint8
    ndim = 4

    def __init__(
        self, shards: Sequence[np.ndarray], rows: np.ndarray | None = None, where: str = ""
    ):
        if not shards:
            raise ValueError("ShardedImages needs at least one shard")
        self.shards = list(shards)
        self.image_shape = tuple(self.shards[0].shape[1:])
        for s in self.shards:
            if s.dtype != np.uint8 or s.ndim != 4 or tuple(s.shape[1:]) != self.image_shape:
                raise ValueError(f"shard {s.dtype} {s.shape} does not match {self.image_shape}")
        self._starts = np.cumsum([0] + [len(s) for s in self.shards]).astype(np.int64)
        total = int(self._starts[-1])
        self.rows = np.arange(total, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= total):
            raise ValueError(f"rows outside the {total} stored rows")
        self.where = where  # the shard folder, for messages

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.image_shape))

    @property
    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.image_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"ShardedImages({tuple(self.shape)}, {len(self.shards)} shards, {self.where!r})"

    def select(self, index: np.ndarray) -> ShardedImages:
        """The images ``index`` (a view: no pixel is read)."""
        return ShardedImages(self.shards, self.rows[np.asarray(index)], self.where)

    def concat(self, other: ShardedImages) -> ShardedImages:
        """These images, then ``other``'s (a view)."""
        rows = np.concatenate([self.rows, other.rows + self._starts[-1]])
        where = " + ".join(w for w in (self.where, other.where) if w)
        return ShardedImages(self.shards + other.shards, rows, where)

    def gather(self, index: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Images ``index`` (ints, in that order) as one uint8 array, read shard by shard in
        stored order; into ``out`` when given (e.g. a pinned buffer's numpy view)."""
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        want = self.rows[np.asarray(index, dtype=np.int64)]
        if out is None:
            out = np.empty((len(want), *self.image_shape), dtype=np.uint8)
        order = np.argsort(want, kind="stable")
        ordered = want[order]
        cuts = np.searchsorted(ordered, self._starts)
        for s, shard in enumerate(self.shards):
            a, b = cuts[s], cuts[s + 1]
            if a < b:
                out[order[a:b]] = shard[ordered[a:b] - self._starts[s]]
        return out

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, slice):
            return torch.from_numpy(self.gather(np.arange(len(self))[key]))
        if isinstance(key, (int, np.integer)):
            return torch.from_numpy(self.gather([int(key) % max(1, len(self))])[0])
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return torch.from_numpy(self.gather(key))


def join_images(a: Any, b: Any) -> Any:
    """Two image sets end to end: a numpy array when both are, else :class:`ShardedImages`
    (an in-memory array becomes one shard of it)."""
    if not isinstance(a, ShardedImages) and not isinstance(b, ShardedImages):
        return np.concatenate([a, b])
    first, second = (x if isinstance(x, ShardedImages) else ShardedImages([x]) for x in (a, b))
    return first.concat(second)


# ----------------------------------------------------------------------- the store


@dataclass
class ShardStore:
    images: ShardedImages  # every stored row (select the usable ones)
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    stamps: list[dict[str, Any]]
    path: Path  # the sidecar


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.shards", cache_dir / f"{key}.shards.json"


def _shard_name(i: int) -> str:
    return f"images-{i:05d}"


def _check_shard(folder: Path, stamp: dict[str, Any], size: int, verify: bool) -> np.ndarray:
    """The memory-mapped shard of ``stamp``, or :class:`_Corrupt` saying what is wrong."""
    file = folder / stamp["file"]
    if not file.is_file():
        raise _Corrupt(f"{file.name} is missing")
    st = file.stat()
    if st.st_size != stamp["file_bytes"]:
        raise _Corrupt(f"{file.name} is {st.st_size} bytes, expected {stamp['file_bytes']}")
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise _Corrupt(f"{file.name} does not load: {exc}") from None
    if arr.dtype != np.uint8 or tuple(arr.shape) != (stamp["rows"], 3, size, size):
        raise _Corrupt(f"{file.name} holds {arr.dtype} {list(arr.shape)}")
    if (verify or st.st_mtime_ns != stamp["mtime_ns"]) and array_checksum(arr) != stamp["sha256"]:
        raise _Corrupt(f"{file.name} content does not match its checksum")
    return arr


def open_store(
    cache_dir: str | Path, key: str, fp: str, *, verify: bool = False
) -> ShardStore | None:
    """The shard store of ``key``, or None (missing, or broken: a :class:`CacheWarning`)."""
    folder, side = _paths(Path(cache_dir), key)
    if not side.is_file():
        return None
    try:
        sidecar = read_sidecar(side, SHARD_FORMAT_VERSION, fp)
        try:
            size, stamps = int(sidecar["image_size"]), list(sidecar["shards"])
            starts = [st["start"] for st in stamps]
            if starts != [sum(st["rows"] for st in stamps[:i]) for i in range(len(stamps))] or (
                sum(st["rows"] for st in stamps) != sidecar["n"]
            ):
                raise _Corrupt("the shard table does not cover the rows")
            shards = [_check_shard(folder, st, size, verify) for st in stamps]
            arrays = {
                name: _load_array(folder, name, spec, True)
                for name, spec in sidecar["arrays"].items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise _Corrupt(f"sidecar is malformed ({exc!r})") from None
        if not shards:
            raise _Corrupt("no shards")
    except _Corrupt as exc:
        warnings.warn(
            f"agelab: shard cache {side} is broken ({exc}); rebuilding what is broken",
            CacheWarning,
            stacklevel=2,
        )
        return None
    images = ShardedImages(shards, where=str(folder))
    return ShardStore(images, arrays, sidecar.get("meta") or {}, stamps, side)


def _space_error(folder: Path, needed: int, free: int | None, exc: Exception | None) -> DataError:
    have = f"only {human_bytes(free)} is free there" if free is not None else f"failed: {exc}"
    return DataError(
        f"the shard cache of this dataset needs {human_bytes(needed)} in {folder} but {have}: "
        "free space there, or set data.cache_dir (or $AGELAB_CACHE_DIR) to a folder on a disk "
        "with room (or raise data.max_resident_gb to hold the images in RAM, if they fit)"
    )


@dataclass
class ShardWriter:
    """Builds the shard store of ``n`` images of ``image_size`` px under ``cache_dir``.

    Real data: :meth:`write` one shard at a time (skipping those :meth:`done` returns), then
    :meth:`finish`. Generated data: :meth:`open_all` gives one writable target for every row
    (rows land in any order), :meth:`commit_all` seals it, then :meth:`finish`."""

    cache_dir: Path
    key: str
    fp: str
    n: int
    image_size: int
    rows: int = 0  # per shard; 0: rows_per_shard(image_size)
    bounds: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        self.folder, self.sidecar = _paths(self.cache_dir, self.key)
        self.rows = self.rows or rows_per_shard(self.image_size)
        self.bounds = [(a, min(a + self.rows, self.n)) for a in range(0, self.n, self.rows)]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(exc) from exc
        _clean_stale_temps(self.folder)

    def _error(self, exc: Exception) -> DataError:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _space_error(self.folder, self.needed_bytes(), _free(self.folder), exc)
        return DataError(
            f"cannot write the shard cache in {self.folder} ({exc}): set data.cache_dir to a "
            "writable folder with room (or raise data.max_resident_gb to hold the images in RAM)"
        )

    def done(self, i: int) -> dict[str, Any] | None:
        """Shard ``i``'s stamp when a complete, matching shard is already on disk (resume)."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, _Corrupt):
            stamp = json.loads((self.folder / f"{_shard_name(i)}.json").read_text("utf-8"))
            a, b = self.bounds[i]
            if stamp["fingerprint"] == self.fp and (stamp["start"], stamp["rows"]) == (a, b - a):
                _check_shard(self.folder, stamp, self.image_size, False)
                return stamp
        return None

    def needed_bytes(self) -> int:
        todo = [i for i in range(len(self.bounds)) if self.done(i) is None]
        return sum(decoded_bytes(b - a, self.image_size) for a, b in (self.bounds[i] for i in todo))

    def check_space(self) -> None:
        """A :class:`DataError` before writing anything when the disk cannot hold the store."""
        needed, free = self.needed_bytes(), _free(self.folder)
        if free is not None and needed > free:
            raise _space_error(self.folder, needed, free, None)

    def write(self, i: int, images: np.ndarray, facts: dict[str, Any] | None = None) -> dict:
        """Shard ``i`` (all of its rows), atomically; then its stamp. Returns the stamp."""
        a, b = self.bounds[i]
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.shape != (b - a, 3, self.image_size, self.image_size):
            raise ValueError(f"shard {i} needs {b - a} rows, got {images.shape}")
        file = self.folder / f"{_shard_name(i)}.npy"
        try:
            _atomic_write(file, lambda f: np.save(f, images, allow_pickle=False))
            return self._stamp(i, file, array_checksum(images), facts or {})
        except OSError as exc:
            raise self._error(exc) from exc

    def _stamp(self, i: int, file: Path, sha256: str, facts: dict[str, Any]) -> dict:
        a, b = self.bounds[i]
        st = file.stat()
        stamp = {
            "fingerprint": self.fp,
            "file": file.name,
            "start": a,
            "rows": b - a,
            "file_bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": sha256,
            "facts": facts,
        }
        body = json.dumps(stamp, default=str).encode()
        _atomic_write(self.folder / f"{_shard_name(i)}.json", lambda f: f.write(body))
        return stamp

    def open_all(self) -> _ScatterTarget:
        """Writable memory maps of every shard, under temporary names (see :meth:`commit_all`)."""
        try:
            return _ScatterTarget(self)
        except OSError as exc:
            raise self._error(exc) from exc

    def commit_all(self, target: _ScatterTarget) -> list[dict[str, Any]]:
        """Flush, fsync and rename every shard of ``target`` into place; their stamps."""
        try:
            return target.commit()
        except OSError as exc:
            raise self._error(exc) from exc

    def finish(
        self, stamps: list[dict[str, Any]], arrays: dict[str, np.ndarray], meta: dict[str, Any]
    ) -> ShardStore:
        """Write the small arrays and then the sidecar (the commit marker); the open store."""
        try:
            described = {}
            for name, arr in arrays.items():
                described[name] = write_array(self.folder / f"{name}.npy", arr)
            body = json.dumps(
                {
                    "format": SHARD_FORMAT_VERSION,
                    "fingerprint": self.fp,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "image_size": self.image_size,
                    "n": self.n,
                    "shards": stamps,
                    "arrays": described,
                    "meta": meta,
                },
                indent=1,
                default=str,
            ).encode()
            _fsync_dir(self.folder)
            _atomic_write(self.sidecar, lambda f: f.write(body))
            _fsync_dir(self.cache_dir)
        except OSError as exc:
            raise self._error(exc) from exc
        store = open_store(self.cache_dir, self.key, self.fp)
        if store is None:  # just written: only a concurrent writer could break it
            raise DataError(f"the shard cache {self.sidecar} did not read back after writing")
        return store


class _ScatterTarget:
    """``target[idx] = images``: rows in any order, across every shard (generated data)."""

    def __init__(self, writer: ShardWriter):
        import tempfile

        self.writer = writer
        self.files: list[tuple[Path, Path]] = []
        self.maps: list[np.memmap] = []
        s = writer.image_size
        for i, (a, b) in enumerate(writer.bounds):
            final = writer.folder / f"{_shard_name(i)}.npy"
            fd, tmp = tempfile.mkstemp(
                dir=writer.folder, prefix=f".{final.name}.{_HOST}.{os.getpid()}.", suffix=".tmp"
            )
            os.close(fd)
            self.files.append((Path(tmp), final))
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(b - a, 3, s, s))
            _reserve(Path(tmp))  # a full disk is an OSError now, not a SIGBUS mid-generation
            self.maps.append(arr)
        self._starts = np.array([a for a, _ in writer.bounds] + [writer.n], dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.writer.image_size
        return (self.writer.n, 3, s, s)

    def __setitem__(self, index: Any, values: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        shard = np.searchsorted(self._starts, index, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            self.maps[s][index[sel] - self._starts[s]] = values[sel]

    def commit(self) -> list[dict[str, Any]]:
        stamps = []
        for i, ((tmp, final), arr) in enumerate(zip(self.files, self.maps, strict=True)):
            arr.flush()
            sha = array_checksum(arr)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            stamps.append(self.writer._stamp(i, final, sha, {}))
        self.maps.clear()
        return stamps

    def discard(self) -> None:
        self.maps.clear()
        for tmp, _ in self.files:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _reserve(file: Path) -> None:
    """Allocate a (sparse) file's blocks, where the system can."""
    if hasattr(os, "posix_fallocate"):
        fd = os.open(file, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
        finally:
            os.close(fd)


def _free(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def build_in_chunks(
    writer: ShardWriter,
    decode: Callable[[int, int], tuple[np.ndarray, dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Every shard of ``writer``: kept when already complete, else ``decode(start, stop)`` →
    (images of those rows, facts for the stamp) and written. Holds one shard in RAM at most."""
    writer.check_space()
    stamps = []
    for i, (a, b) in enumerate(writer.bounds):
        stamp = writer.done(i)
        if stamp is None:
            images, facts = decode(a, b)
            stamp = writer.write(i, images, facts)
        stamps.append(stamp)
    return stamps
