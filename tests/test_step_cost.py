"""The host-synchronisation budget of one HA-GAN training iteration (benchmarks/step_cost.py's counter)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("step_cost", Path(__file__).parents[1] / "benchmarks" / "step_cost.py")
step_cost = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(step_cost)

MAX_SYNCS = 2  # the slab start, and ADA's statistic every 4th iteration
ADA = {"hagan": {"diffaug": "translation,cutout", "ada_target": 0.6, "r1_gamma": 1.0}}


@pytest.mark.parametrize("preset, overrides", [
    ("paper-128", []),
    ("paper-512", []),
    ("small-data-128", []),
    ("demo", []),
    ("paper-128", [ADA]),
    ("paper-128", [{"model": {"num_classes": 3}, "hagan": {"r1_per_voxel": 1e-4, "r1_every": 2}}]),
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


def test_recomputing_high_res_activations_gives_the_same_step_in_less_memory():
    """hagan.recompute_activations (paper-512's setting) changes memory only: the same weights after a
    step, bitwise on CPU, and a lower peak."""
    import torch

    from hagan.models.patch.model import TensorMemoryPeak

    g = torch.Generator().manual_seed(0)
    data = {"image": torch.rand(2, 1, 64, 64, 64, generator=g) * 2 - 1, "label": torch.full((2,), -1)}
    weights, peaks = [], []
    for recompute in (False, True):
        model = step_cost.build("paper-128", 64, 0.25, 2, [{"model": {"latent_dim": 16},
                                                            "hagan": {"recompute_activations": recompute}}])
        assert model.high_gen.recompute is recompute
        rng = torch.Generator().manual_seed(0)
        model.train_step(dict(data), 0, rng)
        with TensorMemoryPeak() as probe:
            model.train_step(dict(data), 1, rng)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        peaks.append(probe.peak)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert peaks[1] < 0.9 * peaks[0], peaks

