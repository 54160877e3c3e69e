"""Hostile runs and caches (issue 15): tampered run folders and caches, non-finite weights and outputs,
count arguments, numeric config keys, and YAML alias bombs. Each gives one short line that names the
file or the key, never a traceback and never a silent wrong result."""

import dataclasses
import json
import pickle
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hagan.api import load_run
from hagan.checks import short_repr
from hagan.cli.commands import build_parser, main
from hagan.config import CORE_SECTIONS, MODEL_PRESETS, Config, build_config, parse_assignment
from hagan.data.dataset import CachedVolumeDataset
from hagan.errors import HaganError
from hagan.models import SECTIONS, model_spec
from hagan.models.hagan.model import HAGAN
from hagan.training.trainer import Trainer, train

TINY = {
    "model": {"size": 32, "width": 0.125, "latent_dim": 16},
    "optim": {"batch_size": 2},
    "train": {"iterations": 1, "checkpoint_every": 1, "log_every": 1, "sample_every": 1000},
    "hagan": {"ema_kimg": 1.0},
}
CHECKPOINT = Path("checkpoints") / "iter_00000001"
STATE, WEIGHTS, TRAINING_STATE = (CHECKPOINT / name for name in
                                  ("state.json", "weights.safetensors", "training_state.safetensors"))
GEOMETRY, CONFIG = Path("geometry.json"), Path("config.yaml")


@pytest.fixture(scope="module")
def trained(tiny_ct_cache, tmp_path_factory):
    """One tiny HA-GAN run (with an averaged generator), trained once for the whole module."""
    run = tmp_path_factory.mktemp("hostile-runs") / "run"
    train(build_config(None, None, [TINY, {"data": {"cache": str(tiny_ct_cache)}}]), run, progress=False)
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("tensorboard", "samples"))
    return dst


def assert_one_short_line(message: str, names: str, tmp_path: Path) -> None:
    """One line, no traceback, naming ``names`` (a file or key), short once the test's folder is left out."""
    assert "\n" not in message and "Traceback" not in message, message
    assert names in message, message
    assert len(message.replace(str(tmp_path.parent), "")) < 300, message


