"""Decoded-tensor cache: decode a dataset once, reload it in well under a second.

An entry is a set of ``.npy`` arrays plus a JSON sidecar, all named after a key derived from
the fingerprint::

    <cache_dir>/<key>.images.npy     uint8 [N, 3, S, S]
    <cache_dir>/<key>.ages.npy       (synthetic: ages, true_ages, subjects too)
    <cache_dir>/<key>.json           format, fingerprint, per-array shape/dtype/bytes/sha256,
                                     and metadata (bad rows, image-size summary, …)

The fingerprint (:func:`fingerprint`) is a sha256 of everything the decoded arrays depend
on — source name, file list with sizes and mtimes (ns), labels, decoding options and the
format/decoder versions — so any change to the dataset selects a different entry.

Safety:

* Every file is written to a temporary name in the same folder, fsynced and moved into place
  with ``os.replace`` (atomic on POSIX). The sidecar is written last: it is the commit
  marker, so a crash mid-write leaves either no sidecar or an old, self-consistent entry.
* Two processes building the same entry both write complete files and replace atomically;
  last writer wins, and since both decode the same inputs the arrays are identical. If they
  ever differ, the checksum in the sidecar no longer matches and the entry is rebuilt.
* On load, the sidecar must parse and match the fingerprint, and each array must load with
  ``allow_pickle=False`` and match its recorded shape, dtype and sha256. Anything else is a
  corrupt entry: a :class:`CacheWarning` is issued and the caller rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agelab.faults import kill_point
from agelab.processes import pid_alive

#: Bump when the on-disk layout or anything that changes cached contents changes.
CACHE_FORMAT_VERSION = 1


class CacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, truncated, inconsistent) and will be rebuilt."""


def fingerprint(payload: Any) -> str:
    """sha256 of a JSON-serialisable payload (keys sorted, so dict order does not matter)."""
    text = json.dumps(
        {"cache_format": CACHE_FORMAT_VERSION, "payload": payload},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def array_checksum(arr: np.ndarray) -> str:
    """sha256 of an array's raw bytes (≈0.1 s for 10k images at 64×64)."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # no copy; works for size 0
    return hashlib.sha256(flat).hexdigest()


def entry_key(prefix: str, fp: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in prefix)
    return f"{safe}-{fp[:24]}"


@dataclass
class CacheEntry:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path  # the sidecar


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not supported everywhere (e.g. Windows), so best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_array(file: Path, arr: np.ndarray) -> dict[str, Any]:
    """Save ``arr`` (contiguous, no pickle) atomically to ``file``; what a sidecar records of
    it: file name, shape, dtype, bytes in memory and on disk, and the content's sha256."""
    arr = np.ascontiguousarray(arr)
    _atomic_write(file, lambda f: np.save(f, arr, allow_pickle=False))
    return {
        "file": file.name,
        "shape": list(arr.shape),
        "dtype": arr.dtype.str,
        "bytes": int(arr.nbytes),
        "file_bytes": file.stat().st_size,
        "sha256": array_checksum(arr),
    }


def _atomic_write(target: Path, write) -> None:
    """Write via ``write(file)`` to a temp file beside ``target``, fsync, then replace."""
    # The writer's host and pid are in the name, so a later writer can remove the temp
    # files of a writer that was killed (they can be as large as the whole dataset).
    prefix = f".{target.name}.{_HOST}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        kill_point("cache.write")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP_OWNER = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")


def _clean_stale_temps(folder: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove temp files a crashed writer left behind: those of a dead process on this
    host, and any older than ``max_age_s`` (others may belong to a live writer)."""
    now = time.time()
    for p in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            owner = _TEMP_OWNER.search(p.name)
            dead = (
                owner is not None
                and owner["host"] == _HOST
                and int(owner["pid"]) != os.getpid()
                and not pid_alive(int(owner["pid"]))
            )
            if dead or now - p.stat().st_mtime > max_age_s:
                p.unlink()


def save_entry(
    cache_dir: str | Path, key: str, fp: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> Path:
    """Write an entry atomically (arrays first, sidecar last). Returns the sidecar path."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(folder)
    described = {}
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype == object:
            raise TypeError(f"cache array {name!r} has dtype object; use a fixed-width dtype")
        described[name] = write_array(folder / f"{key}.{name}.npy", arr)
    sidecar = {
        "format": CACHE_FORMAT_VERSION,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arrays": described,
        "meta": meta,
    }
    side = folder / f"{key}.json"
    body = json.dumps(sidecar, indent=1, default=str).encode()
    _atomic_write(side, lambda f: f.write(body))
    _fsync_dir(folder)
    return side


class _Corrupt(Exception):
    pass


def _load_array(folder: Path, name: str, spec: dict[str, Any], verify: bool) -> np.ndarray:
    file = folder / spec["file"]
    if not file.is_file():
        raise _Corrupt(f"{file.name} is missing")
    size, want = file.stat().st_size, spec["file_bytes"]
    if size != want:  # the cheapest check first: catches truncation and appended junk
        what = "truncated" if size < want else "too long"
        raise _Corrupt(f"{file.name} is {what} ({size} bytes, expected {want})")
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception as exc:  # any failure to parse means "corrupt"
        raise _Corrupt(f"{file.name} does not load: {exc}") from None
    if list(arr.shape) != spec["shape"] or arr.dtype.str != spec["dtype"]:
        raise _Corrupt(
            f"{file.name} holds {arr.dtype.str} {list(arr.shape)}, expected "
            f"{spec['dtype']} {spec['shape']}"
        )
    if verify and array_checksum(arr) != spec["sha256"]:
        raise _Corrupt(f"{file.name} content does not match its checksum")
    return arr


def read_sidecar(side: Path, version: int, fp: str) -> dict[str, Any]:
    """A sidecar's JSON object, checked for its format ``version`` and fingerprint ``fp``;
    raises :class:`_Corrupt` saying what is wrong."""
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Corrupt(f"sidecar is not valid JSON ({exc})") from None
    if not isinstance(sidecar, dict):
        raise _Corrupt("sidecar is not a JSON object")
    if sidecar.get("format") != version:
        raise _Corrupt(f"format {sidecar.get('format')!r}, expected {version}")
    if sidecar.get("fingerprint") != fp:
        raise _Corrupt("sidecar fingerprint does not match its name")
    return sidecar


def load_entry(
    cache_dir: str | Path, key: str, fp: str, *, verify: bool = True
) -> CacheEntry | None:
    """The cached entry, or None on a miss. A corrupt entry warns and returns None."""
    folder = Path(cache_dir)
    side = folder / f"{key}.json"
    if not side.is_file():
        return None
    try:
        sidecar = read_sidecar(side, CACHE_FORMAT_VERSION, fp)
        if not isinstance(sidecar.get("arrays"), dict):
            raise _Corrupt("sidecar lacks the array table")
        try:
            arrays = {
                name: _load_array(folder, name, spec, verify)
                for name, spec in sidecar["arrays"].items()
            }
        except (KeyError, TypeError) as exc:
            raise _Corrupt(f"sidecar array table is malformed ({exc!r})") from None
    except _Corrupt as exc:
        warnings.warn(
            f"agelab: cache entry {side} is corrupt ({exc}); ignoring it and rebuilding",
            CacheWarning,
            stacklevel=2,
        )
        return None
    return CacheEntry(arrays, sidecar.get("meta") or {}, side)
