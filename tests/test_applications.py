"""The paper's applications at toy size on CPU: augmentation (Table V), features (Table VI), latent walk (Fig. 5).

One tiny class-conditional HA-GAN (32^3, thorax phantoms, severity grade as class) is trained once per
session and shared; the phantoms' ground-truth attributes make the feature and walk assertions checkable.
"""

import argparse
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.stats
import torch
import yaml

from hagan.api import load_run
from hagan.applications.augmentation import (
    AugmentationSettings,
    class_counts,
    run_augmentation,
    synthetic_count,
)
from hagan.applications.classifier import (
    Table8CNN,
    TrainingRecipe,
    classification_scores,
    predict_proba,
    train_classifier,
)
from hagan.applications.datasets import (
    load_cache,
    match_key,
    measurements,
    parse_targets,
    prepare_npz_splits,
    prepare_phantoms,
    read_tables,
)
from hagan.applications.features import FeatureSettings, run_features
from hagan.applications.latent_walk import WalkSettings, fit_probe, run_latent_walk, walk_latents
from hagan.applications.regression import (
    Standardiser,
    cross_validated_r2,
    fit_ridge,
    kfold_indices,
    loo_alpha,
    out_of_fold_predictions,
)
from hagan.applications.report import corrected_resampled_comparison, paired_comparison
from hagan.applications.runs import ensure_run, training_config
from hagan.applications.segment import affine_spacing, segment, volume_ml
from hagan.cli import applications as cli
from hagan.data.io import Volume
from hagan.data.phantoms import brain_mri
from hagan.data.preprocess import preprocess_volume
from hagan.errors import HaganError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
# small and quick to learn: the encoder's learning rate is raised so that its codes follow lung size
# within the few iterations a CPU test affords
TOY_MODEL = {"size": 32, "latent_dim": 64, "width": 0.125, "num_classes": 5}
TOY_OPTIM = {"batch_size": 4, "lr_g": 2e-4, "lr_e": 5e-4}
TOY_TRAIN = {"iterations": 200, "checkpoint_every": 200, "sample_every": 200, "log_every": 50, "device": "cpu"}


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """Thorax phantoms split 30/10 into caches with the grade as class, and a tiny HA-GAN trained on the 30
    with one torch thread, so that the model is the same whatever the machine's core count."""
    root = tmp_path_factory.mktemp("applications")
    splits, table = prepare_phantoms(root / "data", "thorax-ct", n=40, size=32, seed=0, test_fraction=0.25, label="grade")
    config = training_config(None, None, [], splits["train"], model=TOY_MODEL, optim=TOY_OPTIM, train=TOY_TRAIN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = ensure_run(config, root / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "splits": splits, "table": table, "run": load_run(run_dir, device="cpu")}


def png_shape(path: Path) -> tuple[int, ...]:
    return matplotlib.image.imread(path).shape


# --------------------------------------------------------------------------- building blocks


def test_table_viii_cnn_has_the_papers_layout():
    """1 x 128^3 in: 128 x 4^3 before pooling (Table VIII's last row) and the weight count of its 13 convolutions."""
    with torch.device("meta"):
        model = Table8CNN(num_classes=2)
        x = torch.empty(2, 1, 128, 128, 128)
        assert tuple(model.features(x).shape) == (2, 128, 4, 4, 4)
        assert tuple(model(x).shape) == (2, 2)
    # 27 * sum(c_in * c_out) over the convolutions + BatchNorm scale and shift + dense 128 -> 2
    assert sum(p.numel() for p in model.parameters()) == 27 * 38088 + 2 * 608 + 258
    with pytest.raises(HaganError, match="at least 2 classes"):
        Table8CNN(num_classes=1)


def test_classification_scores():
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    scores = classification_scores(probabilities, np.array([0, 1, 1, 0]))
    assert scores["accuracy"] == 0.5
    assert scores["balanced_accuracy"] == 0.5
    assert scores["auc"] == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs ranked right


def test_ridge_primal_dual_and_leave_one_out_agree():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 30)), rng.normal(size=12)
    wide = fit_ridge(x, y, 0.5)  # 30 features > 12 subjects: dual form
    tall = fit_ridge(np.vstack([x, x]), np.concatenate([y, y]), 1.0)  # same objective doubled: primal form
    assert np.allclose(wide.weights, tall.weights) and np.isclose(wide.intercept, tall.intercept)
    alphas = (0.1, 10.0)
    best, errors = loo_alpha(x, y, alphas)
    for alpha, error in zip(alphas, errors):
        left_out = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            left_out.append((fit_ridge(x[keep], y[keep], alpha).predict(x[i : i + 1])[0] - y[i]) ** 2)
        assert error == pytest.approx(np.mean(left_out))
    assert best == alphas[int(np.argmin(errors))]


