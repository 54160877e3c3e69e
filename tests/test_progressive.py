"""The progressive growing GAN: growth schedule, fade-in, WGAN-GP, 2D and 3D shapes, segmentation
channels through preprocessing, training and generation, encoder, exact resume, the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hagan.api import load_run
from hagan.cli.commands import main as cli_main
from hagan.config import build_config
from hagan.data.dataset import CachedVolumeDataset
from hagan.data.io import read_volume, write_volume
from hagan.data.preprocess import preprocess_folder
from hagan.errors import HaganError
from hagan.models import build_model
from hagan.models.progressive.model import ProgressiveGAN, channels_to_labels, critic_loss, label_channels
from hagan.models.progressive.networks import (
    EqualizedConv,
    ProgressiveDiscriminator,
    ProgressiveGenerator,
    channel_rule,
    downsample,
    pixel_norm,
    upsample,
)
from hagan.models.progressive.schedule import GrowthSchedule
from hagan.run_folder import list_checkpoints
from hagan.training.trainer import Trainer

SIZE = 32
LATENT = 8
TINY_CHANNELS = {"channel_base": 32, "max_channels": 8, "min_channels": 4}


def tiny_config(dims: int = 3, iterations: int = 20, **progressive):
    values = {
        "model": {"name": "progressive", "size": SIZE, "latent_dim": LATENT},
        "optim": {"batch_size": 2, "lr_g": 1e-3, "lr_d": 1e-3, "lr_e": 1e-3, "beta1": 0.0, "beta2": 0.99},
        "progressive": {"dims": dims, "fade_images": 4, "stable_images": 4, "slices_per_volume": 2,
                        **TINY_CHANNELS, **progressive},
        "train": {"iterations": iterations, "device": "cpu", "log_every": 1, "sample_every": 1000,
                  "checkpoint_every": 1000, "deterministic": True},
    }
    return build_config(None, None, [values])


def tiny_model(dims: int = 3, seed: int = 0, **progressive) -> ProgressiveGAN:
    torch.manual_seed(seed)
    return ProgressiveGAN(tiny_config(dims, **progressive))


def rule():
    return channel_rule(32, 4, 8)


# ----- schedule ---------------------------------------------------------------------------------------
def test_schedule_phases_alpha_and_encoder():
    schedule = GrowthSchedule(4, 32, fade_iterations=4, stable_iterations=2, final_iterations=3, encoder=True)
    assert schedule.growth_iterations == 2 + 3 * (4 + 2)
    assert schedule.encoder_start == 23
    phases = [schedule.at(i) for i in range(26)]
    assert [p.resolution for p in phases[:8]] == [4, 4, 8, 8, 8, 8, 8, 8]
    assert [p.alpha for p in phases[2:6]] == [0.0, 0.25, 0.5, 0.75]
    assert all(p.fading for p in phases[2:6]) and not phases[6].fading and phases[6].alpha == 1.0
    assert phases[14].resolution == 32 and phases[14].fading and phases[14].start == 14
    assert all(p.resolution == 32 and p.alpha == 1.0 and not p.encoder for p in phases[18:23])
    assert all(p.encoder for p in phases[23:])
    assert [p.name for p in schedule.boundaries()] == [
        "stable 4", "fade 8", "stable 8", "fade 16", "stable 16", "fade 32", "stable 32", "encoder"]
    # without the encoder the GAN keeps training at full size
    plain = GrowthSchedule(4, 32, 4, 2)
    assert plain.at(10_000).resolution == 32 and not plain.at(10_000).encoder
    assert plain.at(10_000).start == plain.growth_iterations - 2


def test_schedule_from_images_and_start_size():
    schedule = GrowthSchedule.from_images(8, 64, fade_images=10, stable_images=8, images_per_iteration=4)
    assert (schedule.fade_iterations, schedule.stable_iterations) == (3, 2)
    assert schedule.at(0).resolution == 8 and schedule.at(2).resolution == 16
    assert schedule.growth_iterations == 2 + 3 * 5
    with pytest.raises(ValueError, match="start size 6"):
        GrowthSchedule(6, 32, 1, 1)
    # a 2D model counts slices: batch 2 x 2 slices = 4 images per iteration
    assert tiny_model(dims=2, fade_images=8, stable_images=12).schedule.stable_iterations == 3
    assert tiny_model(dims=3, fade_images=8, stable_images=12).schedule.stable_iterations == 6


def test_config_problems_and_refusals():
    with pytest.raises(HaganError, match="progressive.dims must be 2 or 3.*start_size must be a power of two"):
        build_config(None, None, [{"model": {"name": "progressive"}, "progressive": {"dims": 4, "start_size": 6}}])
    with pytest.raises(HaganError, match="max_channels"):
        build_config(None, None, [{"model": {"name": "progressive"}, "progressive": {"max_channels": 2, "min_channels": 4}}])
    with pytest.raises(HaganError, match="unconditional"):
        ProgressiveGAN(build_config(None, None, [{"model": {"name": "progressive", "size": 32, "num_classes": 2}}]))
    with pytest.raises(HaganError, match="start_size 64 is larger than model.size 32"):
        tiny_model(start_size=64)
    with pytest.raises(HaganError, match="label maps"):
        ProgressiveGAN(build_config(None, None, [{"model": {"name": "progressive", "size": 32}, "data": {"augment": True},
                                                   "progressive": {"segmentation_labels": 2}}]))
    for name in ("progressive-128", "progressive-2d", "progressive-hippocampus"):
        config = build_config(name)
        assert config.model.name == "progressive" and config.optim.beta2 == 0.99
        with torch.device("meta"):
            model = build_model(config)
        # every preset's GAN schedule ends before its run does, leaving the rest to the encoder
        assert model.schedule.encoder_start < config.train.iterations


# ----- networks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_generator_fade_in_is_the_old_path_at_0_and_the_new_at_1(dims):
    torch.manual_seed(0)
    g = ProgressiveGenerator(dims, 16, LATENT, 3, rule())
    z = torch.randn(3, LATENT)
    with torch.no_grad():
        old = upsample(g(z, 1))
        np.testing.assert_allclose(g(z, 2, 0.0), old, atol=1e-6)
        new, half = g(z, 2, 1.0), g(z, 2, 0.3)
        assert new.shape == (3, 3) + (16,) * dims
        np.testing.assert_allclose(half, 0.7 * old + 0.3 * new, atol=1e-5)
        # the new path does not read the old toRGB, the old path not the new block
        g.to_image[1].weight.add_(1.0)
        np.testing.assert_allclose(g(z, 2, 1.0), new, atol=1e-6)
        g.blocks[1].conv2.weight.add_(1.0)
        np.testing.assert_allclose(g(z, 2, 0.0), upsample(g(z, 1)), atol=1e-6)
        assert not torch.allclose(g(z, 2, 0.0), old)


@pytest.mark.parametrize("dims", [2, 3])
def test_discriminator_fade_in_is_the_old_path_at_0_and_the_new_at_1(dims):
    torch.manual_seed(0)
    d = ProgressiveDiscriminator(dims, 16, 2, rule())
    x = torch.randn(4, 2, *(16,) * dims)
    with torch.no_grad():
        np.testing.assert_allclose(d(x, 2, 0.0), d(downsample(x), 1, 1.0), atol=1e-5)
        new = d(x, 2, 1.0)
        assert new.shape == (4, 1)
        d.from_image["8"].weight.add_(1.0)
        np.testing.assert_allclose(d(x, 2, 1.0), new, atol=1e-6)


def test_real_images_fade_in_like_the_generator():
    model = tiny_model(dims=3)
    images = torch.rand(2, 1, SIZE, SIZE, SIZE) * 2 - 1
    schedule = model.schedule
    fade16 = next(p for p in schedule.boundaries() if p.name == "fade 16")
    np.testing.assert_allclose(model.real_at(images, fade16), upsample(downsample(images, 4)), atol=1e-6)
    stable16 = schedule.at(fade16.start + schedule.fade_iterations)
    np.testing.assert_allclose(model.real_at(images, stable16), downsample(images, 2), atol=1e-6)
    halfway = schedule.at(fade16.start + schedule.fade_iterations // 2)
    expected = torch.lerp(upsample(downsample(images, 4)), downsample(images, 2), halfway.alpha)
    np.testing.assert_allclose(model.real_at(images, halfway), expected, atol=1e-6)
    np.testing.assert_allclose(model.real_at(images, schedule.at(10_000)), images)


def test_equalised_learning_rate_and_pixel_norm():
    torch.manual_seed(0)
    conv = EqualizedConv(3, 64, 32, 3)
    assert abs(float(conv.weight.detach().std()) - 1.0) < 0.02  # stored N(0, 1): Adam steps are alike for all layers
    assert conv.scale == pytest.approx(np.sqrt(2 / (64 * 27)))  # He's constant applied at run time
    x = torch.randn(8, 64, 5, 5, 5)
    manual = F.conv3d(x, conv.weight * conv.scale, conv.bias, padding=1)
    np.testing.assert_allclose(conv(x).detach(), manual.detach(), atol=1e-5)
    # the weight's gradient is scaled too: d out / d weight = scale * d out / d (scaled weight)
    conv(x).sum().backward()
    effective = conv.weight.detach().mul(conv.scale).requires_grad_(True)
    F.conv3d(x, effective, conv.bias.detach(), padding=1).sum().backward()
    np.testing.assert_allclose(conv.weight.grad, effective.grad * conv.scale, rtol=1e-4, atol=1e-6)
    normed = pixel_norm(torch.randn(4, 16, 3, 3) * 7)
    np.testing.assert_allclose(normed.pow(2).mean(dim=1), torch.ones(4, 3, 3), atol=1e-4)


def test_channel_rule_follows_beers_filters():
    channels = channel_rule(2048, 16, 128)
    assert [channels(r) for r in (4, 8, 16, 32, 64, 128)] == [128, 128, 128, 64, 32, 16]
    assert channel_rule(2048, 16, 128, width=0.5)(128) == 8


# ----- loss -------------------------------------------------------------------------------------------
def test_gradient_penalty_against_hand_made_critics():
    real = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    fake = torch.tensor([[0.5, 0.5], [2.0, 0.0]])
    w = torch.tensor([3.0, 4.0])  # linear critic: its gradient is w everywhere, ||w|| = 5

    def linear(x):
        return (x * w).sum(dim=1)

    loss, parts = critic_loss(linear, real, fake, gp_lambda=10.0, generator=torch.Generator().manual_seed(0))
    real_scores, fake_scores = torch.tensor([11.0, -4.0]), torch.tensor([3.5, 6.0])
    expected = fake_scores.mean() - real_scores.mean() + 10.0 * (5 - 1) ** 2 + 0.001 * real_scores.pow(2).mean()
    assert float(loss) == pytest.approx(float(expected))
    assert float(parts["loss/D_gp"]) == pytest.approx(16.0)
    assert float(parts["D/wasserstein"]) == pytest.approx(float(real_scores.mean() - fake_scores.mean()))

    # quadratic critic 0.5 ||x||^2: its gradient at the mixed point is the mixed point itself
    def quadratic(x):
        return 0.5 * x.pow(2).sum(dim=1)

    _, parts = critic_loss(quadratic, real, fake, gp_lambda=1.0, generator=torch.Generator().manual_seed(7))
    eps = torch.rand(2, generator=torch.Generator().manual_seed(7))[:, None]
    mixed = eps * real + (1 - eps) * fake
    assert float(parts["loss/D_gp"].detach()) == pytest.approx(float((mixed.norm(dim=1) - 1).pow(2).mean()), rel=1e-5)


# ----- shapes and segmentation channels ---------------------------------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_generated_shapes_and_resolution_follow_the_phase(dims):
    model = tiny_model(dims=dims, encoder=True, segmentation_labels=2)
    rng = torch.Generator().manual_seed(0)
    shape = (3, 1, SIZE, SIZE, SIZE) if dims == 3 else (3, 1, 1, SIZE, SIZE)
    first = model.sample(3, rng)
    assert first.shape == shape and first.min() >= -1 and first.max() <= 1
    # untrained: the phase is the 4-per-side start, nearest-upsampled to full size
    blocks = first.squeeze(2) if dims == 2 else first
    np.testing.assert_allclose(blocks, upsample(downsample(blocks, SIZE // 4), SIZE // 4), atol=1e-5)
    images, labels = model.sample_with_segmentation(3, rng)
    assert images.shape == shape and labels.shape == shape and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 1, 2}
    model.trained_iterations.fill_(model.schedule.encoder_start + 1)
    assert not torch.equal(model.sample(3, torch.Generator().manual_seed(0)), first)
    assert model.encode(first).shape == (3, LATENT)
    if dims == 2:  # volumes too: their middle axial slice
        assert model.encode(torch.zeros(2, 1, SIZE, SIZE, SIZE)).shape == (2, LATENT)
    with pytest.raises(ValueError, match="must have shape"):
        model.encode(torch.zeros(2, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="unconditional"):
        model.decode(torch.zeros(1, LATENT), torch.zeros(1))


def test_encode_refuses_an_untrained_or_missing_encoder():
    with pytest.raises(ValueError, match="encoder is not trained yet"):
        tiny_model(encoder=True).encode(torch.zeros(1, 1, SIZE, SIZE, SIZE))
    with pytest.raises(ValueError, match="without an encoder"):
        tiny_model().encode(torch.zeros(1, 1, SIZE, SIZE, SIZE))
    with pytest.raises(ValueError, match="no segmentation"):
        tiny_model().decode_with_segmentation(torch.zeros(1, LATENT))


def test_segmentation_channels_round_trip():
    labels = torch.randint(0, 4, (2, 1, 6, 5, 7), generator=torch.Generator().manual_seed(0))
    channels = label_channels(labels, 3)
    assert channels.shape == (2, 3, 6, 5, 7) and set(channels.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(channels[:, 1:2] > 0, labels == 2)
    assert torch.equal(channels_to_labels(channels), labels)
    # generated channels: the strongest positive channel wins, none positive is background
    raw = torch.tensor([[-0.2, 0.3, 0.9], [-0.5, -0.1, -0.9]]).T.reshape(1, 3, 2)
    assert channels_to_labels(raw).flatten().tolist() == [3, 0]


# ----- data path: label maps in the cache --------------------------------------------------------------
def lps_affine():
    affine = np.diag([-1.0, -1.2, 1.5, 1.0])
    affine[:3, 3] = [30.0, 20.0, -10.0]
    return affine


# after the MRI recipe the head lies in [-1, -0.9] and the box above -0.1
BOX_THRESHOLD = -0.5


def write_labelled_folder(root: Path, n: int, shape=(20, 24, 16), seed=0) -> tuple[Path, Path]:
    """Images with a bright box in a dark head, label maps 1 in the box and 2 in its first half."""
    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(n):
        image = rng.uniform(0, 5, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        x0, y0 = rng.integers(2, 6, 2)
        label[x0 : x0 + 10, y0 : y0 + 12, 3:13] = 1
        label[x0 : x0 + 5, y0 : y0 + 12, 3:13] = 2
        image[label > 0] += rng.uniform(50, 100, int((label > 0).sum()))
        write_volume(images / f"case{i}.nii.gz", image, lps_affine())
        # IXI-style suffixed names for some, MSD-style equal names for the others
        write_volume(labels / (f"case{i}_seg.nii.gz" if i % 2 else f"case{i}.nii.gz"), label.astype(np.float32), lps_affine())
    return images, labels


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    images, labels = write_labelled_folder(root, 4)
    cache = root / "cache"
    preprocess_folder(images, cache, "mri", SIZE, mode="resize", progress=False, segmentations=labels)
    return root, images, labels, cache


def test_preprocess_caches_label_maps_on_the_cube_grid(labelled, tmp_path):
    root, images, labels, cache = labelled
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["segmentation_labels"] == 2
    dataset = CachedVolumeDataset(cache)
    assert dataset.segmentation_labels == 2
    item = dataset[1]
    assert item["segmentation"].shape == (1, SIZE, SIZE, SIZE) and item["segmentation"].dtype == torch.int64
    assert set(item["segmentation"].unique().tolist()) == {0, 1, 2}
    # the resized label map covers the bright box of the resized image
    inside, bright = item["segmentation"] > 0, item["image"] > BOX_THRESHOLD
    assert (bright & inside).sum() / (bright | inside).sum() > 0.8
    # pad mode resamples nothing: after reorientation and trimming, box and labels coincide voxel for voxel
    pad = tmp_path / "pad"
    preprocess_folder(images, pad, "mri", SIZE, mode="pad", progress=False, segmentations=labels)
    for item in CachedVolumeDataset(pad):
        image, segmentation = item["image"][0].numpy(), item["segmentation"][0].numpy()
        assert (segmentation > 0).sum() == 10 * 12 * 10
        assert np.array_equal(image > BOX_THRESHOLD, segmentation > 0)
    # old caches have no label maps and keep working
    plain = tmp_path / "plain"
    preprocess_folder(images, plain, "mri", SIZE, mode="resize", progress=False)
    assert "segmentation" not in CachedVolumeDataset(plain)[0]
    assert CachedVolumeDataset(plain).segmentation_labels == 0


def test_preprocess_lists_images_with_unusable_label_maps(labelled, tmp_path):
    root, images, labels, cache = labelled
    broken = tmp_path / "labels"
    shutil.copytree(labels, broken)
    (broken / "case0.nii.gz").unlink()
    write_volume(broken / "case1_seg.nii.gz", np.zeros((5, 5, 5), np.float32), lps_affine())
    write_volume(broken / "case2.nii.gz", np.full((20, 24, 16), 0.5, np.float32), lps_affine())
    report = preprocess_folder(images, tmp_path / "cache", "mri", SIZE, progress=False, segmentations=broken)
    reasons = dict(report.bad)
    assert len(report.entries) == 1
    assert "no label map named like it" in reasons[str(images / "case0.nii.gz")]
    assert "not on the image's grid" in reasons[str(broken / "case1_seg.nii.gz")]
    assert "non-negative integers" in reasons[str(broken / "case2.nii.gz")]
    assert cli_main(["preprocess", str(images), str(tmp_path / "c2"), "--recipe", "mri", "--size", "32",
                     "--segmentations", str(tmp_path / "missing")]) == 2


# ----- training ---------------------------------------------------------------------------------------
def test_training_steps_update_the_right_networks():
    model = tiny_model(dims=2, encoder=True, encoder_recon_weight=1.0, segmentation_labels=1)
    rng = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, SIZE, SIZE, SIZE) * 2 - 1
    image[:, :, :3] = -1  # blank planes are never drawn as slices
    batch = {"image": image, "segmentation": (image > 0.5).long(), "label": torch.full((2,), -1)}

    def snapshot(module):
        return [p.detach().clone() for p in module.parameters()]

    def changed(before, module):
        return [not torch.equal(a, b) for a, b in zip(before, module.parameters())]

    g, d, e = snapshot(model.generator), snapshot(model.discriminator), snapshot(model.encoder)
    logs = model.train_step(batch, 0, rng)
    assert {"loss/D", "loss/G", "loss/D_gp", "D/wasserstein"} <= set(logs) and logs["progress/resolution"] == 4
    # at 4 per side only the base and the 4-per-side toRGB / fromRGB layers learn
    assert changed(g, model.generator) == [name.startswith(("dense", "base_conv", "to_image.0"))
                                           for name, _ in model.generator.named_parameters()]
    assert changed(d, model.discriminator) == [name.startswith(("from_image.4.", "final", "output"))
                                               for name, _ in model.discriminator.named_parameters()]
    assert not any(changed(e, model.encoder))
    assert int(model.trained_iterations) == 1
    slices = model.training_images(batch, torch.Generator().manual_seed(1))
    assert slices.shape == (4, 2, SIZE, SIZE) and bool((slices[:, 0] > -1).flatten(1).any(1).all())

    start = model.schedule.encoder_start
    g, d = snapshot(model.generator), snapshot(model.discriminator)
    logs = model.train_step(batch, start, rng)
    assert {"loss/E", "loss/E_latent", "loss/E_recon"} <= set(logs) and "loss/D" not in logs
    # the encoder is built for full-size inputs only: all of it learns
    assert sorted(model.encoder.from_image) == [str(SIZE)] and all(changed(e, model.encoder))
    assert not any(changed(g, model.generator) + changed(d, model.discriminator))
    with pytest.raises(HaganError, match="no label maps"):
        model.train_step({"image": image, "label": torch.full((2,), -1)}, start + 1, rng)


def test_segmentation_labels_beyond_the_configured_are_refused():
    model = tiny_model(segmentation_labels=1)
    batch = {"image": torch.zeros(2, 1, SIZE, SIZE, SIZE), "segmentation": torch.full((2, 1, SIZE, SIZE, SIZE), 2)}
    with pytest.raises(HaganError, match="hold label 2 but progressive.segmentation_labels is 1"):
        model.train_step(batch, 0, torch.Generator())


def test_generator_learns_the_mean_intensity_at_the_start_resolution():
    """Against reals of one constant intensity on the other side of 0, the 4x4 generator's mean moves to it."""
    model = tiny_model(dims=2, fade_images=10_000, stable_images=10_000)
    rng = torch.Generator().manual_seed(0)

    def mean() -> float:
        return float(model.decode(model.latent(64, torch.Generator().manual_seed(3))).mean())

    target = -0.5 if mean() > 0 else 0.5
    before = abs(mean() - target)
    batch = {"image": torch.full((2, 1, SIZE, SIZE, SIZE), target), "label": torch.full((2,), -1)}
    for i in range(100):
        model.train_step(batch, i, rng)
    assert abs(mean() - target) < 0.75 * before


