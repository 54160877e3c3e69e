"""Hostile input, round two, for the readers: nothing outside a header's folder is read, memory is
bounded by the header before reading, and names print as one escaped line.

docs/reliability.md records the classes, the case counts and the memory ceilings measured here.
"""

import bz2
import gzip
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_hostile_input import LAST_GUARD, fuzz, read_error
from test_io import dicom_image, write_dicom_series
from test_preprocess import head_phantom, lps_affine

from hagan.cli.commands import error_line, main
from hagan.data import io as hio
from hagan.data.io import atomic_write, read_volume, write_volume
from hagan.data.preprocess import preprocess_folder
from hagan.errors import HaganError, VolumeError, printable

CUBE = np.arange(64, dtype=np.float32).reshape(4, 4, 4)  # (k, j, i): slice k is CUBE[k]
NRRD = "NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\nendian: little\n"
META = "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\n"


def nrrd_header(reference: str) -> str:
    return NRRD + f"data file: {reference}\n"


def meta_header(reference: str) -> str:
    return META + f"ElementDataFile = {reference}\n"


HEADERS = {  # a detached header of each kind, and the attached kinds that may still name a data file
    ".nhdr": nrrd_header,
    ".nrrd": lambda reference: nrrd_header(reference) + "\n",
    ".mhd": meta_header,
    ".mha": meta_header,
}


@pytest.fixture
def outside(tmp_path) -> tuple[Path, Path]:
    """A data folder and, beside it, a secret file the user can read that no header may reach."""
    data, secret = tmp_path / "data", tmp_path / "secret"
    data.mkdir()
    secret.mkdir()
    for k in range(4):
        (secret / f"s{k}.raw").write_bytes(CUBE[k].tobytes())
    (secret / "all.raw").write_bytes(CUBE.tobytes())
    (data / "sub").mkdir()
    (data / "sub" / "all.raw").write_bytes(CUBE.tobytes())
    os.symlink(secret / "all.raw", data / "link.raw")
    os.symlink(secret, data / "linked-folder")
    for k in range(4):
        (data / f"s{k}.raw").write_bytes(CUBE[k].tobytes())
    return data, secret


def escaping_references(secret: Path) -> dict[str, str]:
    return {
        "parent": "../secret/all.raw",
        "deeper": "sub/../../secret/all.raw",
        "absolute": str(secret / "all.raw"),
        "absolute /etc": "/etc/passwd",
        "link out": "link.raw",
        "folder link out": "linked-folder/all.raw",
        "list with one out": "LIST 2\ns0.raw\ns1.raw\n../secret/s2.raw\ns3.raw",
        "pattern out": "../secret/s%d.raw 0 3 1 2",
    }


@pytest.mark.parametrize("ext", sorted(HEADERS))
@pytest.mark.parametrize("case", sorted(escaping_references(Path("/x"))))
def test_data_file_outside_the_header_folder_is_refused(outside, ext, case):
    data, secret = outside
    reference = escaping_references(secret)[case]
    if ext in (".mhd", ".mha") and reference.startswith("LIST 2"):
        reference = reference.replace("LIST 2", "LIST 2D")
    if ext in (".mhd", ".mha") and case == "pattern out":
        reference = reference.removesuffix(" 2")
    header = data / f"h{ext}"
    header.write_text(HEADERS[ext](reference))
    assert "lies outside the header's folder; refusing to read it" in read_error(header).reason


@pytest.mark.parametrize(
    "name, text",
    [
        ("plain.nhdr", nrrd_header("sub/all.raw")),
        ("list.nhdr", nrrd_header("LIST 2\ns0.raw\ns1.raw\ns2.raw\ns3.raw")),
        ("pattern.nhdr", nrrd_header("s%d.raw 0 3 1 2")),
        ("plain.mhd", meta_header("sub/all.raw")),
        ("list.mhd", meta_header("LIST 2D\ns0.raw\ns1.raw\ns2.raw\ns3.raw")),
        ("pattern.mhd", meta_header("s%d.raw 0 3 1")),
        ("inside-dots.mhd", meta_header("sub/../s%d.raw 0 3 1")),
    ],
)
def test_data_files_inside_the_header_folder_read_exactly(outside, name, text):
    data, _ = outside
    (data / name).write_text(text)
    np.testing.assert_array_equal(read_volume(data / name).array, CUBE.transpose(2, 1, 0))


