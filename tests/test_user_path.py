"""A newcomer's path through the command line: training straight from a folder of volumes, errors whose
suggested commands run, a time-limit stop that says how to continue, no folder from a failed start,
help text for every option, and evaluation of any tool's volumes with reference scores."""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hagan.cli.commands import COMMANDS, build_parser, command_list_parser, main
from hagan.data.phantoms import write_phantom_dataset
from hagan.evaluation.evaluate import real_halves, repeated
from hagan.evaluation.medicalnet import MedicalNetResNet

ROOT = Path(__file__).resolve().parents[1]
IXI = ROOT.parent / "shared" / "data" / "ixi-t1-2mm" / "t1"
TINY = ["--preset", "demo", "--set", "train.sample_every=1000", "--set", "train.log_every=1", "--set",
        "train.checkpoint_every=1000", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Four 32^3 CT phantoms and one file that is not a volume."""
    folder = tmp_path_factory.mktemp("scans")
    write_phantom_dataset(folder, kind="thorax-ct", n=4, size=32, seed=0)
    (folder / "broken.nii.gz").write_bytes(b"not a volume")
    return folder


@pytest.fixture(scope="module")
def cache(scans, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c32"
    assert main(["preprocess", str(scans), str(out), "--recipe", "ct", "--size", "32"]) == 0
    return out


def run_suggested(message: str, marker: str) -> int:
    """Run the `hagan ...` command that an error or a report suggests after ``marker``."""
    command = message.split(marker, 1)[1].strip()
    command = command.split(" (another", 1)[0]
    argv = shlex.split(command)
    assert argv[0] == "hagan", command
    return main(argv[1:])


# ------------------------------------------------------------------------------- training from a folder


def test_train_from_a_folder_of_volumes_and_resume_reuses_its_cache(scans, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(scans), "--recipe", "ct", "--out", str(out), "--iterations", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert f"preprocessing {scans} into {out / 'cache'}" in printed
    assert "4 of 5 volumes preprocessed" in printed and "broken.nii.gz" in printed  # the skipped file, with why
    manifest = out / "cache" / "manifest.json"
    assert json.loads(manifest.read_text())["size"] == 32
    assert f"cache: {out / 'cache'}" in (out / "config.yaml").read_text()
    built = manifest.stat().st_mtime_ns

    assert main(["train", "--data", str(scans), "--out", str(out), "--resume", "--iterations", "3", *TINY]) == 0
    assert "reusing the cache" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns == built
    assert (out / "checkpoints" / "iter_00000003").is_dir()


@pytest.mark.skipif(not IXI.is_dir(), reason="needs ../shared/data/ixi-t1-2mm (real IXI heads)")
def test_train_from_real_ixi_heads(tmp_path, capsys):
    heads = tmp_path / "t1"
    heads.mkdir()
    for path in sorted(IXI.glob("*.nii.gz"))[:4]:
        (heads / path.name).symlink_to(path)
    out = tmp_path / "runs" / "x"
    assert main(["train", "--data", str(heads), "--out", str(out), "--recipe", "mri", "--iterations", "1", *TINY]) == 0
    assert "4 of 4 volumes preprocessed" in capsys.readouterr().out
    assert (out / "checkpoints" / "iter_00000001").is_dir()


# ------------------------------------------------------------------------------- advice that works


def test_size_overrides_a_presets_size():
    from hagan.cli.commands import training_overrides, training_preset
    from hagan.config import build_config

    args = build_parser().parse_args(["train", "--data", "c", "--out", "r", "--preset", "small-data-128", "--size", "32"])
    config = build_config(training_preset(args), None, training_overrides(args))
    assert config.model.size == 32 and config.hagan.upsample == "trilinear"  # the preset's other values stay


def test_unknown_preset_names_close_ones_without_the_usage_block(cache, tmp_path, capsys):
    assert main(["train", "--data", str(cache), "--out", str(tmp_path / "r"), "--preset", "small-data128"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hagan train: error: unknown preset 'small-data128'; did you mean small-data-128")
    assert "usage:" not in err and "paper-512" not in err and len(err.splitlines()) == 1
    assert main(["summary", "--preset", "papr-256"]) == 2
    assert "did you mean paper-256" in capsys.readouterr().err


def test_suggested_commands_run(cache, tmp_path, capsys):
    out = tmp_path / "run"
    # the cache is 32^3, the model 64^3: the error's command trains at the cache's size
    assert main(["train", "--data", str(cache), "--out", str(out), "--iterations", "1", *TINY, "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert "volumes are 32^3 but model.size is 64; train at the cache's size with: hagan train" in err
    assert not out.exists()
    assert run_suggested(err, "with: ") == 0
    assert (out / "checkpoints" / "iter_00000001").is_dir()

    # a finished run: the error's command trains on
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "already trained 1 iterations" in err
    assert run_suggested(err, "continue with: ") == 0
    assert (out / "checkpoints" / "iter_00000002").is_dir()


def test_torchrun_advice_runs(scans, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", str(scans), "--recipe", "ct", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "under torchrun, preprocess once before training: hagan preprocess" in err and not out.exists()
    monkeypatch.delenv("WORLD_SIZE")
    preprocess, train_with = err.split("training: ", 1)[1].split(", then pass ")
    assert main(shlex.split(preprocess)[1:]) == 0
    data = shlex.split(train_with)[1]
    assert main(["train", "--data", data, "--out", str(out), "--iterations", "1", *TINY]) == 0


def test_a_run_stopped_by_its_time_limit_says_why_and_how_to_continue(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(cache), "--out", str(out), "--iterations", "500", *TINY,
                 "--set", "train.max_minutes=0.004"]) == 0
    printed = capsys.readouterr().out
    match = re.search(r"stopped at iteration (\d+) of 500: the time limit train.max_minutes = 0.004 ran out; "
                      r"checkpoint saved; continue with: hagan train --out \S+ --resume", printed)
    assert match, printed
    stopped = int(match[1])
    assert 0 < stopped < 500 and (out / "checkpoints" / f"iter_{stopped:08d}").is_dir()
    assert run_suggested(printed, "continue with: ") == 0
    assert "stopped at iteration" in capsys.readouterr().out  # resumed with the same limit, and said so again


# ------------------------------------------------------------------------------- a failed start leaves nothing


def test_a_failed_train_leaves_no_folder(scans, cache, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.nii.gz").write_bytes(b"not a volume")
    (junk / "b.nii.gz").write_bytes(b"\x00" * 400)
    config = tmp_path / "no-data.yaml"
    config.write_text("model: {size: 32, width: 0.25, latent_dim: 128}\n")
    cases = {  # case: (arguments, what the one-line error says)
        "unknown preset": (["--data", str(cache), "--preset", "nope"], "unknown preset 'nope'"),
        "missing data": (["--data", str(tmp_path / "nowhere"), "--preset", "demo"], "nowhere: no such folder"),
        "a config without data": (["--config", str(config)], "no training data"),
        "no recipe for a folder": (["--data", str(scans), "--preset", "demo"], "add --recipe ct or --recipe mri"),
        "no usable volume": (["--data", str(junk), "--recipe", "ct", "--preset", "demo"], "no usable volume"),
        "size mismatch": (["--data", str(cache), "--preset", "demo", "--size", "64"], "volumes are 32^3"),
        "labels the cache lacks": (["--data", str(cache), "--preset", "demo", "--num-classes", "2"], "needs a label"),
        "labels the folder lacks": (["--data", str(scans), "--recipe", "ct", "--preset", "demo", "--num-classes", "2"],
                                    "needs a label"),
    }
    for case, (argv, message) in cases.items():
        out = tmp_path / "runs" / case.replace(" ", "-")
        assert main(["train", "--out", str(out), *argv]) == 2, case
        last = capsys.readouterr().err.splitlines()[-1]  # after any progress bar
        assert last.startswith("hagan train: error: ") and message in last, (case, last)
        assert not (tmp_path / "runs").exists(), case


# ------------------------------------------------------------------------------- help text


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, parser), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subparsers(sub, (*path, name))


def test_every_option_of_every_command_has_help_a_description_and_an_example():
    commands = list(subparsers(build_parser()))
    assert len(commands) > len(COMMANDS)  # experiment's own commands are walked too
    for path, parser in commands:
        name = " ".join(path)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"hagan {name} {action.option_strings or action.dest}: no help"
        assert parser.description, f"hagan {name}: no description"
        text = parser.format_help()
        assert "example:\n  hagan " in text, f"hagan {name}: no example"
        assert "paper-512" not in parser.format_usage(), f"hagan {name}: the preset list is in the usage line"
    train = dict(commands)[("train",)].format_help()
    assert "--iterations ITERATIONS" in train and "paper-512" in train  # listed once, under --preset
    assert "(default: auto)" in dict(commands)[("generate",)].format_help()


def test_command_list_matches_the_full_parser():
    def summaries(parser):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {c.dest: c.help for c in action._choices_actions}

    assert summaries(command_list_parser()) == summaries(build_parser()) == COMMANDS


def test_top_level_help_does_not_import_torch():
    code = ("import sys\nfrom hagan.cli.commands import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^ +train +train a model", done.stdout, re.MULTILINE)


def test_gitignore_covers_the_readmes_output_paths():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"--out ([a-z][\w./-]*)", readme)) | {"cache/ixi-128/manifest.json"}
    assert {"generated/", "runs/ixi", "eval/", "recon/", "latents.csv"} <= paths
    for path in sorted(paths):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not in .gitignore"


# ------------------------------------------------------------------------------- evaluation of any tool's volumes


def heads(folder: Path, n: int, shape: tuple[int, int, int], spacing: float, seed: int, scale: float) -> Path:
    """Non-cube head-like volumes: an ellipsoid with a darker core and noise, in arbitrary units."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    for i in range(n):
        radii = rng.uniform(0.6, 0.9, 3)[:, None, None, None]
        r = np.sqrt(((grid / radii) ** 2).sum(0))
        volume = (r < 1) * (1.0 - 0.5 * (r < rng.uniform(0.3, 0.6))) + 0.05 * rng.standard_normal(shape)
        nib.save(nib.Nifti1Image((scale * np.clip(volume, 0, None)).astype(np.float32), np.diag([spacing] * 3 + [1])),
                 str(folder / f"head{i:02d}.nii.gz"))
    return folder


def test_evaluate_scores_two_folders_of_non_cube_volumes_with_references(tmp_path, capsys):
    real = heads(tmp_path / "real", 6, (24, 24, 18), 2.0, seed=1, scale=500.0)
    other = heads(tmp_path / "other-tool", 4, (30, 32, 20), 1.5, seed=2, scale=3.0)
    torch.manual_seed(0)
    weights = tmp_path / "r10.pth"
    torch.save({"state_dict": MedicalNetResNet(10).state_dict()}, weights)
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["evaluate", "--real", str(real), "--fake", str(other), "--out", str(out), "--recipe", "mri",
                     "--size", "16", "--features", "medicalnet-r10", "--weights", str(weights),
                     "--allow-unknown-weights", "--fid-method", "eigh", "--device", "cpu", "--batch-size", "6"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    grid = metrics["protocol"]["grid"]
    assert grid["size"] == 16 and grid["size_from"] == "--size" and grid["mode"] == "resize_keep_aspect"
    assert "resize_keep_aspect" in grid["rule"]
    assert metrics["protocol"]["fake"]["fit"] == "training preprocessing" and metrics["n_fake"] == 4
    halves, mean = metrics["reference"]["real_halves"], metrics["reference"]["mean_volume"]
    assert halves["n"] == [3, 3] and mean["n"] == 4 and mean["ms_ssim"] == 1.0
    for key in ("fid", "kid_mean", "mmd"):
        assert np.isfinite(halves[key]) and np.isfinite(mean[key])
    assert metrics["features"]["medicalnet-r10"]["reference"]["real_halves"]["fid"] == halves["fid"]
    assert mean["fid"] > halves["fid"]  # one volume repeated lacks the real set's spread
    markdown = (out / "metrics.md").read_text()
    assert "reference: real half vs other half (3 vs 3)" in markdown and "reference: real mean volume x 4" in markdown
    assert markdown in printed


def test_reference_sets_split_and_repeat_by_volume():
    rng = np.random.default_rng(0)
    sets = {"volume": rng.standard_normal((5, 3)), "axial": rng.standard_normal((10, 3))}  # 2 slices per volume
    a, b = real_halves(sets, seed=0)
    assert len(a["volume"]) == 2 and len(b["volume"]) == 3 and len(a["axial"]) == 4 and len(b["axial"]) == 6
    rows = {tuple(r) for r in np.concatenate([a["axial"], b["axial"]])}
    assert rows == {tuple(r) for r in sets["axial"]}
    assert np.array_equal(repeated({"axial": sets["axial"][:2]}, 3)["axial"], np.tile(sets["axial"][:2], (3, 1)))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["trian"], "hagan: error: argument COMMAND: invalid choice 'trian'; did you mean train or translate?"),
        (["preprocess", "a", "b", "--recipe", "mrri", "--size", "32"], "argument --recipe: invalid choice 'mrri'; did you mean mri?"),
        (["experiment", "augmentation", "--preset", "demoo", "--data", "x", "--out", "y"], "invalid choice 'demoo'; did you mean demo?"),
        (["generate"], "hagan generate: error: the following arguments are required: run, --out (see `hagan generate --help`)"),
    ],
)
def test_argument_errors_are_one_line_with_the_close_choices(argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expected in err and len(err.splitlines()) == 1 and "usage:" not in err
