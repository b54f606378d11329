"""Real-data sources: read a dataset into a validated manifest (path, age, subject, box).

Three formats, all producing the same :class:`Manifest` (a DataFrame with columns ``path``,
``age``, ``subject`` and, where present, the face box ``x, y, w, h``):

``utkface``  a folder of ``{age}_{gender}_{race}_{datetime}.jpg[.chip.jpg]`` files;
             no person ids (``subject`` is empty: each image is its own group for splits).
``fgnet``    a folder of ``{subject:03d}A{age:02d}[a-z].JPG`` files (case-insensitive).
``csv``      a manifest with columns ``path, age`` and optionally ``subject`` and
             ``x, y, w, h``; paths are relative to the manifest's folder.

Nothing is dropped silently. Each problem with a row is a :class:`BadRow` with one of the
reason constants below. With ``on_bad="error"`` the first one raises :class:`DataError`
(naming the file, the CSV line and what to do); with ``on_bad="skip"`` they are collected
and summarised (count per reason + first examples). Problems with the whole source (folder
missing, CSV columns missing, wrong delimiter, empty file) always raise.

This module reads names, labels and file metadata only; pixels are checked when images are
decoded (:mod:`agelab.data.images`), which adds the image-level reasons.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agelab.data.images import BAD_BOX, CORRUPT_IMAGE, NOT_IMAGE, TRUNCATED_IMAGE, decode_workers
from agelab.errors import DataError

if TYPE_CHECKING:  # pandas is imported when a manifest is built: importing this stays light
    import pandas as pd

# ------------------------------------------------------------------------------ reasons

MISSING_FILE = "missing file"
EMPTY_FILE = "zero-byte file"
SPECIAL_FILE = "not a regular file"
MISSING_PATH = "missing path"
NUL_IN_PATH = "NUL byte in path"
OUTSIDE_ROOT = "path escapes the dataset root"
DUPLICATE_PATH = "duplicate path"
NAME_PATTERN = "name does not match pattern"
MISSING_AGE = "missing age"
BAD_AGE = "age is not a number"
NEGATIVE_AGE = "negative age"
AGE_TOO_HIGH = "age above max_age"
NON_INTEGER_AGE = "age is not an integer"
MALFORMED_ROW = "wrong number of fields"
BAD_QUOTE = "bad quoting"
BAD_SPLIT = "unknown split"

#: Every reason a row can be rejected for, in the order checks run.
REASONS = (
    BAD_QUOTE,
    MALFORMED_ROW,
    BAD_SPLIT,
    NAME_PATTERN,
    MISSING_PATH,
    NUL_IN_PATH,
    OUTSIDE_ROOT,
    DUPLICATE_PATH,
    MISSING_AGE,
    BAD_AGE,
    NON_INTEGER_AGE,
    NEGATIVE_AGE,
    AGE_TOO_HIGH,
    BAD_BOX,
    MISSING_FILE,
    SPECIAL_FILE,
    EMPTY_FILE,
    NOT_IMAGE,
    TRUNCATED_IMAGE,
    CORRUPT_IMAGE,
)

#: What to do about each reason (appended to the DataError message).
HINTS = {
    BAD_QUOTE: 'close the quote or remove it; a quote inside a quoted field is written ""',
    BAD_SPLIT: "write train, calib, conformal or test (or leave it empty: the split is drawn)",
    MALFORMED_ROW: "quote fields that contain commas, or fix the row",
    NAME_PATTERN: "rename or move the file out of the folder",
    MISSING_PATH: "fill in the path or remove the row",
    NUL_IN_PATH: "a path cannot hold a NUL byte: fix the manifest (saved from a binary file?)",
    OUTSIDE_ROOT: "keep images inside the dataset folder and use relative paths",
    DUPLICATE_PATH: "list each image once",
    MISSING_AGE: "fill in the age or remove the row",
    BAD_AGE: "write ages as plain numbers of years with the digits 0-9 and an optional "
    "decimal point, e.g. 30 or 25.5",
    NON_INTEGER_AGE: "this format stores whole years",
    NEGATIVE_AGE: "fix the label",
    AGE_TOO_HIGH: "fix the label, or raise data.max_age if the age is real",
    BAD_BOX: "x, y, w, h must be numbers (pixels) with w, h > 0 overlapping the image, "
    "or all four empty for a centre crop",
    MISSING_FILE: "check the path (relative to the dataset folder) or remove the row",
    EMPTY_FILE: "re-copy or re-download the file, or remove it",
    SPECIAL_FILE: "list image files only, not pipes, devices or sockets",
    NOT_IMAGE: "remove the file or replace it with the real image",
    TRUNCATED_IMAGE: "re-copy or re-download the file (it ends early), or remove it",
    CORRUPT_IMAGE: "re-copy or re-download the file, or remove it",
}

SKIP_HINT = "or set data.on_bad=skip to skip bad rows and report them"

OnBad = Literal["error", "skip"]


@dataclass(frozen=True)
class BadRow:
    reason: str
    where: str  # "labels.csv line 7" or the file name
    detail: str

    def message(self) -> str:
        hint = HINTS.get(self.reason, "")
        return f"{self.where}: {self.reason}: {self.detail} ({hint}; {SKIP_HINT})"


class BadRows:
    """Collects bad rows under a policy: ``error`` raises at the first, ``skip`` records."""

    def __init__(self, on_bad: OnBad = "error"):
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.on_bad = on_bad
        self.rows: list[BadRow] = []

    def add(self, reason: str, where: str, detail: str) -> None:
        row = BadRow(reason, where, detail)
        if self.on_bad == "error":
            raise DataError(row.message(), reason=reason, where=where)
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self, max_examples: int = 3) -> dict[str, Any]:
        return summarize_bad(self.rows, max_examples)


def summarize_bad(rows: list[BadRow], max_examples: int = 3) -> dict[str, Any]:
    """``{"n": 5, "counts": {reason: n}, "examples": {reason: ["where: detail", ...]}}``."""
    counts = Counter(r.reason for r in rows)
    examples: dict[str, list[str]] = {}
    for r in rows:
        ex = examples.setdefault(r.reason, [])
        if len(ex) < max_examples:
            ex.append(f"{r.where}: {r.detail}")
    order = {reason: i for i, reason in enumerate(REASONS)}
    ordered = sorted(counts, key=lambda k: order.get(k, len(order)))
    return {
        "n": len(rows),
        "counts": {k: counts[k] for k in ordered},
        "examples": {k: examples[k] for k in ordered},
    }


def format_bad_summary(
    summary: dict[str, Any], origin: str | Path = "", *, verb: str = "skipped"
) -> str:
    """Human-readable bad-row summary (empty string when there are none)."""
    if not summary or not summary.get("n"):
        return ""
    head = f"{verb} {summary['n']} bad row(s)" + (f" in {origin}" if origin else "") + ":"
    lines = [head]
    for reason, count in summary["counts"].items():
        lines.append(f"  {count:6d} × {reason}")
        for ex in summary["examples"].get(reason, []):
            lines.append(f"           e.g. {ex}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- manifest

BOX_COLUMNS = ("x", "y", "w", "h")
REQUIRED_COLUMNS = ("path", "age")
#: ``split``: a given split per row (published protocols: honoured instead of the random
#: split); ``fold``: a fold id per row (``data.split.fold`` names the fold that is the test).
PROTOCOL_COLUMNS = ("split", "fold")
OPTIONAL_COLUMNS = ("subject", *BOX_COLUMNS, *PROTOCOL_COLUMNS)
GIVEN_SPLITS = ("train", "calib", "conformal", "test")


@dataclass
class Manifest:
    """The validated rows of a source.

    ``table`` columns: ``path`` (relative to ``root``, POSIX), ``age`` (float), ``subject``
    (str, "" when unknown), ``x, y, w, h`` (only when the source has boxes; NaN → no box),
    ``split`` and ``fold`` (str, "" when the manifest gives none: see PROTOCOL_COLUMNS),
    plus bookkeeping: ``where`` (for messages), ``file`` (resolved absolute path),
    ``size`` and ``mtime_ns`` (part of the cache fingerprint).
    """

    source: str
    origin: Path  # what the user gave: the folder or the CSV file
    root: Path  # the folder relative paths resolve against
    table: pd.DataFrame
    bad: BadRows
    n_rows: int  # rows (or files) seen, good + bad
    has_boxes: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)


def _empty_table(has_boxes: bool) -> dict[str, list]:
    cols = [
        "path",
        "age",
        "subject",
        *(BOX_COLUMNS if has_boxes else ()),
        *PROTOCOL_COLUMNS,
        "where",
        "file",
        "size",
        "mtime_ns",
    ]
    return {c: [] for c in cols}


def _frame(cols: dict[str, list]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(cols)
    df["age"] = df["age"].astype("float64")
    df["size"] = df["size"].astype("int64")
    df["mtime_ns"] = df["mtime_ns"].astype("int64")
    for c in BOX_COLUMNS:
        if c in df:
            df[c] = df[c].astype("float64")
    return df


class _FileChecker:
    """Path checks shared by all sources: inside the root, not duplicated, exists, non-empty.

    Resolving symlinks costs a few syscalls per path component, so the resolved folders are
    memoised and only the file itself is checked per row (10k rows in a few ms).
    """

    def __init__(self, root: Path, bad: BadRows):
        self.root = root
        self.root_str = os.path.abspath(root)
        self.root_real = os.path.realpath(root)
        self.bad = bad
        self.seen: dict[str, str] = {}  # real path → where it was first listed
        self._real_dirs: dict[str, str] = {}

    def _realpath(self, rel: str) -> str:
        if ".." in rel.replace("\\", "/").split("/"):
            # ".." after a symlinked folder means "the link target's parent": let the OS
            # semantics decide (slow path, rare).
            return os.path.realpath(os.path.join(self.root_str, rel))
        parent, name = os.path.split(os.path.normpath(os.path.join(self.root_str, rel)))
        real_parent = self._real_dirs.get(parent)
        if real_parent is None:
            real_parent = self._real_dirs[parent] = os.path.realpath(parent)
        real = os.path.join(real_parent, name)
        return os.path.realpath(real) if os.path.islink(real) else real

    def check_location(self, rel: str, where: str) -> str | None:
        """Inside-root and duplicate checks; returns the resolved path (may not exist)."""
        if "\x00" in rel:  # the OS refuses such a path outright (ValueError, not OSError)
            self.bad.add(NUL_IN_PATH, where, f"{rel!r} holds a NUL byte (\\x00)")
            return None
        if os.path.isabs(rel) or re.match(r"^[A-Za-z]:[\\/]", rel) or rel.startswith("\\"):
            self.bad.add(
                OUTSIDE_ROOT, where, f"absolute path {rel!r}; write it relative to {self.root}"
            )
            return None
        real = self._realpath(rel)
        if not (real == self.root_real or real.startswith(self.root_real.rstrip(os.sep) + os.sep)):
            how = (
                "is a symlink to"
                if os.path.islink(os.path.join(self.root_str, rel))
                else "resolves to"
            )
            self.bad.add(OUTSIDE_ROOT, where, f"{rel!r} {how} {real}, outside {self.root_real}")
            return None
        if real in self.seen:
            self.bad.add(DUPLICATE_PATH, where, f"{rel!r} is already listed at {self.seen[real]}")
            return None
        self.seen[real] = where
        return real

    def check_file(self, real: str, rel: str, where: str) -> os.stat_result | None:
        try:
            st = os.stat(real)
        except FileNotFoundError:
            hint = " (use / between folders, not \\)" if "\\" in rel else ""
            self.bad.add(MISSING_FILE, where, f"{rel!r} does not exist under {self.root_str}{hint}")
            return None
        except OSError as exc:
            self.bad.add(MISSING_FILE, where, f"{rel!r} cannot be read: {exc.strerror or exc}")
            return None
        if stat.S_ISDIR(st.st_mode):
            self.bad.add(MISSING_FILE, where, f"{rel!r} is a folder, not a file")
            return None
        if not stat.S_ISREG(st.st_mode):
            # Never opened: reading a FIFO blocks until someone writes, a device never ends.
            kind = special_file_kind(st.st_mode)
            self.bad.add(SPECIAL_FILE, where, f"{rel!r} is {kind}, not an image file")
            return None
        if st.st_size == 0:
            self.bad.add(EMPTY_FILE, where, f"{rel!r} is empty (0 bytes)")
            return None
        return st


def special_file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words (for messages)."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


#: An age as agelab reads it: ASCII digits, an optional decimal point with digits after it,
#: and a minus sign only to say it is negative. Python's float() also takes "1e1", "3_0",
#: "inf", "٣٠" (Arabic-Indic digits) and surrounding whitespace: labels that are typos or
#: data from elsewhere more often than ages, so they are bad rows here.
PLAIN_AGE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def _clip(text: str, limit: int = 40) -> str:
    """A label as messages quote it: not all of a pasted paragraph."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _not_plain(text: str) -> str:
    """Why ``text`` is not a plain decimal age, in words."""
    try:
        if not math.isfinite(float(text)):
            return f"{_clip(text)!r} is not a finite number"
    except ValueError:
        pass
    why = [
        ("non-ASCII digits", any(c.isdigit() and not c.isascii() for c in text)),
        ("exponent notation", bool(re.fullmatch(r"[-+]?[0-9.]+[eE][-+]?[0-9]+", text))),
        ("digit separators", "_" in text or "," in text),
        ("a plus sign", text.startswith("+")),
        ("spaces", any(c.isspace() for c in text)),
    ]
    reasons = [name for name, found in why if found]
    return f"{_clip(text)!r} is not a plain decimal number" + (
        f" ({', '.join(reasons)})" if reasons else ""
    )


