"""Hostile input, round two (issue 15): operating-system errors, interrupted cache rebuilds, labels
CSVs that match ambiguously, cube sizes no model trains at, and geometry that leaves a rod.

Everything runs in process through ``hagan.cli.commands.main`` (a subprocess would spend seconds importing
torch); fixtures are small seeded arrays written here.
"""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import hagan.data.preprocess
import hagan.training.checkpoint
from hagan.cli.commands import main
from hagan.config import build_config
from hagan.data.cube import fitted_span
from hagan.data.io import write_volume
from hagan.data.preprocess import MAX_CUBE_SIZE, preprocess_folder
from hagan.errors import HaganError
from hagan.models import build_model
from hagan.run_folder import list_checkpoints
from hagan.training.checkpoint import TMP_PREFIX, load_checkpoint

ENOSPC = "No space left on device"
NAMES = ("v0", "v1", "v2")


def write_sources(folder: Path, seed: int) -> Path:
    """Three small random volumes; both source sets use the same names, so a mix would go unseen."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in NAMES:
        np.save(folder / f"{name}.npy", rng.uniform(0, 100, (20, 18, 16)).astype(np.float32))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def preprocess(src: Path, dst: Path, *extra: str) -> int:
    return main(["preprocess", str(src), str(dst), "--recipe", "mri", "--size", "32", *extra])


def error_lines(err: str) -> list[str]:
    """The lines of stderr that are not progress bars (tqdm redraws with carriage returns)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hagan ")]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """Sources A and B, and the caches a clean run makes of each (the references)."""
    root = tmp_path_factory.mktemp("caches")
    old_src, new_src = write_sources(root / "a", 0), write_sources(root / "b", 1)
    preprocess_folder(old_src, root / "old", "mri", 32, progress=False)
    preprocess_folder(new_src, root / "new", "mri", 32, progress=False)
    return {"old_src": old_src, "new_src": new_src, "old": root / "old", "new": snapshot(root / "new"),
            "old_bytes": snapshot(root / "old")}


@pytest.fixture
def count_reads(monkeypatch) -> list[Path]:
    """Every volume preprocess_folder reads, to show that a refusal came before any work."""
    reads: list[Path] = []
    original = hagan.data.preprocess.read_volume

    def read(path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(hagan.data.preprocess, "read_volume", read)
    return reads


def fail_on_call(monkeypatch, owner, name: str, call: int, stop: BaseException) -> None:
    """Make ``owner.name`` raise ``stop`` on its ``call``-th use (0-based); other calls go through."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == call + 1:
            raise stop
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


# ---------------------------------------------------------------- class 5: old cache or new, never a mix

STOPS = {
    "ctrl-c": (KeyboardInterrupt(), 130, "hagan preprocess: interrupted"),
    "disk full": (OSError(errno.ENOSPC, ENOSPC), 2, "hagan preprocess: error: {dst}: cannot write (No space left on device)"),
}
# (what is patched, which call fails): the 1st, 2nd and 3rd cube, the manifest, moving the old
# cache aside and moving the new one into place
POINTS = {
    "cube 1": (np, "save", 0),
    "cube 2": (np, "save", 1),
    "cube 3": (np, "save", 2),
    "manifest": (hagan.data.preprocess, "write_json_atomic", 0),
    "old cache aside": (os, "rename", 0),
    "new cache into place": (os, "rename", 1),
}


@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("point", POINTS)
def test_a_rebuild_stopped_anywhere_leaves_the_old_cache_byte_for_byte(caches, tmp_path, monkeypatch, capsys, point, stop):
    dst = tmp_path / "cache"
    shutil.copytree(caches["old"], dst)
    exception, status, message = STOPS[stop]
    with monkeypatch.context() as patch:
        fail_on_call(patch, *POINTS[point], exception)
        assert preprocess(caches["new_src"], dst, "--force") == status
    assert error_lines(capsys.readouterr().err) == [message.format(dst=dst)]
    assert snapshot(dst) == caches["old_bytes"]
    assert hidden_siblings(dst) == []

    assert preprocess(caches["new_src"], dst, "--force") == 0
    assert snapshot(dst) == caches["new"]
    assert hidden_siblings(dst) == []


