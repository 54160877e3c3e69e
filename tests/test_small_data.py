"""HA-GAN's small-data options: slabs trained as they are sampled, the generator's moving average, one loss
per discriminator, R1 scaled by voxels and applied lazily, and G trained through the encoders."""

import math

import pytest
import torch

from hagan.config import build_config
from hagan.errors import HaganError
from hagan.models import build_model
from hagan.models.hagan import model as hagan_module
from hagan.models.hagan.model import StepInputs
from hagan.models.hagan.tiling import tiled_high_res
from hagan.training.losses import latent_moment_penalty

TINY = {"width": 0.125, "latent_dim": 16}


def tiny_model(size=32, **sections):
    model_cfg = {"size": size, **TINY, **sections.pop("model", {})}
    config = build_config(None, None, [{"model": model_cfg}, *({k: v} for k, v in sections.items())])
    torch.manual_seed(0)
    return build_model(config)


def batch(n=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 1, size, size, size, generator=g) * 2 - 1, "label": torch.tensor([-1] * n)}


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def moved(module, before):
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


def assert_slabs_match_full_volume(model, z):
    """The training slab at every start equals that slab of the untiled and of the tiled full volume."""
    model.sample_from_ema = False
    with torch.no_grad():
        features = model.common(z, None)
        full = model.high_gen(features)
        tiled = tiled_high_res(model.high_gen, features, 3)
        torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.decode(z), full, rtol=0, atol=1e-5)
        for start in range(model.max_start + 1):
            slab, _ = model.generate_parts(z, start, None)
            torch.testing.assert_close(slab, model.real_slab(full, start), rtol=0, atol=1e-5, msg=f"start {start}")


@pytest.mark.parametrize("upsample", ["nearest", "trilinear"])
@pytest.mark.parametrize("size", [32, 64])
def test_consistent_slabs_equal_full_generation_at_every_start_before_and_after_training(size, upsample):
    model = tiny_model(size, hagan={"consistent_slabs": True, "upsample": upsample})
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    assert_slabs_match_full_volume(model, z)
    rng = torch.Generator().manual_seed(0)
    for iteration in range(2):
        model.train_step(batch(size=size, seed=iteration), iteration, rng)
    assert_slabs_match_full_volume(model, z)
    assert model.slab_mismatch(z) < 1e-6


def test_paper_slabs_differ_from_full_generation():
    """The paper's G^H sees the slab alone: zero padding at its ends and GroupNorm statistics of the slab."""
    model = tiny_model(64)
    assert model.high_gen.norm == "group"
    assert model.slab_mismatch(torch.randn(2, 16, generator=torch.Generator().manual_seed(5))) > 0.02


def test_consistent_generator_has_the_papers_parameter_count():
    paper, consistent = tiny_model(64), tiny_model(64, hagan={"consistent_slabs": True})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(consistent.high_gen) == count(paper.high_gen)
    assert paper.state_dict().keys() == consistent.state_dict().keys()


# ----- moving average of G -------------------------------------------------------------------------
def test_ema_half_life_is_counted_in_images():
    model = tiny_model(hagan={"ema_kimg": 0.008, "ema_rampup": 0.0}, optim={"batch_size": 4})
    # a half-life of 8 images is two updates of batch 4
    assert model.ema_beta(0) ** 2 == pytest.approx(0.5)
    ramped = tiny_model(hagan={"ema_kimg": 10.0, "ema_rampup": 0.5}, optim={"batch_size": 4})
    # early on the half-life is half the images seen: 2 images at the first update, 200 at the 100th
    assert ramped.ema_beta(0) == pytest.approx(0.5 ** (4 / 2))
    assert ramped.ema_beta(99) == pytest.approx(0.5 ** (4 / 200))