def run_config(cache: Path, **progressive):
    config = tiny_config(dims=2, iterations=16, **progressive)
    config.data.cache = str(cache)
    config.train.checkpoint_every = 11
    config.train.keep_checkpoints = 5
    return config


def test_resume_in_a_fade_phase_is_exact_and_samples_show_label_maps(labelled, tmp_path):
    cache = labelled[3]
    config = run_config(cache, fade_images=8, stable_images=8, encoder=True, segmentation_labels=2)
    # 2 iterations per phase: 4 per side 0-1, ..., fade 32 at 10-11, stable 32 12-13, encoder 14-15
    straight = tmp_path / "straight"
    torch.manual_seed(0)
    Trainer(config, straight, progress=False).fit()
    model = build_model(config)
    assert model.schedule.at(11).name == "fade 32" and model.schedule.encoder_start == 14
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(list_checkpoints(resumed / "checkpoints")[-1])
    trainer = Trainer(config, resumed, resume=True, progress=False)
    assert trainer.start_iteration == 11
    trainer.fit()
    a, b = (load_run(run, device="cpu").model.state_dict() for run in (straight, resumed))
    assert int(a["trained_iterations"]) == 16
    for key in a:
        assert torch.equal(a[key], b[key]), key
    samples = sorted((straight / "samples").glob("*.png"))
    assert samples and samples[-1].stat().st_size > 0


