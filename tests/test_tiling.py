"""tiled_high_res must reproduce HighResGenerator exactly, whatever the tile depth."""

import pytest
import torch
from torch import nn

from hagan.models.hagan.networks import HighResGenerator
from hagan.models.hagan.tiling import tiled_high_res

SHAPE = (2, 16, 8, 6, 5)  # non-cubic, so a mixed-up axis cannot pass


def make(dtype: torch.dtype = torch.float32, norm: str = "group") -> tuple[HighResGenerator, torch.Tensor]:
    torch.manual_seed(0)
    gen = HighResGenerator(in_channels=16, width=0.25, norm=norm)
    norm = gen.body[1][1]
    with torch.no_grad():  # an affine that matters: identity weight and zero bias would hide mistakes in it
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    gen = gen.to(dtype).eval()
    # An offset mean makes the GroupNorm statistics non-trivial.
    return gen, (torch.randn(SHAPE) + 0.3).to(dtype)


@pytest.mark.parametrize("norm", ["group", "channel"])
@pytest.mark.parametrize("tile_depth", [1, 3, 8, 100])
def test_tiled_matches_untiled_float32(tile_depth, norm):
    gen, features = make(norm=norm)
    with torch.no_grad():
        expected = gen(features)
    out = tiled_high_res(gen, features, tile_depth)
    assert out.shape == (2, 1, 32, 24, 20) and out.dtype == torch.float32
    # Every voxel is compared, so a region the tiles never wrote (torch.empty garbage) fails here.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tile_depth", [1, 3, 8])
def test_tiled_matches_untiled_float64(tile_depth):
    gen, features = make(torch.float64)
    with torch.no_grad():
        expected = gen(features)
    out = tiled_high_res(gen, features, tile_depth)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_no_autograd_graph():
    gen, features = make()
    assert not tiled_high_res(gen, features.requires_grad_(), 3).requires_grad


def test_rejects_bad_tile_depth():
    gen, features = make()
    for tile_depth in (0, -1):
        with pytest.raises(ValueError, match="tile_depth"):
            tiled_high_res(gen, features, tile_depth)


def test_rejects_bad_features_shape():
    gen, features = make()
    with pytest.raises(ValueError, match="D >= 1"):
        tiled_high_res(gen, features[0], 2)
    with pytest.raises(ValueError, match="D >= 1"):
        tiled_high_res(gen, features[:, :, :0], 2)


def test_rejects_other_structures():
    gen, features = make()
    with pytest.raises(ValueError, match="expected high_gen.body"):
        tiled_high_res(nn.Module(), features, 2)
    short = HighResGenerator(in_channels=16, width=0.25)
    short.body = short.body[:4]
    with pytest.raises(ValueError, match="expected high_gen.body"):
        tiled_high_res(short, features, 2)
    swapped = HighResGenerator(in_channels=16, width=0.25)
    swapped.body[4] = nn.Sigmoid()
    with pytest.raises(ValueError, match="expected high_gen.body"):
        tiled_high_res(swapped, features, 2)
    strided = HighResGenerator(in_channels=16, width=0.25)
    strided.body[3].stride = (2, 2, 2)
    with pytest.raises(ValueError, match="3x3x3"):
        tiled_high_res(strided, features, 2)


def test_tile_depth_on_a_model_without_tiling_is_a_clear_error(tmp_path):
    import numpy as np

    from hagan.api import load_run
    from hagan.config import build_config, save_yaml
    from hagan.data.io import write_json_atomic
    from hagan.errors import HaganError
    from hagan.models import build_model
    from hagan.training.checkpoint import save_checkpoint

    config = build_config(None, None, [{"model": {"name": "progressive", "size": 32, "latent_dim": 16},
                                        "progressive": {"max_channels": 32}}])
    save_checkpoint(tmp_path / "checkpoints", 0, build_model(config), {}, torch.Generator().manual_seed(0), {}, keep=1)
    save_yaml(config, tmp_path / "config.yaml")
    write_json_atomic(tmp_path / "geometry.json", {"reference_affine": np.eye(4).tolist(), "recipe": "mri",
                                                   "mode": "resize", "size": 32, "num_classes": 0})
    assert load_run(tmp_path, device="cpu").generate(1).shape == (1, 32, 32, 32)
    with pytest.raises(HaganError, match="--tile-depth: model 'progressive' generates whole volumes"):
        load_run(tmp_path, device="cpu", tile_depth=4)
