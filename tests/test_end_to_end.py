"""A tiny run through the command line: phantoms, cache, training, resume, generation, encoding."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hagan.api import load_run
from hagan.cli.commands import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--set", "model.width=0.125", "--set", "model.latent_dim=16", "--set", "train.sample_every=3",
        "--set", "train.checkpoint_every=3", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    assert main(["phantoms", str(root / "phantoms"), "--n", "6", "--size", "32", "--seed", "3"]) == 0
    assert main(["preprocess", str(root / "phantoms"), str(root / "cache"), "--recipe", "ct", "--size", "32"]) == 0
    return root


@pytest.fixture(scope="module")
def run_dir(cache):
    run = cache / "run"
    args = ["train", "--data", str(cache / "cache"), "--out", str(run), "--size", "32", "--iterations", "4",
            "--batch-size", "2", *TINY]
    assert main(args) == 0
    return run


def test_training_writes_a_complete_run(run_dir):
    for name in ("config.yaml", "geometry.json", "scalars.jsonl", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_00000003", "iter_00000004"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["iter_00000003.png", "iter_00000004.png"]
    lines = (run_dir / "scalars.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]
    assert any((run_dir / "tensorboard").iterdir())


def test_resume_continues_at_the_saved_iteration(cache, run_dir, capsys):
    assert main(["train", "--out", str(run_dir), "--resume", "--iterations", "6"]) == 0
    assert load_run(run_dir).iteration == 6
    iterations = [json.loads(line)["iteration"] for line in (run_dir / "scalars.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4, 5, 6]
    assert main(["train", "--out", str(run_dir), "--resume", "--iterations", "6"]) == 2
    assert "already trained 6 iterations" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(cache, run_dir, capsys):
    before = (run_dir / "config.yaml").read_text()
    assert main(["train", "--data", str(cache / "cache"), "--out", str(run_dir), "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (run_dir / "config.yaml").read_text() == before


def test_generate_writes_volumes_with_training_geometry(cache, run_dir, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", str(run_dir), "--n", "3", "--out", str(out), "--seed", "5"]) == 0
    files = sorted(out.glob("sample_*.nii.gz"))
    assert len(files) == 3 and (out / "montage.png").is_file()
    image = nib.load(files[0])
    manifest = json.loads((cache / "cache" / "manifest.json").read_text())
    np.testing.assert_allclose(image.affine, manifest["reference_affine"])
    data = np.asarray(image.dataobj)
    assert data.shape == (32, 32, 32) and data.dtype == np.int16
    assert -1024 <= data.min() and data.max() <= 600
    run = load_run(run_dir)
    np.testing.assert_array_equal(run.generate(2, seed=5), run.generate(2, seed=5))
    assert not np.array_equal(run.generate(1, seed=5), run.generate(1, seed=6))


def test_encode_and_reconstruct(cache, run_dir, tmp_path):
    latents = tmp_path / "z.npy"
    assert main(["encode", str(run_dir), str(cache / "phantoms"), "--out", str(latents)]) == 0
    assert np.load(latents).shape == (6, 16)
    csv_path = tmp_path / "z.csv"
    assert main(["encode", str(run_dir), str(cache / "phantoms" / "thorax-ct_0000.nii.gz"), "--out", str(csv_path)]) == 0
    header, row = csv_path.read_text().splitlines()
    assert header.startswith("file,z0,") and row.startswith("thorax-ct_0000.nii.gz,")
    out = tmp_path / "recon"
    assert main(["reconstruct", str(run_dir), str(cache / "phantoms" / "thorax-ct_0001.nii.gz"), "--out", str(out)]) == 0
    assert (out / "reconstruction_0000.nii.gz").is_file() and (out / "montage.png").is_file()


def test_user_errors_are_one_line(cache, run_dir, tmp_path, capsys):
    cases = [
        (["generate", str(run_dir), "--n", "1", "--out", str(tmp_path / "g"), "--class", "1"], "unconditional"),
        (["generate", str(tmp_path), "--n", "1", "--out", str(tmp_path / "g")], "not a training run"),
        (["train", "--data", str(cache / "phantoms"), "--out", str(tmp_path / "r"), "--size", "32"], "add --recipe ct or --recipe mri"),
        (["train", "--data", str(cache / "cache"), "--out", str(tmp_path / "r2"), "--size", "64"], "--size 32"),
        (["encode", str(run_dir), str(cache / "phantoms"), "--out", str(tmp_path / "z.txt")], ".npy or .csv"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


def test_class_conditional_run(tmp_path):
    phantoms = tmp_path / "phantoms"
    assert main(["phantoms", str(phantoms), "--n", "5", "--size", "32"]) == 0
    assert main(["preprocess", str(phantoms), str(tmp_path / "cache"), "--recipe", "ct", "--size", "32",
                 "--labels", str(phantoms / "attributes.csv"), "--label-column", "grade"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "cache"), "--out", str(run), "--size", "32", "--iterations", "2",
                 "--batch-size", "2", "--num-classes", "5", *TINY]) == 0
    out = tmp_path / "gen"
    assert main(["generate", str(run), "--n", "2", "--out", str(out), "--class", "4"]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 2
    assert main(["generate", str(run), "--n", "2", "--out", str(out)]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "ixi-t1-2mm" / "t1").is_dir(), reason="../shared/data not present")
def test_trains_briefly_on_real_ixi_volumes(tmp_path):
    sources = sorted((SHARED_DATA / "ixi-t1-2mm" / "t1").glob("*.nii.gz"))[:12]
    subset = tmp_path / "t1"
    subset.mkdir()
    for path in sources:
        (subset / path.name).symlink_to(path)
    assert main(["preprocess", str(subset), str(tmp_path / "cache"), "--recipe", "mri", "--size", "64"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "cache"), "--out", str(run), "--size", "64", "--iterations", "20",
                 "--set", "model.width=0.25", "--set", "model.latent_dim=128", "--set", "data.augment=true",
                 "--set", "hagan.diffaug=translation,cutout", "--set", "hagan.r1_gamma=1.0"]) == 0
    volumes = load_run(run).generate(2, seed=0)
    assert volumes.shape == (2, 64, 64, 64) and np.isfinite(volumes).all()


def require_deepbet():
    from hagan.errors import HaganError
    from hagan.evaluation.features import wheel_file

    try:
        wheel_file("deepbet", "data/models/model.pt", "")
    except HaganError:
        pytest.skip("deepbet is not installed")


def test_evaluate_a_run_against_its_cache(cache, run_dir, tmp_path, capsys):
    require_deepbet()
    out = tmp_path / "eval"
    args = ["evaluate", "--real", str(cache / "cache"), "--fake", str(run_dir), "--out", str(out), "--n", "4",
            "--fid-method", "eigh", "--ms-ssim-volumes", "3"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"fid", "kid_mean", "kid_std", "mmd", "ms_ssim"} <= set(metrics)
    assert metrics["fid"] > 0 and 0 < metrics["ms_ssim"] <= 1
    assert "fid" in capsys.readouterr().out.lower()
    figure = tmp_path / "mds.png"
    assert main(["embedding", f"tiny={out}", f"again={out}", "--out", str(figure)]) == 0
    assert figure.stat().st_size > 0
    assert main(["embedding", str(out), "--out", str(figure)]) == 2
    assert "LABEL=EVAL_DIR" in capsys.readouterr().err


def test_pickle_weights_need_an_explicit_flag(run_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(sorted((run_dir / "checkpoints").iterdir())[-1] / "weights.safetensors"))
    pickled = tmp_path / "weights.pt"
    torch.save(weights, pickled)
    args = ["generate", str(run_dir), "--checkpoint", str(pickled), "--n", "1", "--out", str(tmp_path / "g")]
    assert main(args) == 2
    assert "pickle" in capsys.readouterr().err
    assert main([*args, "--allow-pickle"]) == 0
    assert (tmp_path / "g" / "sample_0000.nii.gz").is_file()


def test_periodic_kid_is_logged_during_training(cache, tmp_path):
    require_deepbet()
    run = tmp_path / "run"
    args = ["train", "--data", str(cache / "cache"), "--out", str(run), "--size", "32", "--iterations", "2",
            "--batch-size", "2", *TINY, "--set", "train.eval_every=2", "--set", "train.eval_samples=3"]
    assert main(args) == 0
    records = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    kid = [r for r in records if "eval/kid" in r]
    assert [r["iteration"] for r in kid] == [2] and np.isfinite(kid[0]["eval/kid"])