@pytest.mark.parametrize("stop", STOPS)
def test_a_first_build_stopped_leaves_no_folder(caches, tmp_path, monkeypatch, capsys, stop):
    dst = tmp_path / "deep" / "cache"
    exception, status, message = STOPS[stop]
    with monkeypatch.context() as patch:
        fail_on_call(patch, np, "save", 1, exception)
        assert preprocess(caches["new_src"], dst, "--force") == status
    assert error_lines(capsys.readouterr().err) == [message.format(dst=dst)]
    assert not dst.exists() and hidden_siblings(dst) == []
    assert preprocess(caches["new_src"], dst) == 0  # nothing there, so no --force needed
    assert snapshot(dst) == caches["new"]


def leave_as_killed(caches, dst: Path, moment: str) -> None:
    """The folders a SIGKILL at ``moment`` leaves (the same names preprocess_folder uses)."""
    token = "0123456789ab"
    staged, trash = dst.with_name(f".cache.tmp-{token}"), dst.with_name(f".cache.trash-{token}")
    shutil.copytree(caches["old"], dst)
    if moment == "while building":  # some cubes written, no manifest yet
        (staged / "volumes").mkdir(parents=True)
        (staged / "volumes" / "v0.npy").write_bytes(caches["new"]["volumes/v0.npy"])
        return
    for name, data in caches["new"].items():
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        (staged / name).write_bytes(data)
    os.rename(dst, trash)
    if moment == "between the two renames":
        return
    os.rename(staged, dst)  # "while deleting the old cache": half of it is gone
    (trash / "manifest.json").unlink()


@pytest.mark.parametrize("moment, expected", [
    ("while building", "old"), ("between the two renames", "new"), ("while deleting the old cache", "new"),
])
def test_a_later_run_settles_what_a_kill_left(caches, tmp_path, capsys, moment, expected):
    dst = tmp_path / "cache"
    leave_as_killed(caches, dst, moment)
    assert preprocess(caches["new_src"], dst) == 2  # a cache is in place again, and there is no --force
    assert "already a hagan cache" in capsys.readouterr().err
    assert snapshot(dst) == (caches["old_bytes"] if expected == "old" else caches["new"])
    assert hidden_siblings(dst) == []


def make_user_folder(caches, dst: Path, kind: str) -> None:
    if kind == "cache":
        shutil.copytree(caches["old"], dst)
    elif kind == "cache with notes":
        shutil.copytree(caches["old"], dst)
        (dst / "notes.txt").write_text("mine")
    elif kind == "folder with notes":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    else:
        dst.write_text("a file")


@pytest.mark.parametrize("kind, force, reason", [
    ("cache", False, "already a hagan cache (recipe=mri, size=32, mode=resize_keep_aspect, 3 volumes); "
                     "pass --force to replace it, or choose another folder"),
    ("folder with notes", False, "not empty and not a hagan cache; choose an empty or new folder"),
    ("folder with notes", True, "not empty and not a hagan cache; choose an empty or new folder"),
    ("cache with notes", True, "a hagan cache that also holds other files (notes.txt); move them out or choose "
                               "another folder"),
    ("file", True, "exists and is not a folder"),
])
def test_a_destination_that_may_not_be_replaced_is_refused_before_any_work(
    caches, tmp_path, capsys, count_reads, kind, force, reason
):
    dst = tmp_path / "cache"
    make_user_folder(caches, dst, kind)
    before = dst.read_bytes() if dst.is_file() else snapshot(dst)
    assert preprocess(caches["new_src"], dst, *(["--force"] if force else [])) == 2
    assert capsys.readouterr().err == f"hagan preprocess: error: {dst}: {reason}\n"
    assert (dst.read_bytes() if dst.is_file() else snapshot(dst)) == before
    assert count_reads == [] and hidden_siblings(dst) == []


# ---------------------------------------------------------------- class 4: operating-system errors