def parse_age(
    text: str, where: str, bad: BadRows, *, max_age: float, integer: bool
) -> float | None:
    """Parse and range-check an age (see :data:`PLAIN_AGE`); records the reason and returns
    None when bad."""
    if text == "":
        bad.add(MISSING_AGE, where, "the age is empty")
        return None
    if not PLAIN_AGE.fullmatch(text):
        bad.add(BAD_AGE, where, _not_plain(text))
        return None
    age = float(text)
    if integer and not age.is_integer():
        bad.add(NON_INTEGER_AGE, where, f"{_clip(text)!r} is not a whole number of years")
        return None
    if age < 0:
        bad.add(NEGATIVE_AGE, where, f"age {_clip(text)} is below 0")
        return None
    if not age <= max_age:  # also a 400-digit age, which float() makes inf
        bad.add(AGE_TOO_HIGH, where, f"age {_clip(text)} is above max_age={max_age:g}")
        return None
    return age


def _require_dir(path: Path, source: str) -> Path:
    if not path.exists():
        raise DataError(f"{source} folder {path} does not exist (check data.path)")
    if not path.is_dir():
        raise DataError(
            f"{source} expects a folder of images, but {path} is a file"
            + (" (for a CSV manifest use data.source=csv)" if path.suffix.lower() == ".csv" else "")
        )
    return path


