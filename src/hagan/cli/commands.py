"""The ``hagan`` command line. Errors the user can act on print as one line; ``--debug`` shows tracebacks.

Modules are imported by the commands that need them, so that ``hagan --help`` answers without
loading torch.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .. import __version__
from ..errors import HaganError, display_path, printable

if TYPE_CHECKING:
    import numpy as np

    from ..config import Config

# every command and its one-line summary: `hagan --help` lists these without building the full parser
COMMANDS = {
    "demo": "phantoms -> preprocess -> train a small HA-GAN on CPU -> generate, in one go",
    "phantoms": "write procedural CT or MRI phantoms with their ground-truth attributes",
    "preprocess": "read a folder of volumes into a training cache",
    "train": "train a model on a folder of volumes or a preprocessed cache",
    "generate": "generate full-resolution volumes from a training run",
    "encode": "encode volumes to latent codes with a run's encoders",
    "reconstruct": "encode volumes and generate them back, with their errors",
    "evaluate": "score generated volumes against real ones (FID, KID, MMD, MS-SSIM) with reference scores",
    "embedding": "MDS figure of the real set and several evaluated sets (the paper's Fig. 4)",
    "bench": "training memory and speed, generation time, per resolution and batch size",
    "summary": "parameter count of each module of a configuration",
    "translate": "sketch volumes of any domain and generate them in a patch-GAN run's domain",
    "import-official": "convert the HA-GAN authors' released 256^3 checkpoints into a hagan run",
    "experiment": "the paper's applications: augmentation, features, latent walk",
}


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as a command the user can paste into a shell."""
    return shlex.join(["hagan", *argv])


