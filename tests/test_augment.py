import pytest
import torch

from hagan.data.augment import AdaptiveAugmentStrength, VolumeAugment, diff_augment


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(shape=(3, 1, 16, 32, 32), seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=seeded(seed)) * 2 - 1


@pytest.mark.parametrize("shape", [(3, 1, 16, 32, 32), (2, 2, 4, 32, 32)], ids=["volume", "slab"])
def test_diff_augment_keeps_shape_and_changes_values(shape):
    x = random_batch(shape)
    out = diff_augment(x, generator=seeded())
    assert out.shape == x.shape
    assert not torch.equal(out, x)


def test_diff_augment_passes_gradients_to_the_input():
    x = random_batch().requires_grad_()
    diff_augment(x, generator=seeded()).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diff_augment_matches_finite_differences():
    x = random_batch((2, 1, 4, 8, 8)).double().requires_grad_()
    # Re-seeding inside makes every evaluation draw the same augmentation.
    assert torch.autograd.gradcheck(lambda v: diff_augment(v, generator=seeded(3)), (x,))


def test_probability_zero_is_the_identity():
    x = random_batch()
    assert torch.equal(diff_augment(x, generator=seeded(), probability=0.0), x)


def test_probability_selects_whole_samples():
    x = random_batch((64, 1, 4, 8, 8))
    out = diff_augment(x, "brightness", generator=seeded(), probability=0.5)
    unchanged = (out == x).flatten(1).all(dim=1)
    assert 10 < int(unchanged.sum()) < 54


def test_same_seed_gives_same_output_and_other_seed_differs():
    x = random_batch()
    assert torch.equal(diff_augment(x, generator=seeded(5)), diff_augment(x, generator=seeded(5)))
    assert not torch.equal(diff_augment(x, generator=seeded(5)), diff_augment(x, generator=seeded(6)))


def test_translation_pads_with_background():
    x = torch.ones(16, 1, 16, 32, 32)
    out = diff_augment(x, "translation", generator=seeded())
    assert set(out.unique().tolist()) == {-1.0, 1.0}
    # Shifts are at most 1/8 of the size, so the centre never leaves the volume.
    assert (out[:, :, 6:10, 12:20, 12:20] == 1).all()


def test_translation_moves_content_by_whole_voxels():
    x = torch.full((8, 1, 4, 32, 32), -1.0)
    x[:, :, :, 16, 16] = 1.0
    out = diff_augment(x, "translation", generator=seeded())
    for sample in out[:, 0]:
        positions = (sample == 1).nonzero()
        assert len(positions) == 4  # one voxel per slice: thin slabs are not shifted along D
        assert (positions[:, 1:] - 16).abs().max() <= 4


def test_cutout_sets_a_box_to_background():
    x = torch.ones(8, 1, 16, 32, 32)
    out = diff_augment(x, "cutout", generator=seeded())
    for sample in out[:, 0]:
        cut = sample == -1
        assert cut.any()
        spans = [cut.any(dim=dims) for dims in ((1, 2), (0, 2), (0, 1))]
        box = spans[0][:, None, None] & spans[1][None, :, None] & spans[2][None, None, :]
        assert torch.equal(cut, box)
        # Half of each size, clipped by at most half where the box hangs over the border.
        for span, box_size in zip(spans, (8, 16, 16)):
            assert box_size // 2 <= int(span.sum()) <= box_size


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="saturation.*brightness"):
        diff_augment(random_batch(), "brightness,saturation")


def test_ada_raises_p_while_discriminator_overfits_and_stays_in_bounds():
    ada = AdaptiveAugmentStrength(interval=2, target_kimg=0.1, p_max=0.8)
    for _ in range(100):
        p = ada.update(torch.full((10, 1), 3.0))
    assert p == pytest.approx(0.8)
    assert ada.r_t == 1.0


def test_ada_lowers_p_when_discriminator_fails_on_reals():
    ada = AdaptiveAugmentStrength(interval=2, target_kimg=0.1, p=0.5)
    p_values = [ada.update(-torch.ones(10)) for _ in range(200)]
    assert p_values[1] == pytest.approx(0.5 - 20 / 100)
    assert p_values[-1] == 0.0


def test_ada_only_adjusts_every_interval():
    ada = AdaptiveAugmentStrength(interval=4, target_kimg=1.0)
    assert [ada.update(torch.ones(4)) for _ in range(4)] == pytest.approx([0, 0, 0, 0.016])


def test_ada_resumes_from_state_dict():
    ada = AdaptiveAugmentStrength(interval=3, target_kimg=1.0)
    for _ in range(4):
        ada.update(torch.ones(5))
    resumed = AdaptiveAugmentStrength(interval=3, target_kimg=1.0)
    resumed.load_state_dict(ada.state_dict())
    for _ in range(2):
        assert resumed.update(torch.ones(5)) == ada.update(torch.ones(5))
    assert resumed.p > 0.015


def head_phantom() -> torch.Tensor:
    d, h, w = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), torch.arange(20.0), indexing="ij")
    inside = ((d - 8) / 6) ** 2 + ((h - 12) / 8) ** 2 + ((w - 10) / 7) ** 2 < 1
    volume = torch.where(inside, torch.rand(inside.shape, generator=seeded()) * 1.6 - 0.8, torch.tensor(-1.0))
    return volume[None]


def test_volume_augment_keeps_shape_range_and_background():
    volume = head_phantom()
    augment = VolumeAugment(seed=0)
    for _ in range(5):
        out = augment(volume)
        assert out.shape == volume.shape
        assert out.min() >= -1 and out.max() <= 1
        assert not torch.equal(out, volume)
        assert (out[:, :, :2, :] == -1).all()  # corners stay background after small rotations
    empty = torch.full((1, 8, 12, 10), -1.0)
    assert torch.equal(augment(empty), empty)


def test_volume_augment_intensity_keeps_background_voxels():
    volume = head_phantom()
    out = VolumeAugment(flip_prob=0.0, max_rotation_deg=0.0, max_scale=0.0, seed=1)(volume)
    assert torch.equal(out == -1, volume == -1)


def test_volume_augment_flip_is_seeded():
    flip_only = dict(gamma=(1.0, 1.0), brightness=0.0, contrast=0.0, max_rotation_deg=0.0, max_scale=0.0)
    volume = head_phantom()
    first, second = VolumeAugment(seed=7, **flip_only), VolumeAugment(seed=7, **flip_only)
    flipped = [torch.allclose(first(volume), volume.flip(-1), atol=1e-6) for _ in range(20)]
    assert flipped == [torch.allclose(second(volume), volume.flip(-1), atol=1e-6) for _ in range(20)]
    assert 0 < sum(flipped) < 20
    always = VolumeAugment(flip_prob=1.0, seed=0, **flip_only)
    assert torch.allclose(always(volume), volume.flip(-1), atol=1e-6)


def test_volume_augment_disabled_and_from_config():
    volume = head_phantom()
    assert VolumeAugment.from_config({"enabled": False})(volume) is volume
    assert VolumeAugment.from_config({"gamma": [0.9, 1.1], "seed": 3}).gamma == (0.9, 1.1)
    with pytest.raises(ValueError, match="flip_probability"):
        VolumeAugment.from_config({"flip_probability": 0.5})
