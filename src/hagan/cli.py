"""The ``hagan`` command line. Errors the user can act on print as one line; ``--debug`` shows tracebacks."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .checks import non_negative_int, positive_int, seed_int
from .config import MODEL_PRESETS, PRESETS, build_config, parse_assignment
from .errors import HaganError, VolumeError, printable
from .io import display_path
from .models import MODELS


def cmd_phantoms(args: argparse.Namespace) -> None:
    from .phantoms import write_phantom_dataset

    csv_path = write_phantom_dataset(args.out, kind=args.kind, n=args.n, size=args.size, seed=args.seed, progress=True)
    print(f"wrote {args.n} {args.kind} phantoms and their attributes to {csv_path}")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from .models.networks import SUPPORTED_SIZES
    from .preprocess import preprocess_folder

    # a cache is for training, so refuse up front a size no model trains at (the Python API also
    # takes small sizes, for tests and feature extraction)
    if args.size not in SUPPORTED_SIZES:
        raise HaganError(f"--size {args.size}: no model trains at that size; "
                         f"choose one of {', '.join(map(str, SUPPORTED_SIZES))}")
    report = preprocess_folder(
        args.src, args.dst, recipe=args.recipe, size=args.size, mode=args.mode, trim=not args.no_trim,
        labels_csv=args.labels, label_column=args.label_column, progress=True, segmentations=args.segmentations,
        force=args.force,
    )
    print(report.summary())


def training_overrides(args: argparse.Namespace) -> list[dict]:
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
    if args.preset or args.config or args.model not in MODEL_PRESETS:
        return args.preset
    print(f"--model {args.model} without --preset or --config: starting from the {MODEL_PRESETS[args.model]} preset "
          "(its optimiser and schedule); flags and --set still override it")
    return MODEL_PRESETS[args.model]


def cmd_train(args: argparse.Namespace) -> None:
    from .config import check_world_size
    from .distributed import env_world_size, from_env
    from .train import CONFIG_FILE, Trainer

    out = Path(args.out)
    if args.resume:
        if not (out / CONFIG_FILE).is_file():
            raise HaganError(f"{out}: nothing to resume (no {CONFIG_FILE}); start a new run without --resume")
        config = build_config(None, args.config or out / CONFIG_FILE, training_overrides(args))
    else:
        if args.data is None and args.config is None:
            raise HaganError("pass --data CACHE (a folder written by `hagan preprocess`) or --config FILE")
        config = build_config(training_preset(args), args.config, training_overrides(args))
    # under torchrun: the global batch must split evenly over the processes, checked before any work
    check_world_size(config, env_world_size())
    dist = from_env(config.train.device)
    try:
        trainer = Trainer(config, out, resume=args.resume, dist=dist)
        run_dir = trainer.fit()
    finally:
        dist.close()
    if not dist.is_main:
        return
    if trainer.stopped_by_signal:
        print(f"stopped by a signal at iteration {trainer.final_iteration}; checkpoint saved; "
              f"continue with: hagan train --out {run_dir} --resume")
    print(f"run written to {run_dir} (samples/, curves.png, checkpoints/; tensorboard --logdir {run_dir / 'tensorboard'})")


def cmd_generate(args: argparse.Namespace) -> None:
    from .api import load_run
    from .viz import three_plane_montage

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
    print(f"wrote {len(paths)} volumes to {args.out} (iteration {run.iteration}); montage: {montage}")


def read_for_run(run, paths: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Read and preprocess volumes with the run's recipe and size, as its training data were."""
    from .io import list_volume_paths, read_volume
    from .preprocess import preprocess_volume

    files: list[Path] = []
    for item in paths:
        p = Path(item)
        files.extend((list_volume_paths(p) if p.is_dir() else []) or [p])
    names, arrays = [], []
    for path in files:
        try:
            volume = preprocess_volume(
                read_volume(path), run.geometry["recipe"], run.size, run.geometry["mode"], source=str(path)
            )
        except VolumeError as err:
            print(f"skipped {err}", file=sys.stderr)
            continue
        names.append(path.name)
        arrays.append(volume.array)
    if not arrays:
        raise HaganError("no usable volume among the inputs")
    return names, np.stack(arrays)


