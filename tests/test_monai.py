"""MONAI users: synthetic volumes as a dictionary dataset, and our FID, MMD and MS-SSIM against MONAI's metrics.

MONAI is a test dependency (``pip install -e .[test]``); without it the tests that need it are skipped.
"""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hagan.api import load_run
from hagan.applications.synthetic_dataset import SyntheticVolumes
from hagan.cli.commands import main
from hagan.config import build_config, save_yaml
from hagan.data.io import write_json_atomic
from hagan.errors import HaganError
from hagan.evaluation.stats import fid_from_features, mmd, ms_ssim_3d
from hagan.models import build_model
from hagan.training.checkpoint import save_checkpoint

TINY = ["--set", "model.width=0.125", "--set", "model.latent_dim=16", "--set", "train.sample_every=2",
        "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A tiny class-conditional HA-GAN (32^3, 5 severity grades), trained for two iterations."""
    root = tmp_path_factory.mktemp("synthetic")
    assert main(["phantoms", str(root / "phantoms"), "--n", "4", "--size", "32"]) == 0
    assert main(["preprocess", str(root / "phantoms"), str(root / "cache"), "--recipe", "ct", "--size", "32",
                 "--labels", str(root / "phantoms" / "attributes.csv"), "--label-column", "grade"]) == 0
    assert main(["train", "--data", str(root / "cache"), "--out", str(root / "run"), "--size", "32",
                 "--iterations", "2", "--batch-size", "2", "--num-classes", "5", "--device", "cpu", *TINY]) == 0
    return load_run(root / "run", device="cpu")


@pytest.fixture(scope="module")
def label_map_run(tmp_path_factory):
    """A progressive GAN with two label channels, at its initial weights (what is tested is the dataset's
    handling of label maps, not their quality)."""
    root = tmp_path_factory.mktemp("label-maps")
    config = build_config(None, None, [{"model": {"name": "progressive", "size": 32, "latent_dim": 16},
                                        "progressive": {"segmentation_labels": 2, "max_channels": 32}}])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(config)
    save_checkpoint(root / "checkpoints", 0, model, {}, torch.Generator().manual_seed(0), {}, keep=1)
    save_yaml(config, root / "config.yaml")
    affine = np.diag([2.0, 2.0, 2.0, 1.0]).tolist()
    write_json_atomic(root / "geometry.json", {"reference_affine": affine, "recipe": "mri", "mode": "resize",
                                               "size": 32, "num_classes": 0})
    return load_run(root, device="cpu")


def test_items_are_the_volumes_generate_writes_with_balanced_classes(conditional_run):
    data = SyntheticVolumes(conditional_run, n=6, seed=3)
    assert len(data) == 6
    item = data[4]
    assert item["image"].shape == (1, 32, 32, 32) and item["image"].dtype == torch.float32
    assert int(item["label"]) == 4  # the classes in turn: 0, 1, 2, 3, 4, 0
    labels = [0, 1, 2, 3, 4, 0]
    one_at_a_time = conditional_run.generate(6, seed=3, labels=labels, batch_size=1)
    assert np.array_equal(item["image"][0].numpy(), one_at_a_time[4])
    batched = conditional_run.generate(6, seed=3, labels=labels)  # another summation order
    np.testing.assert_allclose(item["image"][0].numpy(), batched[4], atol=1e-5)
    assert torch.equal(data[4]["image"], item["image"])  # the same index is the same volume every time
    assert not torch.equal(data[0]["image"], data[5]["image"])  # same class, other latent
    np.testing.assert_array_equal(item["image_meta_dict"]["affine"].numpy(), conditional_run.affine)
    assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_output_units_and_chosen_classes(conditional_run):
    hu = SyntheticVolumes(conditional_run, n=2, labels=2, units="output")[1]
    assert int(hu["label"]) == 2 and hu["image"].min() >= -1024 and hu["image"].max() <= 600
    with pytest.raises(HaganError, match="labels must be one class or 2 classes"):
        SyntheticVolumes(conditional_run, n=2, labels=[0, 7])
    with pytest.raises(HaganError, match="units must be"):
        SyntheticVolumes(conditional_run, n=2, units="hu")


def test_a_plain_pytorch_loader_batches_items(conditional_run):
    batch = next(iter(DataLoader(SyntheticVolumes(conditional_run, n=4), batch_size=2)))
    assert batch["image"].shape == (2, 1, 32, 32, 32) and batch["label"].tolist() == [0, 1]


def test_label_maps_come_with_their_volumes(label_map_run):
    item = SyntheticVolumes(label_map_run, n=2, seed=1)[1]
    images, maps = label_map_run.generate_with_label_maps(2, seed=1)
    assert item["label"].shape == (1, 32, 32, 32) and item["label"].dtype == torch.int64
    assert np.array_equal(item["label"][0].numpy(), maps[1]) and np.array_equal(item["image"][0].numpy(), images[1])
    assert "label_meta_dict" in item


# ----- with MONAI --------------------------------------------------------------------------------------


def test_monai_transforms_and_loader_take_the_items(conditional_run, label_map_run):
    monai = pytest.importorskip("monai")
    from monai.transforms import Compose, RandFlipd, ScaleIntensityd

    transform = Compose([ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
                         RandFlipd(keys="image", prob=1.0, spatial_axis=0)])
    data = SyntheticVolumes(conditional_run, n=4, seed=0, transform=transform, meta_tensors=True)
    batch = next(iter(monai.data.DataLoader(data, batch_size=2)))
    assert isinstance(batch["image"], monai.data.MetaTensor) and batch["image"].shape == (2, 1, 32, 32, 32)
    plain = SyntheticVolumes(conditional_run, n=4, seed=0)[1]["image"]
    flipped = (plain - plain.min()) / (plain.max() - plain.min())
    np.testing.assert_allclose(batch["image"][1].as_tensor().numpy(), flipped.flip(1).numpy(), atol=1e-6)
    # the affine travels with the volume and follows the flip
    assert not np.allclose(batch["image"].affine[1].numpy(), conditional_run.affine)

    maps = SyntheticVolumes(label_map_run, n=2, meta_tensors=True,
                            transform=RandFlipd(keys=["image", "label"], prob=1.0, spatial_axis=2))
    item = maps[0]
    raw = SyntheticVolumes(label_map_run, n=2)[0]
    assert torch.equal(item["label"].as_tensor(), raw["label"].flip(3))
    cached = monai.data.CacheDataset(SyntheticVolumes(label_map_run, n=2), progress=False)
    assert torch.equal(cached[1]["image"], SyntheticVolumes(label_map_run, n=2)[1]["image"])


def features(seed, n=48, dim=12, shift=0.0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5
    return (torch.randn(n, dim, generator=gen) @ (torch.eye(dim) + mix)) * scale + shift


def test_fid_agrees_with_monai():
    metrics = pytest.importorskip("monai.metrics")
    real, fake = features(0), features(1, shift=0.3, scale=1.2)
    theirs = float(metrics.FIDMetric()(fake, real))
    assert theirs > 0.5
    for method in ("sqrtm", "eigh"):
        assert abs(fid_from_features(real.numpy(), fake.numpy(), method=method) - theirs) < 1e-9 * max(1.0, theirs)


def test_mmd_agrees_with_monai_on_the_same_kernel():
    """MONAI's MMDMetric is the unbiased MMD^2 with the linear kernel x.y on whatever it is given; ours is
    HA-GAN's, the Gaussian kernel exp(-|x-y|^2 / m^2) with m the median distance. Given random Fourier
    features of that Gaussian kernel (Rahimi & Recht 2007), MONAI's linear MMD estimates ours."""
    metrics = pytest.importorskip("monai.metrics")
    real, fake = features(2, n=32, dim=6), features(3, n=32, dim=6, shift=0.4)
    pooled = torch.cat([real, fake]).double()
    median = torch.cdist(pooled, pooled).flatten().sort().values[(pooled.shape[0] ** 2 - 1) // 2]
    gen = torch.Generator().manual_seed(4)
    d = 200_000
    w = torch.randn(6, d, generator=gen, dtype=torch.float64) * (2**0.5 / median)
    b = torch.rand(d, generator=gen, dtype=torch.float64) * 2 * torch.pi

    def fourier(x):
        return (2 / d) ** 0.5 * torch.cos(x.double() @ w + b)

    ours = mmd(real.numpy(), fake.numpy())
    theirs = float(metrics.MMDMetric(y_mapping=fourier)(fake[:, None], real[:, None]))
    assert ours > 0.05
    assert abs(ours - theirs) < 0.01 * ours  # 0.3% with these 200000 features


def smooth_pair(seed, size, batch):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.nn.functional.avg_pool3d
    x = pool(torch.rand(batch, 1, size + 4, size + 4, size + 4, generator=gen), 5, 1) * 2 - 1
    return x, (x + 0.3 * pool(torch.rand(batch, 1, size + 4, size + 4, size + 4, generator=gen), 5, 1)).clamp(-1, 1)


def test_ms_ssim_agrees_with_monai():
    """Same window (Gaussian 7^3, sigma 1.5), constants, pooling and clipping. Ours renormalises the weights
    to sum to 1 (MONAI's five sum to 1.0001) and, on a volume too small for five scales (under 112^3), uses
    the scales that fit where MONAI refuses; given those scales' weights renormalised, MONAI agrees."""
    metrics = pytest.importorskip("monai.metrics")
    weights = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    x, y = smooth_pair(6, 64, 2)  # four scales: 64, 32, 16, 8
    ours = ms_ssim_3d(x, y).float()
    four = tuple(w / sum(weights[:4]) for w in weights[:4])
    theirs = metrics.MultiScaleSSIMMetric(spatial_dims=3, data_range=2.0, kernel_size=7, weights=four)(x, y)[:, 0]
    assert 0.2 < float(ours.min()) and float(ours.max()) < 0.99
    assert float((ours - theirs).abs().max()) < 1e-5
    x, y = smooth_pair(7, 112, 1)  # all five scales, MONAI's own weights
    as_monai = metrics.MultiScaleSSIMMetric(spatial_dims=3, data_range=2.0, kernel_size=7)(x, y)[:, 0]
    assert float((ms_ssim_3d(x, y).float() - as_monai).abs().max()) < 1e-4
