"""Real-data sources: UTKFace / FG-NET folders, CSV manifests, and every bad-input case.

All datasets are small JPEG/PNG files written into tmp_path; the real 250-image UTKFace
sample beside the repo is used when present (skipped with a reason otherwise).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from agelab.config import DataConfig
from agelab.data import sources as S
from agelab.data.load import load_dataset
from agelab.data.sources import SOURCES, read_csv, read_fgnet, read_manifest, read_utkface
from agelab.errors import DataError
from helpers.images import jpeg_bytes, write_image

# ----------------------------------------------------------------------------- helpers


def write_csv(root: Path, lines: list[str], name: str = "labels.csv", **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text("\n".join(lines) + "\n", **({"encoding": "utf-8"} | kw))
    return path


GOOD = 4  # good rows written alongside each bad one (enough groups to split under skip)


def csv_with(tmp: Path, bad_row: str, *, header: str = "path,age,subject") -> Path:
    """A manifest with GOOD good rows followed by ``bad_row`` (so it is on line GOOD + 2)."""
    root = tmp / "ds"
    rows = []
    for i in range(GOOD):
        write_image(root / "images" / f"img{i}.jpg", seed=i)
        cells = {"path": f"images/img{i}.jpg", "age": str(20 + 10 * i), "subject": f"s{i}"}
        rows.append(",".join(cells.get(col, "") for col in header.split(",")))  # no box: ""
    write_image(root / "images" / "extra.jpg", seed=7)  # unlisted: bad rows may point at it
    return write_csv(root, [header, *rows, bad_row])


def cfg(source: str, path: Path, on_bad: str = "error", **kw) -> DataConfig:
    return DataConfig(
        source=source,
        path=path,
        image_size=16,
        on_bad=on_bad,
        cache_dir=path.parent / ".cache" if path.is_file() else path / ".cache",
        **kw,
    )


# ------------------------------------------------------------------------------ formats


def test_registry_names_every_source():
    assert list(SOURCES) == ["synthetic", "utkface", "fgnet", "csv"]
    assert SOURCES["synthetic"].read is None
    assert all(SOURCES[n].read is not None for n in ("utkface", "fgnet", "csv"))


def test_utkface_folder(tmp_path):
    names = [
        "25_0_1_20170116174525125.jpg.chip.jpg",
        "3_1_0_20170109150557335.jpg",
        "80_0_2_20170110182418551.JPG",
    ]
    for i, n in enumerate(names):
        write_image(tmp_path / n, seed=i)
    (tmp_path / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    m = read_utkface(tmp_path)
    assert sorted(m.table["age"]) == [3.0, 25.0, 80.0]
    assert set(m.table["subject"]) == {""}
    assert list(m.table.columns[:3]) == ["path", "age", "subject"]
    assert m.n_rows == 3 and len(m.bad) == 0


def test_fgnet_folder_is_case_insensitive_and_has_subjects(tmp_path):
    for i, n in enumerate(["001A02.JPG", "001A43a.JPG", "002a05.jpg", "002A10b.jpg"]):
        write_image(tmp_path / n, seed=i)
    m = read_fgnet(tmp_path)
    got = sorted(zip(m.table["subject"], m.table["age"], strict=True))
    assert got == [("001", 2.0), ("001", 43.0), ("002", 5.0), ("002", 10.0)]


def test_csv_minimal_float_ages_relative_paths(tmp_path):
    write_image(tmp_path / "a" / "x.png", seed=1)
    write_image(tmp_path / "y.jpg", seed=2)
    m = read_csv(write_csv(tmp_path, ["path,age", "a/x.png,25.5", "./y.jpg,7"]))
    assert list(m.table["path"]) == ["a/x.png", "y.jpg"]
    assert list(m.table["age"]) == [25.5, 7.0]
    assert list(m.table["subject"]) == ["", ""]
    assert not m.has_boxes and "x" not in m.table


def test_csv_with_subject_and_box_columns_any_order_and_case(tmp_path):
    write_image(tmp_path / "a.jpg", size=(40, 30))
    write_image(tmp_path / "b.jpg", size=(40, 30))
    man = write_csv(
        tmp_path,
        [" Subject ,H,W,Y,X,Age,PATH,extra", "p1,10,12,3,4,30,a.jpg,ignored", "p2,,,,,40,b.jpg,"],
    )
    m = read_csv(man)
    assert m.has_boxes
    row = m.table.iloc[0]
    assert (row["subject"], row["x"], row["y"], row["w"], row["h"]) == ("p1", 4, 3, 12, 10)
    assert np.isnan(m.table.iloc[1]["x"])  # all four empty → centre crop for that row


def test_csv_bom_and_crlf_are_handled(tmp_path):
    write_image(tmp_path / "a.jpg")
    man = tmp_path / "labels.csv"
    man.write_bytes("path,age\r\na.jpg,30\r\n".encode("utf-8-sig"))
    assert list(read_csv(man).table["age"]) == [30.0]


def test_csv_short_rows_are_padded_blank_lines_ignored(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg")
    m = read_csv(write_csv(tmp_path, ["path,age,subject", "a.jpg,30", "", ",,", "b.jpg,31,s"]))
    assert list(m.table["subject"]) == ["", "s"] and m.n_rows == 2


def test_dotdot_that_stays_inside_is_fine(tmp_path):
    write_image(tmp_path / "y.jpg")
    (tmp_path / "sub").mkdir()
    m = read_csv(write_csv(tmp_path, ["path,age", "sub/../y.jpg,30"]))
    assert list(m.table["path"]) == ["y.jpg"]


def test_symlink_inside_root_is_fine(tmp_path):
    write_image(tmp_path / "real.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
    m = read_csv(write_csv(tmp_path, ["path,age", "link.jpg,30"]))
    assert len(m) == 1


def test_reason_constants_are_unique_and_hinted():
    assert len(set(S.REASONS)) == len(S.REASONS)
    assert set(S.HINTS) == set(S.REASONS)


# ---------------------------------------------------------------- bad rows: the table
# Each case builds a dataset with GOOD good rows and exactly one bad one, and names the
# reason and a substring the message must contain. Under on_bad=error loading raises a
# DataError naming the place; under skip it loads the good rows and records the bad one.


def _utk(tmp: Path, bad_name: str, bad_bytes: bytes | None = None) -> Path:
    root = tmp / "utk"
    for i in range(GOOD):
        write_image(root / f"{20 + i}_0_0_2017010{i}000000000.jpg.chip.jpg", seed=i)
    if bad_bytes is None:
        write_image(root / bad_name, seed=9)
    else:
        (root / bad_name).write_bytes(bad_bytes)
    return root


def _fg(tmp: Path, bad_name: str) -> Path:
    root = tmp / "fg"
    for i in range(GOOD):
        write_image(root / f"00{i}A1{i}.JPG", seed=i)
    write_image(root / bad_name, seed=9)
    return root


def _missing(t):
    return "csv", csv_with(t, "images/nope.jpg,30,x")


def _zero(t):
    p = csv_with(t, "images/empty.jpg,30,x")
    (p.parent / "images" / "empty.jpg").write_bytes(b"")
    return "csv", p


def _text(t):
    p = csv_with(t, "images/notes.jpg,30,x")
    (p.parent / "images" / "notes.jpg").write_text("this is not a picture\n")
    return "csv", p


def _truncated(t):
    p = csv_with(t, "images/cut.jpg,30,x")
    data = jpeg_bytes()
    (p.parent / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return "csv", p


def _garbage(t):
    p = csv_with(t, "images/garbage.jpg,30,x")
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (p.parent / "images" / "garbage.jpg").write_bytes(jpeg_bytes()[:200] + noise)
    return "csv", p


def _dup(t):
    return "csv", csv_with(t, "./images/img1.jpg,99,x")


def _dotdot(t):
    write_image(t / "outside.jpg")
    return "csv", csv_with(t, "../outside.jpg,30,x")


def _absolute(t):
    p = csv_with(t, "PLACEHOLDER")
    abs_path = p.parent / "images" / "img0.jpg"
    p.write_text(p.read_text().replace("PLACEHOLDER", f"{abs_path},30,x"))
    return "csv", p


def _symlink_out(t):
    p = csv_with(t, "images/link.jpg,30,x")
    (p.parent / "images" / "link.jpg").symlink_to(write_image(t / "elsewhere.jpg"))
    return "csv", p


def _linked_dir_out(t):
    write_image(t / "outdir" / "x.jpg")
    p = csv_with(t, "linked/x.jpg,30,x")
    (p.parent / "linked").symlink_to(t / "outdir", target_is_directory=True)
    return "csv", p


def _backslash(t):
    return "csv", csv_with(t, "images\\extra.jpg,30,x")


def _box_bad(t):
    p = csv_with(t, "images/extra.jpg,30,x,a,b,c,d", header="path,age,subject,x,y,w,h")
    return "csv", p


def _box_outside(t):
    p = csv_with(t, "images/far.jpg,30,x,1000,1000,10,10", header="path,age,subject,x,y,w,h")
    write_image(p.parent / "images" / "far.jpg")
    return "csv", p


def _fifo(t):
    p = csv_with(t, "images/pipe.jpg,30,x")
    os.mkfifo(p.parent / "images" / "pipe.jpg")  # opening it would block until a writer comes
    return "csv", p


def _socket(t):
    import socket

    p = csv_with(t, "images/sock.jpg,30,x")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(p.parent / "images" / "sock.jpg"))
    sock.close()
    return "csv", p


def _utk_fifo(t):
    root = _utk(t, "holiday.jpg")
    (root / "holiday.jpg").unlink()
    os.mkfifo(root / "30_0_0_20170101.jpg")
    return "utkface", root


def _age(text):
    return lambda t: ("csv", csv_with(t, f"images/extra.jpg,{text},x"))


BAD_CASES = {
    # case: (builder, reason, substring of the message)
    "fifo listed": (_fifo, S.SPECIAL_FILE, "is a FIFO (named pipe)"),
    "socket listed": (_socket, S.SPECIAL_FILE, "is a socket"),
    "fifo in a utkface folder": (_utk_fifo, S.SPECIAL_FILE, "30_0_0_20170101.jpg"),
    "nul byte in a path": (
        lambda t: ("csv", csv_with(t, "images/ex\0tra.jpg,30,x")),
        S.NUL_IN_PATH,
        "holds a NUL byte",
    ),
    "age in arabic-indic digits": (_age("٣٠"), S.BAD_AGE, "non-ASCII digits"),
    "age in full-width digits": (_age("３０"), S.BAD_AGE, "non-ASCII digits"),
    "age with an exponent": (_age("3e1"), S.BAD_AGE, "exponent notation"),
    "age with a digit separator": (_age("3_0"), S.BAD_AGE, "digit separators"),
    "age with a plus sign": (_age("+30"), S.BAD_AGE, "a plus sign"),
    "age infinite": (_age("Infinity"), S.BAD_AGE, "not a finite number"),
    "age with inner space": (_age("3 0"), S.BAD_AGE, "spaces"),
    "utkface age with an exponent": (
        lambda t: ("utkface", _utk(t, "3e1_0_0_20170101.jpg")),
        S.BAD_AGE,
        "'3e1' is not a plain decimal number",
    ),
    "fgnet age in arabic-indic digits": (
        lambda t: ("fgnet", _fg(t, "009A٣٠.JPG")),
        S.NAME_PATTERN,
        "009A٣٠",
    ),
    "missing file": (_missing, S.MISSING_FILE, "nope.jpg"),
    "zero-byte file": (_zero, S.EMPTY_FILE, "0 bytes"),
    "text named .jpg": (_text, S.NOT_IMAGE, "notes.jpg"),
    "truncated jpeg": (_truncated, S.TRUNCATED_IMAGE, "cut.jpg"),
    "corrupt jpeg": (_garbage, S.CORRUPT_IMAGE, "garbage.jpg"),
    "age not numeric": (
        lambda t: ("csv", csv_with(t, "images/extra.jpg,thirty,x")),
        S.BAD_AGE,
        "'thirty'",
    ),
    "age nan": (lambda t: ("csv", csv_with(t, "images/extra.jpg,nan,x")), S.BAD_AGE, "finite"),
    "age empty": (lambda t: ("csv", csv_with(t, "images/extra.jpg,,x")), S.MISSING_AGE, "empty"),
    "age negative": (lambda t: ("csv", csv_with(t, "images/extra.jpg,-2,x")), S.NEGATIVE_AGE, "-2"),
    "age over max": (
        lambda t: ("csv", csv_with(t, "images/extra.jpg,121,x")),
        S.AGE_TOO_HIGH,
        "max_age=120",
    ),
    "duplicate path": (_dup, S.DUPLICATE_PATH, "already listed at"),
    "path with ..": (_dotdot, S.OUTSIDE_ROOT, "outside.jpg"),
    "absolute path": (_absolute, S.OUTSIDE_ROOT, "absolute path"),
    "symlink outside": (_symlink_out, S.OUTSIDE_ROOT, "symlink to"),
    "symlinked folder outside": (_linked_dir_out, S.OUTSIDE_ROOT, "outside"),
    "windows separators": (_backslash, S.MISSING_FILE, "not \\"),
    "empty path": (lambda t: ("csv", csv_with(t, ",30,x")), S.MISSING_PATH, "path is empty"),
    "too many fields": (
        lambda t: ("csv", csv_with(t, "images/extra.jpg,30,x,extra")),
        S.MALFORMED_ROW,
        "4 fields",
    ),
    "box not numeric": (_box_bad, S.BAD_BOX, "not all numbers"),
    "box outside image": (_box_outside, S.BAD_BOX, "outside the 24x20 image"),
    "utkface name": (lambda t: ("utkface", _utk(t, "holiday.jpg")), S.NAME_PATTERN, "holiday"),
    "utkface non-integer": (
        lambda t: ("utkface", _utk(t, "25.5_0_0_20170101.jpg")),
        S.NON_INTEGER_AGE,
        "'25.5'",
    ),
    "utkface negative": (
        lambda t: ("utkface", _utk(t, "-3_0_0_20170101.jpg")),
        S.NEGATIVE_AGE,
        "-3",
    ),
    "utkface over max": (
        lambda t: ("utkface", _utk(t, "130_0_0_20170101.jpg")),
        S.AGE_TOO_HIGH,
        "130",
    ),
    "utkface text file": (
        lambda t: ("utkface", _utk(t, "30_0_0_1.jpg", b"hello")),
        S.NOT_IMAGE,
        "30_0_0_1.jpg",
    ),
    "fgnet name": (lambda t: ("fgnet", _fg(t, "001B02.JPG")), S.NAME_PATTERN, "001B02"),
    "fgnet over max": (lambda t: ("fgnet", _fg(t, "009A99.JPG")), S.AGE_TOO_HIGH, "99"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_row_under_error_names_place_and_fix(tmp_path, case):
    build, reason, needle = BAD_CASES[case]
    source, path = build(tmp_path)
    max_age = 90 if case == "fgnet over max" else 120
    with pytest.raises(DataError) as info:
        load_dataset(cfg(source, path, "error", max_age=max_age), progress=False)
    msg = str(info.value)
    assert reason in msg and needle in msg, msg
    assert info.value.reason == reason
    assert "on_bad=skip" in msg  # says what to do
    if source == "csv":
        assert f"line {GOOD + 2}" in msg  # header is line 1, the bad row comes last


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_row_under_skip_is_recorded_not_dropped_silently(tmp_path, case, capsys):
    build, reason, needle = BAD_CASES[case]
    source, path = build(tmp_path)
    max_age = 90 if case == "fgnet over max" else 120
    data = load_dataset(cfg(source, path, "skip", max_age=max_age), progress=False)
    assert len(data) == GOOD
    bad = data.info["bad_rows"]
    assert data.info["n_bad"] == 1 and bad["counts"] == {reason: 1}
    assert needle in bad["examples"][reason][0]
    assert reason in capsys.readouterr().err  # the summary is printed


def test_skip_reports_many_reasons_with_counts(tmp_path):
    root = tmp_path / "ds"
    for i in range(5):
        write_image(root / f"g{i}.jpg", seed=i)
    (root / "empty.jpg").write_bytes(b"")
    lines = [
        "path,age",
        *(f"g{i}.jpg,{30 + i}" for i in range(5)),
        "nope1.jpg,3",
        "nope2.jpg,3",
        "nope3.jpg,3",
        "nope4.jpg,3",
        "empty.jpg,5",
        "g0.jpg,x",
    ]
    data = load_dataset(cfg("csv", write_csv(root, lines), "skip"), progress=False)
    bad = data.info["bad_rows"]
    assert bad["n"] == 6
    assert bad["counts"] == {S.DUPLICATE_PATH: 1, S.MISSING_FILE: 4, S.EMPTY_FILE: 1}
    assert len(bad["examples"][S.MISSING_FILE]) == 3  # the first examples only


def test_all_rows_bad_is_an_error_even_under_skip(tmp_path):
    p = write_csv(tmp_path, ["path,age", "a.jpg,3", "b.jpg,4"])
    with pytest.raises(DataError, match=r"no usable images.*all 2 row\(s\) are bad"):
        load_dataset(cfg("csv", p, "skip"), progress=False)


def test_all_images_undecodable_is_an_error_even_under_skip(tmp_path):
    (tmp_path / "a.jpg").write_text("not an image")
    p = write_csv(tmp_path, ["path,age", "a.jpg,3"])
    with pytest.raises(DataError, match="no usable images"):
        load_dataset(cfg("csv", p, "skip"), progress=False)


# --------------------------------------------------------- source-level problems: raise


def _semicolon(t):
    return "csv", write_csv(t, ["path;age;subject", "a.jpg;3;x"])


def _tab(t):
    return "csv", write_csv(t, ["path\tage", "a.jpg\t3"])


def _utf16(t):
    p = t / "labels.csv"
    p.write_text("path,age\na.jpg,3\n", encoding="utf-16")
    return "csv", p


def _latin1(t):
    p = t / "labels.csv"
    p.write_bytes("path,age\nJosé.jpg,3\n".encode("latin-1"))
    return "csv", p


def _empty_csv(t):
    (t / "labels.csv").write_bytes(b"")
    return "csv", t / "labels.csv"


def _blank_csv(t):
    (t / "labels.csv").write_text("\n  \n")
    return "csv", t / "labels.csv"


def _utk_wrong_folder(t):
    write_image(t / "data" / "images" / "25_0_1_20170116174525125.jpg.chip.jpg")
    write_csv(t / "data", ["path,age"])
    return "utkface", t / "data"


SOURCE_CASES = {
    "missing age column": (
        lambda t: ("csv", write_csv(t, ["path,years", "a.jpg,3"])),
        "missing column(s) age; found columns: 'path', 'years'",
    ),
    "no header": (lambda t: ("csv", write_csv(t, ["a.jpg,3"])), "first line looks like data"),
    "semicolon delimiter": (_semicolon, "separated by semicolons, not commas"),
    "tab delimiter": (_tab, "separated by tabs, not commas"),
    "empty file": (_empty_csv, "is empty"),
    "whitespace-only file": (_blank_csv, "is empty"),
    "header only": (lambda t: ("csv", write_csv(t, ["path,age,subject"])), "no rows"),
    "partial box columns": (
        lambda t: ("csv", write_csv(t, ["path,age,x,y", "a.jpg,3,1,2"])),
        "needs all of x, y, w, h",
    ),
    "duplicate columns": (
        lambda t: ("csv", write_csv(t, ["path,age,age", "a.jpg,3,4"])),
        "duplicate column(s) age",
    ),
    "utf-16": (_utf16, "UTF-16"),
    "latin-1": (_latin1, "not UTF-8"),
    "manifest missing": (lambda t: ("csv", t / "nope.csv"), "does not exist"),
    "csv given a folder": (lambda t: ("csv", write_csv(t, ["path,age"]).parent), "use data.path="),
    "utkface folder missing": (lambda t: ("utkface", t / "nope"), "does not exist"),
    "utkface given a file": (
        lambda t: ("utkface", write_csv(t, ["path,age"])),
        "use data.source=csv",
    ),
    "utkface wrong folder": (_utk_wrong_folder, "subfolder images/ has 1 files"),
    "fgnet empty folder": (lambda t: ("fgnet", t), "no fgnet images"),
}


@pytest.mark.parametrize("on_bad", ["error", "skip"])
@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_source_problems_raise_under_both_policies(tmp_path, case, on_bad):
    build, needle = SOURCE_CASES[case]
    source, path = build(tmp_path)
    with pytest.raises(DataError) as info:
        read_manifest(source, path, on_bad=on_bad)
    assert needle in str(info.value), str(info.value)


def test_unreadable_file_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can read any file")
    p = csv_with(tmp_path, "images/locked.jpg,30,x")
    locked = write_image(p.parent / "images" / "locked.jpg")
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match=r"locked\.jpg"):
            load_dataset(cfg("csv", p), progress=False)
    finally:
        locked.chmod(0o644)


# ------------------------------------------------------------------- the real sample


def test_real_sample_as_csv_and_as_utkface_folder(faces_sample):
    m_csv = read_manifest("csv", faces_sample / "labels.csv")
    m_utk = read_manifest("utkface", faces_sample / "images")
    assert len(m_csv) == len(m_utk) == 250 and len(m_csv.bad) == len(m_utk.bad) == 0
    by_name = dict(zip(m_utk.table["path"], m_utk.table["age"], strict=True))
    for path, age in zip(m_csv.table["path"], m_csv.table["age"], strict=True):
        assert by_name[Path(path).name] == age  # the label is the name's first field
    assert m_csv.table["age"].min() == 1 and m_csv.table["age"].max() == 116
    assert set(m_csv.table["subject"]) == {""}


# ------------------------------------------------------- special files, quoting, ages


@pytest.mark.timeout(30)
@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_special_files_never_block(tmp_path, on_bad):
    """A FIFO (as the manifest, listed, or in a folder) and a character device as the
    manifest are named and refused without being opened: reading a FIFO with no writer
    blocks forever, reading /dev/zero never ends."""
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO (named pipe)"), (Path("/dev/zero"), "a character device")):
        with pytest.raises(DataError, match=re.escape(f"manifest {path} is {kind}, not a file")):
            read_csv(path, on_bad=on_bad)
    source, listed = _fifo(tmp_path / "t")
    if on_bad == "error":
        with pytest.raises(DataError, match="not a regular file"):
            read_manifest(source, listed, on_bad=on_bad)
    else:
        m = read_manifest(source, listed, on_bad=on_bad)
        assert len(m) == GOOD and m.bad.summary()["counts"] == {S.SPECIAL_FILE: 1}


@pytest.mark.parametrize(
    ("rows", "line", "says"),
    [
        (['"images/img0.jpg,20', "images/img1.jpg,30"], 2,
         "never closed (it runs to the end, line 3)"),
        (['images/img0.jpg,"20', 'images/img1.jpg",30', "images/img2.jpg,40"], 2,
         "a quote opened in column 'age' closes only on line 3"),
        (["images/img0.jpg,20", "images/img1.jpg,30", '"images/img2".jpg,40'], 4,
         "the quoting is malformed"),
        (['"path",age', "images/img0.jpg,20"], None, None),  # quoted header: fine
    ],
)  # fmt: skip
def test_quoting_errors_name_the_line_where_the_quote_starts(tmp_path, rows, line, says):
    for i in range(3):
        write_image(tmp_path / "images" / f"img{i}.jpg", seed=i)
    header = [] if rows[0].startswith('"path"') else ["path,age"]
    path = write_csv(tmp_path, [*header, *rows])
    if line is None:
        assert len(read_csv(path)) == 1
        return
    for on_bad in ("error", "skip"):  # the rest of the file would be misread: always stops
        with pytest.raises(DataError) as info:
            read_csv(path, on_bad=on_bad)
        assert f"{path} line {line}: bad quoting: " in str(info.value) and says in str(info.value)
        assert info.value.reason == S.BAD_QUOTE


@pytest.mark.parametrize("text", ["30", "30.5", "007", "  30 ", "\t30", "0", "120"])
def test_plain_ages_are_accepted(tmp_path, text):
    write_image(tmp_path / "a.jpg")
    m = read_csv(write_csv(tmp_path, ["path,age", f"a.jpg,{text}"]))
    assert m.table["age"].tolist() == [float(text)]