SEGMENTS = st.sampled_from(["..", ".", "sub", "link.raw", "linked-folder", "all.raw", "s1.raw", "secret", ""])


@fuzz(80)
@given(parts=st.lists(SEGMENTS, min_size=1, max_size=5), absolute=st.booleans(), ext=st.sampled_from(sorted(HEADERS)))
def test_any_reference_reads_only_inside_the_folder(tmp_path_factory, parts, absolute, ext):
    """Whatever the reference, a file outside the folder is never read; one inside reads or fails cleanly."""
    root = tmp_path_factory.mktemp("fuzz")
    data, secret = root / "data", root / "secret"
    (data / "sub").mkdir(parents=True)
    secret.mkdir()
    for folder in (data, data / "sub", secret):
        (folder / "all.raw").write_bytes(CUBE.tobytes())
        (folder / "s1.raw").write_bytes(CUBE[1].tobytes())
    os.symlink(secret / "all.raw", data / "link.raw")
    os.symlink(secret, data / "linked-folder")
    reference = "/".join(parts)
    if absolute:
        reference = str(data / reference)
    header = data / f"h{ext}"
    header.write_text(HEADERS[ext](reference))
    target = os.path.realpath(os.path.join(data, reference))
    inside = os.path.commonpath([os.path.realpath(data), target]) == os.path.realpath(data)
    try:
        read_volume(header)
        assert inside
    except VolumeError as err:
        # every failure is a VolumeError by construction; an inside reference must fail for a reason a reader
        # gave, not fall through to read_volume's catch-all
        assert not err.reason.startswith(LAST_GUARD), str(err)
        assert inside or "outside the header's folder" in err.reason or "invalid data file" in err.reason


def test_preprocess_never_caches_a_file_outside_the_folder(outside, tmp_path):
    data, secret = outside
    for i, reference in enumerate(escaping_references(secret).values()):
        if not reference.startswith(("LIST", "..")) and "%" not in reference:
            (data / f"h{i}.nhdr").write_text(nrrd_header(reference))
    nib.save(nib.Nifti1Image(head_phantom(), lps_affine()), data / "good.nii.gz")
    report = preprocess_folder(data, tmp_path / "cache", recipe="mri", size=8, progress=False)
    assert [e.name for e in report.entries] == ["good"]
    assert len(report.bad) == len(list(data.glob("*.nhdr"))) == 5
    assert all("outside the header's folder" in reason for _, reason in report.bad)


# ---------------------------------------------------------------- memory bounded before reading

PEAK_PROBE = textwrap.dedent(
    """
    import sys
    from hagan.data.io import read_volume
    import SimpleITK  # imported on the first NRRD read; its ~90 MiB are not the read's
    from hagan.errors import VolumeError

    def peak_kib():  # this process's high-water mark; ru_maxrss would include pytest's, inherited at fork
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

    before = peak_kib()
    try:
        outcome = "read %s" % (read_volume(sys.argv[1]).array.shape,)
    except VolumeError as err:
        outcome = "error " + err.reason
    print((peak_kib() - before) // 1024)
    print(outcome)
    """
)


@pytest.fixture
def linux_memory_accounting():
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc/self/status (Linux)")


def read_in_child(path: Path) -> tuple[int, str]:
    """Growth of the peak resident memory (MiB) while a fresh process reads ``path``, and the outcome."""
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(path)], capture_output=True, text=True, check=True)
    growth, outcome = result.stdout.splitlines()
    return int(growth), outcome


def zeros_gzip(prefix: bytes, zeros: int) -> bytes:
    """``prefix`` then ``zeros`` zero bytes, gzip-compressed a chunk at a time (a bomb is cheap to make)."""
    packer = zlib.compressobj(9, wbits=31)
    chunks = [packer.compress(prefix)]
    chunk = b"\0" * (1 << 20)
    for _ in range(zeros >> 20):
        chunks.append(packer.compress(chunk))
    chunks.append(packer.compress(b"\0" * (zeros & ((1 << 20) - 1))))
    return b"".join(chunks) + packer.flush()


