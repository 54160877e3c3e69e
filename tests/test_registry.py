"""The model registry and the configuration built from it: each model's section, presets and contract."""

import dataclasses
import subprocess
import sys

import pytest
import torch
import yaml

from hagan.cli import main
from hagan.config import CORE_SECTIONS, Config, build_config, parse_assignment, save_yaml
from hagan.errors import HaganError
from hagan.evaluation.bench import estimate_memory, module_param_counts
from hagan.models import MODELS, PRESETS, SECTIONS, build_model, model_class
from hagan.models.base import GenerativeModel
from hagan.models.registry import SECTION_MODULES


def test_every_registered_model_has_a_section_presets_and_a_contract_class():
    assert set(MODELS) == {"hagan", "patch", "progressive", "wgan-gp", "alpha-gan", "vae-gan"}
    names = [name for module in SECTION_MODULES for name in module.PRESETS]
    assert len(names) == len(set(names)) == len(PRESETS)  # no preset shadows another model's
    for spec in MODELS.values():
        assert issubclass(model_class(spec.name), GenerativeModel)
        assert spec.section in SECTIONS and spec.section not in CORE_SECTIONS
        assert hasattr(Config(), spec.section)
        assert spec.default_preset is None or build_config(spec.default_preset).model.name == spec.name
    for name, preset in PRESETS.items():
        assert build_config(name).model.name == preset.get("model", {}).get("name", "hagan"), name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_reports_its_parts_and_memory_through_the_contract(name):
    spec = MODELS[name]
    size = 64 if name == "patch" else 32  # the patch GAN's low-resolution stage is 64^3
    config = build_config(spec.default_preset, None, [{"model": {"name": name, "size": size, "width": 0.25}},
                                                     {"optim": {"batch_size": 2}}])
    with torch.device("meta"):
        model = build_model(config)
    counts = module_param_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) > 0
    assert all(counts[part] > 0 for part in model.parts)
    estimate = estimate_memory(config, 1, model)
    if name in ("patch", "progressive"):  # stitching and the growth phase read values: no meta-device pass
        return
    assert estimate["generate"] > counts["total"] * 4 and estimate["train"] > estimate["generate"]


def test_a_runs_config_holds_the_core_sections_and_its_models_own(tmp_path):
    for preset, own in (("demo", "hagan"), ("patch-128", "patch"), ("progressive-128", "progressive"),
                        ("wgan-gp-64", "baseline")):
        path = save_yaml(build_config(preset), tmp_path / f"{preset}.yaml")
        saved = yaml.safe_load(path.read_text())
        assert list(saved) == [*CORE_SECTIONS, own]
        assert dataclasses.asdict(build_config(None, path)) == dataclasses.asdict(build_config(preset))


def test_another_models_option_is_refused_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path), "--out", str(out), "--model", "patch",
                 "--set", "hagan.diffaug=translation"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and not out.exists()
    assert "hagan.diffaug is an option of hagan; model 'patch' does not use it" in err
    with pytest.raises(HaganError, match="patch.lambda_l1 is an option of patch; model 'wgan-gp'"):
        build_config("wgan-gp-64", None, [parse_assignment("patch.lambda_l1=3")])
    build_config("wgan-gp-64", None, [parse_assignment("patch.lambda_l1=10.0")])  # its default changes nothing


def test_files_in_the_former_layout_load_into_todays_sections(tmp_path):
    """Runs written before HA-GAN's options had a section of their own still load (and still refuse)."""
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({
        "model": {"name": "hagan", "size": 32, "low_res_branch": False, "upsample": "trilinear",
                  "consistent_slabs": True},
        "loss": {"kind": "wgan-gp", "gp_lambda": 3.0, "disc_losses": "separate", "r1_every": 4},
        "train": {"iterations": 5, "ema_kimg": 2.0, "recompute_activations": True},
    }))
    h = build_config(None, old).hagan
    assert (h.low_res_branch, h.upsample, h.consistent_slabs, h.loss, h.gp_lambda, h.disc_losses, h.r1_every,
            h.ema_kimg, h.recompute_activations) == (False, "trilinear", True, "wgan-gp", 3.0, "separate", 4, 2.0, True)
    progressive = build_config("progressive-128", None, [parse_assignment("loss.gp_lambda=5")])
    assert progressive.progressive.gp_lambda == 5.0 and progressive.hagan.gp_lambda == 10.0
    with pytest.raises(HaganError, match="hagan.diffaug is an option of hagan; model 'patch'"):
        build_config("patch-128", None, [parse_assignment("loss.diffaug=translation")])
    with pytest.raises(HaganError, match="unknown section 'loss'"):
        build_config(None, None, [parse_assignment("loss.not_a_key=1")])


def test_the_configuration_and_the_registry_load_no_torch():
    code = "import sys, hagan.config, hagan.models; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
