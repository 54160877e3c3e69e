"""The 3D baselines (WGAN-GP, alpha-GAN, VAE-GAN): parameter counts against the published layouts,
shapes, the gradient penalty on critics whose gradient is known, losses moving the right way, and
training, generating and encoding through the command line."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hagan.cli.commands import main
from hagan.config import build_config
from hagan.errors import HaganError
from hagan.models import build_model
from hagan.models.baselines.model import VAEGAN, WGANGP, AlphaGAN
from hagan.training.losses import wasserstein_critic_loss

TINY_FLAGS = ["--set", "model.width=0.125", "--set", "model.latent_dim=16", "--set", "train.sample_every=2",
              "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]


def config(name: str, size: int = 32, **sections):
    overrides = [{"model": {"name": name, "size": size, "width": 0.125, "latent_dim": 16}},
                 {"optim": {"batch_size": 2}}, *({k: v} for k, v in sections.items())]
    return build_config(None, None, overrides)


def tiny(name: str, **sections):
    torch.manual_seed(0)
    return build_model(config(name, **sections))


def cube() -> torch.Tensor:
    """Two volumes: a bright cube in a dark background."""
    x = torch.full((2, 1, 32, 32, 32), -1.0)
    x[:, :, 8:24, 8:24, 8:24] = 0.5
    return x


def batch() -> dict[str, torch.Tensor]:
    return {"image": cube(), "label": torch.full((2,), -1), "index": torch.arange(2), "seed": torch.arange(2)}


def counts(preset: str, **baseline) -> dict[str, int]:
    overrides = [{"baseline": baseline}] if baseline else []
    with torch.device("meta"):
        model = build_model(build_config(preset, None, overrides))
    return {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}


# ----- architecture ------------------------------------------------------------------------------
def conv(cin, cout, k, bias=True):
    return cin * cout * k**3 + (cout if bias else 0)


def batch_norm(c):
    return 2 * c


def linear(cin, cout):
    return cin * cout + cout


LATENT = 1000  # Kwon et al.'s latent size, the presets'
# 64^3 (Kwon et al.): G 1000 -> 512 @4^3 -> 256 @8^3 -> 128 @16^3 -> 64 @32^3 -> 1 @64^3
GENERATOR_64 = (conv(LATENT, 512, 4, bias=False) + batch_norm(512) + conv(512, 256, 3, False) + batch_norm(256)
                + conv(256, 128, 3, False) + batch_norm(128) + conv(128, 64, 3, False) + batch_norm(64)
                + conv(64, 1, 3, False))
# 128^3 (HA-GAN's authors' 128^3 baseline): one more level, 1024 channels at 4^3
GENERATOR_128 = (conv(LATENT, 1024, 4, False) + batch_norm(1024) + conv(1024, 512, 3, False) + batch_norm(512)
                 + GENERATOR_64 - conv(LATENT, 512, 4, False) - batch_norm(512))
# critic: 1 -> 64 -> 128 -> 256 -> 512 (stride-2 4^3 convolutions, 64^3 -> 4^3), then a 4^3 convolution
TRUNK_64 = conv(1, 64, 4) + conv(64, 128, 4) + conv(128, 256, 4) + conv(256, 512, 4)
TRUNK_BN_64 = TRUNK_64 + batch_norm(128) + batch_norm(256) + batch_norm(512)
CODE_CRITIC = linear(LATENT, 4096) + linear(4096, 4096) + linear(4096, 1)
VAE_HEAD = linear(512 * 4**3, 2048) + batch_norm(2048) + linear(2048, LATENT)


def test_parameter_counts_follow_the_published_layouts():
    assert GENERATOR_64 == 37_416_512 and GENERATOR_128 == 84_342_336
    assert counts("wgan-gp-64") == {"generator": GENERATOR_64, "critic": TRUNK_64 + conv(512, 1, 4)}
    assert counts("alpha-gan-64") == {
        "generator": GENERATOR_64, "critic": TRUNK_64 + conv(512, 1, 4),
        "encoder": TRUNK_BN_64 + conv(512, LATENT, 4), "code_critic": CODE_CRITIC,
    }
    # Kwon et al.'s BatchNorm critics
    batch = counts("alpha-gan-64", critic_norm="batch")
    assert batch["critic"] == TRUNK_BN_64 + conv(512, 1, 4)
    assert batch["code_critic"] == CODE_CRITIC + 2 * batch_norm(4096)
    assert counts("vae-gan-64") == {"generator": GENERATOR_64, "critic": TRUNK_BN_64 + conv(512, 1, 4),
                                    "encoder": TRUNK_BN_64 + 2 * VAE_HEAD}
    trunk_128 = conv(1, 32, 4) + TRUNK_64 - conv(1, 64, 4) + conv(32, 64, 4)
    assert counts("wgan-gp-128") == {"generator": GENERATOR_128, "critic": trunk_128 + conv(512, 1, 4)}


def test_critics_of_gradient_penalty_models_have_no_batch_norm_by_default():
    for model in (tiny("wgan-gp"), tiny("alpha-gan")):
        for critic in (model.critic, getattr(model, "code_critic", model.critic)):
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
        assert all(c not in model.compiled_modules() for c in model.critics())
    vae = tiny("vae-gan")  # no gradient penalty: its critic is differentiated once and may be compiled
    assert vae.critic in vae.compiled_modules()


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_shapes_at_every_size(size):
    with torch.device("meta"):
        model = AlphaGAN(config("alpha-gan", size))
        vae = VAEGAN(config("vae-gan", size))
    model.eval(), vae.eval()
    z = torch.zeros(3, 16, device="meta")
    volume = model.decode(z)
    assert volume.shape == (3, 1, size, size, size)
    assert model.critic(volume).shape == (3,)
    assert model.encode(volume).shape == vae.encode(volume).shape == (3, 16)
    assert model.code_critic(z).shape == (3,)


def test_generated_volumes_follow_the_seed_and_encoding_checks_its_input():
    for name in ("wgan-gp", "alpha-gan", "vae-gan"):
        model = tiny(name).eval()
        x = model.sample(2, torch.Generator().manual_seed(0))
        # the generator ends in tanh, so the range is given; the seed deciding the volumes is not
        assert x.shape == (2, 1, 32, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all(), name
        assert torch.equal(model.sample(2, torch.Generator().manual_seed(0)), x), name
        assert not torch.allclose(model.sample(2, torch.Generator().manual_seed(1)), x), name
        assert not torch.allclose(x[0], x[1]), name
        assert (x.abs() > 0.99).float().mean() < 0.1, name
        with pytest.raises(ValueError, match="unconditional"):
            model.decode(torch.zeros(2, 16), labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(HaganError, match="model 'wgan-gp' has no encoder"):
        tiny("wgan-gp").encode(cube())
    with pytest.raises(ValueError, match=r"shape \(n, 1, 32, 32, 32\)"):
        tiny("alpha-gan").encode(torch.zeros(1, 1, 16, 16, 16))
    vae = tiny("vae-gan").eval()
    torch.testing.assert_close(vae.encode(cube()), vae.encode(cube()))  # the posterior mean, no noise


# ----- gradient penalty ---------------------------------------------------------------------------
def value(t: torch.Tensor) -> float:
    return float(t.detach())


def test_gradient_penalty_of_a_linear_critic_is_exact():
    # D(x) = <w, x> has gradient w everywhere: each penalty is (|w| - 1)^2 = 4 whatever the mixing
    w = torch.zeros(1, 4, 4, 4)
    w[0, 0, 0, :2] = torch.tensor([3.0 * 0.6, 3.0 * 0.8])  # |w| = 3

    def critic(x):
        return (x * w).flatten(1).sum(1)

    real, fake_a, fake_b = torch.randn(5, 1, 4, 4, 4), torch.randn(5, 1, 4, 4, 4), torch.randn(5, 1, 4, 4, 4)
    out = wasserstein_critic_loss(critic, real, [fake_a], gp_lambda=10.0)
    assert value(out.penalty) == pytest.approx(4.0)
    gap = critic(real).mean() - critic(fake_a).mean()
    assert value(out.distance) == pytest.approx(value(gap))
    assert value(out.loss) == pytest.approx(value(-gap + 40.0))
    # alpha-GAN's image critic: two fakes, each with its own penalty
    two = wasserstein_critic_loss(critic, real, [fake_a, fake_b], gp_lambda=10.0)
    expected = 2 * critic(real).mean() - critic(fake_a).mean() - critic(fake_b).mean()
    assert value(two.loss) == pytest.approx(value(-expected + 80.0), rel=1e-5)
    assert value(two.penalty) == pytest.approx(8.0)


def test_gradient_penalty_takes_one_norm_per_sample():
    # D(x) = |x|^2 / 2 has gradient x: mixing a volume with itself gives the norm of each volume,
    # (|x_i| - 1)^2 averaged over the batch, not the norm of the whole batch or of single voxels
    def critic(x):
        return 0.5 * x.pow(2).flatten(1).sum(1)

    x = torch.zeros(3, 1, 4, 4, 4)
    for i, norm in enumerate((0.5, 2.0, 4.0)):
        x[i, 0, i, i, i] = norm
    out = wasserstein_critic_loss(critic, x, [x], gp_lambda=1.0)
    assert value(out.penalty) == pytest.approx(((0.5 - 1) ** 2 + (2 - 1) ** 2 + (4 - 1) ** 2) / 3)
    # mixing a volume of norm 2 with zeros lands at norm 2(1 - eps) in [0, 2]: each term lies in [0, 1]
    fake = torch.zeros_like(x)
    two = torch.zeros_like(x)
    two[:, 0, 1, 1, 1] = 2.0
    penalties = [value(wasserstein_critic_loss(critic, two, [fake], 1.0, torch.Generator().manual_seed(s)).penalty)
                 for s in range(8)]
    assert all(0 <= p <= 1 for p in penalties) and len(set(penalties)) > 1
    generator = torch.Generator().manual_seed(3)
    assert value(wasserstein_critic_loss(critic, two, [fake], 1.0, generator).penalty) == penalties[3]


# ----- training -----------------------------------------------------------------------------------
EXPECTED_LOGS = {
    "wgan-gp": {"loss/D", "loss/G", "D/wasserstein", "loss/D_gp"},
    "alpha-gan": {"loss/EG", "loss/EG_recon_l1", "loss/EG_code", "loss/D", "D/wasserstein", "loss/D_gp",
                  "loss/C", "C/wasserstein", "loss/C_gp"},
    "vae-gan": {"loss/D", "D/real_logit", "loss/G", "loss/G_recon_mse", "loss/E", "loss/E_kl"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LOGS))
def test_one_iteration_updates_every_network_and_logs_finite_losses(name):
    model = tiny(name)
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in model.named_children()}
    logs = model.train_step(batch(), 0, torch.Generator().manual_seed(0))
    assert set(logs) == EXPECTED_LOGS[name] and all(math.isfinite(v) for v in logs.values())
    for key, module in model.named_children():
        assert any(not torch.equal(a, b) for a, b in zip(before[key], module.parameters())), key
    assert all(p.requires_grad for p in model.parameters())


def test_steps_per_iteration_follow_the_config():
    model = tiny("wgan-gp", baseline={"critic_steps": 2, "generator_steps": 5})  # Kwon et al.'s 1:5, doubled critic
    model.train_step(batch(), 0, torch.Generator().manual_seed(0))
    for name, steps in (("D", 2), ("G", 5)):
        optimizer = model.optimizers()[name]
        assert {int(optimizer.state[p]["step"]) for p in optimizer.param_groups[0]["params"]} == {steps}


def test_critic_step_widens_the_critics_margin():
    model = tiny("wgan-gp")
    rng = torch.Generator().manual_seed(0)
    model.trainable("D")
    margins = []
    for _ in range(5):
        loss, logs = model.critic_step(cube(), rng, rng)
        model.update("D", loss)
        margins.append(value(logs["D/wasserstein"]))
    assert margins[-1] > margins[0] + 0.1


@pytest.mark.parametrize("name, optimizer, step, key", [
    ("alpha-gan", "EG", "encoder_generator_step", "loss/EG_recon_l1"),
    ("vae-gan", "G", "generator_step", "loss/G_recon_mse"),
])
def test_reconstruction_steps_lower_the_reconstruction_error(name, optimizer, step, key):
    model = tiny(name)
    rng = torch.Generator().manual_seed(0)
    model.trainable(optimizer)
    errors = []
    for _ in range(6):
        loss, logs = getattr(model, step)(cube(), rng, rng)
        model.update(optimizer, loss)
        errors.append(value(logs[key]))
    assert errors[-1] < errors[0] - 0.05


def test_vae_gan_encoder_step_pulls_the_posterior_towards_the_prior():
    model = tiny("vae-gan")
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():  # start far from the prior: every mean shifted by 3
        model.encoder.mean[-1].bias.fill_(3.0)
    model.trainable("E")
    kls = []
    for _ in range(4):
        loss, logs = model.encoder_step(cube(), rng, rng)
        model.update("E", loss)
        kls.append(value(logs["loss/E_kl"]))
    assert kls[0] > 4 and kls[-1] < kls[0]


# ----- configuration ------------------------------------------------------------------------------
def test_presets_set_kwon_et_al_settings():
    c = build_config("alpha-gan-128")
    assert (c.model.name, c.model.size, c.model.latent_dim) == ("alpha-gan", 128, 1000)
    assert (c.optim.lr_g, c.optim.lr_d, c.optim.lr_e, c.optim.beta1, c.optim.beta2) == (2e-4, 2e-4, 2e-4, 0.9, 0.999)
    assert c.baseline.lambda_recon == 10.0 and c.baseline.gp_lambda == 10.0
    assert build_config("wgan-gp-64").baseline.generator_steps == 5
    v = build_config("vae-gan-64")
    assert v.optim.lr_g == 1e-4 and v.baseline.critic_norm == "batch"


def test_bad_options_are_one_line_errors():
    with pytest.raises(HaganError, match="baseline.critic_norm must be one of none, batch"):
        config("wgan-gp", baseline={"critic_norm": "layer"})
    with pytest.raises(HaganError, match="baseline.critic_steps must be at least 1"):
        config("wgan-gp", baseline={"critic_steps": 0})
    with pytest.raises(HaganError, match="baseline.lambda_recon must not be negative"):
        config("alpha-gan", baseline={"lambda_recon": -1.0})
    with pytest.raises(HaganError, match="model.num_classes: wgan-gp is unconditional"):
        WGANGP(config("wgan-gp", model={"num_classes": 2}))


# ----- command line -------------------------------------------------------------------------------
def test_cli_trains_generates_encodes_and_reconstructs_alpha_gan(tiny_ct_cache, tmp_path):
    run = tmp_path / "alpha"
    assert main(["train", "--model", "alpha-gan", "--data", str(tiny_ct_cache), "--out", str(run), "--size", "32",
                 "--iterations", "2", "--batch-size", "2", *TINY_FLAGS]) == 0
    assert (run / "samples" / "iter_00000002.png").is_file()
    assert main(["generate", str(run), "--n", "2", "--out", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("sample_*.nii.gz"))) == 2
    raw = tiny_ct_cache.parent / "raw"
    assert main(["encode", str(run), str(raw), "--out", str(tmp_path / "z.npy")]) == 0
    assert np.load(tmp_path / "z.npy").shape == (5, 16)
    assert main(["reconstruct", str(run), str(raw / "v0.npy"), "--out", str(tmp_path / "rec")]) == 0
    assert list((tmp_path / "rec").glob("*.nii.gz"))


def test_cli_encode_with_wgan_gp_says_it_has_no_encoder(tiny_ct_cache, tmp_path, capsys):
    run = tmp_path / "wgan"
    assert main(["train", "--model", "wgan-gp", "--data", str(tiny_ct_cache), "--out", str(run), "--size", "32",
                 "--iterations", "1", "--batch-size", "2", *TINY_FLAGS]) == 0
    capsys.readouterr()
    assert main(["encode", str(run), str(tiny_ct_cache.parent / "raw"), "--out", str(tmp_path / "z.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model 'wgan-gp' has no encoder" in err and len(err.splitlines()) == 1