# ------------------------------------------------------------------------------ folders

# UTKFace: the age field is captured loosely so that "-3_…" or "2.5_…" get a precise reason
# (negative / not an integer) rather than a generic pattern mismatch.
UTKFACE_PATTERN = re.compile(
    r"^(?P<age>[^_]+)_(?P<gender>\d+)_(?P<race>\d+)_(?P<datetime>\d+)\.jpg(?:\.chip\.jpg)?$",
    re.IGNORECASE | re.ASCII,  # \d is 0-9 only: "٣٠" is not a subject or a date
)
UTKFACE_EXAMPLE = "25_0_1_20170116174525125.jpg.chip.jpg"
FGNET_PATTERN = re.compile(
    r"^(?P<subject>\d{3,})A(?P<age>\d{2,})(?P<suffix>[a-z]?)\.jpe?g$", re.IGNORECASE | re.ASCII
)
FGNET_EXAMPLE = "001A02.JPG or 002A43a.JPG"


def _list_folder(root: Path) -> tuple[list[str], list[str]]:
    """(file names, subfolder names) of a folder, sorted; hidden dotfiles are ignored."""
    files, dirs = [], []
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry.name)
    return sorted(files), sorted(dirs)


def _no_images(
    source: str,
    root: Path,
    names: list[str],
    subdirs: list[str],
    pattern: re.Pattern[str],
    example: str,
) -> DataError:
    """The error for a folder where no file is named like the source's images: what was
    found, and a subfolder that does hold such files, if there is one."""
    found = ", ".join(names[:5]) + (" …" if len(names) > 5 else "") if names else "no files"
    hint = ""
    for d in subdirs:
        try:
            inner, _ = _list_folder(root / d)
        except OSError:
            continue
        if any(pattern.match(n) for n in inner):
            hint = f"; the subfolder {d}/ has {len(inner)} files — use data.path={root / d}"
            break
    return DataError(
        f"no {source} images in {root}: expected names like {example} (found: {found}){hint}"
    )