def test_ema_follows_the_generator_and_is_what_sampling_uses():
    model = tiny_model(hagan={"ema_kimg": 0.008, "ema_rampup": 0.0}, optim={"batch_size": 4})
    assert model.ema is not None and not any(p.requires_grad for p in model.ema.parameters())
    assert {"common", "high_gen"} <= set(model.ema)
    start = {name: params(averaged) for name, averaged in model.ema.items()}
    model.train_step(batch(), 0, torch.Generator().manual_seed(0))
    beta = model.ema_beta(0)
    for name, before in start.items():  # every averaged module, every parameter
        raw = list(getattr(model, name).parameters())
        assert len(raw) == len(before) > 0, name
        for averaged, old, new in zip(model.ema[name].parameters(), before, raw):
            torch.testing.assert_close(averaged, beta * old + (1 - beta) * new, msg=name)
    assert all(p.requires_grad for p in model.common.parameters())
    assert not any(p.requires_grad for p in model.ema.parameters())
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    from_ema = model.decode(z)
    model.sample_from_ema = False
    from_raw = model.decode(z)
    assert not torch.allclose(from_ema, from_raw)
    with torch.no_grad():
        torch.testing.assert_close(from_ema, model.ema["high_gen"](model.ema["common"](z, None)))


def test_ema_weights_are_saved_beside_the_raw_ones_and_resume_exactly(tiny_ct_cache, tmp_path):
    from hagan.api import load_run
    from hagan.training.trainer import train

    def config(iterations):
        return build_config(None, None, [
            {"model": {"size": 32, **TINY}}, {"hagan": {"consistent_slabs": True, "ema_kimg": 0.01}},
            {"optim": {"batch_size": 2}}, {"data": {"cache": str(tiny_ct_cache)}},
            {"train": {"iterations": iterations, "checkpoint_every": 1, "sample_every": 1000, "deterministic": True}}])

    train(config(2), tmp_path / "straight", progress=False)
    train(config(1), tmp_path / "split", progress=False)
    train(config(2), tmp_path / "split", resume=True, progress=False)
    runs = [load_run(tmp_path / name, device="cpu", sample_from="raw") for name in ("straight", "split")]
    for a, b in zip(*(r.model.state_dict().values() for r in runs)):
        assert torch.equal(a, b)
    assert any(key.startswith("ema.") for key in runs[0].model.state_dict())
    averaged = load_run(tmp_path / "straight", device="cpu")
    assert averaged.uses_ema and not runs[0].uses_ema
    assert not torch.equal(torch.from_numpy(averaged.generate(1)), torch.from_numpy(runs[0].generate(1)))


def test_asking_for_an_average_the_run_does_not_keep_is_an_error(tiny_ct_cache, tmp_path):
    from hagan.api import load_run
    from hagan.training.trainer import train

    config = build_config(None, None, [{"model": {"size": 32, **TINY}}, {"optim": {"batch_size": 2}},
                                       {"data": {"cache": str(tiny_ct_cache)}}, {"train": {"iterations": 1}}])
    train(config, tmp_path / "run", progress=False)
    assert not load_run(tmp_path / "run", device="cpu").uses_ema
    with pytest.raises(HaganError, match="keeps no averaged generator"):
        load_run(tmp_path / "run", device="cpu", sample_from="ema")
    with pytest.raises(HaganError, match="sample_from"):
        load_run(tmp_path / "run", device="cpu", sample_from="average")


# ----- one loss per discriminator -------------------------------------------------------------------
def test_separate_losses_weigh_each_discriminator():
    model = tiny_model(hagan={"disc_losses": "separate", "weight_low": 0.0})
    low_disc, high_disc = params(model.low_disc), params(model.high_disc)
    logs = model.train_step(batch(), 0, torch.Generator().manual_seed(0))
    assert not moved(model.low_disc, low_disc), "D^L has weight 0: no gradient may reach it"
    assert moved(model.high_disc, high_disc)
    assert logs and all(math.isfinite(float(v)) for v in logs.values()), logs