def cmd_encode(args: argparse.Namespace) -> None:
    from .api import load_run
    from .io import atomic_write

    run = load_run(args.run, args.checkpoint, args.device, args.allow_pickle)
    names, volumes = read_for_run(run, args.volumes)
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
    from .api import load_run
    from .viz import three_plane_montage

    run = load_run(args.run, args.checkpoint, args.device, args.allow_pickle)
    names, volumes = read_for_run(run, args.volumes)
    recon = run.reconstruct(volumes, labels=args.class_label)
    run.save(recon, args.out, prefix="reconstruction")
    l1 = np.abs(recon - volumes).mean(axis=(1, 2, 3))
    pairs = [v for pair in zip(volumes[:8], recon[:8]) for v in pair]
    titles = [t for name in names[:8] for t in (name, "reconstruction")]
    three_plane_montage(pairs, Path(args.out) / "montage.png", titles=titles)
    for name, err in zip(names, l1):
        print(f"{name}: mean absolute error {err:.4f} (intensities in [-1, 1])")


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
    from .evaluation import evaluate

    recipe = None if args.recipe == "none" else args.recipe
    evaluate(
        args.real, args.fake, args.out, features=args.features, weights=weights_argument(args.weights), n=args.n,
        seed=args.seed, save_stats=args.save_stats, device=args.device, batch_size=args.batch_size, recipe=recipe,
        mode=args.mode, allow_unknown_weights=args.allow_unknown_weights, ms_ssim_volumes=args.ms_ssim_volumes,
        ms_ssim_pairs=args.ms_ssim_pairs, class_label=args.class_label, fid_method=args.fid_method,
        extractor_options={"inception-2.5d": {"n_slices": args.slices}},
    )
    print((Path(args.out) / "metrics.md").read_text())


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import format_row, run_bench, save_bench

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
    from .evaluation import embedding_from_evaluations

    evaluations = {}
    for item in args.evaluations:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise HaganError(f"{item!r}: expected LABEL=EVAL_DIR, e.g. ha-gan=eval/hagan")
        evaluations[label] = folder
    embedding_from_evaluations(evaluations, args.out, feature=args.feature, seed=args.seed)
    print(f"wrote {args.out}")