def _append_file(cols: dict[str, list], where: str, real: str, st: os.stat_result) -> None:
    """The bookkeeping columns of an accepted row (messages and the cache fingerprint)."""
    cols["where"].append(where)
    cols["file"].append(real)
    cols["size"].append(st.st_size)
    cols["mtime_ns"].append(st.st_mtime_ns)


def _read_folder(
    source: str,
    path: Path,
    pattern: re.Pattern[str],
    example: str,
    subject_of: Callable[[re.Match[str]], str],
    *,
    max_age: float,
    on_bad: OnBad,
) -> Manifest:
    root = _require_dir(Path(path), source)
    names, subdirs = _list_folder(root)
    if not any(pattern.match(n) for n in names):
        # Nothing matches at all: almost certainly the wrong folder, so say where to look
        # instead of reporting every file as a bad row.
        raise _no_images(source, root, names, subdirs, pattern, example)
    bad = BadRows(on_bad)
    checker = _FileChecker(root, bad)
    cols = _empty_table(False)
    for name in names:
        where = str(root / name)
        m = pattern.match(name)
        if m is None:
            bad.add(NAME_PATTERN, where, f"{name!r} is not named like {example}")
            continue
        real = checker.check_location(name, where)
        if real is None:
            continue
        age = parse_age(m["age"], where, bad, max_age=max_age, integer=True)
        if age is None:
            continue
        st = checker.check_file(real, name, where)
        if st is None:
            continue
        cols["path"].append(name)
        cols["age"].append(age)
        cols["subject"].append(subject_of(m))
        cols["split"].append("")
        cols["fold"].append("")
        _append_file(cols, where, real, st)
    notes = [f"ignored {len(subdirs)} subfolder(s): {', '.join(subdirs[:5])}"] if subdirs else []
    return Manifest(source, root, root, _frame(cols), bad, len(names), False, notes)