def test_huge_vox_offset_costs_time_not_memory(tmp_path, linux_memory_accounting):
    """A 0.4 MB .nii.gz whose vox_offset skips 400 MB of zeros: read in a bounded stream."""
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.float32)
    offset = 400_000_000
    block = bytearray(header.binaryblock)
    struct.pack_into("<f", block, 108, float(offset))
    path = tmp_path / "offset.nii.gz"
    path.write_bytes(zeros_gzip(bytes(block) + b"\0" * 4, offset - 352 + 8**3 * 4))
    assert path.stat().st_size < 500_000
    growth, outcome = read_in_child(path)
    assert outcome == "read (8, 8, 8)"
    assert growth < 64, f"peak memory grew by {growth} MiB"


@pytest.mark.parametrize(
    "name, encoding, data",
    [
        ("ascii.nrrd", "ascii", b"1 2 3\n"),
        ("text.nrrd", "text", b"1,2,3,4,5"),
        ("hex.nrrd", "hex", b"00 00 80 3f"),
        ("gzip.nrrd", "gzip", gzip.compress(b"\0" * 4096)),
    ],
)
def test_tiny_nrrd_claiming_a_huge_volume_is_refused_before_allocating(tmp_path, linux_memory_accounting, name, encoding, data):
    """81 bytes of ASCII NRRD declaring 700^3 used to make ITK allocate 1.3 GiB before failing."""
    path = tmp_path / name
    path.write_bytes(f"NRRD0004\ntype: float\ndimension: 3\nsizes: 700 700 700\nendian: little\nencoding: {encoding}\n\n".encode() + data)
    growth, outcome = read_in_child(path)
    assert outcome.startswith("error truncated: header declares 700x700x700 32-bit float"), outcome
    assert growth < 64, f"peak memory grew by {growth} MiB"


@pytest.mark.parametrize(
    "encoding, data, outcome",
    [
        ("ascii", " ".join(str(v) for v in CUBE.ravel()).encode(), "read"),
        ("ascii", " ".join(str(v) for v in CUBE.ravel()[:-16]).encode(), "truncated"),
        ("ascii", " ".join(str(v) for v in np.tile(CUBE.ravel(), 2)).encode(), "dimensions disagree with the data"),
        ("hex", CUBE.tobytes().hex(" ", 4).encode(), "read"),
        ("hex", CUBE.tobytes()[:-64].hex().encode(), "truncated"),
    ],
)
def test_text_and_hex_data_are_measured_against_the_header(tmp_path, encoding, data, outcome):
    path = tmp_path / "v.nrrd"
    path.write_bytes(f"{NRRD.replace('encoding: raw', f'encoding: {encoding}')}\n".encode() + data)
    if outcome == "read":
        np.testing.assert_array_equal(read_volume(path).array, CUBE.transpose(2, 1, 0))
    else:
        assert outcome in read_error(path).reason


def test_bzip2_nrrd_is_refused_before_reading(tmp_path):
    """ITK's NRRD reader has no bzip2: say so up front instead of inflating anything."""
    packer = bz2.BZ2Compressor(9)
    bomb = b"".join(packer.compress(b"\0" * (1 << 20)) for _ in range(64)) + packer.flush()
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(f"{NRRD.replace('encoding: raw', 'encoding: bzip2')}\n".encode() + bomb)
    assert read_error(path).reason == "bzip2-encoded NRRD data cannot be read (ITK's NRRD reader lacks bzip2); save it raw or gzip"


def test_read_memory_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), path)
    assert read_volume(path).array.shape == (64, 64, 64)
    monkeypatch.setattr(hio, "MAX_READ_BYTES", 1 << 20)
    reason = read_error(path).reason
    assert "reading it takes about 2.0 MiB of memory" in reason and "1.0 MiB limit" in reason
    assert "HAGAN_MAX_READ_GIB" in reason
    monkeypatch.setenv("HAGAN_MAX_READ_GIB", "1")
    assert read_volume(path).array.shape == (64, 64, 64)
    monkeypatch.setenv("HAGAN_MAX_READ_GIB", "0.0001")
    assert "limit" in read_error(path).reason
    for bad in ("lots", "-1", "nan", "0"):
        monkeypatch.setenv("HAGAN_MAX_READ_GIB", bad)
        with pytest.raises(HaganError, match="HAGAN_MAX_READ_GIB=.*expected a positive number of GiB"):
            read_volume(path)


