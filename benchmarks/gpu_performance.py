#!/usr/bin/env python
"""HA-GAN training and generation speed on a GPU: our reference path (float32 with TF32) against the
fast paths (bf16 autocast, channels-last, torch.compile), with ratios to the authors' code; prints JSON.

    python benchmarks/gpu_performance.py --variants fp32 bf16 bf16-cl --out runs/perf

Every row comes from ``hagan.evaluation.bench.run_bench`` (one child process per configuration, CUDA peak memory
from ``max_memory_allocated``); the authors' figures are the issue tracker's reference table, measured on
an H100 80GB with torch 2.11, TF32 and cudnn.benchmark, same networks, same four update steps per iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from hagan.evaluation.bench import run_bench

# (size, batch) -> (it/s, peak GB) for training; size -> (ms, peak GB) for one generated volume
AUTHORS_TRAIN = {(128, 4): (15.0, 2.58), (128, 2): (17.2, 1.83), (256, 4): (4.67, 9.42), (256, 2): (6.69, 5.25)}
AUTHORS_GENERATE = {128: (4.8, 0.84), 256: (32.2, 4.81)}

VARIANTS = {
    "fp32": {"train": {"precision": "fp32"}},
    "bf16": {"train": {"precision": "bf16"}},
    "bf16-cl": {"train": {"precision": "bf16", "channels_last": True}},
    "bf16-compile": {"train": {"precision": "bf16", "compile": True}},
    "fp32-compile": {"train": {"precision": "fp32", "compile": True}},
    "bf16-compile-graphs": {"train": {"precision": "bf16", "compile": True}},
    "fp32-compile-graphs": {"train": {"precision": "fp32", "compile": True}},
    "bf16-recompute": {"train": {"precision": "bf16"}, "hagan": {"recompute_activations": True}},
}
# environment of the benchmark's child processes per variant: Inductor replays its kernels as CUDA graphs
VARIANT_ENV = {"bf16-compile-graphs": {"TORCHINDUCTOR_CUDAGRAPHS": "1"},
               "fp32-compile-graphs": {"TORCHINDUCTOR_CUDAGRAPHS": "1"}}


def compare(row: dict) -> dict:
    """The row's figures beside the authors' (ratios > 1 are better for speed, < 1 for memory)."""
    out = {k: row.get(k) for k in ("variant", "size", "batch", "dtype", "status")}
    gb = 1e9
    if row.get("train_it_per_s"):
        out.update(train_it_per_s=round(row["train_it_per_s"], 2), train_peak_gb=round(row["train_peak_mem_bytes"] / gb, 2),
                   train_tflops=round(row["tflops"], 1) if row.get("tflops") else None)
        ref = AUTHORS_TRAIN.get((row["size"], row["batch"]))
        if ref:
            out.update(speed_vs_authors=round(row["train_it_per_s"] / ref[0], 2),
                       memory_vs_authors=round(row["train_peak_mem_bytes"] / gb / ref[1], 2))
    if row.get("gen_seconds_per_volume"):
        ms = row["gen_seconds_per_volume"] * 1e3
        out.update(gen_ms=round(ms, 2), gen_batch=row["generate_batch"], gen_peak_gb=round(row["gen_peak_mem_bytes"] / gb, 2),
                   gen_tflops=round(row["gen_tflops"], 1) if row.get("gen_tflops") else None, tile_depth=row.get("tile_depth"))
        ref = AUTHORS_GENERATE.get(row["size"])
        if ref and row["generate_batch"] == 1 and not row.get("tile_depth"):
            out.update(gen_speed_vs_authors=round(ref[0] / ms, 2))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16", "bf16-cl"], choices=list(VARIANTS))
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 2])
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--generate-batch", type=int, default=1)
    p.add_argument("--tile-depth", type=int, default=0)
    p.add_argument("--preset-overrides", default="", help="extra JSON config overrides, e.g. '{\"hagan\": {\"r1_gamma\": 0}}'")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="per-phase time guard (0: none; on a GPU the first iteration includes cuDNN autotuning "
                        "and overpredicts, which skipped a 128^3 row once)")
    p.add_argument("--out", help="folder for the JSON")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_performance.py needs a CUDA GPU", file=sys.stderr)
        return 2
    extra = [json.loads(args.preset_overrides)] if args.preset_overrides else []
    rows, table = [], []
    for variant in args.variants:
        os.environ.pop("TORCHINDUCTOR_CUDAGRAPHS", None)
        os.environ.update(VARIANT_ENV.get(variant, {}))
        for row in run_bench(sizes=args.sizes, batch_sizes=args.batch_sizes, device="cuda", iterations=args.iterations,
                             warmup=args.warmup, generate_batch=args.generate_batch,
                             config_overrides=[VARIANTS[variant], *extra], max_seconds=args.max_seconds or None,
                             tile_depth=args.tile_depth):
            row["variant"] = variant
            rows.append(row)
            table.append(compare(row))
            print(json.dumps(table[-1]), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": os.environ.get("HAGAN_COMMIT"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "table": table, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = (f"perf_{'_'.join(args.variants)}_{'_'.join(map(str, args.sizes))}_b{'_'.join(map(str, args.batch_sizes))}"
                f"_g{args.generate_batch}_t{args.tile_depth}.json")
        (out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