def test_separate_losses_sum_the_terms_the_average_mixes():
    averaged = tiny_model()
    separate = tiny_model(hagan={"disc_losses": "separate", "weight_high": 0.5, "weight_low": 2.0})
    real = batch()["image"]
    r = averaged.normalised_start(0)
    slab, low = averaged.real_slab(real, 0), averaged.low_res(real)
    (one,) = averaged.head_logits(slab, low, r)
    high, low_term = separate.head_logits(slab, low, r)
    torch.testing.assert_close(one[0], (high[0] + low_term[0]) / 2)
    assert (high[2], low_term[2]) == (0.5, 2.0)


# ----- R1 scaled by voxels, lazy ------------------------------------------------------------------------
def step_inputs(model, real, start=0):
    return StepInputs(real, model.real_slab(real, start), model.low_res(real), start, model.normalised_start(start),
                      None, None, torch.Generator().manual_seed(0))


def test_r1_gamma_scales_with_the_voxels_each_discriminator_sees(monkeypatch):
    model = tiny_model(64, hagan={"disc_losses": "separate", "r1_per_voxel": 0.0002}, optim={"batch_size": 4})
    slab_voxels, low_voxels = model.input_voxels
    assert (slab_voxels, low_voxels) == (8 * 64 * 64, 16**3)
    captured = {}
    original = hagan_module.r1_penalty

    def spy(critic, reals):
        captured[tuple(reals[0].shape[2:])] = value = original(critic, reals)
        return value

    monkeypatch.setattr(hagan_module, "r1_penalty", spy)
    step = step_inputs(model, batch(4, 64)["image"])
    aug = (step.real_slab, step.real_low)
    total = model.penalties(aug, aug, step, 0, {})
    gamma_high, gamma_low = 0.0002 * slab_voxels / 4, 0.0002 * low_voxels / 4
    expected = gamma_high / 2 * captured[(8, 64, 64)] + gamma_low / 2 * captured[(16, 16, 16)]
    torch.testing.assert_close(total, expected)


def test_lazy_r1_runs_every_n_steps_scaled_by_n(monkeypatch):
    model = tiny_model(hagan={"r1_gamma": 1.0, "r1_every": 4})
    calls = []
    original = hagan_module.r1_penalty
    monkeypatch.setattr(hagan_module, "r1_penalty", lambda critic, reals: calls.append(1) or original(critic, reals))
    step = step_inputs(model, batch()["image"])
    aug = (step.real_slab, step.real_low)
    totals = [model.penalties(aug, aug, step, i, {}) for i in range(8)]
    assert len(calls) == 2
    assert [float(t.detach()) > 0 for t in totals] == [True, False, False, False, True, False, False, False]
    eager = tiny_model(hagan={"r1_gamma": 1.0})
    torch.testing.assert_close(totals[0], 4 * eager.penalties(aug, aug, step, 0, {}))


def test_r1_is_computed_in_float32_under_bf16_autocast():
    model = tiny_model(hagan={"r1_gamma": 1.0}, train={"precision": "bf16"})
    step = step_inputs(model, batch()["image"])
    with model.autocast():
        total = model.penalties((step.real_slab, step.real_low), (step.real_slab, step.real_low), step, 0, {})
    assert total.dtype == torch.float32


# ----- G trained through the encoders, codes kept on the prior ------------------------------------------
def test_reconstruction_trains_the_generator_through_frozen_encoders():
    silent = {"disc_losses": "separate", "weight_high": 0.0, "weight_low": 0.0}
    without = tiny_model(hagan=silent)
    with_recon = tiny_model(hagan={**silent, "lambda_recon_generator": 1.0})
    logs = {}
    for model in (without, with_recon):
        before = {name: params(getattr(model, name)) for name in ("common", "high_gen", "slab_encoder", "global_encoder")}
        logs[model] = model._generator_phase(step_inputs(model, batch()["image"], 1), torch.Generator().manual_seed(0))
        assert not moved(model.slab_encoder, before["slab_encoder"])
        assert not moved(model.global_encoder, before["global_encoder"])
        assert moved(model.common, before["common"]) == (model is with_recon)
    assert "loss/G_recon" in logs[with_recon] and "loss/G_recon" not in logs[without]


