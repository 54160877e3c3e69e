"""``hagan experiment augmentation|features|latent-walk``: the paper's three applications as commands.

Each takes a trained run (``--run``) or trains one into ``OUT/run`` from ``--preset``/``--config``/
``--set`` (resumed by the same command when ``--train-minutes`` stopped it), and writes
``OUT/results.json`` and a PNG figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hagan.api import Run, load_run, run_config
from hagan.checks import non_negative_int, positive_int, seed_int
from hagan.config import PRESETS
from hagan.errors import HaganError

from ..applications.augmentation import AugmentationSettings, run_augmentation
from ..applications.classifier import TrainingRecipe
from ..applications.datasets import (
    PHANTOM_TARGETS,
    count_classes,
    is_cache,
    parse_targets,
    prepare_npz_splits,
    prepare_phantoms,
    read_tables,
    require_columns,
)
from ..applications.features import FeatureSettings, run_features
from ..applications.latent_walk import DIRECTIONS, FIT_ON, REFERENCES, WalkSettings, run_latent_walk
from ..applications.runs import ensure_run, open_runs, training_config
from ..applications.segment import SEGMENTERS

PHANTOMS = "phantoms"
WALK_DEFAULTS = {"thorax-ct": ("lung_volume_ml", "lung"), "brain-mri": ("ventricle_volume_ml", "csf")}


def ridge_penalty(text: str) -> float | None:
    """``auto`` (None: leave-one-out) or a non-negative number, for ``--alpha``."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _training_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("the generative model (an existing run, or one trained into OUT/run)")
    group.add_argument("--run", help="trained run folder to use instead of training one")
    group.add_argument("--preset", default="demo", choices=sorted(PRESETS), metavar="NAME",
                       help="training preset (`hagan train --help` lists them)")
    group.add_argument("--config", help="training YAML, applied after the preset")
    group.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a training value")
    group.add_argument("--iterations", type=positive_int, help="training iterations")
    group.add_argument("--train-minutes", type=float, help="stop training after this long; the same command resumes it")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def _data_arguments(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--data", nargs="+", required=True, help=data_help)
    p.add_argument("--out", required=True, help="folder for results.json, the figure, prepared data and a trained run")
    p.add_argument("--phantom-kind", default="thorax-ct", choices=sorted(PHANTOM_TARGETS), help="with --data phantoms")
    p.add_argument("--n", type=positive_int, default=60, help="number of phantoms with --data phantoms")


def _obtain_run(args: argparse.Namespace, cache: Path | None, **sections: dict) -> Run:
    if args.run:
        return load_run(args.run, device=args.device)
    if cache is None:
        raise HaganError("--data is not a cache from `hagan preprocess`: pass --run, or a cache to train on")
    train_section = {"device": args.device}
    if args.iterations:
        train_section["iterations"] = args.iterations
    if args.train_minutes:
        train_section["max_minutes"] = args.train_minutes
    config = training_config(args.preset, args.config, args.set, cache, train=train_section, **sections)
    return load_run(ensure_run(config, Path(args.out) / "run"), device=args.device)


def _model_size(args: argparse.Namespace) -> int:
    """The cube edge the data must be prepared at: the given run's, or the training config's."""
    if args.run:
        return run_config(args.run).model.size
    return training_config(args.preset, args.config, args.set, Path(".")).model.size


def cmd_augmentation(args: argparse.Namespace) -> None:
    out = Path(args.out)
    source = args.data[0]
    if len(args.data) != 1:
        raise HaganError("--data: the augmentation experiment takes one source")
    recipe = TrainingRecipe(args.epochs, args.batch_size, args.lr, args.classifier_width)
    settings = AugmentationSettings(args.seeds, args.synthetic_fraction, recipe, args.device)
    settings.check()
    if source == PHANTOMS:
        if args.phantom_kind != "thorax-ct":
            raise HaganError("--phantom-kind: the augmentation experiment's phantom classes are thorax CT emphysema grades")
        splits, _ = prepare_phantoms(out / "data", "thorax-ct", args.n, _model_size(args), seed=0, test_fraction=0.25,
                                     label="grade")
    elif source.endswith(".npz"):
        splits = prepare_npz_splits(source, out / "data", _model_size(args))
    elif is_cache(Path(source) / "train") and is_cache(Path(source) / "test"):
        splits = {s: Path(source) / s for s in ("train", "val", "test") if is_cache(Path(source) / s)}
    else:
        raise HaganError(f"--data {source}: expected a MedMNIST .npz, 'phantoms', or a folder with train/ and test/ caches")
    classes = count_classes(list(splits.values()))
    hagan_run = _obtain_run(args, splits["train"], model={"num_classes": classes})
    generators = {args.label: [hagan_run], **open_runs(args.compare, args.device)}
    results = run_augmentation(splits, generators, out, settings)
    for arm, summary in results["summary"].items():
        accuracy = summary["test"]["accuracy"]
        print(f"{arm:>24s}: test accuracy {100 * accuracy['mean']:.1f} ± {100 * accuracy['std']:.1f} %")
    for name, tests in results["paired_tests"].items():
        print(f"{name}: accuracy difference {100 * tests['accuracy']['mean_difference']:+.1f} points, "
              f"paired t-test p = {tests['accuracy'].get('p_ttest', float('nan')):.3g}")
    print(f"wrote {out / 'results.json'} and {out / 'augmentation.png'}")


def _phantom_kind(args: argparse.Namespace) -> str | None:
    """The phantom kind when the toy data were asked for, else None."""
    return args.phantom_kind if args.data == [PHANTOMS] else None


def _measured_inputs(args: argparse.Namespace) -> tuple[list[str], list[str], Path | None]:
    """Inputs, tables, and a cache to train on (phantoms are prepared here)."""
    if _phantom_kind(args):
        caches, table = prepare_phantoms(Path(args.out) / "data", args.phantom_kind, args.n, _model_size(args))
        return [str(caches["all"])], [str(table)] + list(args.table), caches["all"]
    if not args.table:
        raise HaganError("--table: name the CSV file(s) that hold the measurements")
    cache = Path(args.data[0]) if len(args.data) == 1 and is_cache(args.data[0]) else None
    return list(args.data), list(args.table), cache


def cmd_features(args: argparse.Namespace) -> None:
    kind = _phantom_kind(args)
    targets = parse_targets(args.targets or (PHANTOM_TARGETS[kind] if kind else []))
    settings = FeatureSettings(targets, args.folds, args.seeds, args.alpha, not args.no_log, args.image_edge)
    settings.check()
    inputs, tables, cache = _measured_inputs(args)
    table = read_tables(tables)
    require_columns(table, targets)
    encoders = {args.label: _obtain_run(args, cache), **{k: v[0] for k, v in open_runs(args.compare, args.device).items()}}
    results = run_features(inputs, table, encoders, args.out, settings)
    for name, by_set in results["r2"].items():
        cells = ", ".join(f"{label} {v['pooled_mean']:.3f} ± {v['pooled_std']:.3f}" for label, v in by_set.items())
        print(f"R² {name}: {cells}")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'features.png'}")