def error_line(capsys) -> str:
    """The last line of stderr (progress bars come before it), after checking there is no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def write(relative, data):
    def tamper(root: Path) -> None:
        path = root / relative
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return tamper


def bomb(levels: int, indent: str = "") -> str:
    """A "billion laughs" YAML: each line an anchored list of nine aliases of the line before."""
    names = "abcdefghijklmnop"
    lines = [f"{indent}- &a [x,x,x,x,x,x,x,x,x]"]
    lines += [f"{indent}- &{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# ----- every numeric key of the config --------------------------------------------------------------------
# keys where 0 is a meaningful setting (a term or feature switched off, or "automatic"); every other
# numeric key must refuse 0
ZERO_MEANS = {
    "model.num_classes": "unconditional", "hagan.lambda_recon_slab": "no slab reconstruction",
    "hagan.lambda_recon_global": "no global reconstruction", "hagan.lambda_class": "no class loss",
    "hagan.r1_gamma": "no fixed R1", "hagan.r1_per_voxel": "no per-voxel R1", "hagan.gp_lambda": "no gradient penalty",
    "hagan.weight_high": "no high-resolution D loss", "hagan.weight_low": "no low-resolution D loss",
    "hagan.lambda_recon_generator": "off", "hagan.lambda_latent_prior": "off", "hagan.diffaug_p": "no DiffAugment",
    "hagan.ada_target": "no ADA", "optim.beta1": "no momentum", "optim.beta2": "Adam's second moment of one step",
    "data.workers": "load in the training process", "train.seed": "seed 0", "train.max_minutes": "no time limit",
    "train.eval_every": "no periodic KID", "train.max_rollbacks": "stop at the first divergence",
    "hagan.ema_kimg": "no EMA", "hagan.ema_rampup": "no ramp-up", "patch.overlap": "no overlap",
    "patch.iterations_per_stage": "split train.iterations evenly", "patch.dropout": "no dropout",
    "patch.lambda_l1": "no L1 term",
    "patch.sketch_sigma": "no smoothing", "patch.sketch_low": "every edge", "patch.sketch_noise": "off",
    "patch.context_noise": "off", "patch.context_blur_p": "off", "patch.context_blur_sigma": "off",
    "patch.context_half_res_p": "off", "patch.seed_size": "patch.low_res_size",
    "progressive.final_images": "no final phase", "progressive.segmentation_labels": "images only",
    "progressive.encoder_recon_weight": "latent regression only", "baseline.lambda_recon": "off",
    "baseline.vae_recon_generator": "off", "baseline.vae_recon_encoder": "off",
    "progressive.gp_lambda": "no gradient penalty", "baseline.gp_lambda": "no gradient penalty",
}
# keys where a negative value is meaningful
NEGATIVE_MEANS = {"data.workers": {-1: "automatic"}, "patch.overlap": {-1: "the papers' overlap"}}
# zero is allowed for this key, but not together with the default of another
ZERO_CONFLICTS = {"patch.sketch_high": "patch.sketch_low (0.1) must not exceed it"}
NUMERIC_KEYS = [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
                for f in dataclasses.fields(section.default_factory())
                if type(getattr(section.default_factory(), f.name)) in (int, float)]
MODEL_BASES = [None, *MODEL_PRESETS.values()]  # HA-GAN's defaults, then each other model's preset
VALUES = ["-1", "-0.5", "0", ".nan", "nan", ".inf", "-.inf", "1e999"]


def test_the_numeric_keys_are_all_there():
    assert len(NUMERIC_KEYS) == 76 and "hagan.lambda_recon_slab" in NUMERIC_KEYS and "baseline.critic_steps" in NUMERIC_KEYS
    assert set(ZERO_MEANS) | set(NEGATIVE_MEANS) | set(ZERO_CONFLICTS) <= set(NUMERIC_KEYS)


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_every_numeric_key_refuses_bad_values_naming_the_key(key):
    """Through ``--set`` (parse_assignment), on every model's base: refused naming the key, or allowed
    (only in the core sections and the base model's own section: another model's option is refused)."""
    section, field = key.split(".")
    for base in MODEL_BASES:
        owns = section in CORE_SECTIONS or section == model_spec(build_config(base).model.name).section
        for text in VALUES:
            value = yaml.safe_load(text) if text != "nan" else float("nan")
            meaningful = (value == 0 and key in ZERO_MEANS) or (value in NEGATIVE_MEANS.get(key, {}))
            # another model's option at its default changes nothing (older runs' files list every section)
            allowed = meaningful and (owns or value == getattr(SECTIONS[section](), field))
            try:
                build_config(base, None, [parse_assignment(f"{key}={text}")])
            except HaganError as err:
                message = str(err)
                assert not allowed, f"{key}={text} on {base}: {message}"
                assert "\n" not in message and len(message) < 400, message
                assert key in message or (f"{section}." in message and field in message), (base, text, message)
            else:
                assert allowed, f"{key}={text} on {base or 'hagan'} was accepted"


# ----- YAML that is cheap to parse and expensive to print -------------------------------------------------
def _measure(call, memory=True):
    """(result or error, seconds, peak bytes the call allocated: traced only with ``memory``, which
    slows the call down)."""
    if memory:
        tracemalloc.start()
    started = time.perf_counter()
    try:
        outcome = call()
    except (HaganError, SystemExit) as err:
        outcome = err
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if memory else None
    if memory:
        tracemalloc.stop()
    return outcome, seconds, peak


@pytest.mark.parametrize("levels", [9, 10])
def test_alias_bomb_config_is_one_short_line_fast(tmp_path, capsys, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text("model:\n  size:\n" + bomb(levels, "  "))
    assert len(path.read_bytes()) < 400  # 9 ** levels values once expanded
    build_parser()  # imports what the command line imports, outside the measurement
    code, seconds, peak = _measure(lambda: main(["train", "--config", str(path), "--out", str(tmp_path / "run")]))
    err = error_line(capsys)
    assert code == 2 and seconds < 1 and peak < 5 * 2**20, (seconds, peak)
    assert err == f"hagan train: error: {path}: line 4: the alias *a is not allowed in a config; write the value out"


@pytest.mark.parametrize("levels", [9, 10])
def test_alias_bomb_in_a_run_config_or_set_value_is_one_short_line(trained, tmp_path, capsys, levels):
    run = copy_run(trained, tmp_path)
    write(CONFIG, "model:\n  name:\n" + bomb(levels, "  "))(run)
    code, seconds, _ = _measure(lambda: main(["generate", str(run), "--out", str(tmp_path / "out")]), memory=False)
    err = error_line(capsys)
    assert code == 2 and seconds < 1 and err.endswith("config.yaml: line 4: the alias *a is not allowed in a config; "
                                                      "write the value out")
    text = "[" + bomb(levels).replace("\n", ",").replace("- ", "").rstrip(",") + "]"
    outcome, seconds, _ = _measure(lambda: parse_assignment(f"model.name={text}"), memory=False)
    assert str(outcome) == "--set 'model.name': line 1: the alias *a is not allowed in a config; write the value out"


def test_an_expanded_bomb_is_echoed_in_bounded_time_and_length():
    """Defence in depth: a value full of shared references (what PyYAML's own loader builds from a bomb)
    is echoed by a bounded walk."""
    value = yaml.safe_load("x:\n" + bomb(12, "  "))["x"]  # 9**12 = 2.8e11 values, if walked
    outcome, seconds, peak = _measure(lambda: Config.from_dict({"model": {"size": value}}))
    message = str(outcome)
    assert isinstance(outcome, HaganError) and seconds < 0.5 and peak < 2**20
    assert message.startswith("config: model.size must be int, got [['x', 'x', 'x', 'x', ...], [[")
    assert len(message) < 150 and len(short_repr(value)) <= 80


@pytest.mark.parametrize("content, message", [
    ("model:\n  size: " + "[" * 20_000 + "]" * 20_000 + "\n", "not usable YAML (nested too deeply)"),
    ("model:\n  size: " + "7" * 5000 + "\n", "not usable YAML (Exceeds the limit (4300 digits)"),
    (b"model:\n  name: \xff\xfe\n", "not a YAML config (not UTF-8 text at byte 15)"),
    ("hagan:\n  loss: '" + "x" * 100_000 + "'\n", "hagan.loss must be one of bce, wgan-gp, got 'xxxx"),
    ("model:\n  size: '" + "x" * 100_000 + "'\n", "model.size must be int, got 'xxxxxxxx"),
    ("model:\n  size: 32\n  name: [a\n", "not valid YAML (while parsing a flow sequence"),
    ("'" + "k" * 1000 + "': 1\n", "unknown section 'kkkkkkkk"),  # YAML's longest implicit key
    ("model:\n  'k\u202ek\u2066': 1\n", "unknown key model.k\\u202ek\\u2066 (keys"),  # bidirectional overrides
    ("model:\n  1: 2\n", "unknown key model.1"),
    ("? [1, 2]\n: 3\n", "not valid YAML (while constructing a mapping"),
    ("- 1\n- 2\n", "expected a mapping of sections, got list"),
])
def test_hostile_yaml_is_one_short_line(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    outcome, seconds, _ = _measure(lambda: build_config(None, path), memory=False)
    assert isinstance(outcome, HaganError), outcome
    assert message in str(outcome) and seconds < 2
    assert_one_short_line(str(outcome), "config.yaml", tmp_path)


# ----- tampered run folders ------------------------------------------------------------------------------
def edit_json(relative, change):
    def tamper(root: Path) -> None:
        path = root / relative
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return tamper


def raw_json(relative, key, raw):
    """Set ``key`` of a JSON file to the literal text ``raw`` (which ``json.dumps`` would never write)."""
    def tamper(root: Path) -> None:
        path = root / relative
        path.write_text(json.dumps({**json.loads(path.read_text()), key: "RAW"}).replace('"RAW"', raw))
    return tamper


def edit_text(relative, change):
    def tamper(root: Path) -> None:
        path = root / relative
        path.write_text(change(path.read_text()))
    return tamper


def edit_tensors(relative, change, metadata=None):
    """Rewrite a safetensors file with ``change(tensors)``; ``metadata``: a function of the old metadata."""
    def tamper(root: Path) -> None:
        from safetensors import safe_open

        path = root / relative
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            old = handle.metadata()
        change(tensors)
        save_file(tensors, str(path), metadata=metadata(old) if metadata else old)
    return tamper


def truncate(relative, keep=0.5):
    def tamper(root: Path) -> None:
        path = root / relative
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return tamper


def poison(match, value=float("nan")):
    """Set one element of the first tensor whose name contains ``match`` to ``value``."""
    def change(tensors):
        key = next(k for k in tensors if match in k and tensors[k].is_floating_point())
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return change


def set_key(key, value):
    def change(data):
        data[key] = value
        return data
    return change


def set_in(key, inner, value):
    def change(data):
        data[key][inner] = value
        return data
    return change


def without(*keys):
    def change(data):
        for key in keys:
            data.pop(key)
        return data
    return change


DEEP_JSON = "[" * 100_000 + "]" * 100_000
A_SPECTRAL_VECTOR = "parametrizations.weight.0._u"

RUN_CASES = {
    # state.json
    "state-list": (STATE, write(STATE, "[]")),
    "state-empty-object": (STATE, write(STATE, "{}")),
    "state-iteration-string": (STATE, edit_json(STATE, set_key("iteration", "1"))),
    "state-iteration-negative": (STATE, edit_json(STATE, set_key("iteration", -1))),
    "state-iteration-bool": (STATE, edit_json(STATE, set_key("iteration", True))),
    "state-not-json": (STATE, write(STATE, '{"iteration": 1,')),
    "state-binary": (STATE, write(STATE, b"\x80\x81\xfe\xff\x00")),
    "state-empty-file": (STATE, write(STATE, b"")),
    "state-nan": (STATE, write(STATE, '{"iteration": NaN}')),
    "state-overflow": (STATE, write(STATE, '{"iteration": 1, "lr_scale": 1e999}')),
    "state-deep": (STATE, write(STATE, DEEP_JSON)),
    "state-lr-scale-negative": (STATE, edit_json(STATE, set_key("lr_scale", -1.0))),
    "state-loader-list": (STATE, edit_json(STATE, set_key("loader", [0, 1]))),
    "state-loader-no-epoch": (STATE, edit_json(STATE, lambda s: {**s, "loader": {"position": 1}})),
    # geometry.json
    "geometry-list": (GEOMETRY, write(GEOMETRY, "[1, 2]")),
    "geometry-missing-keys": (GEOMETRY, edit_json(GEOMETRY, without("reference_affine", "mode"))),
    "geometry-affine-overflow": (GEOMETRY, raw_json(GEOMETRY, "reference_affine", "[[1e999, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]")),
    "geometry-affine-nan": (GEOMETRY, raw_json(GEOMETRY, "reference_affine", "[[NaN, 0, 0, 0], [0, 1, 0, 0]]")),
    "geometry-affine-singular": (GEOMETRY, edit_json(GEOMETRY, set_key("reference_affine", [[0.0] * 4] * 4))),
    "geometry-affine-3x3": (GEOMETRY, edit_json(GEOMETRY, set_key("reference_affine", np.eye(3).tolist()))),
    "geometry-affine-strings": (GEOMETRY, edit_json(GEOMETRY, set_key("reference_affine", [["a"] * 4] * 4))),
    "geometry-affine-ragged": (GEOMETRY, edit_json(GEOMETRY, set_key("reference_affine", [[1.0], [1.0, 2.0]]))),
    "geometry-recipe": (GEOMETRY, edit_json(GEOMETRY, set_key("recipe", "xray"))),
    "geometry-recipe-list": (GEOMETRY, edit_json(GEOMETRY, set_key("recipe", ["ct"]))),
    "geometry-mode": (GEOMETRY, edit_json(GEOMETRY, set_key("mode", "stretch"))),
    "geometry-size-mismatch": (GEOMETRY, edit_json(GEOMETRY, set_key("size", 64))),
    "geometry-size-string": (GEOMETRY, edit_json(GEOMETRY, set_key("size", "32"))),
    "geometry-classes-negative": (GEOMETRY, edit_json(GEOMETRY, set_key("num_classes", -2))),
    # weights.safetensors
    "weights-truncated": (WEIGHTS, truncate(WEIGHTS)),
    "weights-header-only": (WEIGHTS, truncate(WEIGHTS, keep=0.001)),
    "weights-empty": (WEIGHTS, write(WEIGHTS, b"")),
    "weights-random-bytes": (WEIGHTS, write(WEIGHTS, np.random.default_rng(0).bytes(4096))),
    "weights-nan-parameter": (WEIGHTS, edit_tensors(WEIGHTS, poison("common.fc.weight"))),
    "weights-inf-spectral-vector": (WEIGHTS, edit_tensors(WEIGHTS, poison(A_SPECTRAL_VECTOR, float("inf")))),
    "weights-nan-ema": (WEIGHTS, edit_tensors(WEIGHTS, poison("ema."))),
    "weights-missing-tensor": (WEIGHTS, edit_tensors(WEIGHTS, lambda t: t.pop(next(iter(t))))),
    # config.yaml
    "config-unknown-key": (CONFIG, edit_text(CONFIG, lambda t: t.replace("  size: 32", "  sise: 32"))),
    "config-wrong-type": (CONFIG, edit_text(CONFIG, lambda t: t.replace("  size: 32", "  size: '32'"))),
    "config-nan": (CONFIG, edit_text(CONFIG, lambda t: t.replace("  lr_g: 0.0001", "  lr_g: .nan"))),
    "config-list": (CONFIG, write(CONFIG, "- model\n- loss\n")),
    "config-empty": (CONFIG, write(CONFIG, "")),
    "config-binary": (CONFIG, write(CONFIG, b"\xff\xfe\x00m\x00o")),
    "config-invalid-yaml": (CONFIG, write(CONFIG, "model: [unclosed\n")),
    "config-python-tag": (CONFIG, write(CONFIG, "model: !!python/object/apply:os.system ['true']\n")),
    "config-alias-bomb": (CONFIG, write(CONFIG, "model:\n  name:\n" + bomb(9, "  "))),
}


@pytest.mark.parametrize("file, tamper", RUN_CASES.values(), ids=RUN_CASES.keys())
def test_tampered_run_is_refused_naming_the_file(trained, tmp_path, file, tamper):
    run = copy_run(trained, tmp_path)
    tamper(run)
    with pytest.raises(HaganError) as info:
        load_run(run, device="cpu")
    assert_one_short_line(str(info.value), file.name, tmp_path)


@pytest.mark.parametrize("case", ["state-list", "geometry-affine-singular", "weights-nan-parameter",
                                  "config-alias-bomb"])
def test_generate_on_a_tampered_run_exits_2_with_one_line_and_writes_nothing(trained, tmp_path, capsys, case):
    file, tamper = RUN_CASES[case]
    run = copy_run(trained, tmp_path)
    tamper(run)
    out = tmp_path / "out"
    assert main(["generate", str(run), "--out", str(out), "--n", "1", "--device", "cpu"]) == 2
    err = error_line(capsys)
    assert err.startswith("hagan generate: error: ")
    assert_one_short_line(err, file.name, tmp_path)
    assert not out.exists()


def test_non_finite_weights_name_the_first_bad_tensor(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    edit_tensors(WEIGHTS, poison(A_SPECTRAL_VECTOR, float("inf")))(run)
    with pytest.raises(HaganError, match=r"weights.safetensors: tensor \S+\._u holds non-finite values \(0 NaN, 1 Inf"):
        load_run(run, device="cpu")


def test_generate_refuses_to_write_non_finite_volumes(trained, tmp_path, capsys, monkeypatch):
    """Finite weights can still overflow: the last guard before writing."""
    monkeypatch.setattr(HAGAN, "decode", lambda self, z, labels=None: torch.full((len(z), 1, 32, 32, 32), float("nan")))
    out = tmp_path / "out"
    assert main(["generate", str(trained), "--out", str(out), "--n", "2", "--device", "cpu"]) == 2
    err = error_line(capsys)
    assert err.endswith("iter_00000001: the generator produced NaN or Inf in 2 of 2 volumes (first: volume 0); "
                        "nothing written")
    assert_one_short_line(err, "iter_00000001", tmp_path)
    assert not out.exists()
    run = load_run(trained, device="cpu")
    with pytest.raises(HaganError, match="refusing to write volumes that hold NaN or Inf"):
        run.save(np.full((1, 32, 32, 32), np.inf, np.float32), tmp_path / "direct")
    assert not (tmp_path / "direct").exists()


def _resume_config(run: Path):
    return build_config(None, run / CONFIG, [{"train": {"iterations": 2}}])


def _optimizer_meta(change):
    def metadata(old):
        meta = json.loads(old["optimizers"])
        return {"optimizers": json.dumps(change(meta))}
    return metadata


def _unchanged(tensors):
    return None


RESUME_CASES = {
    "training-state-truncated": (TRAINING_STATE, truncate(TRAINING_STATE)),
    "training-state-empty": (TRAINING_STATE, write(TRAINING_STATE, b"")),
    "training-state-no-metadata": (TRAINING_STATE, edit_tensors(TRAINING_STATE, _unchanged, metadata=lambda old: None)),
    "training-state-metadata-not-json": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, _unchanged, metadata=lambda old: {"optimizers": "{not json"})),
    "training-state-metadata-list": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, _unchanged, metadata=lambda old: {"optimizers": "[1, 2]"})),
    "training-state-optimizer-missing": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, _unchanged, metadata=_optimizer_meta(without("E_G")))),
    "training-state-lr-string": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, _unchanged, metadata=_optimizer_meta(lambda m: {**m, "G": {**m["G"], "param_groups": [
            {**m["G"]["param_groups"][0], "lr": "fast"}]}}))),
    "training-state-betas": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, _unchanged, metadata=_optimizer_meta(lambda m: {**m, "D": {**m["D"], "param_groups": [
            {**m["D"]["param_groups"][0], "betas": [2.0, 0.5]}]}}))),
    "training-state-groups": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, _unchanged, metadata=_optimizer_meta(lambda m: {**m, "G": {**m["G"], "param_groups": []}}))),
    "training-state-nan-moment": (TRAINING_STATE, edit_tensors(TRAINING_STATE, poison("exp_avg_sq"))),
    "training-state-moment-shape": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, lambda t: t.update({"G/0/exp_avg": torch.zeros(3, 3)}))),
    "training-state-slot-out-of-range": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, lambda t: t.update({"G/99999/exp_avg": torch.zeros(1)}))),
    "training-state-no-rng": (TRAINING_STATE, edit_tensors(TRAINING_STATE, lambda t: t.pop("rng"))),
    "training-state-rng-dtype": (TRAINING_STATE, edit_tensors(
        TRAINING_STATE, lambda t: t.update({"rng": t["rng"].float()}))),
    "state-extra-wrong-type": (STATE, edit_json(STATE, set_key("extra", {"last_r1": [1, 2, 3]}))),
    "state-loader-position-negative": (STATE, edit_json(STATE, set_in("loader", "position", -4))),
}


@pytest.mark.parametrize("file, tamper", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_tampered_checkpoint_is_refused_at_resume(trained, tmp_path, file, tamper):
    run = copy_run(trained, tmp_path)
    tamper(run)
    with pytest.raises(HaganError) as info:
        Trainer(_resume_config(run), run, resume=True, progress=False)
    assert_one_short_line(str(info.value), file.name, tmp_path)


def test_resume_through_the_command_line_names_the_file(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    RESUME_CASES["training-state-no-metadata"][1](run)
    assert main(["train", "--out", str(run), "--resume", "--iterations", "2"]) == 2
    err = error_line(capsys)
    assert err.startswith("hagan train: error: ") and err.endswith(
        "training_state.safetensors: no optimizer metadata; not a hagan training state")
    assert_one_short_line(err, "training_state.safetensors", tmp_path)


# ----- caches ---------------------------------------------------------------------------------------------
MANIFEST = Path("manifest.json")
CUBE = Path("volumes") / "v0.npy"


class MarkerOnUnpickle:
    """Unpickling this creates a file: proof that a cache was unpickled."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickled_cube(kind):
    def tamper(root: Path) -> None:
        MarkerOnUnpickle.marker = root / "UNPICKLED"
        if kind == "object-array":
            np.save(root / CUBE, np.array([MarkerOnUnpickle()], dtype=object), allow_pickle=True)
        else:
            (root / CUBE).write_bytes(pickle.dumps(MarkerOnUnpickle()))
    return tamper


def save_cube(array):
    return lambda root: np.save(root / CUBE, array)


def set_entry(key, value, index=0):
    def change(manifest):
        manifest["entries"][index][key] = value
        return manifest
    return change


CACHE_CASES = {
    "manifest-list": (MANIFEST, write(MANIFEST, "[]")),
    "manifest-empty-object": (MANIFEST, write(MANIFEST, "{}")),
    "manifest-not-json": (MANIFEST, write(MANIFEST, '{"format": ')),
    "manifest-binary": (MANIFEST, write(MANIFEST, b"\x89PNG\r\n\x1a\n")),
    "manifest-nan": (MANIFEST, edit_text(MANIFEST, lambda t: t.replace('"size": 32', '"size": NaN'))),
    "manifest-format": (MANIFEST, edit_json(MANIFEST, set_key("format", "hagan-cache/0"))),
    "manifest-no-entries": (MANIFEST, edit_json(MANIFEST, without("entries"))),
    "manifest-entries-empty": (MANIFEST, edit_json(MANIFEST, set_key("entries", []))),
    "manifest-entries-object": (MANIFEST, edit_json(MANIFEST, set_key("entries", {"file": "volumes/v0.npy"}))),
    "manifest-entry-not-dict": (MANIFEST, edit_json(MANIFEST, lambda m: {**m, "entries": ["volumes/v0.npy"]})),
    "manifest-entry-no-file": (MANIFEST, edit_json(MANIFEST, lambda m: {**m, "entries": [
        {k: v for k, v in m["entries"][0].items() if k != "file"}]})),
    "manifest-file-climbs-out": (MANIFEST, edit_json(MANIFEST, set_entry("file", "../../etc/passwd"))),
    "manifest-file-absolute": (MANIFEST, edit_json(MANIFEST, set_entry("file", "/etc/passwd"))),
    "manifest-file-climbs-inside": (MANIFEST, edit_json(MANIFEST, set_entry("file", "volumes/../../cache/x.npy"))),
    "manifest-file-number": (MANIFEST, edit_json(MANIFEST, set_entry("file", 7))),
    "manifest-segmentation-climbs-out": (MANIFEST, edit_json(MANIFEST, set_entry("segmentation", "../seg.npy"))),
    "manifest-label-string": (MANIFEST, edit_json(MANIFEST, set_entry("label", "one"))),
    "manifest-label-float": (MANIFEST, edit_json(MANIFEST, set_entry("label", 0.5))),
    "manifest-label-beyond-classes": (MANIFEST, edit_json(MANIFEST, set_entry("label", 3))),
    "manifest-size-string": (MANIFEST, edit_json(MANIFEST, set_key("size", "32"))),
    "manifest-size-zero": (MANIFEST, edit_json(MANIFEST, set_key("size", 0))),
    "manifest-classes-negative": (MANIFEST, edit_json(MANIFEST, set_key("num_classes", -1))),
    "manifest-recipe": (MANIFEST, edit_json(MANIFEST, set_key("recipe", "pet"))),
    "manifest-affine-singular": (MANIFEST, edit_json(MANIFEST, set_key("reference_affine", np.zeros((4, 4)).tolist()))),
    "cube-missing": (CUBE, lambda root: (root / CUBE).unlink()),
    "cube-wrong-size": (CUBE, save_cube(np.zeros((16, 16, 16), np.float16))),
    "cube-not-a-cube": (CUBE, save_cube(np.zeros((32, 32), np.float16))),
    "cube-integer-dtype": (CUBE, save_cube(np.zeros((32, 32, 32), np.int32))),
    "cube-string-dtype": (CUBE, save_cube(np.full((32, 32, 32), "a"))),
    "cube-truncated": (CUBE, truncate(CUBE)),
    "cube-random-bytes": (CUBE, write(CUBE, np.random.default_rng(1).bytes(300))),
    "cube-npz": (CUBE, lambda root: np.savez(root / "v0.npz", image=np.zeros((32, 32, 32))) or
                 (root / "v0.npz").replace(root / CUBE)),
    "cube-object-array": (CUBE, pickled_cube("object-array")),
    "cube-pickle": (CUBE, pickled_cube("pickle")),
}


@pytest.mark.parametrize("file, tamper", CACHE_CASES.values(), ids=CACHE_CASES.keys())
def test_tampered_cache_is_refused_naming_the_file(tiny_ct_cache, tmp_path, file, tamper):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_ct_cache, cache)
    tamper(cache)
    with pytest.raises(HaganError) as info:
        CachedVolumeDataset(cache)
    assert_one_short_line(str(info.value), file.name, tmp_path)
    assert not (cache / "UNPICKLED").exists()


