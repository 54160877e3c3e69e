"""Shapes and parameter counts of the seven HA-GAN modules against the paper and the authors' models."""

import json

import pytest
import torch

from hagan.cli.commands import main
from hagan.config import build_config
from hagan.models import build_model


def counts(preset: str | None = None, **model) -> dict[str, int]:
    config = build_config(preset, None, [{"model": model}] if model else [])
    with torch.device("meta"):
        net = build_model(config)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in net.parts.items()}


def test_paper_256_matches_table_vii_and_authors_modules():
    c = counts("paper-256")
    total = sum(c.values())
    assert abs(total - 79.7e6) / 79.7e6 < 0.01
    assert c["G_A"] + c["G_L"] + c["G_H"] == pytest.approx(52.52e6, rel=0.002)
    assert c["D_H"] + c["D_L"] == pytest.approx(7.40e6, rel=0.002)
    assert c["D_L"] == pytest.approx(2.77e6, rel=0.002)
    assert c["E_H"] == pytest.approx(0.161e6, rel=0.01)
    assert c["E_G"] == pytest.approx(19.66e6, rel=0.002)
    assert c["G_L"] == pytest.approx(69.7e3, rel=0.002)


def test_paper_128_matches_authors_modules():
    c = counts("paper-128")
    assert c["G_A"] + c["G_L"] + c["G_H"] == pytest.approx(52.52e6, rel=0.002)
    assert c["D_H"] + c["D_L"] == pytest.approx(7.24e6, rel=0.002)
    assert c["D_L"] == pytest.approx(2.64e6, rel=0.002)
    assert c["E_G"] == pytest.approx(19.66e6, rel=0.002)


def test_first_dense_layer_holds_33_6m():
    config = build_config("paper-256")
    with torch.device("meta"):
        net = build_model(config)
    assert net.common.fc.weight.numel() + net.common.fc.bias.numel() == pytest.approx(33.6e6, rel=0.002)


@pytest.mark.parametrize("size", [32, 64, 128, 256, 512])
def test_shapes_at_every_size(size):
    config = build_config(None, None, [{"model": {"size": size}}])
    with torch.device("meta"):
        net = build_model(config)
        z = torch.randn(2, 1024)
        features = net.common(z)
        assert features.shape == (2, 64, size // 4, size // 4, size // 4)
        slab, low = net.generate_parts(z, net.max_start, None)
        assert slab.shape == (2, 1, size // 8, size, size)
        assert low.shape == (2, 1, size // 4, size // 4, size // 4)
        assert net.high_gen(features).shape == (2, 1, size, size, size)
        logit, cls = net.discriminate(slab, low, torch.ones(1))
        assert logit.shape == (2, 1) and cls is None
        assert net.slab_encoder(slab).shape == (2, 64, size // 32, size // 4, size // 4)
        volume = torch.empty(2, 1, size, size, size)
        assert net.encode_slabs(volume).shape == features.shape
        assert net.global_encoder(features).shape == (2, 1024)


def test_conditional_heads():
    config = build_config(None, None, [{"model": {"size": 32, "num_classes": 5, "width": 0.125, "latent_dim": 16}}])
    net = build_model(config)
    slab, low = net.generate_parts(torch.randn(2, 16), 0, net.onehot(torch.tensor([0, 4])))
    logit, cls = net.discriminate(slab, low, torch.zeros(1))
    assert cls.shape == (2, 5) and logit.shape == (2, 1)
    with pytest.raises(ValueError, match="class-conditional"):
        net.onehot(None)
    with pytest.raises(ValueError, match="0..4"):
        net.onehot(torch.tensor([5]))


def test_unsupported_size_is_refused():
    with pytest.raises(Exception, match="power of two"):
        build_config(None, None, [{"model": {"size": 96}}])


def test_summary_json(capsys):
    assert main(["summary", "--preset", "paper-256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"G_A", "G_L", "G_H", "D_H", "D_L", "E_H", "E_G", "total"}
    assert out["total"] == sum(v for k, v in out.items() if k != "total")
    assert abs(out["total"] - 79.7e6) / 79.7e6 < 0.01
