#!/usr/bin/env python
"""Memory and speed of HA-GAN training and generation per resolution and batch size; prints JSON.

    python benchmarks/bench_hagan.py --sizes 32 64 --batch-sizes 2 4 --device cpu --iterations 3 --out runs/bench

Every performance figure in docs/benchmarks.md comes from this script (or `hagan bench`, the same code):
it prints one JSON document (the rows of ``hagan.evaluation.bench.run_bench``) on stdout, progress on stderr, and
with --out also writes bench.json and bench.png (memory and speed against resolution, like the paper's Fig. 6).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from hagan.config import MODEL_SIZES, parse_assignment
from hagan.evaluation.bench import run_bench, save_bench
from hagan.models import MODELS


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["hagan"], help=f"models to measure (available: {', '.join(MODELS)})")
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128], choices=MODEL_SIZES)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 4])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations (and generations) per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first; the first also counts FLOPs")
    p.add_argument("--generate-batch", type=int, default=1, help="volumes per generation call")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = the paper's networks)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, e.g. model.latent_dim=128 (repeatable)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="time limit per configuration and phase (0: none)")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="refuse configurations predicted above this (default on CPU: 90%% of available RAM)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the measuring process")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process instead of fresh children")
    p.add_argument("--out", help="also write OUT/bench.json and OUT/bench.png")
    args = p.parse_args(argv)
    rows = run_bench(
        models=args.models, sizes=args.sizes, batch_sizes=args.batch_sizes, device=args.device,
        iterations=args.iterations, warmup=args.warmup, generate_batch=args.generate_batch, width=args.width,
        config_overrides=[parse_assignment(s) for s in args.set], isolate=not args.no_isolate, progress=True,
        max_seconds=args.max_seconds or None,
        memory_limit_bytes=int(args.memory_limit_gb * 2**30) if args.memory_limit_gb else None, threads=args.threads,
    )
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "commit": git_commit(), "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "python": platform.python_version(), "torch": torch.__version__, "rows": rows}
    if args.out:
        json_path, png_path = save_bench(rows, args.out)
        result["files"] = [str(json_path), str(png_path)]
    print(json.dumps(result, indent=2))
    return 1 if any(str(r.get("status", "")).startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