def cmd_summary(args: argparse.Namespace) -> None:
    import torch

    from .bench import module_param_counts
    from .models import build_model

    overrides = [{"model": {"size": args.size}}] if args.size else []
    config = build_config(args.preset, None, overrides)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hagan", description="Memory-efficient GANs for 3D medical images.")
    parser.add_argument("--version", action="version", version=f"hagan {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="phantoms -> preprocess -> train a small HA-GAN on CPU -> generate")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--kind", default="thorax-ct", choices=["thorax-ct", "brain-mri"])
    p.add_argument("--n", type=positive_int, default=48, help="number of phantoms")
    p.add_argument("--iterations", type=positive_int, default=None, help="training iterations (default: the demo preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("phantoms", help="write procedural phantoms with ground-truth attributes")
    p.add_argument("out")
    p.add_argument("--kind", default="thorax-ct", choices=["thorax-ct", "brain-mri"])
    p.add_argument("--n", type=positive_int, default=16)
    p.add_argument("--size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("preprocess", help="read a folder of volumes into a training cache")
    p.add_argument("src", help="folder of NIfTI/NRRD/MHA/DICOM/npy volumes")
    p.add_argument("dst", help="cache folder to write")
    p.add_argument("--recipe", required=True, choices=["ct", "mri"])
    p.add_argument("--size", type=int, required=True, help="training cube edge: 32, 64, 128, 256 or 512")
    p.add_argument("--mode", default="resize_keep_aspect", choices=["resize_keep_aspect", "resize", "pad"])
    p.add_argument("--force", action="store_true",
                   help="replace an existing cache in DST (swapped in only once the new one is complete)")
    p.add_argument("--no-trim", action="store_true", help="keep blank axial slices at the ends")
    p.add_argument("--labels", help="CSV with a file column and a class-label column")
    p.add_argument("--label-column", help="column of --labels holding integer classes")
    p.add_argument("--segmentations", metavar="LABEL_FOLDER",
                   help="folder of label maps on the images' grids (same file name, or the name plus a suffix "
                        "like _DLMUSE), cached beside each cube with nearest-neighbour resampling")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train a model on a preprocessed cache")
    p.add_argument("--data", help="cache folder from `hagan preprocess`")
    p.add_argument("--out", required=True, help="run folder (checkpoints, samples, logs)")
    p.add_argument("--config", help="YAML config; flags override it")
    p.add_argument("--model", choices=list(MODELS), help="model to train (default hagan, or the preset's)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", choices=sorted(PRESETS), help="named configuration")
    group.add_argument("--size", type=int, help="output cube edge, 32..512")
    p.add_argument("--iterations", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-classes", type=int, help="class-conditional training with the cache's labels")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config value")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=cmd_train)

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", help="training run folder")
        p.add_argument("--checkpoint", help="a checkpoint folder or weights file (default: the latest checkpoint)")
        p.add_argument("--device", default="auto")
        p.add_argument("--allow-pickle", action="store_true",
                       help="accept a pickle weights file (.pt/.pth), loaded with weights_only; only from sources you trust")

    p = sub.add_parser("generate", help="generate full-resolution volumes")
    run_args(p)
    p.add_argument("--n", type=positive_int, default=8, help="volumes to generate")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--class", dest="class_label", type=non_negative_int, help="class to generate (conditional models)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="override the run's train.precision (auto: bf16 on GPUs, float32 on CPU)")
    p.add_argument("--tile-depth", type=non_negative_int, default=0,
                   help="G^H over depth tiles of this many feature slices: the same volume in less memory (0: untiled below 512^3)")
    p.add_argument("--label-maps", action="store_true",
                   help="also write the label maps generated with each volume (progressive GAN with label channels)")
    p.add_argument("--sample-from", choices=["ema", "raw"],
                   help="the generator's moving average of weights (default when the run keeps one) or its trained weights")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("encode", help="encode volumes to latent codes")
    run_args(p)
    p.add_argument("volumes", nargs="+", help="volume files or folders")
    p.add_argument("--out", required=True, help="latents.npy or latents.csv")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("reconstruct", help="encode volumes and generate them back")
    run_args(p)
    p.add_argument("volumes", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--class", dest="class_label", type=non_negative_int)
    p.set_defaults(func=cmd_reconstruct)

    from .evaluation import FEATURES
    from .preprocess import FIT_MODES

    p = sub.add_parser("evaluate", help="score generated volumes against real ones (FID, KID, MMD, MS-SSIM)")
    p.add_argument("--real", required=True, help="cache folder, folder of volumes, or stats .npz from --save-stats")
    p.add_argument("--fake", required=True, help="folder of generated volumes, or a training run")
    p.add_argument("--out", required=True, help="folder for metrics.json, metrics.md and figures")
    p.add_argument("--n", type=positive_int, help="generated volumes to use (default: the real set's size for a run)")
    p.add_argument("--features", nargs="+", default=["deepbet"], choices=sorted(FEATURES))
    p.add_argument("--weights", action="append", metavar="[FEATURE=]PATH", help="feature-network weights file")
    p.add_argument("--allow-unknown-weights", action="store_true", help="accept weights whose sha256 is unpublished")
    p.add_argument("--save-stats", metavar="PATH", help="also save the real set's feature statistics (.npz)")
    p.add_argument("--recipe", choices=["ct", "mri", "none"], help="intensity recipe of raw or generated folders")
    p.add_argument("--mode", choices=FIT_MODES, help="fit mode for a folder of raw real volumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--fid-method", choices=["sqrtm", "eigh"], default="sqrtm")
    p.add_argument("--class", dest="class_label", type=non_negative_int, help="class to generate from a conditional run")
    p.add_argument("--ms-ssim-volumes", type=positive_int, default=50)
    p.add_argument("--ms-ssim-pairs", type=positive_int, default=500)
    p.add_argument("--slices", type=positive_int, default=16, help="slices per plane for inception-2.5d")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("embedding", help="MDS figure of real and several generated sets (the paper's Fig. 4)")
    p.add_argument("evaluations", nargs="+", metavar="LABEL=EVAL_DIR", help="output folders of `hagan evaluate`")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--feature", help="feature set to embed (default: the first evaluated)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_embedding)

    p = sub.add_parser("bench", help="training memory and speed, generation time, per resolution and batch size")
    p.add_argument("--models", nargs="+", default=["hagan"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128], choices=[32, 64, 128, 256, 512])
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[2, 4])
    p.add_argument("--device", default="auto")
    p.add_argument("--iterations", type=positive_int, default=5, help="timed training iterations per configuration")
    p.add_argument("--warmup", type=non_negative_int, default=2)
    p.add_argument("--generate-batch", type=positive_int, default=1)
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

    p = sub.add_parser("summary", help="parameter count of each module")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--size", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    from .applications.cli import add_parser as add_experiment
    from .translate import add_parser as add_translate

    add_translate(sub)
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
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
