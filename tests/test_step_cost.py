"""The host-synchronisation budget of one HA-GAN training iteration (benchmarks/step_cost.py's counter)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("step_cost", Path(__file__).parents[1] / "benchmarks" / "step_cost.py")
step_cost = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(step_cost)

MAX_SYNCS = 2  # the slab start, and ADA's statistic every 4th iteration
ADA = {"loss": {"diffaug": "translation,cutout", "ada_target": 0.6, "r1_gamma": 1.0}}


@pytest.mark.parametrize("preset, overrides", [
    ("paper-128", []),
    ("paper-512", []),
    ("small-data-128", []),
    ("demo", []),
    ("paper-128", [ADA]),
    ("paper-128", [{"model": {"num_classes": 3}, "loss": {"r1_per_voxel": 1e-4, "r1_every": 2}}]),
])
def test_a_training_iteration_reads_back_at_most_twice(preset, overrides):
    cost = step_cost.step_cost(preset, 32, width=0.125, batch=2, iterations=4, overrides=overrides)
    assert cost["syncs"] <= MAX_SYNCS, cost["sync_ops"]


def test_the_counter_sees_a_read_back():
    import torch

    with step_cost.StepCost() as cost:
        float(torch.ones(3).sum())
        bool(torch.ones(()) > 0)
    assert cost.syncs == 2 and cost.ops >= 4
