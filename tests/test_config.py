"""Configuration: presets, YAML round trip, and clear errors before any work starts."""

import pytest

from hagan.config import PRESETS, Config, build_config, load_yaml, parse_assignment, save_yaml
from hagan.errors import HaganError


def test_defaults_are_the_papers_settings():
    c = build_config("paper-256")
    assert (c.model.size, c.model.latent_dim, c.optim.batch_size) == (256, 1024, 4)
    assert (c.optim.lr_g, c.optim.lr_e, c.optim.lr_d) == (1e-4, 1e-4, 4e-4)
    assert (c.optim.beta1, c.optim.beta2) == (0.0, 0.999)
    assert (c.hagan.loss, c.hagan.lambda_recon_slab, c.hagan.lambda_recon_global, c.hagan.lambda_class) == ("bce", 5.0, 5.0, 0.1)
    assert c.hagan.diffaug == "" and c.hagan.r1_gamma == 0 and not c.data.augment
    assert build_config("paper-128").model.size == 128


def test_every_preset_is_valid():
    for name in PRESETS:
        build_config(name)


def test_later_sources_override_earlier(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  size: 64\ntrain:\n  iterations: 10\n")
    c = build_config("paper-256", path, [parse_assignment("train.iterations=7"), parse_assignment("hagan.r1_gamma=2")])
    assert (c.model.size, c.train.iterations, c.hagan.r1_gamma) == (64, 7, 2.0)


def test_exponents_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr_d: 1e-4\n")
    c = build_config(None, path, [parse_assignment("optim.lr_g=2e-4")])
    assert (c.optim.lr_d, c.optim.lr_g) == (1e-4, 2e-4)
    with pytest.raises(HaganError, match="optim.lr_d must be float, got 'fast'"):
        build_config(None, None, [parse_assignment("optim.lr_d=fast")])


def test_yaml_round_trip(tmp_path):
    c = build_config("small-data-128")
    save_yaml(c, tmp_path / "config.yaml")
    assert Config.from_dict(load_yaml(tmp_path / "config.yaml")) == c


@pytest.mark.parametrize(
    "values, message",
    [
        ({"modle": {"size": 64}}, "unknown section 'modle'"),
        ({"model": {"sise": 64}}, "unknown key model.sise"),
        ({"model": {"size": "64"}}, "model.size must be int"),
        ({"model": {"size": 96}}, "power of two"),
        ({"optim": {"batch_size": 0}}, "optim.batch_size must be at least 1"),
        ({"hagan": {"loss": "hinge"}}, "hagan.loss"),
        ({"hagan": {"encoder": 1}}, "hagan.encoder must be bool"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(values, message):
    with pytest.raises(HaganError, match=message):
        Config.from_dict(values)


def test_bad_yaml_and_assignment(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(HaganError, match="bad.yaml: not valid YAML"):
        build_config(None, bad)
    with pytest.raises(HaganError, match="section.key=value"):
        parse_assignment("iterations=5")
    with pytest.raises(HaganError, match="unknown preset"):
        build_config("paper-1024")


def test_model_flag_alone_starts_from_that_models_preset(capsys):
    """`hagan train --model progressive` must not train with HA-GAN's learning rates and betas."""
    from hagan.cli.commands import build_parser, training_overrides, training_preset
    from hagan.config import MODEL_PRESETS
    from hagan.models import MODELS

    assert set(MODEL_PRESETS) == set(MODELS) - {"hagan"}
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "cache", "--out", "run", "--model", "progressive", "--size", "64"])
    config = build_config(training_preset(args), None, training_overrides(args))
    assert "progressive-128 preset" in capsys.readouterr().out
    assert (config.model.name, config.model.size) == ("progressive", 64)
    assert (config.optim.beta1, config.optim.beta2) == (0.0, 0.99) and config.optim.lr_g == config.optim.lr_d == 1e-3
    for argv in (["--model", "hagan"], ["--preset", "demo"], ["--model", "wgan-gp", "--config", "x.yaml"]):
        assert training_preset(parser.parse_args(["train", "--out", "run", *argv])) == (
            "demo" if "demo" in argv else None)
