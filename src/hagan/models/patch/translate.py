"""``hagan translate``: unpaired domain translation with a multi-scale patch GAN run.

Each input (any contrast or scanner: T2 into a T1-trained run, low-dose into a standard-dose one) is
preprocessed into the run's cube with the run's intensity recipe and fit mode, sketched, and generated
by the cascade; the result is written as NIfTI with the input's geometry (the cube's affine places it
over the input in world space) and the run's output intensities. Label maps, resampled onto the same
cube by nearest neighbour, can be overlaid on the sketches (the papers' explicit pathologies).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ...api import Run, load_run
from ...checks import positive_int
from ...config import PRECISIONS
from ...data.intensity import RECIPES, to_output_intensity
from ...data.io import Volume, display_path, read_volume, volume_stem, write_volume
from ...errors import HaganError, VolumeError
from ...run_folder import GEOMETRY_FILE, prepare_inputs, volume_paths
from ...viz import three_plane_montage

MONTAGE_VOLUMES = 4


def labels_on_cube(labels: Volume, cube: Volume) -> np.ndarray:
    """An integer label map resampled (nearest neighbour) onto the grid of a preprocessed cube."""
    to_label_voxels = np.linalg.inv(labels.affine) @ cube.affine
    resampled = ndimage.affine_transform(
        labels.array, to_label_voxels[:3, :3], offset=to_label_voxels[:3, 3], output_shape=cube.array.shape,
        order=0, mode="constant", cval=0.0,
    )
    return np.rint(resampled).astype(np.int32)


def translate_files(
    run: Run,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[str | Path] | None = None,
    recipe: str | None = None,
    save_sketches: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Translate each input volume into the run's domain; returns the written files (unusable inputs are
    reported on stderr and skipped, as ``hagan encode`` does)."""
    model = run.model
    if not model.translates:
        raise HaganError(f"{run.run_dir}: model {run.config.model.name!r} cannot translate sketches; "
                         "train one with --model patch")
    for key in ("recipe", "mode"):
        if key not in run.geometry:
            raise HaganError(f"{run.run_dir}: {GEOMETRY_FILE} lacks {key!r}, so inputs cannot be prepared as the "
                             "training data were")
    recipe = recipe or run.geometry["recipe"]
    if recipe not in RECIPES:
        raise HaganError(f"--recipe must be one of {', '.join(sorted(RECIPES))}, got {recipe!r}")
    paths = volume_paths(inputs)
    label_paths = volume_paths(labels) if labels else None
    if label_paths is not None and len(label_paths) != len(paths):
        raise HaganError(f"--labels gives {len(label_paths)} label maps for {len(paths)} volumes; give one per volume")
    out = Path(out_dir)
    written, shown = [], []
    for i, path, cube in prepare_inputs(paths, recipe, run.size, run.geometry["mode"], progress, desc="translate"):
        try:
            label_map = labels_on_cube(read_volume(label_paths[i]), cube) if label_paths else None
        except VolumeError as err:
            print(f"skipped {err}", file=sys.stderr)
            continue
        result = model.translate(cube.array[None, None], None if label_map is None else label_map[None])[0, 0].numpy()
        stem = volume_stem(path)
        written.append(write_volume(out / f"{stem}_translated.nii.gz",
                                    to_output_intensity(result, run.geometry["recipe"]), cube.affine))
        drawing = model.sketch_of(cube.array, label_map) if save_sketches or len(shown) < MONTAGE_VOLUMES else None
        if save_sketches:
            written.append(write_volume(out / f"{stem}_sketch.nii.gz", (drawing + 1) / 2, cube.affine))
        if len(shown) < MONTAGE_VOLUMES:
            shown.append((stem, cube.array, drawing, result))
    if not written:
        raise HaganError("no usable volume among the inputs")
    three_plane_montage([v for _, *volumes in shown for v in volumes], out / "montage.png",
                        titles=[f"{stem} {kind}" for stem, *_ in shown for kind in ("input", "sketch", "translated")],
                        cols=3)
    return written


def cmd_translate(args: argparse.Namespace) -> None:
    run = load_run(args.run, args.checkpoint, args.device, args.allow_pickle, args.precision)
    if args.batch_size is not None:
        run.config.patch.inference_batch = args.batch_size
    written = translate_files(run, args.volumes, args.out, args.labels, args.recipe, args.save_sketches)
    volumes = sum(1 for p in written if p.name.endswith("_translated.nii.gz"))
    print(f"translated {volumes} volumes into {display_path(args.out)} (iteration {run.iteration}); "
          f"montage: {display_path(Path(args.out) / 'montage.png')}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "translate", help="sketch volumes of any domain and generate them in a patch-GAN run's domain",
        description="sketch volumes of any domain and generate them in a patch-GAN run's domain.\n\n"
                    "Each input is preprocessed into the run's cube with its recipe and fit mode, sketched, and "
                    "generated by the cascade; the result is written as NIfTI with the input's geometry and the "
                    "run's output intensities, with a montage.",
        epilog="example:\n  hagan translate runs/patch-t1 /data/t2/ --out translated/ --save-sketches")
    p.add_argument("run", help="training run folder of a patch model")
    p.add_argument("volumes", nargs="+", help="volume files or folders, any contrast or scanner")
    p.add_argument("--out", required=True, help="folder for the translated NIfTI volumes and a montage")
    p.add_argument("--labels", nargs="+", help="label maps, one per volume in the same order, overlaid on the sketches")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="intensity recipe of the inputs (default: the run's)")
    p.add_argument("--save-sketches", action="store_true", help="also write each input's sketch")
    p.add_argument("--checkpoint", help="a checkpoint folder or weights file (default: the latest checkpoint)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=PRECISIONS, help="override the run's train.precision")
    p.add_argument("--batch-size", type=positive_int, help="patches per generator call (default: the run's patch.inference_batch)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle weights file (.pt/.pth), loaded with weights_only; only from sources you trust")
    p.set_defaults(func=cmd_translate)
