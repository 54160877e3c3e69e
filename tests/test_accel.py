"""The GPU fast path, checked on the CPU against the float32 reference.

Precision resolution and its config checks, bf16 autocast against float32 (decode and one training
step), float32 spectral norm under autocast, which networks ``train.compile`` compiles, tiled decode
through the model and ``load_run``, the paper-512 preset, and augmentation on the training device.
"""

import time

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from hagan.api import load_run
from hagan.config import build_config
from hagan.data.augment import VolumeAugment
from hagan.errors import HaganError
from hagan.evaluation.bench import meta_model, param_counts
from hagan.models import build_model
from hagan.models.layers import Float32SpectralNorm, spectral_norm
from hagan.training import accel
from hagan.training.accel import resolve_precision
from hagan.training.trainer import Trainer

SMALL = {"size": 32, "width": 0.25, "latent_dim": 128}  # the fp32 / bf16 comparisons
TINY = {"size": 32, "width": 0.125, "latent_dim": 16}  # trainers and runs


def build(model=SMALL, precision="fp32", seed=0, **sections):
    """A HAGAN with seeded initial weights; ``sections`` are more config sections (hagan=..., train=...)."""
    overrides = [{"model": model}, {"optim": {"batch_size": 2}}, {"train": {"precision": precision}}]
    overrides += [{name: values} for name, values in sections.items()]
    torch.manual_seed(seed)
    return build_model(build_config(None, None, overrides))


def latents(n, dim, seed=3):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def real_batch(n=2, size=32, seed=4):
    """Air (-1) around a block of random tissue, as the real data look."""
    image = torch.full((n, 1, size, size, size), -1.0)
    inner = size * 3 // 4
    begin = (size - inner) // 2
    tissue = torch.rand(n, 1, inner, inner, inner, generator=torch.Generator().manual_seed(seed)) * 1.4 - 0.9
    image[:, :, begin : begin + inner, begin : begin + inner, begin : begin + inner] = tissue
    return {"image": image, "label": torch.zeros(n, dtype=torch.long)}


def tiny_config(cache, augment=False, workers=-1, **train):
    return build_config(None, None, [
        {"model": TINY}, {"optim": {"batch_size": 2}},
        {"data": {"cache": str(cache), "augment": augment, "workers": workers}},
        {"train": {"iterations": 2, "sample_every": 1000, "checkpoint_every": 1000, **train}},
    ])


# ----- 1. precision: resolution and config checks ---------------------------------------------------
@pytest.mark.parametrize("precision, device, expected", [
    ("auto", "cpu", "fp32"),
    ("auto", "cuda", "bf16"),  # a device name is enough: no GPU needed
    ("auto", torch.device("cuda", 1), "bf16"),
    ("auto", "meta", "fp32"),
    ("fp32", "cuda", "fp32"),
    ("bf16", "cpu", "bf16"),
])
def test_resolve_precision(precision, device, expected):
    assert resolve_precision(precision, device) == expected


@pytest.mark.parametrize("bad", ["fp16", "BF16", "float32", ""])
def test_resolve_precision_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision(bad, "cpu")


def test_autocast_is_bf16_only_when_asked_and_full_precision_leaves_it():
    with accel.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with accel.autocast("meta", "bf16"):  # no autocast for other device types
        assert not torch.is_autocast_enabled("cpu")
    with accel.autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with accel.full_precision("cpu"):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")


def test_config_defaults_for_the_fast_path():
    config = build_config()
    assert (config.train.precision, config.train.channels_last, config.train.compile) == ("auto", False, False)
    assert config.data.workers == -1
    config = build_config(None, None, [{"train": {"precision": "bf16"}, "data": {"workers": 0}}])
    assert (config.train.precision, config.data.workers) == ("bf16", 0)


@pytest.mark.parametrize("override, message", [
    ({"train": {"precision": "fp16"}}, "train.precision must be"),
    ({"train": {"precision": "float32"}}, "train.precision must be"),
    ({"data": {"workers": -2}}, "data.workers must be"),
    ({"data": {"workers": 1.5}}, "data.workers must be int"),
    ({"train": {"channels_last": "yes"}}, "train.channels_last must be bool"),
])
def test_config_rejects_bad_fast_path_settings(override, message):
    with pytest.raises(HaganError, match=message):
        build_config(None, None, [override])