def cmd_latent_walk(args: argparse.Namespace) -> None:
    default_target, default_tissue = WALK_DEFAULTS.get(_phantom_kind(args), (None, None))
    target_spec = args.target or default_target
    tissue = args.tissue or default_tissue
    if target_spec is None or tissue is None:
        raise HaganError("--target and --tissue are needed unless --data is phantoms")
    settings = WalkSettings(parse_targets([target_spec])[0], tissue, args.steps, args.references, args.reference,
                            args.direction, tuple(args.target_quantiles), args.class_label, args.alpha, args.seed,
                            args.fit_on, args.samples)
    settings.check()
    inputs, tables, cache = _measured_inputs(args)
    table = read_tables(tables)
    require_columns(table, [settings.target])
    results = run_latent_walk(inputs, table, _obtain_run(args, cache), args.out, settings)
    for i, walk in enumerate(results["walks"]):
        print(f"walk {i + 1} from {walk['reference']}: segmented {tissue} "
              f"{' -> '.join(f'{v:.0f}' for v in walk['measured_ml'])} ml (Spearman {walk['spearman']:.2f})")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'latent_walk.png'}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hagan experiment NAME`` on the main command line."""
    experiment = subparsers.add_parser(
        "experiment", help="the paper's applications: augmentation, features, latent walk",
        description="the paper's applications: augmentation, features, latent walk.\n\n"
                    "Each takes a trained run (--run) or trains one into OUT/run, and writes OUT/results.json and "
                    "a figure; `hagan experiment NAME --help` describes each.",
        epilog="example:\n  hagan experiment features --data phantoms --out runs/features --iterations 200")
    names = experiment.add_subparsers(dest="experiment", required=True, metavar="NAME")

    p = names.add_parser("augmentation", help="GAN augmentation for a 3D CNN classifier (Table V)",
                         description="GAN augmentation for a 3D CNN classifier (Table V): the classifier trained "
                                     "with and without synthetic volumes, over several seeds, with paired tests.",
                         epilog="example:\n  hagan experiment augmentation --data adrenalmnist3d_64.npz "
                                "--out runs/augmentation")
    _data_arguments(p, "MedMNIST-style .npz (official splits), 'phantoms' (thorax CT, severity grade as class), "
                       "or a folder with labelled train/ and test/ caches")
    _training_arguments(p)
    p.add_argument("--label", default="hagan", help="name of the main model in the results")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=RUN[,RUN...]",
                   help="another model: a class-conditional run, or one unconditional run per class in class order")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="classifier training seeds, one arm each")
    p.add_argument("--synthetic-fraction", type=float, default=0.2, help="share of synthetic volumes in the augmented set")
    p.add_argument("--epochs", type=positive_int, default=20, help="classifier training epochs")
    p.add_argument("--batch-size", type=positive_int, default=8, help="classifier batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="classifier learning rate")
    p.add_argument("--classifier-width", type=float, default=1.0, help="channel multiplier of the Table VIII CNN")
    p.set_defaults(func=cmd_augmentation)

    for name, helptext, func in (("features", "ridge regression of measurements on encoded latents (Table VI)", cmd_features),
                                 ("latent-walk", "walk along a measurement's latent direction (Fig. 5)", cmd_latent_walk)):
        p = names.add_parser(name, help=helptext, description=f"{helptext}.",
                             epilog=f"example:\n  hagan experiment {name} --data phantoms --out runs/{name}")
        _data_arguments(p, "caches or folders of volumes (read with the run's preprocessing), or 'phantoms'")
        _training_arguments(p)
        p.add_argument("--table", action="append", default=[], help="CSV of measurements, first column (or 'file') the ID")
        p.add_argument("--alpha", type=ridge_penalty, default=1e-4 if name == "features" else None,
                       help="ridge penalty, or 'auto' for leave-one-out in each training fold"
                            + (" (1e-4 is the paper's)" if name == "features" else " (default: auto)"))
        p.set_defaults(func=func)
        if name == "features":
            p.add_argument("--targets", nargs="+", metavar="NAME=COLUMN", help="measurements to predict")
            p.add_argument("--label", default="hagan", help="name of the main encoder in the results")
            p.add_argument("--compare", action="append", default=[], metavar="LABEL=RUN", help="another model's encoder")
            p.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds")
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds of the fold splits")
            p.add_argument("--no-log", action="store_true", help="predict the measurements, not their logarithms")
            p.add_argument("--image-edge", type=non_negative_int, default=8, help="edge of the pooled-image reference (0: none)")
        else:
            p.add_argument("--target", metavar="NAME=COLUMN", help="the measurement whose direction is walked")
            p.add_argument("--tissue", choices=sorted(SEGMENTERS), help="segmentation rule that measures generated volumes")
            p.add_argument("--direction", default="pattern", choices=DIRECTIONS,
                           help="latent direction: the regression's activation pattern or its raw weights")
            p.add_argument("--reference", default="random", choices=REFERENCES, help="where each walk starts: a random latent (the paper) or an encoded real volume")
            p.add_argument("--fit-on", default="real", choices=FIT_ON,
                           help="regress the measurement on encoded real volumes (the paper), or the segmented "
                                "volume on the generator's own samples (no encoder needed)")
            p.add_argument("--samples", type=positive_int, default=128, help="generated samples to fit on with --fit-on generated")
            p.add_argument("--steps", type=positive_int, default=7, help="volumes generated along each walk")
            p.add_argument("--references", type=positive_int, default=3, help="number of walks")
            p.add_argument("--target-quantiles", type=float, nargs=2, default=[0.05, 0.95],
                           help="walk between these quantiles of the values the direction is fitted on")
            p.add_argument("--class", dest="class_label", type=non_negative_int, help="class to generate (conditional runs)")
            p.add_argument("--seed", type=seed_int, default=0, help="seed of the reference latents")
