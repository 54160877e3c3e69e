"""HA-GAN's update rule: which module each step changes, slab alignment, encoders, losses and ablations."""

import math

import pytest
import torch

from hagan.config import build_config
from hagan.models import build_model
from hagan.training.losses import discriminator_loss, generator_loss, gradient_penalty, r1_penalty

TINY = {"size": 32, "width": 0.125, "latent_dim": 16}


def tiny_model(**changes):
    model_cfg = {**TINY, **changes.pop("model", {})}
    config = build_config(None, None, [{"model": model_cfg}, *({k: v} for k, v in changes.items())])
    torch.manual_seed(0)
    return build_model(config)


def batch(n=2, size=32, labels=None):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(n, 1, size, size, size, generator=g) * 2 - 1
    return {"image": image, "label": torch.tensor(labels if labels is not None else [-1] * n)}


def all_finite(logs):
    """Every logged value is a finite number (and there is at least one to check)."""
    return bool(logs) and all(math.isfinite(float(v)) for v in logs.values())


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(module, before):
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


def test_one_iteration_updates_every_module_and_logs_finite_losses():
    model = tiny_model()
    before = {name: snapshot(getattr(model, name)) for name in
              ("common", "low_gen", "high_gen", "high_disc", "low_disc", "slab_encoder", "global_encoder")}
    logs = model.train_step(batch(), 0, torch.Generator().manual_seed(0))
    assert {"loss/D_adv", "loss/G_adv", "loss/E_H", "loss/E_G"} <= set(logs)
    assert all_finite(logs), logs
    for name, params in before.items():
        assert changed(getattr(model, name), params), name


def test_encoder_steps_leave_generator_and_discriminators_alone():
    model = tiny_model()
    frozen = {name: snapshot(getattr(model, name)) for name in ("common", "low_gen", "high_gen", "high_disc", "low_disc")}
    encoders = {name: snapshot(getattr(model, name)) for name in ("slab_encoder", "global_encoder")}
    real = batch()["image"]
    model.encoder_steps(real, model.real_slab(real, 2), model.low_res(real), 2, None)
    for name, params in frozen.items():
        assert not changed(getattr(model, name), params), name
    for name, params in encoders.items():
        assert changed(getattr(model, name), params), name


def test_slab_encoder_loss_falls_on_a_fixed_batch():
    model = tiny_model()
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 32)] * 3, indexing="ij"))
    real = torch.where((grid**2).sum(0) < 0.5, 0.5, -1.0).expand(2, 1, 32, 32, 32).contiguous()
    slab = model.real_slab(real, 2)
    losses = [model.encoder_steps(real, slab, model.low_res(real), 2, None)["loss/E_H"] for _ in range(25)]
    assert losses[-1] < 0.9 * losses[0]