# ----- 2. bf16 autocast against the float32 reference ----------------------------------------------
def test_bf16_decode_agrees_with_fp32():
    reference, fast = build(precision="fp32"), build(precision="bf16")
    assert (reference.precision, fast.precision) == ("fp32", "bf16")
    for a, b in zip(reference.state_dict().values(), fast.state_dict().values()):
        assert torch.equal(a, b)  # the same model: only the arithmetic differs
    z = latents(2, SMALL["latent_dim"])
    expected, out = reference.decode(z), fast.decode(z)
    assert out.dtype == torch.float32 and out.shape == expected.shape == (2, 1, 32, 32, 32)
    diff = out - expected
    assert not torch.equal(out, expected)  # bf16 really ran
    assert diff.abs().mean() < 0.05
    assert diff.norm() / expected.norm() < 5e-2


def test_bf16_train_step_is_close_to_fp32_and_updates_float32_weights():
    reference, fast = build(precision="fp32"), build(precision="bf16")
    for a, b in zip(reference.parameters(), fast.parameters()):
        assert torch.equal(a, b)
    discs = ("high_disc", "low_disc")
    before = {name: [p.detach().clone() for p in getattr(fast, name).parameters()] for name in (*discs, "common")}
    batch = real_batch()
    expected = reference.train_step(dict(batch), 0, torch.Generator().manual_seed(1))
    logs = fast.train_step(dict(batch), 0, torch.Generator().manual_seed(1))
    assert logs.keys() == expected.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    for key in ("loss/D_adv", "loss/D", "loss/G_adv", "loss/E_H", "loss/E_G", "D/real_logit", "D/fake_logit"):
        assert abs(logs[key] - expected[key]) < 0.1, (key, logs[key], expected[key])
    for name, params in before.items():
        after = list(getattr(fast, name).parameters())
        assert all(p.dtype == torch.float32 for p in after), name  # autocast never changes the weights' dtype
        assert all(not torch.equal(a, b) for a, b in zip(after, params)), f"{name} weights did not move"
    for optimizer in fast.optimizers().values():
        for state in optimizer.state.values():
            assert state["exp_avg"].dtype == torch.float32
    # the first Adam step moves each weight by about +-lr in the direction of its gradient: the bf16 step
    # should point the same way as the float32 one for most D weights
    # (both models started from the same weights, so before["high_disc"] is the reference's start too)
    start = before["high_disc"]
    moved_fast = torch.cat([(a - b).flatten() for a, b in zip(fast.high_disc.parameters(), start)])
    moved_ref = torch.cat([(a - b).flatten() for a, b in zip(reference.high_disc.parameters(), start)])
    assert (moved_fast.sign() == moved_ref.sign()).float().mean() > 0.95


# ----- 3. spectral norm stays float32 under autocast -----------------------------------------------
def test_spectral_norm_weight_is_float32_and_normalised_under_autocast():
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv3d(4, 8, 3)).train()
    x = torch.randn(1, 4, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16  # autocast is on for the convolution itself
        for _ in range(30):  # each access in training mode is one power iteration
            weight = conv.weight
        assert weight.dtype == torch.float32
    sigma = torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2)
    assert abs(float(sigma) - 1) < 1e-2
    sn = conv.parametrizations.weight[0]
    assert isinstance(sn, Float32SpectralNorm)
    assert sn._u.dtype == sn._v.dtype == conv.parametrizations.weight.original.dtype == torch.float32
    # no power iteration in eval mode: the normalised weight is the float32 one, bit for bit
    conv.eval()
    with torch.no_grad():
        outside = conv.weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = conv.weight
    assert torch.equal(inside, outside)