def test_a_path_out_of_the_cache_is_refused_before_it_is_opened(tiny_ct_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_ct_cache, cache)
    edit_json(MANIFEST, set_entry("file", "../../etc/passwd", index=2))(cache)
    assert main(["train", "--data", str(cache), "--out", str(tmp_path / "run"), "--size", "32"]) == 2
    err = error_line(capsys)
    assert err.endswith("manifest.json: entry 2 file '../../etc/passwd' leads outside the cache; a cache names "
                        "its files relative to itself; run `hagan preprocess` again")
    assert_one_short_line(err, "manifest.json", tmp_path)


# ----- counts ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(trained):
    return load_run(trained, device="cpu")


@pytest.mark.parametrize("call, message", [
    (lambda run: run.generate(0), "n must be a positive integer, got 0"),
    (lambda run: run.generate(-3), "n must be a positive integer, got -3"),
    (lambda run: run.generate(2.0), "n must be a positive integer, got 2.0"),
    (lambda run: run.generate(True), "n must be a positive integer, got True"),
    (lambda run: run.generate(1, batch_size=0), "batch_size must be a positive integer, got 0"),
    (lambda run: run.generate(1, batch_size=-1), "batch_size must be a positive integer, got -1"),
    (lambda run: run.generate(1, seed=2**64), "seed must be an integer"),
    (lambda run: run.generate(1, seed="0"), "seed must be an integer"),
    (lambda run: run.encode(np.zeros((1, 32, 32, 32)), batch_size=0), "batch_size must be a positive integer"),
    (lambda run: run.reconstruct(np.zeros((1, 32, 32, 32)), batch_size=-2), "batch_size must be a positive integer"),
])
def test_run_api_refuses_bad_counts(loaded, call, message):
    with pytest.raises(HaganError, match=message):
        call(loaded)