@pytest.mark.parametrize(
    "rows, columns, outcome",
    [
        (4096, 4096, "truncated: slice slice000.dcm declares 4096x4096x1 voxels (32.0 MiB) but its pixel data hold 144 bytes"),
        (9, 10, "truncated: slice slice000.dcm declares 10x9x1 voxels (180 bytes) but its pixel data hold 144 bytes"),
        (4, 9, "slice slice000.dcm declares 9x4x1 voxels (72 bytes) but its pixel data hold 144 bytes; dimensions disagree with the data"),
    ],
)
def test_dicom_rows_and_columns_must_match_the_pixel_data(tmp_path, rows, columns, outcome):
    folder = tmp_path / "series"
    write_dicom_series(folder, dicom_image(), "1.2.826.0.1.3680043.2.1125.77")
    for file in sorted(folder.iterdir()):
        dataset = pydicom.dcmread(file)
        dataset.Rows, dataset.Columns = rows, columns
        dataset.save_as(file)
    assert read_error(folder).reason == outcome


# ---------------------------------------------------------------- names


HOSTILE_NAMES = [
    "two\nlines",
    "forged\nhagan preprocess: error: everything is fine",
    "carriage\rreturn",
    "colour\x1b[31mred\x1b[0m",
    "title\x1b]0;pwned\x07",
    "bidi\u202eevil",
    "zero\u200bwidth",
    "tab\there",
    "line\u2028separator",
    "bytes\udcff\udcfe",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_printable_names_are_one_escaped_line(name):
    shown = printable(name)
    assert shown.isprintable() and "\n" not in shown and "\x1b" not in shown
    shown.encode("utf-8")
    assert printable(shown) == shown  # escaping twice changes nothing
    assert str(VolumeError(name, "bad\nreason")) == f"{shown}: bad reason"


def test_hostile_names_cannot_forge_lines_in_preprocess_output(tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(HOSTILE_NAMES[:-1]):
        (data / f"{name}.nii.gz").write_bytes(b"not a volume %d" % i)
    nib.save(nib.Nifti1Image(head_phantom(), lps_affine()), data / "good\x1b[2J.nii.gz")
    assert main(["preprocess", str(data), str(tmp_path / "cache"), "--recipe", "mri", "--size", "32"]) == 0
    out, err = capfd.readouterr()
    lines = (out + err).replace("\r", "\n").splitlines()
    assert "\x1b" not in out + err and not [line for line in lines if line.startswith("hagan preprocess: error:")]
    skipped = [line for line in lines if "not a readable NIfTI file" in line]
    assert len(skipped) == len(HOSTILE_NAMES) - 1
    forged = "forged\\nhagan preprocess: error: everything is fine.nii.gz"
    assert sum(line.count(forged) for line in skipped) == 2  # the path, and the reader's message quoting it


@pytest.mark.parametrize("name", ["a" * 243 + ".nii.gz", "b" * 255, "é" * 120 + ".nii.gz", "c.d.e" * 49 + ".nii.gz"])
def test_temporary_names_fit_beside_any_legal_name(tmp_path, name):
    assert len(name.encode()) <= 255
    if name.endswith(".nii.gz"):
        path = write_volume(tmp_path / name, np.ones((3, 3, 3), np.float32), np.eye(4))
        assert sorted(os.listdir(tmp_path)) == [name]
        assert read_volume(path).array.shape == (3, 3, 3)
    with atomic_write(tmp_path / name) as tmp:
        assert len(tmp.name.encode()) <= 255 and tmp.name.startswith(".")
        tmp.write_bytes(b"x")
    assert (tmp_path / name).read_bytes() == b"x"


def test_long_names_are_cached_with_the_good_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    names = ("x" * 248 + ".nii.gz", "x" * 248 + ".nii", "x" * 251 + ".npy", "short.nii.gz")
    for name in names:
        write_volume(data / name, head_phantom(), lps_affine()) if ".nii" in name else np.save(data / name, head_phantom())
    report = preprocess_folder(data, tmp_path / "cache", recipe="mri", size=8, progress=False)
    assert len(report.entries) == 4 and not report.bad
    assert sorted(len(e.name) for e in report.entries) == [5, 200, 202, 202]


def test_every_cli_error_is_one_bounded_printable_line(tmp_path, capsys):
    assert error_line("a\nhagan x: error: b\x1b[2J") == "a\\nhagan x: error: b\\x1b[2J"
    long = error_line("v" * 10**6)
    assert len(long) <= 1000 and long.endswith("(1000000 characters in all; --debug shows the whole error)")
    missing = tmp_path / "no\nsuch\x1b[31m"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "\x1b" not in err and "no\\nsuch\\x1b[31m" in err


ATTACHED = bytes(range(256))  # 64 float32 values: what an attached 4^3 volume would hold
BYPASSES = {  # headers whose reading by teem or MetaIO could differ from a naive parse, each reaching out
    "meta colon separator.mha": (META + "ElementDataFile: ../secret/all.raw\nElementDataFile = LOCAL\n").encode() + ATTACHED,
    "meta := separator.mha": (META + "ElementDataFile := ../secret/all.raw\n").encode(),
    "meta tab colon.mha": (META + "ElementDataFile\t: ../secret/all.raw\n").encode(),
    "meta lower case first.mha": (META + "elementdatafile = LOCAL\nElementDataFile = ../secret/all.raw\n").encode(),
    "nrrd lone CR.nhdr": (NRRD + "content: x\rdata file: ../secret/all.raw\n").encode(),
    "nrrd lone CR attached.nrrd": (NRRD + "content: x\rdata file: ../secret/all.raw\n\n").encode() + ATTACHED,
    "nrrd LIST3.nhdr": (NRRD + "data file: LIST3\n../secret/all.raw\n").encode(),
    "nrrd blank in LIST.nhdr": (NRRD + "data file: LIST 2\ns0.raw\n\n../secret/s1.raw\ns2.raw\ns3.raw\n").encode(),
    "nrrd other spelling.nhdr": (NRRD + "Data File: ../secret/all.raw\n").encode(),
    "nrrd key-value spelling.nhdr": (NRRD + "datafile:=../secret/all.raw\n").encode(),
    "meta LIST3D.mhd": (META + "ElementDataFile = LIST3D\n../secret/all.raw\n").encode(),
    "meta LISTx.mhd": (META + "ElementDataFile = LISTx\n../secret/all.raw\n").encode(),
    "meta 2-word pattern.mhd": (META + "ElementDataFile = %c../secret/all.raw 47\n").encode(),
    "meta %s pattern (crashes MetaIO).mhd": (META + "ElementDataFile = s%s.raw 0 3 1\n").encode(),
    "nrrd %n pattern.nhdr": (NRRD + "data file: s%n.raw 0 3 1 2\n").encode(),
    "nrrd two conversions.nhdr": (NRRD + "data file: s%d%d.raw 0 3 1 2\n").encode(),
}


HEADER_REFUSALS = re.compile(
    "lies outside the header's folder|carriage return|in a form hagan does not read|is not one hagan reads|"
    "blank or missing name|longer than"
)


@pytest.mark.parametrize("name", sorted(BYPASSES))
def test_headers_read_differently_by_itk_are_refused(outside, name):
    """Found by review: each of these once returned the secret's bytes (or crashed the process)."""
    data, _ = outside
    (data / "LIST3").write_bytes(CUBE.tobytes())  # a plain file named like the list, inside the folder
    path = data / name.replace(" ", "-")
    path.write_bytes(BYPASSES[name])
    assert HEADER_REFUSALS.search(read_error(path).reason)


def test_list_names_past_the_header_window_are_refused(outside):
    data, _ = outside
    padding = "".join(f"Comment = {'x' * 62}\n" for _ in range(hio._HEADER_MAX // 73 - 30))  # ends ~2 KiB short
    path = data / "long.mhd"
    path.write_text(META + padding + "ElementDataFile = LIST 2D\n" + "s0.raw\n" * 1000 + "../secret/s3.raw\n")
    assert "LIST of data files longer than" in read_error(path).reason