def test_spectral_norm_power_iteration_runs_outside_autocast(monkeypatch):
    """CPU autocast leaves torch.mv in float32 anyway, CUDA autocast would not: check that the power
    iteration and sigma are computed with autocast switched off, which is what keeps them float32 on GPUs."""
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv3d(4, 8, 3)).train()
    seen = []
    mv = torch.mv

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return mv(*args, **kwargs)

    monkeypatch.setattr(torch, "mv", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(1, 4, 5, 5, 5))
    assert seen and not any(seen)


def test_spectral_norm_state_matches_pytorch_and_old_checkpoints_load():
    torch.manual_seed(0)
    ours = spectral_norm(nn.Conv3d(4, 8, 3))
    torch.manual_seed(0)
    theirs = torch_spectral_norm(nn.Conv3d(4, 8, 3))
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {
        "bias", "parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v"}
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key  # same initialisation too
    # a checkpoint written with PyTorch's own spectral norm (after some training) loads strictly
    with torch.no_grad():
        theirs.parametrizations.weight.original.mul_(1.5).add_(0.01)
    theirs.train()
    for _ in range(3):
        theirs.weight
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 4, 5, 5, 5)
    with torch.no_grad():
        assert torch.equal(ours.weight, theirs.weight)
        assert torch.equal(ours(x), theirs(x))


def test_every_spectral_norm_in_hagan_is_float32():
    model = build(TINY)
    layers = [m for d in (model.high_disc, model.low_disc) for m in d.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    assert len(layers) == 9  # D^H: 4 convolutions and 3 linear layers at 32^3; D^L: 2 convolutions
    assert all(isinstance(m.parametrizations.weight[0], Float32SpectralNorm) for m in layers)
    normed = [m for m in model.modules() if hasattr(m, "parametrizations")]
    assert len(normed) == len(layers)  # only the discriminators are spectral-normed


# ----- 4. what train.compile compiles -----------------------------------------------------------------
@pytest.mark.parametrize("loss, discriminators", [
    ({}, True),
    ({"loss": "bce", "r1_gamma": 0.0}, True),
    ({"r1_gamma": 1.0}, False),
    ({"loss": "wgan-gp"}, False),
    ({"loss": "wgan-gp", "r1_gamma": 0.5}, False),
])
def test_compiled_modules_leave_out_twice_differentiated_discriminators(loss, discriminators):
    model = build(TINY, hagan=loss)
    modules = model.compiled_modules()
    ids = [id(m) for m in modules]
    assert len(ids) == len(set(ids)) and all(m is not None for m in modules)
    for generator in (model.common, model.low_gen, model.high_gen, model.slab_encoder, model.global_encoder):
        assert id(generator) in ids
    assert (id(model.high_disc) in ids) is discriminators
    assert (id(model.low_disc) in ids) is discriminators
    assert len(modules) == 5 + 2 * discriminators


def test_compiled_modules_skip_absent_branches():
    model = build(TINY, hagan={"low_res_branch": False, "encoder": False})
    assert [id(m) for m in model.compiled_modules()] == [id(model.common), id(model.high_gen), id(model.high_disc)]


def test_accelerate_compiles_exactly_the_compiled_modules(monkeypatch):
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *args, **kwargs: calls.append(self))
    model = build(TINY, hagan={"r1_gamma": 1.0}, train={"compile": True, "channels_last": True})
    assert model.accelerate() is model
    assert [id(m) for m in calls] == [id(m) for m in model.compiled_modules()]
    # channels-last is a CUDA layout: on the CPU the weights stay contiguous
    assert model.memory_format == torch.contiguous_format
    assert model.common.body[0][0].weight.is_contiguous()
    calls.clear()
    build(TINY).accelerate()
    assert calls == []


# ----- 5. tiled decode through the model and load_run ------------------------------------------------
def test_tiled_decode_equals_untiled_decode():
    model = build().eval()
    z = latents(2, SMALL["latent_dim"])
    whole = model.decode(z)
    for tile_depth in (1, 3):  # 8 feature slices at 32^3: a divisor and a non-divisor
        model.tile_depth = tile_depth
        torch.testing.assert_close(model.decode(z), whole, rtol=0, atol=1e-5)