def read_utkface(path: str | Path, *, max_age: float = 120.0, on_bad: OnBad = "error") -> Manifest:
    """A UTKFace folder (``{age}_{gender}_{race}_{datetime}.jpg[.chip.jpg]``); no subjects."""
    return _read_folder(
        "utkface",
        Path(path),
        UTKFACE_PATTERN,
        UTKFACE_EXAMPLE,
        lambda m: "",
        max_age=max_age,
        on_bad=on_bad,
    )


def read_fgnet(path: str | Path, *, max_age: float = 120.0, on_bad: OnBad = "error") -> Manifest:
    """An FG-NET folder (``{subject:03d}A{age:02d}[a-z].JPG``); subject = the 3 digits."""
    return _read_folder(
        "fgnet",
        Path(path),
        FGNET_PATTERN,
        FGNET_EXAMPLE,
        lambda m: m["subject"],
        max_age=max_age,
        on_bad=on_bad,
    )


# ---------------------------------------------------------------------------------- csv


def _decode_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text; save it as UTF-8 CSV ('CSV UTF-8' in Excel)")
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Excel) is dropped
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8 CSV"
        ) from None
    if not text.strip():
        raise DataError(f"{path} is empty; a manifest needs a header line (path,age) and rows")
    return text


def _check_header(path: Path, header: list[str], first_line: str) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    if not all(c in names for c in REQUIRED_COLUMNS):
        for delim, label in ((";", "semicolons"), ("\t", "tabs")):
            if first_line.count(delim) > first_line.count(","):
                raise DataError(
                    f"{path} is separated by {label}, not commas (header: {first_line!r}); "
                    'save it as comma-separated CSV, e.g. python -c "import pandas as pd; '
                    f"pd.read_csv('{path.name}', sep={delim!r}).to_csv('{path.name}', "
                    'index=False)"'
                )
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        found = ", ".join(repr(h) for h in header) or "none"
        hint = ""
        if any(
            re.search(r"\.(jpe?g|png)$", h.strip(), re.I) or h.strip().isdigit() for h in header
        ):
            hint = "; the first line looks like data: add a header line such as path,age,subject"
        raise DataError(
            f"{path} is missing column(s) {', '.join(missing)}; found columns: {found}. "
            f"Required: {', '.join(REQUIRED_COLUMNS)}; optional: {', '.join(OPTIONAL_COLUMNS)}"
            + hint
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path} has duplicate column(s) {', '.join(dupes)}")
    present = [c for c in BOX_COLUMNS if c in names]
    if present and len(present) != len(BOX_COLUMNS):
        missing = [c for c in BOX_COLUMNS if c not in names]
        raise DataError(
            f"{path}: a face box needs all of x, y, w, h; found {', '.join(present)} "
            f"but not {', '.join(missing)}"
        )
    return {n: i for i, n in enumerate(names)}