def deny(monkeypatch, folder: Path, code: int) -> None:
    """Creating anything inside ``folder`` fails as it would on a read-only folder or file system."""
    original = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == folder:
            raise OSError(code, os.strerror(code), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("case, where, reason", [
    ("under a file", "file.txt/cache", "{tmp}/file.txt is a file, not a folder"),
    ("deep under a file", "file.txt/a/b/cache", "{tmp}/file.txt is a file, not a folder"),
    ("under /proc", "/proc/hagan-test/cache", None),  # the kernel's reason depends on who asks
    ("read-only folder", "locked/cache", "Permission denied"),
    ("permission denied (simulated)", "locked/cache", "Permission denied"),
    ("read-only file system (simulated)", "locked/cache", "Read-only file system"),
])
def test_an_unwritable_destination_fails_before_any_work(
    caches, tmp_path, monkeypatch, capsys, count_reads, case, where, reason
):
    (tmp_path / "file.txt").write_text("x")
    dst = tmp_path / where
    if case == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions")
        (tmp_path / "locked").mkdir(mode=0o555)
    elif "simulated" in case:
        (tmp_path / "locked").mkdir()
        deny(monkeypatch, tmp_path / "locked", errno.EACCES if "permission" in case else errno.EROFS)
    assert preprocess(caches["new_src"], dst) == 2
    err = capsys.readouterr().err
    if reason is None:
        assert err.startswith(f"hagan preprocess: error: {dst}: cannot write (") and err.count("\n") == 1
    else:
        assert err == f"hagan preprocess: error: {dst}: cannot write ({reason.format(tmp=tmp_path)})\n"
    assert count_reads == [] and not dst.exists()
    assert not [p for p in tmp_path.rglob(".*")]


@pytest.mark.parametrize("error, printed", [
    (OSError(errno.ENOSPC, ENOSPC, "/x/y/volumes"), "/x/y/volumes: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), "/ro/run: Permission denied"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a/b", None, "/c/d"), "/a/b -> /c/d: Invalid cross-device link"),
    (OSError(errno.ENOSPC, ENOSPC), ENOSPC),  # a write to an open file names none
    (OSError("100000 requested and 8176 written"), "100000 requested and 8176 written"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", b"/data/\xff.nii"),
     "/data/\\xff.nii: No such file or directory"),
])
def test_any_os_error_is_one_line_naming_the_path(monkeypatch, capsys, error, printed):
    def fail(args):
        raise error

    monkeypatch.setattr("hagan.cli.commands.cmd_phantoms", fail)
    assert main(["phantoms", "out"]) == 2
    assert capsys.readouterr().err == f"hagan phantoms: error: {printed}\n"
    with pytest.raises(type(error)):
        main(["--debug", "phantoms", "out"])


TINY_RUN = ["--size", "32", "--iterations", "2", "--batch-size", "2", "--set", "model.width=0.125",
            "--set", "model.latent_dim=16", "--set", "train.checkpoint_every=1", "--set", "train.sample_every=1000",
            "--set", "train.log_every=1"]
SECOND = "iter_00000002"