def test_cross_validated_r2_separates_signal_from_a_constant():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 0.0]) + 0.1 * rng.normal(size=40)
    assert cross_validated_r2(x, y, 5, [0, 1], 1e-4)["pooled_mean"] > 0.95
    constant = cross_validated_r2(None, y, 5, [0, 1], 1e-4)
    assert -0.2 < constant["pooled_mean"] < 0  # the training folds' mean always misses a little
    with pytest.raises(HaganError, match="k-fold"):
        cross_validated_r2(x, y, 41, [0], 1e-4)


def test_auto_penalty_is_chosen_inside_each_training_fold():
    """--alpha auto: each fold's penalty comes from leave-one-out on that fold's training subjects only."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(25, 40)), rng.normal(size=25)
    folds = kfold_indices(25, 5, seed=0)
    expected = np.empty(25)
    for test in folds:
        train = np.setdiff1d(np.arange(25), test)
        scaler = Standardiser.fit(x[train])
        alpha = loo_alpha(scaler(x[train]), y[train])[0]
        expected[test] = fit_ridge(scaler(x[train]), y[train], alpha).predict(scaler(x[test]))
    assert np.allclose(out_of_fold_predictions(x, y, folds, None), expected)
    assert cli.ridge_penalty("auto") is None and cli.ridge_penalty("0.5") == 0.5
    for bad in ("-1", "large"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.ridge_penalty(bad)


def test_table_viii_cnn_learns_a_visible_difference():
    """A bright block in one class and not the other: the trained classifier must tell held-out volumes apart."""
    rng = np.random.default_rng(0)

    def volumes(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(-0.5, 0.1, (n, 32, 32, 32)).astype(np.float32)
        y = np.arange(n) % 2
        x[y == 1, 8:20, 8:20, 8:20] += 1.0
        return x, y

    train_x, train_y = volumes(40)
    test_x, test_y = volumes(20)
    model = train_classifier(train_x, train_y, 2, TrainingRecipe(epochs=15, width=0.25), 0, torch.device("cpu"))
    assert classification_scores(predict_proba(model, test_x, torch.device("cpu")), test_y)["accuracy"] >= 0.9


def test_corrected_resampled_test_widens_the_plain_one():
    treated, control = [0.5, 0.7, 0.6, 0.9, 0.4, 0.8], [0.4, 0.5, 0.6, 0.6, 0.3, 0.5]
    corrected = corrected_resampled_comparison(treated, control, test_train_ratio=0.25)
    diff = np.subtract(treated, control)
    error = np.sqrt(diff.var(ddof=1) * (1 / 6 + 0.25))
    assert corrected["mean_difference"] == pytest.approx(diff.mean())
    assert corrected["t"] == pytest.approx(diff.mean() / error)
    assert corrected["p_ttest"] == pytest.approx(2 * scipy.stats.t.sf(diff.mean() / error, 5))
    assert corrected["p_ttest"] > paired_comparison(treated, control)["p_ttest"]
    assert corrected_resampled_comparison([0.1, float("nan"), 0.3], [0.0, 0.2, 0.1], 0.25)["folds"] == 2


def test_synthetic_share_and_class_proportions():
    assert synthetic_count(80, 0.2) == 20  # 20% of the augmented set of 100
    labels = np.array([0] * 7 + [1] * 2 + [2] * 1)
    counts = class_counts(labels, 20, 3)
    assert counts.tolist() == [14, 4, 2]
    assert class_counts(labels, 3, 3).sum() == 3


def test_measurements_match_ixi_style_names(tmp_path):
    (tmp_path / "demo.csv").write_text("ID,Age\nIXI013-HH-1212-T1,46.7\nIXI014-HH-1236-T1,\nIXI015-HH-1258-T1,30\n"
                                       "IXI016-HH-1000-T1,51,surplus\n")  # in this table only, with a stray field
    (tmp_path / "roi.csv").write_text("ID,702\nIXI013-HH-1212-T1,1500000\nIXI014-HH-1236-T1,1400000\nIXI015-HH-1258-T1,1e6\n")
    assert match_key("IXI013-HH-1212_T1.nii.gz") == match_key("IXI013-HH-1212-T1")
    table = read_tables([tmp_path / "demo.csv", tmp_path / "roi.csv"])
    names = ["IXI013-HH-1212_T1", "IXI014-HH-1236_T1", "IXI999-HH-0000_T1", "IXI015-HH-1258_T1.nii.gz", "ixi013 hh 1212 t1",
             "IXI016-HH-1000_T1"]
    keep, values = measurements(names, table, parse_targets(["age=Age", "702"]))
    assert keep.tolist() == [True, False, False, True, True, False]  # IXI014 has no age, IXI999 no row, IXI016 no 702
    assert values["age"].tolist() == [46.7, 30.0, 46.7] and values["702"].tolist() == [1.5e6, 1e6, 1.5e6]
    with pytest.raises(HaganError, match="only 1 of 3"):
        measurements(names[:3], table, parse_targets(["age=Age"]))
    with pytest.raises(HaganError, match="no column 'Sex'"):
        measurements(names, table, parse_targets(["Sex"]))
    with pytest.raises(HaganError, match="NAME=COLUMN"):
        parse_targets(["age="])


def test_npz_splits_become_labelled_caches(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = (rng.random((n, 16, 16, 16)) > 0.7).astype(np.uint8) * 255
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1)).astype(np.uint8)
    np.savez(tmp_path / "toy.npz", **arrays)
    caches = prepare_npz_splits(tmp_path / "toy.npz", tmp_path / "data", size=16)
    assert set(caches) == {"train", "val", "test"}
    train = load_cache(caches["train"])
    assert train.volumes.shape == (5, 16, 16, 16)
    assert set(np.unique(train.volumes)) == {-1.0, 1.0}  # masks keep their two values
    assert train.labels.tolist() == arrays["train_labels"].ravel().tolist()
    assert not list((tmp_path / "data").glob(".raw-*"))  # the temporary .npy files are gone
    np.savez(tmp_path / "no_test.npz", train_images=arrays["train_images"], train_labels=arrays["train_labels"])
    with pytest.raises(HaganError, match="test_images"):
        prepare_npz_splits(tmp_path / "no_test.npz", tmp_path / "other", size=16)


def test_bad_options_are_refused_before_any_data_or_training(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    common = ["--data", "phantoms", "--out", str(tmp_path / "out"), "--device", "cpu"]
    for argv, message in ((["augmentation", *common, "--synthetic-fraction", "1.5"], "synthetic-fraction"),
                          (["augmentation", *common, "--phantom-kind", "brain-mri"], "phantom-kind"),
                          (["features", "--data", "cache", "--table", "t.csv", "--out", str(tmp_path / "out")], "--targets"),
                          (["latent-walk", *common, "--steps", "2"], "--steps")):
        args = parser.parse_args(["experiment", *argv])
        with pytest.raises(HaganError, match=message):
            args.func(args)
        assert not (tmp_path / "out").exists()


def test_a_phantom_preparation_is_reused_only_as_it_was_made(tmp_path):
    caches, _ = prepare_phantoms(tmp_path / "data", "thorax-ct", n=4, size=16, seed=0)
    assert prepare_phantoms(tmp_path / "data", "thorax-ct", n=4, size=16, seed=0)[0] == caches
    with pytest.raises(HaganError, match="prepared as"):
        prepare_phantoms(tmp_path / "data", "thorax-ct", n=6, size=16, seed=0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(HaganError, match="not a phantom preparation"):
        prepare_phantoms(tmp_path / "other", "thorax-ct", n=4, size=16, seed=0)


def test_a_run_folder_of_another_model_is_refused(tmp_path, tiny_ct_cache):
    config = training_config(None, None, [], tiny_ct_cache, model=TOY_MODEL, train=TOY_TRAIN)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": {"size": 64}}))
    with pytest.raises(HaganError, match="another model configuration"):
        ensure_run(config, tmp_path / "run")


def test_csf_rule_follows_phantom_ventricles():
    """The MRI rule measures ventricle size: its volume grows with the phantom's ventricle volume."""
    measured, truth = [], []
    for scale in (0.7, 1.1, 1.6):
        image, attributes = brain_mri(48, 3, ventricle_scale=scale)
        cube = preprocess_volume(Volume(image, np.diag([5.0, 5.0, 5.0, 1.0])), "mri", 48, "pad", trim=False)
        spacing = affine_spacing(cube.affine)
        measured.append(volume_ml(segment(cube.array, "csf", "mri", spacing), spacing))
        truth.append(attributes["ventricle_volume_ml"])
    assert np.all(np.diff(truth) > 0) and np.all(np.diff(measured) > 0)
    with pytest.raises(HaganError, match="recipe is 'mri'"):
        segment(cube.array, "lung", "mri", spacing)