def _parse_box(cells: list[str], where: str, bad: BadRows) -> tuple[float, ...] | None:
    """Box cells → 4 floats, all-NaN for "no box", or None (recorded as bad)."""
    stripped = [c.strip() for c in cells]
    if all(c == "" for c in stripped):
        return (math.nan,) * 4
    try:
        x, y, w, h = (float(c) for c in stripped)
    except ValueError:
        shown = ", ".join(map(repr, stripped))
        bad.add(BAD_BOX, where, f"x, y, w, h = {shown} are not all numbers")
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        bad.add(
            BAD_BOX, where, f"box x={x:g} y={y:g} w={w:g} h={h:g} needs finite values and w, h > 0"
        )
        return None
    return x, y, w, h


def read_csv(path: str | Path, *, max_age: float = 120.0, on_bad: OnBad = "error") -> Manifest:
    """A CSV manifest: ``path, age[, subject][, x, y, w, h][, split][, fold]``; paths
    relative to its folder. A ``split`` or ``fold`` column gives a fixed test protocol.

    Ages may be fractional (e.g. 25.5 years). Blank lines (and lines with only commas) are
    ignored; extra columns are ignored; rows with fewer fields than the header are padded
    with empty cells, rows with more are bad (an unquoted comma in a path, usually).
    """
    path = _require_manifest(Path(path))
    text = _decode_text(path)
    # strict: a quote left open at the end of the file, or text after a closing quote, is
    # an error (reported at its line) instead of being read as some other value.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = _read_header(reader, path)
    first_line = text.splitlines()[reader.line_num - 1] if reader.line_num else ""
    index = _check_header(path, header, first_line)
    has_boxes = "x" in index
    bad = BadRows(on_bad)
    checker = _FileChecker(path.parent, bad)
    cols = _empty_table(has_boxes)
    n_rows = 0
    for line, row in _rows(reader, path, header):
        if not any(c.strip() for c in row):
            continue  # blank line or ",,,"
        n_rows += 1
        _csv_row(row, len(header), index, f"{path} line {line}", checker, cols, max_age=max_age)
    if n_rows == 0:
        raise DataError(f"{path} has a header but no rows")
    return Manifest("csv", path, path.parent, _frame(cols), bad, n_rows, has_boxes)


def _require_manifest(path: Path) -> Path:
    if path.is_dir():
        csvs = sorted(p.name for p in path.glob("*.csv"))
        hint = f"; it holds {', '.join(csvs)} — use data.path={path / csvs[0]}" if csvs else ""
        raise DataError(f"csv source expects a manifest file, but {path} is a folder{hint}")
    if not path.exists():
        raise DataError(f"manifest {path} does not exist (check data.path)")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        # Checked before reading: a FIFO would block until someone writes to it, a device
        # such as /dev/zero would never end.
        raise DataError(
            f"manifest {path} is {special_file_kind(mode)}, not a file (reading it could "
            "block or never end): give the CSV file itself as data.path",
            reason=SPECIAL_FILE,
            where=str(path),
        )
    return path


