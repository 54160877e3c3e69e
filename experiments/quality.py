"""Realism, diversity and copying of HA-GAN samples, measured on held-out IXI heads.

The protocol of docs/small-data.md. The 143 IXI T1 heads are split (seeded) into 113 training and 30
validation heads, each part preprocessed into its own cache. A configuration is trained for N iterations
with a checkpoint every K, and every checkpoint is scored on 64 samples from fixed latents, from the
moving average of G's weights and from the raw weights:

- KID and FID on deepbet features against the validation heads and against the training heads;
- diversity: mean absolute difference between all pairs, in grey levels of 255, the same function as
  for the real heads;
- copying: each sample's distance to its nearest training head in feature space, against the distance
  of each validation head to its nearest training head (median ratio; below 1 means closer than real);
- the slab mismatch: mean |training slab - the same slab of the full volume| over all starts;
- three-plane and axial montages.

    # train and score (resumes a run that stopped; more --iterations continue it)
    python experiments/quality.py train --data ../shared/data/ixi-t1-2mm/t1 --out runs/quality \\
        --config small-data --seed 0 --iterations 2000 --checkpoint-every 250
    # the real rows: k distinct training heads repeated to 64, 64 distinct ones, and 64 blurred ones
    python experiments/quality.py calibrate --data ../shared/data/ixi-t1-2mm/t1 --out runs/quality
    # seconds per iteration of each configuration, back to back in one process
    python experiments/quality.py cost --data ../shared/data/ixi-t1-2mm/t1 --out runs/quality
    # table, curves and side-by-side montages of every run under --out
    python experiments/quality.py report --out runs/quality

Defaults are the CPU protocol: 64^3, channels x 0.25, latent 128, batch 4.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from hagan.api import load_run
from hagan.applications.datasets import load_cache
from hagan.config import build_config, parse_assignment
from hagan.data.dataset import CachedVolumeDataset, split_indices
from hagan.data.io import list_volume_paths, write_json_atomic, write_text_atomic
from hagan.data.preprocess import preprocess_folder
from hagan.evaluation import build_extractor, fid_from_features, kid
from hagan.evaluation.metrics import grey_levels, pairwise_mean_abs_diff
from hagan.models import build_model
from hagan.run_folder import list_checkpoints, read_scalars
from hagan.training.trainer import train
from hagan.viz import MAX_MONTAGE_VOLUMES, montage_grid, three_plane_montage

# name -> (preset, overrides on top of it); the protocol's sizes are applied after these
CONFIGS: dict[str, tuple[str, dict]] = {
    "paper": ("paper-128", {}),
    "small-data": ("small-data-128", {}),
}
VALIDATION_HEADS = 30
SPLIT_SEED = 0
SAMPLES = 64
LATENT_SEED = 20261202
CALIBRATION_COPIES = (1, 4, 16)
BLUR_SIGMAS = (1.0, 2.0)  # deepbet's KID punishes smoothness hard: real heads blurred, to read smooth samples by
TRACKED_EMA_KIMG = 1.0  # a configuration without an averaged G gets one for scoring; training is unchanged


def prepare_split(args: argparse.Namespace) -> tuple[Path, Path]:
    """Training and validation caches from one seeded split of the files, each preprocessed on its own."""
    out, size = Path(args.out), args.size
    paths = list_volume_paths(Path(args.data))
    if len(paths) <= args.validation_heads:
        raise SystemExit(f"{args.data}: {len(paths)} volumes; the split needs more than --validation-heads "
                         f"{args.validation_heads}")
    train_ids, val_ids = split_indices(len(paths), args.validation_heads / len(paths), SPLIT_SEED)
    caches = {"train": (out / f"cache-{size}-train", train_ids), "val": (out / f"cache-{size}-val", val_ids)}
    for cache, ids in caches.values():
        if not (cache / "manifest.json").is_file():
            print(preprocess_folder([paths[i] for i in ids], cache, recipe="mri", size=size, progress=False).summary())
    return caches["train"][0], caches["val"][0]


def extract(extractor, volumes: np.ndarray) -> np.ndarray:
    return extractor.extract(torch.from_numpy(volumes)[:, None], batch_size=8).numpy().astype(np.float64)


def real_reference(args: argparse.Namespace, extractor, train_cache: Path, val_cache: Path) -> dict[str, np.ndarray]:
    """Features (and a few volumes) of the training and validation heads, computed once per --out."""
    path = Path(args.out) / f"real-{args.size}.npz"
    if path.is_file():
        return dict(np.load(path))
    train_volumes, val_volumes = load_cache(train_cache).volumes, load_cache(val_cache).volumes
    reference = {
        "train_features": extract(extractor, train_volumes),
        "val_features": extract(extractor, val_volumes),
        "train_diversity": np.float64(pairwise_mean_abs_diff(grey_levels(train_volumes[:args.samples]))),
        "val_diversity": np.float64(pairwise_mean_abs_diff(grey_levels(val_volumes))),
        "val_shown": val_volumes[:8],
    }
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez(handle, **reference)
    partial.replace(path)
    return reference


def nearest_distances(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.sqrt(((features[:, None, :] - reference[None, :, :]) ** 2).sum(-1)).min(1)


def set_scores(features: np.ndarray, diversity: float, real: dict[str, np.ndarray]) -> dict[str, float]:
    """KID/FID against both real sets, diversity, and the copying ratio of one set of 64 volumes."""
    kid_val, kid_val_std = kid(real["val_features"], features)
    kid_train, _ = kid(real["train_features"], features)
    real_nn = np.median(nearest_distances(real["val_features"], real["train_features"]))
    return {
        "kid_val": kid_val, "kid_val_std": kid_val_std, "kid_train": kid_train,
        "fid_val": fid_from_features(real["val_features"], features, method="eigh"),
        "fid_train": fid_from_features(real["train_features"], features, method="eigh"),
        "diversity": diversity,
        "nn_ratio": float(np.median(nearest_distances(features, real["train_features"])) / real_nn),
    }


def score_checkpoint(run_dir: Path, checkpoint: Path, extractor, real: dict[str, np.ndarray], samples: int,
                     device: str) -> dict:
    """Scores of one checkpoint, from the averaged and from the raw generator, with their montages."""
    scores: dict = {}
    for sample_from in ("ema", "raw"):
        run = load_run(run_dir, checkpoint=checkpoint, device=device, sample_from=sample_from)
        if sample_from == "ema" and not run.uses_ema:
            continue
        latents = torch.randn(samples, run.config.model.latent_dim, generator=torch.Generator().manual_seed(LATENT_SEED))
        volumes = torch.cat(list(run.decode_batches(latents, batch_size=8)))[:, 0].float().cpu().numpy()
        features = extract(extractor, volumes)
        scores[sample_from] = set_scores(features, pairwise_mean_abs_diff(grey_levels(volumes)), real)
        folder = run_dir / "scores"
        three_plane_montage(list(volumes[:8]), folder / f"{checkpoint.name}-{sample_from}-planes.png")
        montage_grid(list(volumes[:16]), folder / f"{checkpoint.name}-{sample_from}-axial.png")
        if sample_from == "raw":
            scores["slab_mismatch"] = run.model.slab_mismatch(latents[:4])
    return scores


def protocol_config(name: str, seed: int, args: argparse.Namespace, cache: Path):
    preset, extra = CONFIGS[name]
    overrides = [
        extra,
        {"model": {"size": args.size, "width": args.width, "latent_dim": args.latent_dim},
         "optim": {"batch_size": args.batch_size}, "data": {"cache": str(cache)},
         "train": {"seed": seed, "device": args.device, "iterations": args.iterations, "log_every": 20,
                   "sample_every": args.checkpoint_every, "checkpoint_every": args.checkpoint_every,
                   "keep_checkpoints": 10_000}},
        *[parse_assignment(text) for text in args.set or []],
    ]
    config = build_config(preset, None, overrides)
    tracked = config.hagan.ema_kimg == 0
    if tracked:
        config.hagan.ema_kimg = TRACKED_EMA_KIMG
    return config, tracked


def cmd_train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    extractor = build_extractor("deepbet", device=args.device)
    train_cache, val_cache = prepare_split(args)
    real = real_reference(args, extractor, train_cache, val_cache)
    label = args.name or args.config
    run_dir = out / "runs" / f"{label}-seed{args.seed}"
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {
        "name": label, "config": args.config, "preset": CONFIGS[args.config][0], "seed": args.seed,
        "set": args.set or [], "segments": [], "checkpoints": {}}
    config, tracked = protocol_config(args.config, args.seed, args, train_cache)
    results["preset_samples_from"] = "raw" if tracked else "ema"
    resume = (run_dir / "config.yaml").is_file()
    done = max((int(p.name.split("_")[1]) for p in list_checkpoints(run_dir / "checkpoints")), default=0)
    if done < args.iterations:
        started = time.perf_counter()
        train(config, run_dir, resume=resume)
        results["segments"].append({"from": done, "to": args.iterations,
                                    "seconds": round(time.perf_counter() - started, 1),
                                    "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")})
    speeds = read_scalars(run_dir).get("speed/it_per_s", [])
    results["seconds_per_iteration"] = round(1 / speeds[-1][1], 3) if speeds else None
    for checkpoint in list_checkpoints(run_dir / "checkpoints"):
        key = str(int(checkpoint.name.split("_")[1]))
        if key not in results["checkpoints"]:
            results["checkpoints"][key] = score_checkpoint(run_dir, checkpoint, extractor, real, args.samples, args.device)
            print(json.dumps({label: {key: results["checkpoints"][key]}}), flush=True)
            write_json_atomic(results_path, results)
    write_json_atomic(results_path, results)


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Real heads as if they were samples: k distinct training heads repeated to 64, all of them, and blurred ones."""
    out = Path(args.out)
    extractor = build_extractor("deepbet", device=args.device)
    train_cache, val_cache = prepare_split(args)
    real = real_reference(args, extractor, train_cache, val_cache)
    volumes = load_cache(train_cache).volumes
    rng = np.random.default_rng(1)
    rows = {}
    for copies in (*CALIBRATION_COPIES, args.samples):
        copies = min(copies, len(volumes))
        chosen = rng.choice(len(volumes), copies, replace=False)
        index = np.resize(chosen, args.samples)
        diversity = pairwise_mean_abs_diff(grey_levels(volumes[index]))
        rows[f"{copies} distinct training heads"] = set_scores(real["train_features"][index], diversity, real)
    sharp = volumes[np.resize(rng.choice(len(volumes), min(args.samples, len(volumes)), replace=False), args.samples)]
    for sigma in BLUR_SIGMAS:
        blurred = gaussian_filter(sharp, sigma=(0, sigma, sigma, sigma)).astype(np.float32)
        diversity = pairwise_mean_abs_diff(grey_levels(blurred))
        rows[f"training heads blurred (sigma {sigma} voxels)"] = set_scores(extract(extractor, blurred), diversity, real)
    rows[f"validation heads ({args.validation_heads})"] = {"diversity": float(real["val_diversity"])}
    write_json_atomic(out / f"calibration-{args.size}.json", rows)
    print(json.dumps(rows, indent=2))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cmd_cost(args: argparse.Namespace) -> None:
    """Seconds per training iteration of each configuration, timed back to back in this process."""
    out = Path(args.out)
    train_cache, _ = prepare_split(args)
    dataset = CachedVolumeDataset(train_cache)
    device = torch.device(args.device)
    batch = {"image": torch.stack([dataset[i]["image"] for i in range(args.batch_size)]).to(device),
             "label": torch.full((args.batch_size,), -1, device=device)}
    rows = {}
    for name in args.configs.split(","):
        config, _ = protocol_config(name, 0, args, train_cache)
        torch.manual_seed(0)
        model = build_model(config).to(device)
        rng = torch.Generator().manual_seed(0)
        for i in range(2):
            model.train_step(dict(batch), i, rng)
        synchronize(device)
        started = time.perf_counter()
        for i in range(args.steps):
            model.train_step(dict(batch), 2 + i, rng)
        synchronize(device)
        rows[name] = {"seconds_per_iteration": round((time.perf_counter() - started) / args.steps, 3)}
    first = next(iter(rows.values()))["seconds_per_iteration"]
    for row in rows.values():
        row["ratio_to_first"] = round(row["seconds_per_iteration"] / first, 2)
    result = {"device": args.device, "threads": torch.get_num_threads(), "steps": args.steps, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    write_json_atomic(out / f"cost-{args.size}.json", result)
    print(json.dumps(result, indent=2))


def reported_iterations(result: dict, at: int) -> list[int]:
    """The targets' iteration, where the run reached it, and the run's last checkpoint when it went further."""
    done = sorted(int(k) for k in result["checkpoints"])
    return sorted({i for i in (at, done[-1]) if i in done})


def wall_minutes(result: dict, iteration: int) -> float:
    """Training time (scoring excluded) of the segments that ended by ``iteration``."""
    return sum(segment["seconds"] for segment in result["segments"] if segment["to"] <= iteration) / 60


def report_rows(runs: list[dict], calibration: dict, at: int) -> list[str]:
    """The markdown table: one row per run at its last checkpoint, then the real rows."""
    header = ("| run | seed | iterations | training wall time (min) | samples from | KID val | (best, at it.) | FID val | "
              "diversity | NN ratio | slab mismatch |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for result, iteration in ((r, i) for r in runs for i in reported_iterations(r, at)):
        scores = result["checkpoints"][str(iteration)]
        for sample_from in ("ema", "raw"):
            if sample_from not in scores:
                continue
            row = scores[sample_from]
            best_it, best = min(((int(k), v[sample_from]["kid_val"]) for k, v in result["checkpoints"].items()
                                 if int(k) <= iteration), key=lambda kv: kv[1])
            used = " (preset)" if sample_from == result["preset_samples_from"] else ""
            lines.append(
                f"| {result['name']} | {result['seed']} | {iteration} | {wall_minutes(result, iteration):.0f} | "
                f"{sample_from}{used} | {row['kid_val']:.4f} sd {row['kid_val_std']:.4f} | {best:.4f} ({best_it}) | "
                f"{row['fid_val']:.3f} | {row['diversity']:.1f} | {row['nn_ratio']:.2f} | {scores['slab_mismatch']:.3f} |")
    for name, row in calibration.items():
        if "kid_val" in row:
            lines.append(f"| real: {name} | - | - | - | - | {row['kid_val']:.4f} sd {row['kid_val_std']:.4f} | - | "
                         f"{row['fid_val']:.3f} | {row['diversity']:.1f} | - | - |")
        else:
            lines.append(f"| real: {name} | - | - | - | - | - | - | - | {row['diversity']:.1f} | - | - |")
    return lines


def plot_curves(runs: list[dict], calibration: dict, real_diversity: float, path: Path) -> None:
    """KID against the validation heads and diversity over iterations, every run, with the real lines."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    kid_ax, div_ax = figure.subplots(1, 2)
    for index, result in enumerate(runs):
        colour = f"C{index % 10}"
        iterations = sorted(int(k) for k in result["checkpoints"])
        for sample_from, style in (("ema", "-"), ("raw", ":")):
            points = [(i, result["checkpoints"][str(i)][sample_from]) for i in iterations
                      if sample_from in result["checkpoints"][str(i)]]
            if not points:
                continue
            label = f"{result['name']} s{result['seed']} {sample_from}"
            kid_ax.plot([i for i, _ in points], [max(s["kid_val"], 1e-5) for _, s in points], style, color=colour,
                        marker="o", markersize=3, label=label)
            div_ax.plot([i for i, _ in points], [s["diversity"] for _, s in points], style, color=colour,
                        marker="o", markersize=3, label=label)
    for copies, style in zip(CALIBRATION_COPIES, ("--", "-.", ":")):
        row = calibration.get(f"{copies} distinct training heads")
        if row:
            kid_ax.axhline(max(row["kid_val"], 1e-5), color="grey", linestyle=style, label=f"{copies} real heads")
    for sigma, colour in zip(BLUR_SIGMAS, ("tan", "brown")):
        row = calibration.get(f"training heads blurred (sigma {sigma} voxels)")
        if row:
            kid_ax.axhline(row["kid_val"], color=colour, linestyle="--", label=f"real heads blurred, sigma {sigma}")
    div_ax.axhline(real_diversity, color="k", linestyle="--", label="real (training heads)")
    kid_ax.set(yscale="log", xlabel="iteration", ylabel="KID vs validation heads (deepbet)", title="realism")
    div_ax.set(xlabel="iteration", ylabel="pairwise mean abs. difference (grey levels)", title="diversity")
    kid_ax.legend(fontsize=6)
    div_ax.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def side_by_side(out: Path, runs: list[dict], real: dict[str, np.ndarray], path: Path, at: int, device: str) -> None:
    """Real validation heads beside each run at the reported iterations (the preset's weights), three planes each."""
    shown_runs = [(r, i) for r in runs for i in reported_iterations(r, at)]
    shown = max(1, min(4, MAX_MONTAGE_VOLUMES // (1 + len(shown_runs))))
    columns = [("real", list(real["val_shown"][:shown]))]
    for result, iteration in shown_runs:
        run_dir = out / "runs" / f"{result['name']}-seed{result['seed']}"
        checkpoint = run_dir / "checkpoints" / f"iter_{iteration:08d}"
        run = load_run(run_dir, checkpoint=checkpoint, device=device, sample_from=result["preset_samples_from"])
        latents = torch.randn(SAMPLES, run.config.model.latent_dim, generator=torch.Generator().manual_seed(LATENT_SEED))
        volumes = torch.cat(list(run.decode_batches(latents[:shown], batch_size=shown)))[:, 0].float().cpu().numpy()
        columns.append((f"{result['name']} s{result['seed']} {iteration}", list(volumes)))
    volumes = [columns[c][1][r] for r in range(shown) for c in range(len(columns))]
    titles = [columns[c][0] for r in range(shown) for c in range(len(columns))]
    three_plane_montage(volumes, path, titles=titles, cols=len(columns))


def cmd_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/results.json"))]
    runs = [r for r in runs if r["checkpoints"] and (not args.runs or r["name"] in args.runs.split(","))]
    calibration_path = out / f"calibration-{args.size}.json"
    calibration = json.loads(calibration_path.read_text()) if calibration_path.is_file() else {}
    real = dict(np.load(out / f"real-{args.size}.npz"))
    lines = report_rows(runs, calibration, args.iterations)
    cost_path = out / f"cost-{args.size}.json"
    if cost_path.is_file():
        cost = json.loads(cost_path.read_text())
        lines += ["", f"Cost per iteration ({cost['threads']} threads, {cost['steps']} steps, {cost['date']}):", ""]
        lines += [f"- {name}: {row['seconds_per_iteration']} s ({row['ratio_to_first']}x)" for name, row in cost["rows"].items()]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    plot_curves(runs, calibration, float(real["train_diversity"]), out / "curves.png")
    picked = [r for r in runs if not args.montage or r["name"] in args.montage.split(",")]
    side_by_side(out, picked, real, out / "side-by-side.png", args.iterations, args.device)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, data: bool = True) -> None:
        if data:
            p.add_argument("--data", required=True, help="the IXI T1 folder (../shared/data/ixi-t1-2mm/t1)")
        p.add_argument("--out", required=True)
        p.add_argument("--size", type=int, default=64)
        p.add_argument("--width", type=float, default=0.25)
        p.add_argument("--latent-dim", type=int, default=128)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--iterations", type=int, default=2000)
        p.add_argument("--checkpoint-every", type=int, default=250)
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
        p.add_argument("--device", default="cpu", help="where to train, generate and extract features (default cpu)")
        p.add_argument("--samples", type=int, default=SAMPLES, help="volumes scored per checkpoint (default 64)")
        p.add_argument("--validation-heads", type=int, default=VALIDATION_HEADS, help="volumes held out (default 30)")

    p = sub.add_parser("train", help="train one configuration and score its checkpoints")
    common(p)
    p.add_argument("--config", choices=list(CONFIGS), required=True)
    p.add_argument("--name", help="run name (default: the configuration's); runs go to OUT/runs/NAME-seedS")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("calibrate", help="score real training heads as samples")
    common(p)
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("cost", help="seconds per iteration of each configuration in one process")
    common(p)
    p.add_argument("--configs", default="paper,small-data")
    p.add_argument("--steps", type=int, default=10)
    p.set_defaults(func=cmd_cost)
    p = sub.add_parser("report", help="table, curves and side-by-side montages of the runs under --out, at "
                       "--iterations and at each run's last checkpoint")
    common(p, data=False)
    p.add_argument("--runs", help="comma list of run names to include (default: all)")
    p.add_argument("--montage", help="comma list of run names shown beside the real heads (default: all)")
    p.set_defaults(func=cmd_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
