"""HA-GAN's training phases: each updates only its own modules, and each combines D^H and D^L, and E^G's
two reconstructions, the way its loss says."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hagan.config import build_config
from hagan.models import build_model
from hagan.training.losses import discriminator_loss, generator_loss

DEMO_SIZE = {"size": 32, "width": 0.25, "latent_dim": 128}
GENERATOR = ("common", "low_gen", "high_gen")
DISCRIMINATORS = ("high_disc", "low_disc")
ENCODERS = ("slab_encoder", "global_encoder")

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded_model(model=None, **sections):
    overrides = [{"model": {**DEMO_SIZE, **(model or {})}}, {"optim": {"batch_size": 2}},
                 *({k: v} for k, v in sections.items())]
    torch.manual_seed(0)
    return build_model(build_config(None, None, overrides))


def first_step(model, labels=None):
    """The phases' shared inputs for iteration 0 of a seeded random batch, and the generator they draw from."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 1, 32, 32, 32, generator=g) * 2 - 1
    batch = {"image": image, "label": torch.tensor(labels if labels is not None else [-1, -1])}
    rng = torch.Generator().manual_seed(0)
    return model.step_inputs(batch, 0, rng), rng


def parameters(model):
    return {name: [p.detach().clone() for p in getattr(model, name).parameters()]
            for name in GENERATOR + DISCRIMINATORS + ENCODERS}


def changed_modules(model, before):
    """The modules any of whose parameters differ, bit for bit, from ``before``."""
    return {name for name, params in before.items()
            if any(not torch.equal(p, q) for p, q in zip(getattr(model, name).parameters(), params))}


@pytest.mark.parametrize("loss", [{}, {"loss": "wgan-gp", "disc_losses": "separate", "lambda_recon_generator": 1.0}])
def test_each_phase_changes_its_own_modules_and_no_others(loss):
    # the wgan-gp configuration runs G through the encoders and D through its gradient penalty
    model = seeded_model(hagan=loss)
    step, rng = first_step(model)
    phases = [
        (lambda: model._discriminator_phase(step, 0, rng), set(DISCRIMINATORS)),
        (lambda: model._generator_phase(step, rng), set(GENERATOR)),
        (lambda: model._slab_encoder_phase(step), {"slab_encoder"}),
        (lambda: model._global_encoder_phase(step), {"global_encoder"}),
    ]
    for run, own in phases:
        before = parameters(model)
        run()
        assert changed_modules(model, before) == own


def recording_inputs(module, calls):
    """Append to ``calls`` the inputs of every call of ``module``, detached, until the handle is removed."""
    return module.register_forward_pre_hook(lambda _, args: calls.append([a.detach().clone() for a in args]))


def direct_logits(model, phase):
    """Run ``phase`` and call copies of D^H and D^L, taken before it, on the inputs it gave them, in the same
    order (spectral normalisation's power iteration moves with every call): (logit, class logits) per call."""
    copies = {name: copy.deepcopy(getattr(model, name)) for name in DISCRIMINATORS}
    calls = {name: [] for name in DISCRIMINATORS}
    handles = [recording_inputs(getattr(model, name), calls[name]) for name in DISCRIMINATORS]
    logs = phase()
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        outputs = {name: [copies[name](*args) for args in calls[name]] for name in DISCRIMINATORS}
    return logs, outputs["high_disc"], outputs["low_disc"]


def averaged(high, low):
    return (high[0] + low[0]) / 2, (high[1] + low[1]) / 2