# --------------------------------------------------------------------------- the three experiments


def test_segmentation_rules_measure_the_phantoms_ground_truth(toy):
    data = load_cache(toy["splits"]["train"])
    keep, values = measurements(data.names, read_tables([toy["table"]]),
                                parse_targets(["lung_volume_ml", "bone_volume_ml"]))
    spacing = affine_spacing(toy["run"].affine)
    for tissue, column, least in (("lung", "lung_volume_ml", 0.98), ("bone", "bone_volume_ml", 0.8)):
        segmented = [volume_ml(segment(v, tissue, "ct", spacing), spacing) for v in data.volumes[keep]]
        assert np.corrcoef(segmented, values[column])[0, 1] > least


def test_augmentation_experiment(toy, tmp_path):
    settings = AugmentationSettings(seeds=[0, 1], classifier=TrainingRecipe(epochs=1, batch_size=8, width=0.25), device="cpu")
    results = run_augmentation(toy["splits"], {"hagan": [toy["run"]]}, tmp_path, settings, progress=False)
    assert results["synthetic"]["count"] == synthetic_count(30, 0.2) == 8
    assert sum(results["synthetic"]["class_counts"]) == 8
    assert results["data"]["classes"] == 5 and results["data"]["train"] == 30 and results["data"]["test"] == 10
    test_labels = load_cache(toy["splits"]["test"]).labels
    assert results["data"]["test_majority_class_accuracy"] == np.bincount(test_labels).max() / 10
    saved = json.loads((tmp_path / "results.json").read_text())
    for arm in ("real", "real+hagan"):
        accuracy = saved["scores"][arm]["test"]["accuracy"]
        assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy)
    test = saved["paired_tests"]["real+hagan vs real"]["accuracy"]
    assert test["pairs"] == 2 and "ci95" in test
    assert png_shape(tmp_path / "augmentation.png")[2] in (3, 4)
    with pytest.raises(HaganError, match="unconditional"):
        run_augmentation(toy["splits"], {"per-class": [toy["run"]] * 5}, tmp_path / "bad", settings, progress=False)