COUNT_ARGUMENTS = [
    (["generate", "RUN", "--out", "o"], "--n", "-3"),
    (["generate", "RUN", "--out", "o"], "--n", "0"),
    (["generate", "RUN", "--out", "o"], "--n", "many"),
    (["generate", "RUN", "--out", "o"], "--batch-size", "0"),
    (["generate", "RUN", "--out", "o"], "--tile-depth", "-1"),
    (["generate", "RUN", "--out", "o"], "--seed", "-1"),
    (["generate", "RUN", "--out", "o"], "--seed", str(2**64)),
    (["generate", "RUN", "--out", "o"], "--class", "-1"),
    (["reconstruct", "RUN", "v.nii.gz", "--out", "o"], "--class", "-2"),
    (["evaluate", "--real", "r", "--fake", "f", "--out", "o"], "--n", "0"),
    (["evaluate", "--real", "r", "--fake", "f", "--out", "o"], "--batch-size", "-1"),
    (["evaluate", "--real", "r", "--fake", "f", "--out", "o"], "--ms-ssim-volumes", "0"),
    (["evaluate", "--real", "r", "--fake", "f", "--out", "o"], "--slices", "0"),
    (["evaluate", "--real", "r", "--fake", "f", "--out", "o"], "--seed", "-1"),
    (["embedding", "a=b", "--out", "o.png"], "--seed", "-1"),
    (["demo"], "--seed", "-3"),
    (["phantoms", "out"], "--seed", "-1"),
    (["experiment", "latent-walk", "--data", "d", "--out", "o"], "--seed", "-1"),
    (["bench"], "--iterations", "0"),
    (["bench"], "--batch-sizes", "0"),
    (["bench"], "--generate-batch", "0"),
    (["bench"], "--warmup", "-1"),
    (["bench"], "--threads", "0"),
    (["demo"], "--n", "0"),
    (["phantoms", "out"], "--n", "-1"),
    (["translate", "RUN", "v.nii.gz", "--out", "o"], "--batch-size", "0"),
    (["experiment", "augmentation", "--data", "d", "--out", "o"], "--epochs", "0"),
    (["experiment", "augmentation", "--data", "d", "--out", "o"], "--batch-size", "0"),
    (["experiment", "augmentation", "--data", "d", "--out", "o"], "--iterations", "-5"),
    (["experiment", "augmentation", "--data", "d", "--out", "o"], "--n", "0"),
    (["experiment", "features", "--data", "d", "--out", "o"], "--folds", "0"),
    (["experiment", "features", "--data", "d", "--out", "o"], "--image-edge", "-8"),
    (["experiment", "latent-walk", "--data", "d", "--out", "o"], "--samples", "0"),
    (["experiment", "latent-walk", "--data", "d", "--out", "o"], "--steps", "-7"),
    (["experiment", "latent-walk", "--data", "d", "--out", "o"], "--references", "0"),
]


@pytest.mark.parametrize("argv, flag, value", COUNT_ARGUMENTS, ids=[f"{a[0]}{f}={v}" for a, f, v in COUNT_ARGUMENTS])
def test_count_arguments_are_checked_when_parsed(capsys, argv, flag, value):
    with pytest.raises(SystemExit) as info:
        main([*argv, flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert f"argument {flag}: expected a" in last and "Traceback" not in err, err
    assert ("positive integer" in last or "non-negative integer" in last or "seed" in last), last