@pytest.mark.parametrize("kind", ["bce", "wgan-gp"])
def test_averaged_losses_use_the_mean_of_both_discriminators_logits(kind):
    model = seeded_model({"num_classes": 2}, hagan={"loss": kind, "disc_losses": "averaged"})
    step, rng = first_step(model, labels=[1, 0])
    labels = step.labels

    logs, high, low = direct_logits(model, lambda: model._discriminator_phase(step, 0, rng))
    assert len(high) == len(low) == (2 if kind == "bce" else 3)  # real, fake (and the gradient penalty's mix)
    real, fake = averaged(high[0], low[0]), averaged(high[1], low[1])
    torch.testing.assert_close(logs["loss/D_adv"], discriminator_loss(kind, real[0], fake[0]))
    torch.testing.assert_close(logs["loss/D_class"], F.cross_entropy(real[1], labels))
    torch.testing.assert_close(logs["D/real_logit"], real[0].mean())
    # D's class term enters its loss with weight 1 (G's with hagan.lambda_class)
    penalty = model.config.hagan.gp_lambda * logs["loss/D_gp"] if kind == "wgan-gp" else 0.0
    expected = logs["loss/D_adv"] + penalty + logs["loss/D_class"]
    assert float(logs["loss/D"]) == pytest.approx(float(expected), rel=1e-6)

    logs, high, low = direct_logits(model, lambda: model._generator_phase(step, rng))
    fake = averaged(high[0], low[0])
    torch.testing.assert_close(logs["loss/G_adv"], generator_loss(kind, fake[0]))
    torch.testing.assert_close(logs["loss/G_class"], F.cross_entropy(fake[1], labels))


def test_separate_losses_weight_one_term_per_discriminator():
    weights = {"weight_high": 0.7, "weight_low": 0.2}
    model = seeded_model({"num_classes": 2}, hagan={"disc_losses": "separate", **weights})
    step, rng = first_step(model, labels=[0, 1])
    labels = step.labels

    def weighted(term):
        return weights["weight_high"] * term(0) + weights["weight_low"] * term(1)

    logs, high, low = direct_logits(model, lambda: model._discriminator_phase(step, 0, rng))
    real, fake = (high[0], low[0]), (high[1], low[1])
    adversarial = weighted(lambda i: discriminator_loss("bce", real[i][0], fake[i][0]))
    torch.testing.assert_close(logs["loss/D_adv"], adversarial)
    torch.testing.assert_close(logs["loss/D_class"], weighted(lambda i: F.cross_entropy(real[i][1], labels)))

    logs, high, low = direct_logits(model, lambda: model._generator_phase(step, rng))
    fake = (high[0], low[0])
    torch.testing.assert_close(logs["loss/G_adv"], weighted(lambda i: generator_loss("bce", fake[i][0])))
    torch.testing.assert_close(logs["loss/G_class"], weighted(lambda i: F.cross_entropy(fake[i][1], labels)))


@pytest.mark.parametrize("low_res_branch", [True, False])
def test_global_encoder_loss_averages_the_slab_and_image_l1_and_reduces_codes_per_dimension(low_res_branch):
    model = seeded_model(hagan={"low_res_branch": low_res_branch, "lambda_latent_prior": 1.0})
    step, _ = first_step(model)
    with torch.no_grad():
        codes = model.global_encoder(model.encode_slabs(step.real))
        slab, low = model.generate_parts(codes, step.start, None)
    slab_l1 = (slab - step.real_slab).abs().mean()
    logs = model._global_encoder_phase(step)
    if low_res_branch:
        # the mean of the two L1s, each over its own voxels: the 8^3 image weighs as much as the 4x32x32 slab
        image_l1 = (low - step.real_low).abs().mean()
        torch.testing.assert_close(logs["loss/E_G"], (slab_l1 + image_l1) / 2)
        pooled = torch.cat([(slab - step.real_slab).abs().flatten(), (low - step.real_low).abs().flatten()]).mean()
        assert abs(float(pooled - logs["loss/E_G"])) > 0.01
    else:
        torch.testing.assert_close(logs["loss/E_G"], slab_l1)
    # the prior term: the squared mean and the second moment's distance from 1, each over the batch, then
    # averaged over the code's dimensions
    first = codes.mean(0).pow(2).mean()
    second = (codes.pow(2).mean(0) - 1).pow(2).mean()
    torch.testing.assert_close(logs["loss/E_G_prior"], first + second)