def test_features_experiment_beats_a_constant_for_lung_volume(toy, tmp_path):
    """The phantoms' lung volume is known: the encoder's codes must predict it on held-out folds."""
    targets = parse_targets(["lung=lung_volume_ml", "bone=bone_volume_ml"])
    settings = FeatureSettings(targets, folds=5, seeds=[0, 1, 2])
    inputs = [toy["splits"]["train"], toy["splits"]["test"]]
    results = run_features(inputs, read_tables([toy["table"]]), {"hagan": toy["run"]}, tmp_path, settings, progress=False)
    assert results["subjects"] == 40
    lung = results["r2"]["lung"]
    assert lung["hagan"]["pooled_mean"] > lung["constant"]["pooled_mean"] + 0.3
    assert lung["constant"]["pooled_mean"] < 0
    assert set(lung) == {"hagan", "image-8^3", "constant"}
    assert png_shape(tmp_path / "features.png")[2] in (3, 4)


def test_latent_walk_grows_the_generated_lungs(toy, tmp_path):
    """A direction fitted on the generator's own samples must enlarge the lungs it generates."""
    settings = WalkSettings(("lung", "lung_volume_ml"), "lung", steps=5, references=4, class_label=0,
                            fit_on="generated", samples=96)
    inputs = [toy["splits"]["train"], toy["splits"]["test"]]
    results = run_latent_walk(inputs, read_tables([toy["table"]]), toy["run"], tmp_path, settings, progress=False)
    assert results["regression"]["samples"] == 96 and results["codes"] is None  # no encoding needed
    assert all(walk["change_ml"] > 0 for walk in results["walks"]), results["walks"]
    assert results["summary"]["mean_spearman"] > 0.5
    assert len(list((tmp_path / "walk").glob("lung_step_*.nii.gz"))) == 5
    assert png_shape(tmp_path / "latent_walk.png")[2] in (3, 4)


