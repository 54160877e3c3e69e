"""A training run folder's layout, in one place, and the inputs prepared as its training data were.

::

    RUN/config.yaml                 the configuration the run trains (CONFIG_FILE)
    RUN/geometry.json               the training data's affine, recipe, fit mode, size, classes (GEOMETRY_FILE)
    RUN/scalars.jsonl               one JSON record of logged values per line (SCALARS_FILE)
    RUN/checkpoints/iter_NNNNNNNN/  weights.safetensors, training_state.safetensors, state.json
    RUN/samples/iter_NNNNNNNN.png   sample montages during training
    RUN/curves.png, RUN/tensorboard/

Training, inference, evaluation and the command line all read these names from here, and this module
imports no torch, so that code which only looks at a run folder (or prepares its inputs) never loads it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from hagan.checks import affine_problem, is_int, read_json_object, short_repr
from hagan.data.cube import FIT_MODES
from hagan.data.intensity import RECIPES
from hagan.data.io import Volume, display_path, list_volume_paths, read_volume, write_text_atomic
from hagan.data.preprocess import preprocess_volume
from hagan.errors import HaganError, VolumeError

CONFIG_FILE = "config.yaml"
GEOMETRY_FILE = "geometry.json"
SCALARS_FILE = "scalars.jsonl"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"

# a checkpoint folder, CHECKPOINTS_DIR/iter_NNNNNNNN, and the files that make it complete
CHECKPOINT_PREFIX = "iter_"
WEIGHTS = "weights.safetensors"
TRAINING_STATE = "training_state.safetensors"
STATE = "state.json"

GEOMETRY_KEYS = ("reference_affine", "recipe", "mode", "size", "num_classes")


def iteration_name(iteration: int) -> str:
    """``iter_NNNNNNNN``: a checkpoint folder's name, and its sample montage's stem, so both sort by iteration."""
    return f"{CHECKPOINT_PREFIX}{iteration:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and all((p / name).is_file() for name in (STATE, WEIGHTS, TRAINING_STATE))]
    return sorted(found, key=lambda p: p.name)


def trained_iterations(run_dir: Path) -> int:
    """The iteration of a run's latest complete checkpoint (0: none yet), read from its folder name."""
    found = list_checkpoints(Path(run_dir) / CHECKPOINTS_DIR)
    return int(found[-1].name.rsplit("_", 1)[-1]) if found else 0


def read_geometry(path: Path) -> dict[str, Any]:
    """A run's ``geometry.json`` (the training data's affine, intensity recipe, fit mode, size and
    classes), every field checked, since generated volumes are written with them."""
    geometry = read_json_object(path)
    where = display_path(path)
    missing = [key for key in GEOMETRY_KEYS if key not in geometry]
    if missing:
        raise HaganError(f"{where}: lacks {', '.join(missing)}; not the geometry of a hagan run")
    problem = affine_problem(geometry["reference_affine"])
    if problem:
        raise HaganError(f"{where}: reference_affine {problem}")
    if not isinstance(geometry["recipe"], str) or geometry["recipe"] not in RECIPES:
        raise HaganError(f"{where}: recipe must be one of {', '.join(RECIPES)}, got {short_repr(geometry['recipe'])}")
    if geometry["mode"] not in FIT_MODES:
        raise HaganError(f"{where}: mode must be one of {', '.join(FIT_MODES)}, got {short_repr(geometry['mode'])}")
    for key, low in (("size", 1), ("num_classes", 0)):
        if not is_int(geometry[key]) or geometry[key] < low:
            raise HaganError(f"{where}: {key} must be an integer >= {low}, got {short_repr(geometry[key])}")
    return geometry


def append_scalars(run_dir: Path, record: dict[str, Any]) -> None:
    """Log one record (``iteration`` and values) as a line of the run's scalars file."""
    with open(Path(run_dir) / SCALARS_FILE, "a") as scalars_file:
        scalars_file.write(json.dumps(record) + "\n")


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The logged scalars of a run, by name, as (iteration, value) pairs."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = Path(run_dir) / SCALARS_FILE
    if path.is_file():
        for record in _scalar_records(path):
            for key, value in record.items():
                if key != "iteration":
                    series.setdefault(key, []).append((record["iteration"], value))
    return series


def _scalar_records(path: Path) -> list[dict[str, Any]]:
    """Complete records only: a run killed mid-write may leave a truncated last line."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
    return records


def truncate_scalars(run_dir: Path, iteration: int) -> None:
    """Drop logged records after ``iteration`` (those a resumed or rolled-back run logs again)."""
    path = Path(run_dir) / SCALARS_FILE
    if not path.is_file():
        return
    kept = [r for r in _scalar_records(path) if r["iteration"] <= iteration]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# ----- inputs prepared as the run's training data were --------------------------------------------


class PreparedInput(NamedTuple):
    """One usable input: its position among the expanded paths, its path, and its cube (array in [-1, 1]
    with the affine that places it over the input in world space)."""

    index: int
    path: Path
    cube: Volume


def volume_paths(items: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as the volumes inside them (sorted); a folder holding none stays itself,
    so that reading it says why instead of the folder vanishing silently."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        paths.extend((list_volume_paths(path) if path.is_dir() else []) or [path])
    return paths


def prepare_volume(path: Path, recipe: str, size: int, mode: str) -> Volume:
    """A volume file read and preprocessed into the ``size`` cube by ``recipe`` and fit ``mode``, as
    ``hagan preprocess`` prepares training data; every problem with the file is a VolumeError."""
    return preprocess_volume(read_volume(path), recipe, size, mode, source=str(path))


def prepare_inputs(
    paths: Sequence[Path], recipe: str, size: int, mode: str, progress: bool = False, desc: str = "preprocess"
) -> Iterator[PreparedInput]:
    """Each usable path of ``volume_paths`` prepared by ``prepare_volume``, one at a time (a caller may
    stream them); an unusable one is reported as one line on stderr and skipped."""
    for index, path in enumerate(tqdm(paths, desc=desc, unit="vol", disable=not progress)):
        try:
            cube = prepare_volume(path, recipe, size, mode)
        except VolumeError as err:
            print(f"skipped {err}", file=sys.stderr)
            continue
        yield PreparedInput(index, path, cube)