def test_discriminator_learns_to_separate_a_fixed_fake_from_reals():
    model = tiny_model()
    real = batch()["image"]
    r = model.normalised_start(0)
    slab, low = model.real_slab(real, 0), model.low_res(real)
    fake_slab, fake_low = torch.full_like(slab, -1.0), torch.full_like(low, -1.0)
    opt = model.optimizers()["D"]
    losses = []
    for _ in range(20):
        loss = discriminator_loss("bce", model.discriminate(slab, low, r)[0], model.discriminate(fake_slab, fake_low, r)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_real_slab_lines_up_with_generated_slab():
    model = tiny_model()
    volume = torch.arange(32.0).view(1, 1, 32, 1, 1).expand(1, 1, 32, 32, 32)
    start = 3
    slab = model.real_slab(volume, start)
    assert slab.shape[2] == 4
    assert slab[0, 0, :, 0, 0].tolist() == [12.0, 13.0, 14.0, 15.0]
    assert model.max_start * 4 == 32 * 7 // 8


def test_start_is_uniform_over_all_positions_and_deterministic_mode_cycles():
    model = tiny_model()
    rng = torch.Generator().manual_seed(0)
    seen = {model.sample_start(i, rng) for i in range(400)}
    assert seen == set(range(model.max_start + 1))
    det = tiny_model(hagan={"r_sampling": "deterministic"})
    assert [det.sample_start(i, rng) for i in range(9)] == [0, 1, 2, 3, 4, 5, 6, 7, 0]


def test_encode_slabs_matches_slab_by_slab():
    model = tiny_model().eval()
    real = batch()["image"]
    joint = model.encode_slabs(real)
    parts = torch.cat([model.slab_encoder(real[:, :, 4 * i : 4 * i + 4]) for i in range(8)], dim=2)
    torch.testing.assert_close(joint, parts)


def test_generated_volumes_have_full_size_and_follow_the_seed():
    model = tiny_model().eval()
    volumes = model.sample(3, torch.Generator().manual_seed(0))
    assert volumes.shape == (3, 1, 32, 32, 32) and volumes.dtype == torch.float32
    assert torch.isfinite(volumes).all()
    # G^H ends in tanh, so the range is given; what is not: the seed decides the volumes, each latent gives
    # its own volume, and an untrained generator is not saturated at +-1
    assert torch.equal(model.sample(3, torch.Generator().manual_seed(0)), volumes)
    assert not torch.allclose(model.sample(3, torch.Generator().manual_seed(1)), volumes)
    assert not torch.allclose(volumes[0], volumes[1]) and not torch.allclose(volumes[1], volumes[2])
    assert (volumes.abs() > 0.99).float().mean() < 0.1
    assert model.encode(volumes).shape == (3, 16)
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.zeros(1, 1, 16, 16, 16))


@pytest.mark.parametrize(
    "changes",
    [
        {"hagan": {"low_res_branch": False}},
        {"hagan": {"encoder": False}},
        {"model": {"num_classes": 3}},
        {"hagan": {"loss": "wgan-gp"}},
        {"hagan": {"minibatch_std": True}},
        {"hagan": {"r1_gamma": 1.0, "diffaug": "translation,cutout,brightness,contrast", "ada_target": 0.6}},
    ],
)
def test_variants_train(changes):
    model = tiny_model(**changes)
    labels = [0, 2] if model.num_classes else None
    logs = model.train_step(batch(labels=labels), 0, torch.Generator().manual_seed(0))
    assert {"loss/D_adv", "loss/G_adv"} <= logs.keys() and all_finite(logs), logs
    if not changes.get("hagan", {}).get("low_res_branch", True):
        assert model.low_gen is None and model.low_disc is None
    if not changes.get("hagan", {}).get("encoder", True):
        assert "loss/E_H" not in logs
    if model.num_classes:
        assert "loss/D_class" in logs and "loss/G_class" in logs


def test_losses_move_the_right_way():
    high, low = torch.tensor([3.0]), torch.tensor([-3.0])
    assert discriminator_loss("bce", high, low) < discriminator_loss("bce", low, high)
    assert generator_loss("bce", high) < generator_loss("bce", low)
    assert discriminator_loss("wgan-gp", high, low) < discriminator_loss("wgan-gp", low, high)
    with pytest.raises(ValueError, match="unknown loss"):
        generator_loss("hinge", high)


def test_penalties_on_a_linear_critic():
    w = torch.tensor([3.0, 4.0])

    def critic(x):
        return x.flatten(1) @ w

    real, fake = torch.randn(5, 2), torch.randn(5, 2)
    assert float(r1_penalty(critic, [real])) == pytest.approx(25.0)
    assert float(gradient_penalty(critic, [real], [fake])) == pytest.approx((5.0 - 1.0) ** 2)

    def two_input_critic(a, b):
        return a.flatten(1) @ w + 2 * b.flatten(1).sum(1)

    assert float(r1_penalty(two_input_critic, [real, torch.zeros(5, 3)])) == pytest.approx(25.0 + 12.0)