def test_tiled_decode_in_bf16_stays_close_and_float32():
    model = build(TINY, precision="bf16").eval()
    z = latents(2, TINY["latent_dim"])
    whole = model.decode(z)
    model.tile_depth = 3
    tiled = model.decode(z)
    assert tiled.dtype == whole.dtype == torch.float32
    assert (tiled - whole).abs().mean() < 0.02


@pytest.fixture(scope="module")
def tiny_run(tiny_ct_cache, tmp_path_factory):
    """A run folder with one trained iteration of a tiny model on the shared cache."""
    run_dir = tmp_path_factory.mktemp("accel") / "run"
    trainer = Trainer(tiny_config(tiny_ct_cache), run_dir, progress=False)
    trainer.model.train_step(trainer.next_batch(), 0, trainer.rng)
    trainer.save(1)
    return run_dir


def test_load_run_tile_depth_gives_the_untiled_volumes(tiny_run):
    reference = load_run(tiny_run)
    assert reference.model.tile_depth == 0 and reference.model.precision == "fp32"  # auto on the CPU
    tiled = load_run(tiny_run, tile_depth=2)
    assert tiled.model.tile_depth == 2
    torch.testing.assert_close(torch.from_numpy(tiled.generate(2, seed=5)),
                               torch.from_numpy(reference.generate(2, seed=5)), rtol=0, atol=1e-5)


def test_generation_batches_by_default_and_gives_the_volumes_of_one_at_a_time(tiny_run):
    run = load_run(tiny_run)
    assert run.generate_batch_size() == 8  # a tiny 32^3 model fits many in the CPU budget
    one_by_one = run.generate(3, seed=5, batch_size=1)
    torch.testing.assert_close(torch.from_numpy(run.generate(3, seed=5)), torch.from_numpy(one_by_one), rtol=0, atol=1e-5)
    untiled = run.model.decode_bytes()
    run.model.tile_depth = 2
    assert run.model.decode_bytes() < untiled / 2  # tiling keeps only the half-size buffer and the result


def test_load_run_precision_override(tiny_run):
    reference = load_run(tiny_run, precision="fp32").generate(2, seed=5)
    run = load_run(tiny_run, precision="bf16")
    assert run.model.precision == "bf16" and run.config.train.precision == "bf16"
    fast = run.generate(2, seed=5)
    assert fast.dtype == reference.dtype and fast.shape == reference.shape == (2, 32, 32, 32)
    assert abs(fast - reference).mean() < 0.05


@pytest.mark.parametrize("kwargs, message", [
    ({"tile_depth": -1}, "tile_depth must not be negative"),
    ({"precision": "fp16"}, "precision must be one of"),
])
def test_load_run_rejects_bad_settings(tiny_run, kwargs, message):
    with pytest.raises(HaganError, match=message):
        load_run(tiny_run, **kwargs)