def _rows(reader: Any, path: Path, header: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, cells) of each row after the header. A quote left open
    swallows the following lines into one cell: that is reported at the line where the quote
    opened (not where the reader noticed), and always stops the load, since every row after
    it is misread."""
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. "field larger than field limit": an open quote
            raise _quote_error(path, start, reader.line_num, header, None, str(exc)) from None
        spill = next((i for i, c in enumerate(row) if "\n" in c or "\r" in c), None)
        if spill is not None:
            raise _quote_error(path, start, reader.line_num, header, spill, "")
        yield start, row
        start = reader.line_num + 1


def _quote_error(
    path: Path, start: int, end: int, header: list[str], cell: int | None, error: str
) -> DataError:
    if cell is not None:
        column = f" in column {header[cell].strip()!r}" if cell < len(header) else ""
        detail = (
            f"a quote opened{column} closes only on line {end}, so the lines up to there ran "
            "into this row"
        )
    elif "unexpected end of data" in error:
        detail = f"a quote opened here is never closed (it runs to the end, line {end})"
    else:
        detail = f"the quoting is malformed ({error})"
    where = f"{path} line {start}"
    return DataError(
        f"{where}: {BAD_QUOTE}: {detail} ({HINTS[BAD_QUOTE]}; every row after it would be misread)",
        reason=BAD_QUOTE,
        where=where,
    )


def _read_header(reader: Any, path: Path) -> list[str]:
    """The first non-blank row of a CSV reader (empty when there is none)."""
    try:
        for row in reader:
            if any(c.strip() for c in row):
                return row
    except csv.Error as exc:
        raise _quote_error(path, reader.line_num, reader.line_num, [], None, str(exc)) from None
    return []


def _csv_row(
    row: list[str],
    n_header: int,
    index: dict[str, int],
    where: str,
    checker: _FileChecker,
    cols: dict[str, list],
    *,
    max_age: float,
) -> None:
    """Check one manifest row and append it to ``cols`` (bad rows go to ``checker.bad``)."""
    bad = checker.bad
    if len(row) > n_header:
        bad.add(
            MALFORMED_ROW,
            where,
            f"{len(row)} fields but the header has {n_header}: {','.join(row)!r}",
        )
        return
    row = row + [""] * (n_header - len(row))
    rel = row[index["path"]].strip()
    if not rel:
        bad.add(MISSING_PATH, where, "the path is empty")
        return
    where = f"{where} ({rel})"
    real = checker.check_location(rel, where)
    if real is None:
        return
    # Spaces around a CSV cell are the spreadsheet's, not the label's.
    age = parse_age(row[index["age"]].strip(" \t"), where, bad, max_age=max_age, integer=False)
    if age is None:
        return
    has_boxes = "x" in index
    box = _parse_box([row[index[c]] for c in BOX_COLUMNS], where, bad) if has_boxes else ()
    if box is None:
        return
    given = row[index["split"]].strip().lower() if "split" in index else ""
    if given and given not in GIVEN_SPLITS:
        bad.add(BAD_SPLIT, where, f"split {given!r}")
        return
    st = checker.check_file(real, rel, where)
    if st is None:
        return
    cols["path"].append(os.path.normpath(rel).replace(os.sep, "/"))
    cols["age"].append(age)
    cols["subject"].append(row[index["subject"]].strip() if "subject" in index else "")
    for c, v in zip(BOX_COLUMNS, box, strict=False):
        cols[c].append(v)
    cols["split"].append(given)
    cols["fold"].append(row[index["fold"]].strip() if "fold" in index else "")
    _append_file(cols, where, real, st)


# --------------------------------------------------------------------------- duplicates


def _digest(file: str) -> str | None:
    """The content hash of a file, or None when it cannot be read (it is then unique)."""
    try:
        with open(file, "rb") as fh:
            return hashlib.file_digest(fh, "blake2b").hexdigest()
    except OSError:
        return None


def content_groups(files: Sequence[str], sizes: Sequence[int]) -> np.ndarray:
    """Byte-identical files (copies, hard links): a group id per file, -1 for a file with no
    twin. Only files whose size another file shares are read (byte-identical files have the
    same size), so a dataset without duplicates costs one pass over the sizes."""
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    groups = np.full(len(sizes_arr), -1, dtype=np.int64)
    _, inverse, counts = np.unique(sizes_arr, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] > 1)
    if not len(candidates):
        return groups
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        digests = list(pool.map(_digest, [files[i] for i in candidates]))
    by_content: dict[tuple[int, str], list[int]] = {}
    for i, digest in zip(candidates.tolist(), digests, strict=True):
        if digest is not None:
            by_content.setdefault((int(sizes_arr[i]), digest), []).append(i)
    twins = [members for members in by_content.values() if len(members) > 1]
    for gid, members in enumerate(sorted(twins)):
        groups[members] = gid
    return groups


def duplicate_summary(
    groups: np.ndarray, paths: Sequence[str], ages: Sequence[float], max_examples: int = 3
) -> dict[str, Any]:
    """``{"n_groups", "n_copies" (images beyond the first of each group), "n_conflicting"
    (groups whose copies carry different ages), "examples": ["a.jpg = b.jpg", ...]}``."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        if g >= 0:
            members.setdefault(g, []).append(i)
    examples, conflicting = [], 0
    for idx in members.values():
        differ = len({float(ages[i]) for i in idx}) > 1
        conflicting += differ
        if len(examples) < max_examples:
            shown = " = ".join(str(paths[i]) for i in idx[:3]) + (" …" if len(idx) > 3 else "")
            ages_note = f" (ages {', '.join(f'{ages[i]:g}' for i in idx[:3])})" if differ else ""
            examples.append(shown + ages_note)
    return {
        "n_groups": len(members),
        "n_copies": sum(len(idx) - 1 for idx in members.values()),
        "n_conflicting": conflicting,
        "examples": examples,
    }


