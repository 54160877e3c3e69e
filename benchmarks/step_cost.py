"""What one HA-GAN training iteration costs the host: synchronisations, dispatched operations, peak memory.

Counted by a dispatch mode on CPU, so the figures are the same on any machine: a host synchronisation is a
tensor read back as a Python number (``aten._local_scalar_dense`` behind ``.item()``, ``float(t)``,
``bool(t)``; ``aten.is_nonzero`` and ``aten.item`` where they dispatch), which on a GPU drains the launch
queue. Each measured iteration follows a warm-up one (optimizer states exist); with ``--iterations N`` the
figures are per iteration, the largest of N in a row (ADA reads its statistic every 4th iteration).

    python benchmarks/step_cost.py --preset paper-128 --size 32 64 --width 1.0
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from hagan.config import build_config
from hagan.models import build_model
from hagan.models.patch.model import TensorMemoryPeak

MIB = 2**20
SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item")


class StepCost(TensorMemoryPeak):
    """TensorMemoryPeak that also counts dispatched operations and host synchronisations by name."""

    def __enter__(self) -> "StepCost":
        self.ops = self.syncs = 0
        self.sync_names: dict[str, int] = {}
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += 1
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.syncs += 1
            self.sync_names[name] = self.sync_names.get(name, 0) + 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def build(preset: str, size: int, width: float, batch: int, overrides: list[dict[str, Any]]):
    config = build_config(preset, None, [{"model": {"size": size, "width": width}, "optim": {"batch_size": batch},
                                          "train": {"device": "cpu"}}, *overrides])
    torch.manual_seed(0)
    return build_model(config)


def step_cost(preset: str, size: int, width: float = 1.0, batch: int = 4, iterations: int = 1,
              overrides: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Syncs, ops and peak MiB of the costliest of ``iterations`` training iterations after a warm-up."""
    model = build(preset, size, width, batch, overrides or [])
    g = torch.Generator().manual_seed(0)
    classes = model.config.model.num_classes
    labels = torch.arange(batch) % classes if classes else torch.full((batch,), -1)
    data = {"image": torch.rand(batch, 1, size, size, size, generator=g) * 2 - 1, "label": labels}
    rng = torch.Generator().manual_seed(0)
    model.train_step(dict(data), 0, rng)
    worst: dict[str, Any] = {"syncs": 0, "ops": 0, "peak_mib": 0.0, "sync_ops": {}}
    for iteration in range(1, iterations + 1):
        with StepCost() as cost:
            model.train_step(dict(data), iteration, rng)
        if cost.syncs >= worst["syncs"]:
            worst["sync_ops"] = cost.sync_names
        worst["syncs"] = max(worst["syncs"], cost.syncs)
        worst["ops"] = max(worst["ops"], cost.ops)
        worst["peak_mib"] = max(worst["peak_mib"], round(cost.peak / MIB, 1))
    return {"preset": preset, "size": size, "width": width, "batch": batch, "iterations": iterations, **worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper-128")
    parser.add_argument("--size", nargs="+", type=int, default=[32])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=1, help="measured iterations after the warm-up")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                        help="a config override, e.g. --set hagan.r1_gamma=1.0")
    args = parser.parse_args()
    overrides = []
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        overrides.append({section: {name: json.loads(value)}})
    for size in args.size:
        result = step_cost(args.preset, size, args.width, args.batch_size, args.iterations, overrides)
        print(json.dumps({**result, "set": args.set}), flush=True)


if __name__ == "__main__":
    main()