# ----- 6. the paper-512 preset -------------------------------------------------------------------------
def test_paper_512_preset():
    config = build_config("paper-512")
    assert (config.model.size, config.optim.batch_size) == (512, 2)
    assert (config.model.latent_dim, config.model.width) == (1024, 1.0)
    model = meta_model(config)
    counts = param_counts(config, model)
    fc = sum(p.numel() for p in model.common.fc.parameters())
    assert fc == (1024 + 0) * 512 * 64 + 512 * 64  # Linear(latent, 512 channels x 4^3): weights + bias
    assert counts["G_A"] == sum(p.numel() for p in model.common.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    # against 256^3: G^A has one more 64-channel conv + GroupNorm; G^L, G^H and E^H do not depend on the size
    smaller = param_counts(build_config("paper-256"))
    assert counts["G_A"] - smaller["G_A"] == 64 * 64 * 27 + 64 + 2 * 64
    for key in ("G_L", "G_H", "E_H"):
        assert counts[key] == smaller[key], key
    assert counts["D_H"] > smaller["D_H"]


@pytest.mark.slow  # about 50 s for the step and 25 s for the decode on 2 CPU cores, ~4 GB of memory
def test_one_training_step_and_tiled_decode_at_512():
    config = build_config("paper-512", None, [{
        "model": {"width": 1 / 64, "latent_dim": 16}, "optim": {"batch_size": 1},
        "hagan": {"r1_gamma": 0.0}, "train": {"precision": "fp32"}}])
    torch.manual_seed(0)
    model = build_model(config)
    assert model.high_gen.body[1][0].out_channels == 8  # the minimum channels
    started = time.perf_counter()
    logs = model.train_step(real_batch(1, 512), 0, torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - started
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    assert {"loss/D", "loss/G_adv", "loss/E_H", "loss/E_G"} <= logs.keys()
    print(f"one 512^3 training step: {seconds:.1f} s")
    model.eval()
    model.tile_depth = 16
    out = model.decode(latents(1, 16))
    assert out.shape == (1, 1, 512, 512, 512) and out.dtype == torch.float32
    assert out.abs().max() <= 1 and torch.isfinite(out).all()
    assert model.decode_low_res(latents(1, 16)).shape == (1, 1, 128, 128, 128)


# ----- 7. augmentation on the training device -----------------------------------------------------
def test_volume_augment_reseed_is_reproducible():
    volume = real_batch(1, 32, seed=7)["image"][0]
    original = volume.clone()
    used = VolumeAugment(seed=0)
    used(volume)  # advance its stream: reseeding must make the history irrelevant
    used.reseed(123)
    augmented = used(volume)
    fresh = VolumeAugment()
    fresh.reseed(123)
    assert torch.equal(augmented, fresh(volume))
    assert not torch.equal(augmented, volume) and torch.equal(volume, original)  # the input is left alone
    fresh.reseed(124)
    assert not torch.equal(fresh(volume), augmented)


def test_trainer_augments_each_item_from_its_loader_seed(tiny_ct_cache, tmp_path):
    first = Trainer(tiny_config(tiny_ct_cache, augment=True), tmp_path / "a", progress=False)
    second = Trainer(tiny_config(tiny_ct_cache, augment=True), tmp_path / "b", progress=False)
    plain = Trainer(tiny_config(tiny_ct_cache, augment=False), tmp_path / "c", progress=False)
    assert first.workers == 0  # auto: load in the training process on the CPU
    states, batches = [], []
    for _ in range(3):  # 5 items in batches of 2: the third batch is in the next epoch
        states.append(first.loader.state_dict())
        batches.append(first.next_batch())
    for batch in batches:
        other, raw = second.next_batch(), plain.next_batch()
        assert torch.equal(batch["index"], other["index"]) and torch.equal(batch["seed"], other["seed"])
        assert torch.equal(batch["image"], other["image"])
        assert torch.equal(batch["index"], raw["index"]) and torch.equal(batch["seed"], raw["seed"])
        assert plain.volume_augment is None
        for i, seed in enumerate(batch["seed"].tolist()):
            augment = VolumeAugment()
            augment.reseed(seed)
            assert torch.equal(batch["image"][i], augment(raw["image"][i]))
            assert not torch.equal(batch["image"][i], raw["image"][i])
    # the same loader position gives the same images, whatever came before
    second.loader.load_state_dict(states[1])
    jumped = second.next_batch()
    assert torch.equal(jumped["image"], batches[1]["image"]) and torch.equal(jumped["seed"], batches[1]["seed"])


def test_trainer_loader_workers_give_the_same_augmented_batches(tiny_ct_cache, tmp_path):
    inline = Trainer(tiny_config(tiny_ct_cache, augment=True, workers=0), tmp_path / "a", progress=False)
    workers = Trainer(tiny_config(tiny_ct_cache, augment=True, workers=1), tmp_path / "b", progress=False)
    assert (inline.workers, workers.workers) == (0, 1)
    for _ in range(2):
        a, b = inline.next_batch(), workers.next_batch()
        assert torch.equal(a["seed"], b["seed"]) and torch.equal(a["image"], b["image"])


def test_one_device_resolution_for_every_command():
    from hagan.errors import HaganError
    from hagan.training.accel import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(HaganError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(HaganError, match="needs CUDA, which is not available"):
            resolve_device("cuda:1")