def format_duplicates(summary: dict[str, Any] | None, origin: str | Path = "") -> str:
    """One line about byte-identical images (empty when there are none)."""
    if not summary or not summary.get("n_groups"):
        return ""
    conflicting = summary.get("n_conflicting", 0)
    return (
        f"{summary['n_copies']} duplicate image(s): byte-identical copies in "
        f"{summary['n_groups']} group(s)" + (f" in {origin}" if origin else "") + "; each "
        "group is kept in one split (like one subject), so no test face is trained on"
        + (
            f"; {conflicting} group(s) carry different ages: check those labels"
            if conflicting
            else ""
        )
        + (f"; e.g. {'; '.join(summary['examples'])}" if summary.get("examples") else "")
    )


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Source:
    """A registered data source. ``read`` is None for the synthetic generator."""

    name: str
    kind: Literal["synthetic", "folder", "manifest"]
    description: str
    read: Callable[..., Manifest] | None = None


SOURCES: dict[str, Source] = {
    "synthetic": Source("synthetic", "synthetic", "procedural faces from agelab.data.synth"),
    "utkface": Source("utkface", "folder", f"UTKFace folder ({UTKFACE_EXAMPLE})", read_utkface),
    "fgnet": Source("fgnet", "folder", f"FG-NET folder ({FGNET_EXAMPLE})", read_fgnet),
    "csv": Source("csv", "manifest", "CSV manifest: path, age[, subject][, x, y, w, h]", read_csv),
}


def read_manifest(
    source: str, path: str | Path, *, max_age: float = 120.0, on_bad: OnBad = "error"
) -> Manifest:
    """Read and validate a real source by name. Raises :class:`DataError`."""
    spec = SOURCES.get(source)
    if spec is None:
        raise DataError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
    if spec.read is None:
        raise DataError(f"source {source!r} is generated, not read from files")
    manifest = spec.read(Path(path), max_age=max_age, on_bad=on_bad)
    if len(manifest) == 0:
        raise DataError(
            f"no usable images in {manifest.origin}: all {manifest.n_rows} row(s) are bad\n"
            + format_bad_summary(manifest.bad.summary(), manifest.origin)
        )
    return manifest