def test_update_skips_non_finite_loss_or_gradient_on_the_device_and_records_the_first():
    from hagan.models.base import DivergenceError

    model = tiny_model()
    before = snapshot(model.high_disc)
    real = batch()["image"]
    r = model.normalised_start(0)

    def logit():
        return model.discriminate(model.real_slab(real, 0), model.low_res(real), r)[0]

    model.update("D", logit().mean() * float("nan"))  # iteration 1: non-finite loss
    model.iteration = 4
    weight = model.high_disc.adv.parametrizations.weight.original
    poisoned = weight.sum()
    poisoned.register_hook(lambda g: g * float("inf"))  # a finite loss whose gradient is not
    model.update("D", logit().mean() + 0 * poisoned)
    assert not changed(model.high_disc, before)
    assert all(float(state["step"]) == 0 for state in model.optimizers()["D"].state.values())
    err = model.take_divergence()  # the first of the two, read once
    assert isinstance(err, DivergenceError) and err.iteration == 1
    assert err.describe() == "training diverged at iteration 1: non-finite loss in the D step (loss/D = nan)"
    assert model.take_divergence() is None
    poisoned = weight.sum()
    poisoned.register_hook(lambda g: g * float("inf"))
    model.update("D", logit().mean() + 0 * poisoned)
    err = model.take_divergence()
    err.noticed = 8
    assert err.describe().startswith("training diverged at iteration 5: non-finite gradient in the D step (loss/D = ")
    assert err.describe().endswith("(read back at iteration 8; no update with a non-finite value was applied)")
    assert not changed(model.high_disc, before)
    expected = logit().mean()
    assert float(model.update("D", expected)) == pytest.approx(float(expected.detach()))
    assert changed(model.high_disc, before)
    assert model.take_divergence() is None


def test_an_optimizer_that_cannot_skip_on_the_device_is_checked_on_the_host():
    from hagan.models.base import DivergenceError

    model = tiny_model()
    model.optimizers()["D"] = torch.optim.Adam(model.high_disc.parameters())
    before = snapshot(model.high_disc)
    real = batch()["image"]
    logit = model.discriminate(model.real_slab(real, 0), model.low_res(real), model.normalised_start(0))[0]
    with pytest.raises(DivergenceError, match=r"non-finite loss in the D step \(loss/D = nan\)"):
        model.update("D", logit.mean() * float("nan"))
    assert not changed(model.high_disc, before)


def test_train_latent_is_this_ranks_shard_of_the_global_batch():
    from hagan.training.distributed import DistContext

    model = tiny_model()
    whole = model.train_latent(4, torch.Generator().manual_seed(3))
    model.dist = DistContext(rank=1, world_size=2)
    rng = torch.Generator().manual_seed(3)
    torch.testing.assert_close(model.train_latent(2, rng), whole[2:])
    assert torch.equal(rng.get_state(), (g := torch.Generator().manual_seed(3), torch.randn(4, 16, generator=g))[0].get_state())


def test_minibatch_stddev_tells_a_collapsed_batch_from_a_varied_one():
    from hagan.models.layers import minibatch_stddev

    same = torch.ones(4, 3, 2, 2, 2)
    varied = torch.randn(4, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    assert minibatch_stddev(same).shape == (4, 4, 2, 2, 2)
    assert float(minibatch_stddev(same)[:, -1].abs().max()) == 0.0
    assert float(minibatch_stddev(varied)[:, -1].min()) > 0.5
    model = tiny_model(hagan={"minibatch_std": True})
    r = model.normalised_start(0)
    slab = torch.zeros(2, 1, 4, 32, 32)
    low = torch.zeros(2, 1, 8, 8, 8)
    twins = model.discriminate(slab, low, r)[0]
    mixed = model.discriminate(torch.stack([slab[0], slab[1] + 1]), torch.stack([low[0], low[1] + 1]), r)[0]
    assert not torch.allclose(twins[0], mixed[0])