def test_cli_trains_generates_and_encodes_a_3d_model(tmp_path, tiny_ct_cache):
    run = tmp_path / "run"
    overrides = {"progressive.fade_images": 2, "progressive.stable_images": 2, "progressive.encoder": "true",
                 "progressive.start_size": 8, "model.latent_dim": LATENT, "train.log_every": 1,
                 **{f"progressive.{k}": v for k, v in TINY_CHANNELS.items()}}
    args = ["train", "--model", "progressive", "--data", str(tiny_ct_cache), "--out", str(run), "--size", "32",
            "--iterations", "9", "--batch-size", "2", "--device", "cpu"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    assert cli_main(args) == 0
    scalars = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    assert [r["progress/resolution"] for r in scalars] == [8, 16, 16, 32, 32, 32, 32, 32, 32]
    assert "loss/E" in scalars[-1] and "loss/D" in scalars[4]
    out = tmp_path / "generated"
    assert cli_main(["generate", str(run), "--n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("sample_*.nii.gz"))) == 2
    assert cli_main(["generate", str(run), "--n", "1", "--out", str(tmp_path / "x"), "--label-maps", "--device", "cpu"]) == 2
    latents = tmp_path / "z.npy"
    source = tmp_path / "volumes"
    source.mkdir()
    for i in range(2):
        array = np.full((32, 32, 32), -1000.0, np.float32)
        array[4:28, 6:26, 6:26] = 100.0 * i
        np.save(source / f"v{i}.npy", array)
    assert cli_main(["encode", str(run), str(source), "--out", str(latents), "--device", "cpu"]) == 0
    assert np.load(latents).shape == (2, LATENT)


def test_generate_writes_label_maps_beside_their_volumes(labelled, tmp_path):
    """A model trained with label channels writes each generated label map on its volume's grid."""
    config = tiny_config(dims=3, iterations=4, segmentation_labels=2)
    config.data.cache = str(labelled[3])
    Trainer(config, tmp_path / "run", progress=False).fit()
    out = tmp_path / "generated"
    assert cli_main(["generate", str(tmp_path / "run"), "--n", "2", "--seed", "3", "--out", str(out),
                     "--label-maps", "--device", "cpu"]) == 0
    run = load_run(tmp_path / "run", device="cpu")
    expected_images, expected_maps = run.generate_with_label_maps(2, seed=3)
    assert np.array_equal(expected_images, run.generate(2, seed=3))
    for i in range(2):
        image, label_map = read_volume(out / f"sample_{i:04d}.nii.gz"), read_volume(out / f"sample_{i:04d}_labels.nii.gz")
        assert label_map.array.shape == image.array.shape == (SIZE, SIZE, SIZE)
        assert np.allclose(label_map.affine, image.affine)
        assert np.array_equal(label_map.array, expected_maps[i]) and set(np.unique(label_map.array)) <= {0, 1, 2}