def test_reconstruction_loss_of_the_generator_falls_on_a_fixed_batch():
    model = tiny_model(hagan={"disc_losses": "separate", "weight_high": 0.0, "weight_low": 0.0,
                              "lambda_recon_generator": 1.0})
    fixed = batch()
    rng = torch.Generator().manual_seed(0)
    losses = [model.train_step(dict(fixed), i, rng)["loss/G_recon"] for i in range(15)]
    assert losses[-1] < 0.8 * losses[0]


def test_moment_penalty_tells_prior_codes_from_collapsed_ones():
    prior = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    assert float(latent_moment_penalty(prior)) < 0.05
    assert float(latent_moment_penalty(torch.full((256, 64), 0.1))) > 0.9
    assert float(latent_moment_penalty(prior * 3 + 1)) > 10


def test_prior_term_pulls_encoded_codes_towards_the_prior():
    model = tiny_model(hagan={"lambda_latent_prior": 10.0, "lambda_recon_global": 0.0})
    real = batch(4)["image"]
    penalties = [model.encoder_steps(real, model.real_slab(real, 0), model.low_res(real), 0, None)["loss/E_G_prior"]
                 for _ in range(12)]
    assert penalties[-1] < 0.25 * penalties[0]


# ----- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sections, message", [
    ({"hagan": {"disc_losses": "sum"}}, "hagan.disc_losses"),
    ({"hagan": {"r1_gamma": 1.0, "r1_per_voxel": 0.0002}}, "not both"),
    ({"hagan": {"r1_every": 0}}, "hagan.r1_every"),
    ({"hagan": {"weight_low": -1.0}}, "hagan.weight_low must not be negative"),
    ({"hagan": {"lambda_recon_generator": 1.0, "encoder": False}}, "need hagan.encoder"),
    ({"hagan": {"ema_kimg": -1.0}}, "hagan.ema_kimg"),
    ({"hagan": {"upsample": "cubic"}}, "hagan.upsample must be"),
    ({"hagan": {"upsample": "trilinear"}}, "needs hagan.consistent_slabs"),
    ({"model": {"name": "wgan-gp"}, "hagan": {"ema_kimg": 1.0}}, "hagan.ema_kimg is an option of hagan; model .wgan-gp. does not use it"),
])
def test_bad_small_data_options_are_refused(sections, message):
    with pytest.raises(HaganError, match=message):
        build_config(None, None, [sections])



def test_paper_presets_keep_the_papers_training_and_small_data_turns_the_fixes_on():
    for name in ("paper-128", "paper-256", "paper-512"):
        c = build_config(name)
        assert (c.hagan.consistent_slabs, c.hagan.upsample, c.hagan.loss, c.hagan.disc_losses) == (
            False, "nearest", "bce", "averaged")
        assert (c.hagan.lambda_recon_generator, c.hagan.lambda_latent_prior, c.hagan.ema_kimg) == (0, 0, 0)
    for name in ("small-data-128", "demo"):
        c = build_config(name)
        assert c.hagan.consistent_slabs and c.hagan.upsample == "trilinear" and c.hagan.disc_losses == "separate"
        assert c.hagan.lambda_recon_generator > 0 and c.hagan.lambda_latent_prior > 0 and c.hagan.ema_kimg > 0
    assert build_config("demo").model.size == 32 and build_config("small-data-128").model.size == 128


def test_small_data_preset_trains_and_samples_from_its_average():
    model = tiny_model(**{k: v for k, v in build_config("demo").to_dict().items() if k in ("hagan", "optim", "train")})
    rng = torch.Generator().manual_seed(0)
    before = params(model.ema)
    for i in range(2):
        model.train_step(batch(), i, rng)
    assert moved(model.ema, before) and model.sample_from_ema
    assert_slabs_match_full_volume(model, torch.randn(2, TINY["latent_dim"]))