def with_option(argv: Sequence[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option`` set to ``value``: replaced where given (``--size 8``, ``--size=8``), else appended."""
    out, i, found = [], 0, False
    while i < len(argv):
        item = argv[i]
        if item == option and i + 1 < len(argv):
            out += [option, value]
            i, found = i + 2, True
            continue
        if item.startswith(option + "="):
            out.append(f"{option}={value}")
            found = True
        else:
            out.append(item)
        i += 1
    return out if found else [*out, option, value]


def check_preset(name: str) -> str:
    """A known preset name, or an error that names the close ones instead of every preset."""
    from ..config import PRESETS

    if name in PRESETS:
        return name
    close = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.5)
    names = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else "".join(close)
    hint = f"did you mean {names}?" if close else "`hagan train --help` lists the presets"
    raise HaganError(f"unknown preset {printable(name)!r}; {hint}")


def cmd_phantoms(args: argparse.Namespace) -> None:
    from ..data.phantoms import write_phantom_dataset

    csv_path = write_phantom_dataset(args.out, kind=args.kind, n=args.n, size=args.size, seed=args.seed, progress=True)
    print(f"wrote {args.n} {args.kind} phantoms and their attributes to {csv_path}")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from ..config import MODEL_SIZES
    from ..data.preprocess import preprocess_folder

    # a cache is for training, so refuse up front a size no model trains at (the Python API also
    # takes small sizes, for tests and feature extraction)
    if args.size not in MODEL_SIZES:
        raise HaganError(f"--size {args.size}: no model trains at that size; "
                         f"choose one of {', '.join(map(str, MODEL_SIZES))}")
    report = preprocess_folder(
        args.src, args.dst, recipe=args.recipe, size=args.size, mode=args.mode, trim=not args.no_trim,
        labels_csv=args.labels, label_column=args.label_column, progress=True, segmentations=args.segmentations,
        force=args.force,
    )
    print(report.summary())


def training_overrides(args: argparse.Namespace) -> list[dict]:
    from ..config import parse_assignment

    overrides: list[dict] = [parse_assignment(item) for item in args.set or []]
    flags = {
        ("data", "cache"): args.data,
        ("model", "name"): args.model,
        ("model", "size"): args.size,
        ("model", "num_classes"): args.num_classes,
        ("train", "iterations"): args.iterations,
        ("optim", "batch_size"): args.batch_size,
        ("train", "device"): args.device,
        ("train", "seed"): args.seed,
    }
    for (section, key), value in flags.items():
        if value is not None:
            overrides.append({section: {key: value}})
    return overrides


def training_preset(args: argparse.Namespace) -> str | None:
    """The named preset, or the model's own when ``--model`` alone chooses a model other than HA-GAN."""
    from ..config import MODEL_PRESETS

    if args.preset:
        return check_preset(args.preset)
    if args.config or args.model not in MODEL_PRESETS:
        return None
    print(f"--model {args.model} without --preset or --config: starting from the {MODEL_PRESETS[args.model]} preset "
          "(its optimiser and schedule); flags and --set still override it")
    return MODEL_PRESETS[args.model]


RUN_CACHE = "cache"


def is_cache_folder(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating it would add), or None."""
    missing, here = None, Path(os.path.abspath(path))
    while not os.path.lexists(here):
        missing, here = here, here.parent
    return missing


def volumes_to_cache(args: argparse.Namespace, config: Config, out: Path) -> Path | None:
    """When ``--data`` is a folder of volumes, point ``config.data.cache`` at ``OUT/cache`` and return the
    folder to preprocess into it; None when there is nothing to preprocess (a cache was given, or a
    resumed run reuses the cache its first start made)."""
    from ..data.io import list_volume_paths
    from ..training.distributed import env_world_size

    if not config.data.cache:
        return None  # the trainer says that data are needed
    data = Path(config.data.cache)
    if not os.path.lexists(data):
        raise HaganError(f"{data}: no such folder (--data takes a folder of volumes or a cache)")
    if not data.is_dir() or is_cache_folder(data):
        return None  # a cache, or a file the trainer reports on
    cache = out / RUN_CACHE
    config.data.cache = str(cache)
    if is_cache_folder(cache):
        print(f"reusing the cache {display_path(cache)} preprocessed from the volumes on the run's first start")
        return None
    if not list_volume_paths(data):
        raise HaganError(f"{data}: neither a hagan cache (no manifest.json) nor a folder of volumes "
                         "(NIfTI, NRRD, MHA/MHD, DICOM, .npy/.npz)")
    if args.recipe is None:
        raise HaganError(f"{data}: a folder of volumes is preprocessed into {cache} first, which needs their "
                         f"intensity recipe; add --recipe ct or --recipe mri")
    if env_world_size() > 1:
        command = ["preprocess", str(data), str(cache), "--recipe", args.recipe, "--size", str(config.model.size)]
        raise HaganError(f"{data}: under torchrun, preprocess once before training: {command_line(command)}, "
                         f"then pass --data {shlex.quote(str(cache))}")
    return data


def check_cache_size(args: argparse.Namespace, config: Config) -> None:
    """A cache at another size than the model: the error gives the command that trains at the cache's size."""
    from ..data.cache import load_manifest

    cache = Path(config.data.cache)
    if not is_cache_folder(cache):
        return
    size = int(load_manifest(cache)["size"])
    if size != config.model.size:
        raise HaganError(f"{cache}: volumes are {size}^3 but model.size is {config.model.size}; train at the "
                         f"cache's size with: {command_line(with_option(args.argv, '--size', str(size)))}")


def check_not_trained(args: argparse.Namespace, config: Config, out: Path) -> None:
    """A resumed run that already reached its iterations: the error gives the command that trains on."""
    from ..run_folder import trained_iterations

    done = trained_iterations(out)
    if done >= config.train.iterations:
        more = str(done + config.train.iterations)
        raise HaganError(f"{out}: already trained {done} iterations (train.iterations is {config.train.iterations}); "
                         f"continue with: {command_line(with_option(args.argv, '--iterations', more))}")


def cmd_train(args: argparse.Namespace) -> None:
    from ..config import build_config, check_world_size
    from ..data.preprocess import preprocess_folder
    from ..run_folder import CHECKPOINTS_DIR, CONFIG_FILE, CURVES_FILE, SAMPLES_DIR, TENSORBOARD_DIR
    from ..training.distributed import env_world_size, from_env
    from ..training.trainer import Trainer, prepare_run_dir

    out = Path(args.out)
    if args.resume:
        if not (out / CONFIG_FILE).is_file():
            raise HaganError(f"{out}: nothing to resume (no {CONFIG_FILE}); start a new run without --resume")
        config = build_config(None, args.config or out / CONFIG_FILE, training_overrides(args))
    else:
        if args.data is None and args.config is None:
            raise HaganError("pass --data FOLDER (volumes, or a cache from `hagan preprocess`) or --config FILE")
        config = build_config(training_preset(args), args.config, training_overrides(args))
    # under torchrun: the global batch must split evenly over the processes, checked before any work
    check_world_size(config, env_world_size())
    volumes = volumes_to_cache(args, config, out)
    if not args.resume:
        prepare_run_dir(out, config, resume=False)
    created = None if args.resume else first_missing(out)
    try:
        if volumes is not None:
            print(f"preprocessing {display_path(volumes)} into {display_path(config.data.cache)} ({args.recipe} recipe, "
                  f"{config.model.size}^3)")
            print(preprocess_folder(volumes, config.data.cache, recipe=args.recipe, size=config.model.size,
                                    progress=True).summary())
        check_cache_size(args, config)
        if args.resume:
            check_not_trained(args, config, out)
        dist = from_env(config.train.device)
        try:
            trainer = Trainer(config, out, resume=args.resume, dist=dist)
        except BaseException:
            dist.close()
            raise
    except BaseException:
        if created is not None:  # a failed start leaves nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    try:
        run_dir = trainer.fit()
    finally:
        dist.close()
    if not dist.is_main:
        return
    resume = command_line(["train", "--out", str(run_dir), "--resume"])
    if trainer.stopped_by_signal:
        print(f"stopped by a signal at iteration {trainer.final_iteration}; checkpoint saved; continue with: {resume}")
    elif trainer.final_iteration < config.train.iterations:
        print(f"stopped at iteration {trainer.final_iteration} of {config.train.iterations}: the time limit "
              f"train.max_minutes = {config.train.max_minutes:g} ran out; checkpoint saved; continue with: {resume} "
              "(another max_minutes; add --set train.max_minutes=0 for no limit)")
    print(f"run written to {display_path(run_dir)} ({SAMPLES_DIR}/, {CURVES_FILE}, {CHECKPOINTS_DIR}/; tensorboard "
          f"--logdir {display_path(run_dir / TENSORBOARD_DIR)})")


def cmd_generate(args: argparse.Namespace) -> None:
    from ..api import load_run
    from ..viz import three_plane_montage

    run = load_run(args.run, args.checkpoint, args.device, args.allow_pickle, args.precision, args.tile_depth,
                   args.sample_from)
    if args.label_maps:
        if args.class_label is not None:
            raise HaganError("--label-maps: the models that generate label maps take no --class")
        volumes, label_maps = run.generate_with_label_maps(args.n, seed=args.seed, batch_size=args.batch_size, progress=True)
        run.save_label_maps(label_maps, args.out)
    else:
        volumes = run.generate(args.n, seed=args.seed, labels=args.class_label, batch_size=args.batch_size, progress=True)
    paths = run.save(volumes, args.out)
    run.save_geometry(args.out)
    montage = three_plane_montage(list(volumes[:16]), Path(args.out) / "montage.png",
                                  titles=[p.name for p in paths[:16]])
    print(f"wrote {len(paths)} volumes to {display_path(args.out)} (iteration {run.iteration}); montage: "
          f"{display_path(montage)}")


def read_for_run(run, paths: Sequence[str]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Read and preprocess volumes with the run's recipe and size, as its training data were; with each
    file's name and each cube's affine, which places it over its input in world space."""
    import numpy as np

    from ..run_folder import prepare_inputs, volume_paths

    prepared = list(prepare_inputs(volume_paths(paths), run.geometry["recipe"], run.size, run.geometry["mode"]))
    if not prepared:
        raise HaganError("no usable volume among the inputs")
    return ([p.path.name for p in prepared], np.stack([p.cube.array for p in prepared]),
            [p.cube.affine for p in prepared])


def cmd_encode(args: argparse.Namespace) -> None:
    import csv

    import numpy as np

    from ..api import load_run
    from ..data.io import atomic_write

    run = load_run(args.run, args.checkpoint, args.device, args.allow_pickle)
    names, volumes, _ = read_for_run(run, args.volumes)
    latents = run.encode(volumes)
    out = Path(args.out)
    with atomic_write(out) as tmp:
        if out.suffix == ".csv":
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["file"] + [f"z{i}" for i in range(latents.shape[1])])
                writer.writerows([name, *map(float, row)] for name, row in zip(names, latents))
        elif out.suffix == ".npy":
            with open(tmp, "wb") as handle:
                np.save(handle, latents)
        else:
            raise HaganError(f"{out}: --out must end in .npy or .csv")
    print(f"encoded {len(names)} volumes to {out} ({latents.shape[1]} values each)")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    import numpy as np

    from ..api import load_run
    from ..viz import three_plane_montage

    run = load_run(args.run, args.checkpoint, args.device, args.allow_pickle)
    names, volumes, affines = read_for_run(run, args.volumes)
    recon = run.reconstruct(volumes, labels=args.class_label)
    run.save(recon, args.out, prefix="reconstruction", affines=affines)
    l1 = np.abs(recon - volumes).mean(axis=(1, 2, 3))
    pairs = [v for pair in zip(volumes[:8], recon[:8]) for v in pair]
    titles = [t for name in names[:8] for t in (printable(name), "reconstruction")]
    three_plane_montage(pairs, Path(args.out) / "montage.png", titles=titles)
    for name, err in zip(names, l1):
        print(f"{printable(name)}: mean absolute error {err:.4f} (intensities in [-1, 1])")


def weights_argument(items: list[str] | None) -> dict[str, str] | str | None:
    """``--weights PATH`` for the MedicalNet feature, or ``--weights FEATURE=PATH`` for a named one."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    named = {}
    for item in items:
        if "=" not in item:
            raise HaganError(f"--weights {item!r}: with several weights files, name each as FEATURE=PATH")
        feature, path = item.split("=", 1)
        named[feature] = path
    return named


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ..evaluation import evaluate

    evaluate(
        args.real, args.fake, args.out, features=args.features, weights=weights_argument(args.weights), n=args.n,
        seed=args.seed, save_stats=args.save_stats, device=args.device, batch_size=args.batch_size, recipe=args.recipe,
        mode=args.mode, allow_unknown_weights=args.allow_unknown_weights, ms_ssim_volumes=args.ms_ssim_volumes,
        ms_ssim_pairs=args.ms_ssim_pairs, class_label=args.class_label, fid_method=args.fid_method,
        extractor_options={"inception-2.5d": {"n_slices": args.slices}}, size=args.size,
    )
    print((Path(args.out) / "metrics.md").read_text())


def cmd_bench(args: argparse.Namespace) -> None:
    import json

    from ..config import parse_assignment
    from ..evaluation.bench import format_row, run_bench, save_bench

    rows = run_bench(
        models=args.models, sizes=args.sizes, batch_sizes=args.batch_sizes, device=args.device,
        iterations=args.iterations, warmup=args.warmup, generate_batch=args.generate_batch, width=args.width,
        config_overrides=[parse_assignment(item) for item in args.set or []], isolate=not args.no_isolate,
        progress=True, max_seconds=args.max_seconds or None,
        memory_limit_bytes=int(args.memory_limit_gb * 2**30) if args.memory_limit_gb else None, threads=args.threads,
        tile_depth=args.tile_depth,
    )
    if args.out:
        json_path, png_path = save_bench(rows, args.out)
        print(f"wrote {json_path} and {png_path}")
    print(json.dumps(rows, indent=2) if args.json else "\n".join(map(format_row, rows)))


def cmd_embedding(args: argparse.Namespace) -> None:
    from ..evaluation import embedding_from_evaluations

    evaluations = {}
    for item in args.evaluations:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise HaganError(f"{item!r}: expected LABEL=EVAL_DIR, e.g. ha-gan=eval/hagan")
        evaluations[label] = folder
    embedding_from_evaluations(evaluations, args.out, feature=args.feature, seed=args.seed)
    print(f"wrote {args.out}")


def cmd_summary(args: argparse.Namespace) -> None:
    import json

    import torch

    from ..config import build_config
    from ..evaluation.bench import module_param_counts
    from ..models import build_model

    overrides = [{"model": {"size": args.size}}] if args.size else []
    config = build_config(args.preset and check_preset(args.preset), None, overrides)
    with torch.device("meta"):
        model = build_model(config)
    counts = module_param_counts(model)
    if args.json:
        print(json.dumps(counts))
        return
    print(f"{config.model.name} at {config.model.size}^3 (preset {args.preset or 'none'})")
    for key, value in counts.items():
        print(f"  {key:12s} {value / 1e6:9.3f} M")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, kind=args.kind, n=args.n, iterations=args.iterations, seed=args.seed)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; each option's default after its help, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or not action.option_strings or default in (None, False, argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class HelpParser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands (at every depth) share ``HelpFormatter``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """A wrong choice names the close ones (``did you mean train?``) instead of listing every choice."""
        if action.choices is None or value in action.choices:
            return
        choices = [str(choice) for choice in action.choices]
        close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else (
            f"choose from {', '.join(choices)}" if len(choices) <= 8 else f"`{self.prog} --help` lists them")
        raise argparse.ArgumentError(action, f"invalid choice {printable(str(value))!r}; {hint}")

    def error(self, message: str) -> NoReturn:
        """One line, as every other error: the usage block is one ``--help`` away."""
        self.exit(2, f"{self.prog}: error: {error_line(message)} (see `{self.prog} --help`)\n")


def add_command(sub: argparse._SubParsersAction, name: str, details: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose help reads as a synopsis: what it does, its options with defaults, one example."""
    import textwrap

    return sub.add_parser(name, help=COMMANDS[name], description=f"{COMMANDS[name]}.\n\n{textwrap.fill(details, 79)}",
                          epilog=f"example:\n  {example}")


def top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = HelpParser(prog="hagan", description="Memory-efficient GANs for 3D medical images.",
                        epilog="`hagan COMMAND --help` describes a command's options, with an example.")
    parser.add_argument("--version", action="version", version=f"hagan {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, sub


def command_list_parser() -> argparse.ArgumentParser:
    """The parser for `hagan` without a known command: lists the commands, imports nothing heavy."""
    parser, sub = top_parser()
    for name, summary in COMMANDS.items():
        sub.add_parser(name, help=summary)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from ..checks import non_negative_int, positive_int, seed_int
    from ..config import PRESETS
    from ..data.cube import FIT_MODES
    from ..data.intensity import RECIPES
    from ..evaluation import FEATURES
    from ..models import MODELS

    presets = ", ".join(sorted(PRESETS))
    parser, sub = top_parser()

    p = add_command(sub, "demo", "Writes phantoms, a 32^3 cache, a short training run and generated volumes under "
                    "OUT, replacing an earlier OUT.", "hagan demo --out runs/demo")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--kind", default="thorax-ct", choices=["thorax-ct", "brain-mri"], help="phantom anatomy")
    p.add_argument("--n", type=positive_int, default=48, help="number of phantoms")
    p.add_argument("--iterations", type=positive_int, help="training iterations (default: the demo preset's)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the phantoms and the training")
    p.set_defaults(func=cmd_demo)

    p = add_command(sub, "phantoms", "Each phantom is a NIfTI file; attributes.csv holds its ground truth (tissue "
                    "volumes, grades).", "hagan phantoms phantoms/ --kind brain-mri --n 32 --size 64")
    p.add_argument("out", help="folder to write the phantoms and attributes.csv to")
    p.add_argument("--kind", default="thorax-ct", choices=["thorax-ct", "brain-mri"], help="phantom anatomy")
    p.add_argument("--n", type=positive_int, default=16, help="number of phantoms")
    p.add_argument("--size", type=positive_int, default=64, help="cube edge of each phantom in voxels")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed")
    p.set_defaults(func=cmd_phantoms)

    p = add_command(sub, "preprocess", "Reorients, maps intensities by the recipe, trims blank end slices and fits "
                    "each volume to the training cube; unusable files are listed with the reason. The cache is "
                    "built beside DST and swapped in when complete.",
                    "hagan preprocess /data/ixi/t1 cache/ixi-128 --recipe mri --size 128")
    p.add_argument("src", help="folder of NIfTI/NRRD/MHA/DICOM/npy volumes")
    p.add_argument("dst", help="cache folder to write")
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES),
                   help="intensity mapping to [-1, 1]: ct (HU window) or mri (percentile)")
    p.add_argument("--size", type=int, required=True, help="training cube edge: 32, 64, 128, 256 or 512")
    p.add_argument("--mode", default="resize_keep_aspect", choices=FIT_MODES, help="how a volume is fitted to the cube")
    p.add_argument("--force", action="store_true",
                   help="replace an existing cache in DST (swapped in only once the new one is complete)")
    p.add_argument("--no-trim", action="store_true", help="keep blank axial slices at the ends")
    p.add_argument("--labels", help="CSV with a file column and a class-label column")
    p.add_argument("--label-column", help="column of --labels holding integer classes")
    p.add_argument("--segmentations", metavar="LABEL_FOLDER",
                   help="folder of label maps on the images' grids (same file name, or the name plus a suffix "
                        "like _DLMUSE), cached beside each cube with nearest-neighbour resampling")
    p.set_defaults(func=cmd_preprocess)

    p = add_command(sub, "train", "Trains into the run folder OUT: config.yaml, checkpoints/, samples/, curves.png, "
                    "tensorboard/. A folder of volumes is first preprocessed into OUT/cache (--recipe, at the "
                    "model's size), which --resume reuses. Flags override --config, which overrides --preset.",
                    "hagan train --data /data/ixi/t1 --recipe mri --out runs/ixi --preset small-data-128")
    p.add_argument("--data", metavar="FOLDER",
                   help="a folder of volumes, or a cache from `hagan preprocess` (required for a new run without --config)")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="intensity recipe for a folder of volumes (ct or mri); a cache knows its own")
    p.add_argument("--out", required=True, help="run folder (checkpoints, samples, logs)")
    p.add_argument("--config", help="YAML config; flags override it")
    p.add_argument("--model", metavar="NAME", choices=list(MODELS),
                   help=f"model to train: {', '.join(MODELS)} (default hagan, or the preset's)")
    p.add_argument("--preset", metavar="NAME", help=f"named configuration: {presets}")
    p.add_argument("--size", type=int, help="output cube edge, 32..512 (overrides the preset's)")
    p.add_argument("--iterations", type=positive_int, help="training iterations (overrides the preset's)")
    p.add_argument("--batch-size", type=positive_int, help="global batch size (overrides the preset's)")
    p.add_argument("--num-classes", type=non_negative_int, help="class-conditional training with the cache's labels")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default: the config's, auto)")
    p.add_argument("--seed", type=seed_int, help="training seed (default: the config's, 0)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config value")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=cmd_train)

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", help="training run folder")
        p.add_argument("--checkpoint", help="a checkpoint folder or weights file (default: the latest checkpoint)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
        p.add_argument("--allow-pickle", action="store_true",
                       help="accept a pickle weights file (.pt/.pth), loaded with weights_only; only from sources you trust")

    p = add_command(sub, "generate", "Writes NIfTI volumes in the training data's units (CT in HU, MRI in [0, 1]) "
                    "and the run's canonical geometry (RAS, centred on the origin, the training cubes' median voxel "
                    "size), and montage.png.", "hagan generate runs/ixi --n 16 --out generated/ --seed 0")
    run_args(p)
    p.add_argument("--n", type=positive_int, default=8, help="volumes to generate")
    p.add_argument("--out", required=True, help="folder to write the volumes to")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the latent codes")
    p.add_argument("--class", dest="class_label", type=non_negative_int, help="class to generate (conditional models)")
    p.add_argument("--batch-size", type=positive_int,
                   help="volumes per generator call (default: as many as fit half the free GPU memory, "
                        "2 GiB on CPU, at most 8; 1 with --label-maps); pass it for bit-identical volumes "
                        "across machines")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="override the run's train.precision (auto: bf16 on GPUs, float32 on CPU)")
    p.add_argument("--tile-depth", type=non_negative_int, default=0,
                   help="G^H over depth tiles of this many feature slices: the same volume in less memory (0: untiled below 512^3)")
    p.add_argument("--label-maps", action="store_true",
                   help="also write the label maps generated with each volume (progressive GAN with label channels)")
    p.add_argument("--sample-from", choices=["ema", "raw"],
                   help="the generator's moving average of weights (default when the run keeps one) or its trained weights")
    p.set_defaults(func=cmd_generate)

    p = add_command(sub, "encode", "Reads each volume with the run's preprocessing and writes one latent code per "
                    "volume.", "hagan encode runs/ixi /data/ixi/t1 --out latents.csv")
    run_args(p)
    p.add_argument("volumes", nargs="+", help="volume files or folders")
    p.add_argument("--out", required=True, help="latents.npy or latents.csv")
    p.set_defaults(func=cmd_encode)

    p = add_command(sub, "reconstruct", "Writes each reconstruction as NIfTI over its input (the geometry of the input's "
                    "preprocessed cube), a montage of inputs beside their reconstructions, and prints each mean "
                    "absolute error.",
                    "hagan reconstruct runs/ixi /data/ixi/t1/IXI002-Guys-0828_T1.nii.gz --out recon/")
    run_args(p)
    p.add_argument("volumes", nargs="+", help="volume files or folders, read with the run's preprocessing")
    p.add_argument("--out", required=True, help="folder for the reconstructions and montage.png")
    p.add_argument("--class", dest="class_label", type=non_negative_int, help="class to reconstruct with (conditional runs)")
    p.set_defaults(func=cmd_reconstruct)

    p = add_command(sub, "evaluate", "Both sets are brought to one grid, the protocol's cube: a cache or run as it is; "
                    "a folder from `hagan generate` back from its output units; any other folder of volumes (any "
                    "shape and spacing: other tools' outputs, real scans) by the training preprocessing (reoriented, "
                    "--recipe, blank end slices trimmed, fitted by --mode to --size). Beside each score: the same "
                    "score for one half of the real set against the other, and for the real set's mean volume "
                    "repeated (a trivial generator). Writes metrics.json, metrics.md, features.npz, figures.",
                    "hagan evaluate --real /data/ixi/t1 --fake other-model/ --recipe mri --size 128 --out eval/")
    p.add_argument("--real", required=True, help="cache folder, folder of volumes, or stats .npz from --save-stats")
    p.add_argument("--fake", required=True, help="folder of generated volumes (any tool's), or a training run")
    p.add_argument("--out", required=True, help="folder for metrics.json, metrics.md and figures")
    p.add_argument("--size", type=positive_int,
                   help="the protocol's cube edge (default: the run's, generated folder's or cache's size, else 128)")
    p.add_argument("--n", type=positive_int, help="generated volumes to use (default: all in a folder; for a run, the real set's size)")
    p.add_argument("--features", nargs="+", default=["deepbet"], choices=sorted(FEATURES), metavar="FEATURE",
                   help=f"feature extractors: {', '.join(sorted(FEATURES))}; the first gives the headline scores")
    p.add_argument("--weights", action="append", metavar="[FEATURE=]PATH", help="feature-network weights file")
    p.add_argument("--allow-unknown-weights", action="store_true", help="accept weights whose sha256 is unpublished")
    p.add_argument("--save-stats", metavar="PATH", help="also save the real set's feature statistics (.npz)")
    p.add_argument("--recipe", choices=["ct", "mri", "none"],
                   help="intensity recipe of folders of volumes (none: already in [-1, 1]; default: from geometry.json)")
    p.add_argument("--mode", choices=FIT_MODES, help="fit mode for folders of volumes (default: the run's, else resize_keep_aspect)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of generated latents, KID subsets, MS-SSIM pairs and the real split")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=positive_int, default=2, help="volumes per feature-network call")
    p.add_argument("--fid-method", choices=["sqrtm", "eigh"], default="sqrtm",
                   help="matrix square root for FID: scipy's sqrtm, or a symmetric eigendecomposition (same value, faster)")
    p.add_argument("--class", dest="class_label", type=non_negative_int, help="class to generate from a conditional run")
    p.add_argument("--ms-ssim-volumes", type=positive_int, default=50, help="volumes of each set kept for MS-SSIM")
    p.add_argument("--ms-ssim-pairs", type=positive_int, default=500, help="most volume pairs averaged for MS-SSIM")
    p.add_argument("--slices", type=positive_int, default=16, help="slices per plane for inception-2.5d")
    p.set_defaults(func=cmd_evaluate)

    p = add_command(sub, "embedding", "Reads features.npz from each `hagan evaluate` folder and draws one covariance "
                    "ellipse per set.", "hagan embedding ha-gan=eval/hagan wgan=eval/wgan --out mds.png")
    p.add_argument("evaluations", nargs="+", metavar="LABEL=EVAL_DIR", help="output folders of `hagan evaluate`")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--feature", help="feature set to embed (default: the first evaluated)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the embedding")
    p.set_defaults(func=cmd_embedding)

    p = add_command(sub, "bench", "Each configuration runs in a fresh process (unless --no-isolate); configurations "
                    "predicted not to fit in memory are skipped.", "hagan bench --sizes 32 64 --batch-sizes 2 --out bench/")
    p.add_argument("--models", nargs="+", default=["hagan"], metavar="MODEL", help=f"models to measure: {', '.join(MODELS)}")
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128], choices=[32, 64, 128, 256, 512],
                   metavar="SIZE", help="cube edges: 32, 64, 128, 256, 512")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[2, 4], help="batch sizes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--iterations", type=positive_int, default=5, help="timed training iterations per configuration")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed iterations before them")
    p.add_argument("--generate-batch", type=positive_int, default=1, help="volumes per timed generator call")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config value")
    p.add_argument("--max-seconds", type=float, default=600, help="time limit per phase (0: none)")
    p.add_argument("--memory-limit-gb", type=float, help="skip configurations predicted above this (CPU default: 90%% of free RAM)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process instead of fresh ones")
    p.add_argument("--tile-depth", type=non_negative_int, default=0, help="generate with G^H over depth tiles (0: untiled below 512^3)")
    p.add_argument("--out", help="folder for bench.json and bench.png")
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.set_defaults(func=cmd_bench)

    p = add_command(sub, "summary", "Builds the networks without allocating their weights and prints millions of "
                    "parameters per module.", "hagan summary --preset paper-256")
    p.add_argument("--preset", metavar="NAME", help=f"named configuration: {presets}")
    p.add_argument("--size", type=int, help="cube edge (overrides the preset's)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=cmd_summary)

    from ..models.hagan.official import add_parser as add_import_official
    from ..models.patch.translate import add_parser as add_translate
    from .applications import add_parser as add_experiment

    add_translate(sub)
    add_import_official(sub)
    add_experiment(sub)
    return parser


def os_error_message(err: OSError) -> str:
    """``path: reason`` (``path -> other: reason`` for a rename) in one printable line; just the
    reason when the operating system named no file (a write to an open file that fills the disk)."""
    reason = " ".join(printable(str(err.strerror or err)).split())
    names = [display_path(name) for name in (err.filename, err.filename2) if isinstance(name, (str, bytes, os.PathLike))]
    return f"{' -> '.join(names)}: {reason}" if names else reason


MESSAGE_LIMIT = 1000


def error_line(message: object) -> str:
    """A message as one printable line of bounded length, whatever it quotes (a file name with a
    newline, a value of megabytes): the last guard behind each message's own care."""
    whole = str(message)
    text = printable(whole[: 2 * MESSAGE_LIMIT])
    if len(text) > MESSAGE_LIMIT or len(whole) > 2 * MESSAGE_LIMIT:
        tail = f"... ({len(whole)} characters in all; --debug shows the whole error)"
        text = text[: MESSAGE_LIMIT - len(tail)] + tail
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((item for item in argv if not item.startswith("-")), None)
    parser = build_parser() if command in COMMANDS else command_list_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except (HaganError, ValueError) as err:
        if args.debug:
            raise
        print(f"hagan {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.debug:
            raise
        print(f"hagan {args.command}: error: {error_line(os_error_message(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hagan {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0