def fill_disk_at_second_checkpoint(monkeypatch, where: str) -> None:
    """The disk fills while the second checkpoint is written, failing as the real writer fails there:
    Python's own write (state.json) raises OSError ENOSPC with no file name; safetensors (0.8, tried
    on a full tmpfs) raises SafetensorError('Error while serializing: I/O error: No space left on
    device (os error 28)')."""
    if where == "state.json":
        original = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == "state.json" and SECOND in str(self):
                raise OSError(errno.ENOSPC, ENOSPC)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    else:
        original = hagan.training.checkpoint.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if SECOND in filename:
                raise SafetensorError(f"Error while serializing: I/O error: {ENOSPC} (os error 28)")
            return original(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(hagan.training.checkpoint, "save_file", save_file)


def assert_previous_checkpoint_loads(run: Path) -> None:
    latest = list_checkpoints(run / "checkpoints")[-1]
    model = build_model(build_config(None, run / "config.yaml"))
    assert load_checkpoint(latest, model, model.optimizers(), torch.Generator())["iteration"] == 1


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous(tiny_ct_cache, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fill_disk_at_second_checkpoint(monkeypatch, "state.json")
    assert main(["train", "--data", str(tiny_ct_cache), "--out", str(run), *TINY_RUN]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith("hagan train: error: ") and ENOSPC in line and "Traceback" not in err
    assert_previous_checkpoint_loads(run)


@pytest.mark.parametrize("where", ["state.json", "weights"])
def test_disk_full_at_a_checkpoint_names_it_and_leaves_no_partial_folder(
    tiny_ct_cache, tmp_path, monkeypatch, capsys, where
):
    run = tmp_path / "run"
    fill_disk_at_second_checkpoint(monkeypatch, where)
    assert main(["train", "--data", str(tiny_ct_cache), "--out", str(run), *TINY_RUN]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"hagan train: error: {run / 'checkpoints' / SECOND}") and ENOSPC in line
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert_previous_checkpoint_loads(run)


# ---------------------------------------------------------------- class 7: silent wrong results


def write_named(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name in names:
        np.save(folder / f"{name}.npy", rng.uniform(0, 100, (12, 12, 12)).astype(np.float32))
    return sorted(folder.iterdir())


IXI = ["IXI002-Guys-0828_T1", "IXI002-Guys-0828_T2"]


@pytest.mark.parametrize("rows, files, labels, problem", [
    # a name twice with different labels, also when spelled differently
    ("a,1\nb,0\na,0\n", ["a", "b"], None, "labels.csv: lines 2 (a) and 4 (a) label the same files differently "
                                          "(1 and 0); keep one"),
    ("a_b,1\nA B,2\n", ["a_b"], None, "labels.csv: lines 2 (a_b) and 3 (A B) label the same files differently "
                                      "(1 and 2); keep one"),
    # the same label twice is no ambiguity
    ("a,1\nb,0\na,1\n", ["a", "b"], [1, 0], None),
    # a file matched only by subject number, by two rows that disagree
    ("IXI002-Guys-0828-T1,1\nIXI002-Guys-0828-PD,0\n", ["IXI002-Guys-0828_T2"], None,
     "labels.csv: IXI002-Guys-0828_T2.npy matches line 2 (IXI002-Guys-0828-T1, label 1) and line 3 "
     "(IXI002-Guys-0828-PD, label 0) by subject number; add a row with its exact name"),
    # ... that agree
    ("IXI002-Guys-0828-T1,1\nIXI002-Guys-0828-PD,1\n", ["IXI002-Guys-0828_T2"], [1], None),
    # the exact name wins over the subject number (by which these two rows would disagree)
    ("IXI002-Guys-0828-T2,0\nIXI002-Guys-0828-T1,1\n", IXI, [1, 0], None),
    # a subject row and another scan's row both match a file by subject number
    ("IXI002,0\nIXI002-Guys-0828-T1,1\n", ["IXI002-Guys-0828_T2"], None,
     "labels.csv: IXI002-Guys-0828_T2.npy matches line 2 (IXI002, label 0) and line 3 (IXI002-Guys-0828-T1, "
     "label 1) by subject number; add a row with its exact name"),
    # one row labelling several files
    ("IXI002,1\n", IXI, [1, 1], "labels.csv:2: IXI002 labels 2 files (IXI002-Guys-0828_T1.npy, "
                                "IXI002-Guys-0828_T2.npy); check that one label fits them all"),
])
def test_a_labels_csv_that_matches_ambiguously(tmp_path, monkeypatch, count_reads, rows, files, labels, problem):
    monkeypatch.chdir(tmp_path)
    Path("labels.csv").write_text("file,label\n" + rows)
    paths = write_named(tmp_path / "src", files)

    def run():
        return preprocess_folder(paths, tmp_path / "cache", "mri", 32, labels_csv="labels.csv", label_column="label",
                                 progress=False)

    if labels is None:
        with pytest.raises(HaganError) as info:
            run()
        assert str(info.value) == problem
        assert count_reads == [] and not (tmp_path / "cache").exists()
        return
    report = run()
    assert [entry.label for entry in report.entries] == labels
    assert report.warnings == ([problem] if problem else [])


@pytest.mark.parametrize("size", [16, 48, 100, 1000, 0])
def test_cli_refuses_sizes_no_model_trains_at(caches, tmp_path, capsys, count_reads, size):
    dst = tmp_path / "cache"
    assert main(["preprocess", str(caches["new_src"]), str(dst), "--recipe", "mri", "--size", str(size)]) == 2
    assert capsys.readouterr().err == (f"hagan preprocess: error: --size {size}: no model trains at that size; "
                                       "choose one of 32, 64, 128, 256, 512\n")
    assert count_reads == [] and not dst.exists()


class Reached(Exception):
    """Raised where work would start: the arguments were accepted."""


@pytest.mark.parametrize("size, accepted", [(8, True), (MAX_CUBE_SIZE, True), (MAX_CUBE_SIZE + 1, False), (1000, False)])
def test_api_caps_the_cube_size(caches, tmp_path, monkeypatch, size, accepted):
    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(hagan.data.preprocess, "_prepare_destination", reached)
    expected = (Reached, None) if accepted else (HaganError, rf"^cube size {size} is above the 512 maximum "
                                                          r"\(hagan.data.preprocess.MAX_CUBE_SIZE\)")
    with pytest.raises(expected[0], match=expected[1]):
        preprocess_folder(caches["new_src"], tmp_path / "cache", "mri", size, progress=False)


# shape and voxel size of real data sets and of broken headers; minimum span along an axis at 32^3
@pytest.mark.parametrize("shape, spacing, outcome", [
    ((120, 120, 90), (2.0, 2.0, 2.0), "ok"),          # IXI T1, 2 mm
    ((35, 50, 35), (1.0, 1.0, 1.0), "ok"),            # MSD hippocampus crop
    ((31, 59, 24), (1.0, 1.0, 1.0), "ok"),            # its most elongated case
    ((28, 28, 28), (1.0, 1.0, 1.0), "ok"),            # AdrenalMNIST3D
    ((24, 24, 2), (1.0, 1.0, 1.0), "warning"),        # 3 of 32 voxels thick
    ((16, 16, 16), (0.1, 0.1, 10.0), "skipped"),      # 0.1 x 0.1 x 10 mm voxels: a rod
    ((2, 2, 200), (1.0, 1.0, 1.0), "skipped"),        # 2 x 2 x 200 voxels: a rod
])
def test_thin_geometry_is_flagged_naming_the_file(tmp_path, capsys, shape, spacing, outcome):
    for size in (32, 64, 128, 256, 512):  # the rule scales with the cube
        span = fitted_span(shape, spacing, size, "resize_keep_aspect")
        assert (min(span) >= size / 8) == (outcome == "ok"), (size, span)
    src = tmp_path / "src"
    src.mkdir()
    array = np.random.default_rng(0).uniform(0, 100, shape).astype(np.float32)
    write_volume(src / "odd.nii.gz", array, np.diag([*spacing, 1.0]))
    np.save(src / "normal.npy", np.random.default_rng(1).uniform(0, 100, (20, 20, 20)).astype(np.float32))
    assert preprocess(src, tmp_path / "cache") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "odd.nii.gz" in line]
    if outcome == "ok":
        assert lines == []
        return
    extent = "x".join(f"{n * s:.3g}" for n, s in zip(shape[::-1], spacing[::-1]))
    span = "x".join(map(str, fitted_span(shape[::-1], spacing[::-1], 32, "resize_keep_aspect")))
    where = f"{src / 'odd.nii.gz'}: its {extent} mm extent (S, A, R) fills {span} voxels of the 32^3 cube"
    if outcome == "warning":
        assert lines == [f"warning: {where} (under 1/8 of an edge); check the voxel size in its header"]
        assert "2 of 2 volumes preprocessed" in out
    else:
        assert lines == [f"{where}: a sheet or rod, nothing to learn; check the voxel size in its header"]
        assert "1 of 2 volumes preprocessed" in out


@pytest.mark.parametrize("mode, span", [("resize", (32, 32, 32)), ("pad", (2, 24, 24)),
                                        ("resize_keep_aspect", (3, 32, 32))])
def test_fitted_span_per_mode(mode, span):
    assert fitted_span((2, 24, 24), (1.0, 1.0, 1.0), 32, mode) == span


@pytest.mark.parametrize(
    "table, message",
    [
        ("file,label\na.nii,1,extra\n", "no column 'diagnosis'; columns: file, label"),
        ("file,diagnosis\na.nii,1e300\n", "label '1e300' in column 'diagnosis' is not a class (an integer from 0 to 65535)"),
        ("file,diagnosis\na.nii,-1\n", "is not a class"),
        ("file,diagnosis\na.nii,2.5\n", "is not a class"),
    ],
)
def test_a_labels_csv_with_bad_rows_is_one_line(tmp_path, capsys, table, message):
    (tmp_path / "l.csv").write_text(table)
    (tmp_path / "src").mkdir()
    code = main(["preprocess", str(tmp_path / "src"), str(tmp_path / "dst"), "--recipe", "mri", "--size", "32",
                 "--labels", str(tmp_path / "l.csv"), "--label-column", "diagnosis"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
