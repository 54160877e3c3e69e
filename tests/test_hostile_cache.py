"""Hostile input, round two (issue 15): operating-system errors and labels CSVs that match ambiguously.

Everything runs in process through ``hagan.cli.main`` (a subprocess would spend seconds importing
torch); fixtures are small seeded arrays written here.
"""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import hagan.checkpoint
import hagan.preprocess
from hagan.checkpoint import TMP_PREFIX, list_checkpoints, load_checkpoint
from hagan.cli import main
from hagan.config import build_config
from hagan.errors import HaganError
from hagan.models import build_model
from hagan.preprocess import preprocess_folder

ENOSPC = "No space left on device"


def error_lines(err: str) -> list[str]:
    """The lines of stderr that are not progress bars (tqdm redraws with carriage returns)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("hagan ")]


@pytest.fixture
def count_reads(monkeypatch) -> list[Path]:
    """Every volume preprocess_folder reads, to show that a refusal came before any work."""
    reads: list[Path] = []
    original = hagan.preprocess.read_volume

    def read(path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(hagan.preprocess, "read_volume", read)
    return reads


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

    monkeypatch.setattr("hagan.cli.cmd_phantoms", fail)
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
        original = hagan.checkpoint.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if SECOND in filename:
                raise SafetensorError(f"Error while serializing: I/O error: {ENOSPC} (os error 28)")
            return original(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(hagan.checkpoint, "save_file", save_file)


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


@pytest.mark.xfail(strict=True, reason="save_checkpoint leaves its .tmp- folder on a failed write, names no path "
                                       "and lets SafetensorError through (a change to checkpoint.py is proposed)")
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