def test_latent_walk_from_encoded_real_volumes_reports_the_regression(toy, tmp_path):
    settings = WalkSettings(("lung", "lung_volume_ml"), "lung", steps=3, references=2, reference="encoded", class_label=0)
    inputs = [toy["splits"]["train"], toy["splits"]["test"]]
    results = run_latent_walk(inputs, read_tables([toy["table"]]), toy["run"], tmp_path, settings, progress=False)
    assert results["subjects"] == 40 and results["regression"]["fit_on"] == "real"
    assert results["regression"]["in_sample_r2"] > 0.5  # the codes carry lung volume (see the features test)
    assert results["segmentation"]["real_pearson_with_target"] > 0.98
    assert {w["reference"] for w in results["walks"]} <= set(load_cache(toy["splits"]["train"]).names
                                                             + load_cache(toy["splits"]["test"]).names)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["walks"]) == 2 and len(saved["walks"][0]["measured_ml"]) == 3
    with pytest.raises(HaganError, match="--fit-on"):
        WalkSettings(("lung", "lung_volume_ml"), "lung", fit_on="table").check()


def test_walk_reaches_each_predicted_target():
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(30, 6))
    values = codes @ np.array([2.0, 1.0, 0, 0, 0, 0]) + 3.0
    targets = np.array([0.0, 3.0, 6.0])
    for direction in ("pattern", "weights"):
        probe = fit_probe(codes, values, direction, alpha=1e-6)
        path = walk_latents(probe, codes[0], targets)
        assert np.allclose(probe.predict(path), targets, atol=1e-6)


def test_cli_runs_features_on_a_given_run(toy, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "experiment", "features", "--run", str(toy["run"].run_dir), "--device", "cpu",
        "--data", str(toy["splits"]["train"]), "--table", str(toy["table"]), "--targets", "lung_volume_ml",
        "--folds", "3", "--seeds", "0", "--image-edge", "0", "--out", str(tmp_path),
    ])
    args.func(args)
    assert "R² lung_volume_ml" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "results.json").read_text())["r2"]["lung_volume_ml"]) == {"hagan", "constant"}
    args = parser.parse_args(["experiment", "features", "--run", str(toy["run"].run_dir), "--device", "cpu",
                              "--data", str(toy["splits"]["train"]), "--targets", "lung_volume_ml", "--out", str(tmp_path / "x")])
    with pytest.raises(HaganError, match="--table"):
        args.func(args)


# --------------------------------------------------------------------------- real data and longer runs


@pytest.mark.skipif(not (DATA / "ixi-t1-2mm").is_dir(), reason="needs ../shared/data")
def test_ixi_tables_match_the_volumes_and_their_roi_columns():
    """The documented columns: 702 intracranial volume, 701 = every single ROI, 509 = the six ventricle labels."""
    ixi = DATA / "ixi-t1-2mm"
    table = read_tables([ixi / "demographics.csv", ixi / "dlmuse_roi_volumes.csv"])
    names = [p.name for p in (ixi / "t1").glob("*.nii.gz")]
    keep, values = measurements(names, table, parse_targets(["age=Age", "icv=702", "brain=701", "ventricles=509"]))
    assert keep.sum() >= 70
    rows = [row for row in table.values() if row.get("509")]
    for row in rows[:10]:
        ventricles = sum(float(row[c]) for c in ("4", "11", "49", "50", "51", "52"))
        assert float(row["509"]) == pytest.approx(ventricles, rel=1e-6)
        assert float(row["701"]) + float(row["600"]) == pytest.approx(float(row["702"]), rel=1e-6)
    assert np.all(values["ventricles"] < values["brain"]) and np.all(values["brain"] < values["icv"])


@pytest.mark.slow
def test_cli_trains_its_own_run_on_phantoms(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    common = ["--data", "phantoms", "--n", "24", "--device", "cpu", "--iterations", "60",
              "--set", "model.width=0.125", "--set", "model.latent_dim=32", "--set", "hagan.diffaug=''",
              "--set", "data.augment=false", "--set", "hagan.r1_gamma=0.0", "--out", str(tmp_path / "walk")]
    args = parser.parse_args(["experiment", "latent-walk", *common, "--steps", "3", "--references", "1"])
    args.func(args)
    results = json.loads((tmp_path / "walk" / "results.json").read_text())
    assert results["run"]["iteration"] == 60 and len(results["walks"][0]["measured_ml"]) == 3
