"""The paper's applications at full scale on one GPU, in calls of a few minutes each.

    python experiments/applications_gpu.py augmentation --adrenal DIR/adrenalmnist3d_64.npz --work W --minutes 7
    python experiments/applications_gpu.py features --ixi DIR/ixi-t1-2mm --work W --minutes 7
    python experiments/applications_gpu.py latent-walk --ixi DIR/ixi-t1-2mm --work W --minutes 4

Each call trains, or resumes, every model its experiment still lacks, side by side on the one GPU
(one process each) for at most ``--minutes`` less a margin, then runs the experiment once all have
reached their iterations. Repeat the same command until it prints the results; everything lives
under ``--work`` (prepared caches in W/data, runs in W/runs, results in W/results/NAME).

Models (seed 0 throughout; experiment seeds 0-4):

* augmentation (AdrenalMNIST3D, 64^3, official splits): a class-conditional HA-GAN (preset
  ``paper-128`` at 64^3, 2 classes) and, as the paper's comparison, alpha-GAN (preset
  ``alpha-gan-64``), trained as one unconditional run per class because the baseline has no class input;
* features and latent-walk (IXI T1, 143 heads at 128^3): HA-GAN (preset ``small-data-128``, which
  the project recommends for a set this small) and alpha-GAN (preset ``alpha-gan-128``); ridge on
  log age, intracranial volume (DLMUSE 702), total brain (701) and ventricles (509), with the paper's
  penalty 1e-4 (results/features) and with the nested leave-one-out one (results/features-auto).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hagan.api import load_run
from hagan.applications.augmentation import AugmentationSettings, run_augmentation
from hagan.applications.classifier import TrainingRecipe
from hagan.applications.datasets import (
    cache_from_arrays,
    is_cache,
    parse_targets,
    prepare_npz_splits,
    read_tables,
)
from hagan.applications.features import FeatureSettings, run_features
from hagan.applications.latent_walk import WalkSettings, run_latent_walk
from hagan.applications.runs import TrainingPaused, ensure_run, training_config
from hagan.data.preprocess import preprocess_folder
from hagan.run_folder import trained_iterations

SEEDS = [0, 1, 2, 3, 4]
MARGIN_MINUTES = 1.5  # start-up, checkpoint writing and the process's exit
EXPERIMENT_MINUTES = {"augmentation": 4.0, "features": 1.5, "latent-walk": 1.5}
IXI_TARGETS = ["age=Age", "icv=702", "brain=701", "ventricles=509"]


def adrenal_jobs(args: argparse.Namespace) -> dict[str, dict]:
    data = args.work / "data" / "adrenal"
    splits = prepare_npz_splits(args.adrenal, data, 64)
    jobs = {"hagan-adrenal": {"cache": splits["train"], "preset": "paper-128", "iterations": args.hagan_iterations,
                              "sections": {"model": {"size": 64, "num_classes": 2}}}}
    with np.load(args.adrenal) as archive:
        images, labels = archive["train_images"], archive["train_labels"].reshape(-1)
    for c in (0, 1):
        cache = data / f"train-class{c}"
        if not is_cache(cache):
            cache_from_arrays(images[labels == c], labels[labels == c], f"class{c}", cache, "mri", 64)
        jobs[f"alpha-adrenal-class{c}"] = {"cache": cache, "preset": "alpha-gan-64", "iterations": args.alpha_iterations,
                                           "sections": {}}
    return jobs


def ixi_jobs(args: argparse.Namespace) -> dict[str, dict]:
    cache = args.work / "data" / "ixi128"
    if not is_cache(cache):
        print(preprocess_folder(args.ixi / "t1", cache, recipe="mri", size=128).summary())
    return {
        "hagan-ixi": {"cache": cache, "preset": "small-data-128", "iterations": args.hagan_iterations, "sections": {}},
        "alpha-ixi": {"cache": cache, "preset": "alpha-gan-128", "iterations": args.alpha_iterations, "sections": {}},
    }


def train_job(spec_json: str) -> None:
    """One model for at most its minutes (run in its own process, so several share the GPU)."""
    spec = json.loads(spec_json)
    config = training_config(spec["preset"], None, [], Path(spec["cache"]),
                             train={"iterations": spec["iterations"], "max_minutes": spec["minutes"], "seed": 0,
                                    "checkpoint_every": 500, "sample_every": 2000},
                             **spec["sections"])
    try:
        ensure_run(config, spec["run"], progress=False)
    except TrainingPaused as paused:
        print(paused)


def train_all(jobs: dict[str, dict], args: argparse.Namespace, minutes: float) -> bool:
    """Train every unfinished job in parallel for ``minutes``; True when all have finished."""
    pending = {name: job for name, job in jobs.items()
               if trained_iterations(args.work / "runs" / name) < job["iterations"]}
    processes = []
    for name, job in pending.items():
        spec = {**job, "cache": str(job["cache"]), "run": str(args.work / "runs" / name), "minutes": minutes}
        log = open(args.work / "runs" / f"{name}.log", "a")
        print(f"training {name} for up to {minutes:.1f} min (at iteration {trained_iterations(args.work / 'runs' / name)} "
              f"of {job['iterations']})")
        processes.append(subprocess.Popen([sys.executable, __file__, "_train", json.dumps(spec)], stdout=log, stderr=log))
    for process in processes:
        process.wait()
    unfinished = [f"{name} ({trained_iterations(args.work / 'runs' / name)}/{job['iterations']})"
                  for name, job in jobs.items() if trained_iterations(args.work / "runs" / name) < job["iterations"]]
    if unfinished:
        print("still training: " + ", ".join(unfinished) + "; run the same command again")
    return not unfinished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["augmentation", "features", "latent-walk", "_train"])
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--adrenal", type=Path, help="adrenalmnist3d_64.npz")
    parser.add_argument("--ixi", type=Path, help="folder with t1/, demographics.csv, dlmuse_roi_volumes.csv")
    parser.add_argument("--work", type=Path, default=Path("runs/applications"))
    parser.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget of this call")
    parser.add_argument("--hagan-iterations", type=int, default=20000)
    parser.add_argument("--alpha-iterations", type=int, default=10000)
    args = parser.parse_args()
    if args.experiment == "_train":
        train_job(args.spec)
        return
    started = time.perf_counter()
    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    needs = {"augmentation": args.adrenal, "features": args.ixi, "latent-walk": args.ixi}[args.experiment]
    if needs is None:
        parser.error(f"{args.experiment} needs --{'adrenal' if args.experiment == 'augmentation' else 'ixi'}")
    jobs = adrenal_jobs(args) if args.experiment == "augmentation" else ixi_jobs(args)
    spent = (time.perf_counter() - started) / 60
    if not train_all(jobs, args, args.minutes - MARGIN_MINUTES - spent):
        return
    left = args.minutes - (time.perf_counter() - started) / 60
    if left < EXPERIMENT_MINUTES[args.experiment]:
        print(f"models ready; {left:.1f} min left is too little for the experiment: run the same command again")
        return
    out = args.work / "results" / args.experiment
    runs = {name: load_run(args.work / "runs" / name) for name in jobs}
    if args.experiment == "augmentation":
        splits = {s: args.work / "data" / "adrenal" / s for s in ("train", "val", "test")}
        generators = {"hagan": [runs["hagan-adrenal"]],
                      "alpha-gan": [runs["alpha-adrenal-class0"], runs["alpha-adrenal-class1"]]}
        results = run_augmentation(splits, generators, out, AugmentationSettings(SEEDS, 0.2, TrainingRecipe()))
        summary = {arm: v["test"]["accuracy"] for arm, v in results["summary"].items()}
    else:
        tables = read_tables([args.ixi / "demographics.csv", args.ixi / "dlmuse_roi_volumes.csv"])
        inputs = [args.work / "data" / "ixi128"]
        if args.experiment == "features":
            encoders = {"hagan": runs["hagan-ixi"], "alpha-gan": runs["alpha-ixi"]}
            summary = {}
            for alpha, folder in ((1e-4, out), (None, out.with_name("features-auto"))):  # the paper's, then nested LOO
                results = run_features(inputs, tables, encoders, folder,
                                       FeatureSettings(parse_targets(IXI_TARGETS), seeds=SEEDS, alpha=alpha))
                summary[f"alpha {alpha or 'auto'}"] = {name: {k: round(v["pooled_mean"], 3) for k, v in by.items()}
                                                       for name, by in results["r2"].items()}
        else:
            settings = WalkSettings(parse_targets(["ventricles=509"])[0], "csf", references=3, reference="random")
            results = run_latent_walk(inputs, tables, runs["hagan-ixi"], out, settings)
            summary = results["summary"]
    print(json.dumps(summary, indent=1))
    print(f"results in {out} after {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
