"""``hagan import-official``: the authors' checkpoint format, mapped exactly onto our paper-256 networks.

The authors' files cannot be downloaded here, so the fixtures are state dicts with the key names and
shapes of their ``models/Model_HA_GAN_256.py`` (random, seeded weights), and their forward pass is
rewritten below from the layer list of that file with plain torch ops. A small latent (64) keeps the
files small; every convolution has its released size. The default tests compare G^A, G^L and one
high-resolution slab, and both encoders, each at full size; the slow tests compare whole 256^3 volumes
from ``decode`` (a few GB of memory and about a minute per dataset on one CPU thread) and run the commands.
"""

import contextlib
import io
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hagan.api import load_run
from hagan.cli.commands import main
from hagan.errors import HaganError
from hagan.models.hagan.official import import_official
from hagan.training.checkpoint import load_checkpoint

LATENT = 64
TOL = 1e-5


def conv(gen, cout, cin, k):
    return {"weight": torch.randn(cout, cin, k, k, k, generator=gen) / (cin * k**3) ** 0.5,
            "bias": 0.1 * torch.randn(cout, generator=gen)}


def norm(gen, c):
    return {"weight": 1 + 0.1 * torch.randn(c, generator=gen), "bias": 0.1 * torch.randn(c, generator=gen)}


def flat(prefix, params):
    return {f"{prefix}.{k}": v for k, v in params.items()}


def authors_state_dicts(seed=0, latent=LATENT):
    """G, E and Sub_E state dicts named and shaped as the authors' 256^3 model (channel 32, GroupNorm 8)."""
    gen = torch.Generator().manual_seed(seed)
    g = {"fc1.weight": torch.randn(4 * 4 * 4 * 512, latent, generator=gen) / latent**0.5,
         "fc1.bias": 0.1 * torch.randn(4 * 4 * 4 * 512, generator=gen)}
    channels = [(512, 512), (512, 512), (256, 512), (128, 256), (64, 128), (32, 64)]
    for i, (cout, cin) in enumerate(channels, start=1):
        g |= flat(f"tp_conv{i}", conv(gen, cout, cin, 3)) | flat(f"bn{i}", norm(gen, cout))
    g |= flat("tp_conv7", conv(gen, 1, 32, 3))
    g |= flat("sub_G.tp_conv1", conv(gen, 32, 64, 3)) | flat("sub_G.bn1", norm(gen, 32))
    g |= flat("sub_G.tp_conv2", conv(gen, 16, 32, 3)) | flat("sub_G.bn2", norm(gen, 16))
    g |= flat("sub_G.tp_conv3", conv(gen, 1, 16, 3))
    e = {}
    for i, (cout, cin, k) in enumerate([(32, 1, 4), (32, 32, 3), (64, 32, 4)], start=1):
        e |= flat(f"conv{i}", conv(gen, cout, cin, k)) | flat(f"bn{i}", norm(gen, cout))
    sub_e = {}
    for i, (cout, cin) in enumerate([(32, 64), (64, 32), (128, 64), (256, 128)], start=1):
        sub_e |= flat(f"conv{i}", conv(gen, cout, cin, 4)) | flat(f"bn{i}", norm(gen, cout))
    sub_e |= flat("conv5", conv(gen, latent, 256, 4))
    return {"G": g, "E": e, "Sub_E": sub_e}


def write_authors_folder(folder, states, data_parallel=True):
    """The release's layout: {module}_iter80000.pth holding {'model': state_dict, 'optimizer': ...}."""
    folder.mkdir(parents=True, exist_ok=True)
    for module, state in states.items():
        if data_parallel:
            state = {f"module.{k}": v for k, v in state.items()}
        torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}}, folder / f"{module}_iter80000.pth")
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, folder / "D_iter80000.pth")  # never read
    return folder


# ----- the authors' forward pass, from the layer list of Model_HA_GAN_256.py -------------------------


def cgr(h, sd, conv_name, norm_name, **kw):
    h = F.conv3d(h, sd[f"{conv_name}.weight"], sd[f"{conv_name}.bias"], **kw)
    return F.relu(F.group_norm(h, 8, sd[f"{norm_name}.weight"], sd[f"{norm_name}.bias"]))


def authors_common(g, z):
    """fc1, view to 512 x 4^3, tp_conv1..5 (3^3, pad 1) + GN(8) + ReLU, nearest x2 before tp_conv2..5."""
    h = F.linear(z, g["fc1.weight"], g["fc1.bias"]).view(-1, 512, 4, 4, 4)
    for i in range(1, 6):
        if i > 1:
            h = F.interpolate(h, scale_factor=2)
        h = cgr(h, g, f"tp_conv{i}", f"bn{i}", padding=1)
    return h


def authors_low(g, h_latent):
    h = cgr(h_latent, g, "sub_G.tp_conv1", "sub_G.bn1", padding=1)
    h = cgr(h, g, "sub_G.tp_conv2", "sub_G.bn2", padding=1)
    return torch.tanh(F.conv3d(h, g["sub_G.tp_conv3.weight"], g["sub_G.tp_conv3.bias"], padding=1))


def authors_high(g, h):
    h = cgr(F.interpolate(h, scale_factor=2), g, "tp_conv6", "bn6", padding=1)
    h = F.conv3d(F.interpolate(h, scale_factor=2), g["tp_conv7.weight"], g["tp_conv7.bias"], padding=1)
    return torch.tanh(h)


def authors_slab_encoder(e, slab):
    h = cgr(slab, e, "conv1", "bn1", stride=2, padding=1)
    h = cgr(h, e, "conv2", "bn2", padding=1)
    return cgr(h, e, "conv3", "bn3", stride=2, padding=1)


def authors_global_encoder(s, features):
    h = features
    for i in range(1, 5):
        h = cgr(h, s, f"conv{i}", f"bn{i}", stride=2, padding=1)
    return F.conv3d(h, s["conv5.weight"], s["conv5.bias"]).flatten(1)


FLIPS = {"copdgene": (1, 2), "gsp": (0, 2)}


def to_ours(x, dataset):
    """The authors' (B, C, D, H, W) in hagan's axes: the import flips these volume axes."""
    return x.flip([2 + a for a in FLIPS[dataset]])


@pytest.fixture(scope="module")
def states():
    return authors_state_dicts()


@pytest.fixture(scope="module")
def imported(states, tmp_path_factory):
    """Run folders and their loaded runs: COPDGene through the API (keys with DataParallel's prefix), GSP
    through the command line (plain keys, the dataset read from the folder name), with its output."""
    root = tmp_path_factory.mktemp("official")
    import_official(write_authors_folder(root / "COPD_HA_GAN_pretrained", states), root / "run-copdgene",
                    dataset="copdgene")
    gsp = write_authors_folder(root / "GSP_HA_GAN_pretrained", states, data_parallel=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["import-official", str(gsp), "--out", str(root / "run-gsp")]) == 0
    dirs = {dataset: root / f"run-{dataset}" for dataset in FLIPS}
    return dirs, {dataset: load_run(path, device="cpu") for dataset, path in dirs.items()}, printed.getvalue()


def max_diff(a, b):
    return float((a - b).abs().max())


def close(ours, theirs):
    """Equal to 1e-5 on the values' scale: absolute for images in [-1, 1], relative for larger features.
    The flipped kernels sum the same products in another order, so float32 rounding differs (about 1e-6
    of the largest value at the end of G^A's five convolutions); a wrong mapping differs by O(1)."""
    return max_diff(ours, theirs) < TOL * max(1.0, float(theirs.abs().max()))


@torch.no_grad()
def test_generator_equals_the_authors_forward_on_low_res_and_a_slab(states, imported):
    g = states["G"]
    z = torch.randn(1, LATENT, generator=torch.Generator().manual_seed(1))
    model = imported[1]["copdgene"].model
    h_latent = authors_common(g, z)
    features = model.common(z)
    assert close(features, to_ours(h_latent, "copdgene"))
    assert close(model.decode_low_res(z), to_ours(authors_low(g, h_latent), "copdgene"))
    start = 5  # feature slices; the authors' crop_idx 20
    ours = model.high_gen(features[:, :, start : start + 8])
    theirs = authors_high(g, h_latent[:, :, start : start + 8])
    assert ours.shape == (1, 1, 32, 256, 256)
    assert close(ours, to_ours(theirs, "copdgene"))
    assert float(ours.std()) > 0.01  # not a constant that would match anything


@pytest.mark.parametrize("dataset", sorted(FLIPS))
@torch.no_grad()
def test_encoders_equal_the_authors_forward(states, imported, dataset):
    model = imported[1][dataset].model
    gen = torch.Generator().manual_seed(2)
    slab = torch.rand(1, 1, 32, 256, 256, generator=gen) * 2 - 1
    assert close(model.slab_encoder(to_ours(slab, dataset)), to_ours(authors_slab_encoder(states["E"], slab), dataset))
    features = torch.rand(1, 64, 64, 64, 64, generator=gen)
    assert close(model.global_encoder(to_ours(features, dataset)), authors_global_encoder(states["Sub_E"], features))


def test_the_run_records_what_was_imported_and_says_how_d_is_treated(imported):
    run = imported[1]["gsp"]
    assert run.iteration == 80000 and run.size == 256 and run.config.model.latent_dim == LATENT
    assert run.geometry["recipe"] == "mri" and run.geometry["mode"] == "resize"  # from the folder name
    assert nib.aff2axcodes(np.asarray(run.geometry["reference_affine"])) == ("S", "A", "R")
    assert imported[1]["copdgene"].geometry["recipe"] == "ct"
    state = (run.checkpoint / "state.json").read_text()
    assert "not imported" in state and "G_iter80000.pth" in state
    printed = imported[2]
    assert "GSP brain MRI" in printed and "D not imported" in printed and "hagan generate" in printed


def test_an_imported_run_cannot_be_resumed(imported):
    run = imported[1]["copdgene"]
    optimizer = torch.optim.Adam(run.model.parameters())
    with pytest.raises(HaganError, match="imported from published weights, which hold no training state"):
        load_checkpoint(run.checkpoint, run.model, {"G": optimizer}, torch.Generator())


# ----- files that are not such checkpoints: one line naming the first mismatch ----------------------


class Payload:
    """Unpickling this would run ``os.system``; weights_only must refuse it before anything runs."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def import_error(folder, tmp_path, capsys, dataset="copdgene"):
    code = main(["import-official", str(folder), "--out", str(tmp_path / "out"), "--dataset", dataset])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and err.splitlines()[-1].startswith("hagan import-official: error:"), err
    assert not (tmp_path / "out").exists()
    return err


@pytest.fixture()
def small_folder(tmp_path):
    """The encoder files only; each test adds the G file it needs (G is the large one)."""
    states = authors_state_dicts(seed=3)
    folder = write_authors_folder(tmp_path / "ckpt", {"E": states["E"], "Sub_E": states["Sub_E"]})
    return folder, states


def test_a_malicious_pickle_is_refused_and_never_runs(small_folder, tmp_path, capsys, monkeypatch):
    folder, _ = small_folder
    monkeypatch.chdir(tmp_path)
    buffer = io.BytesIO()
    pickle.dump({"model": Payload()}, buffer)
    (folder / "G_iter80000.pth").write_bytes(buffer.getvalue())
    err = import_error(folder, tmp_path, capsys)
    assert "G_iter80000.pth: cannot read it as a plain PyTorch checkpoint (it holds objects other than tensors" in err
    assert not (tmp_path / "PWNED").exists()


def test_a_file_that_is_not_a_checkpoint(small_folder, tmp_path, capsys):
    folder, _ = small_folder
    (folder / "G_iter80000.pth").write_bytes(b"PK\x03\x04 truncated download")
    assert "G_iter80000.pth: cannot read it" in import_error(folder, tmp_path, capsys)
    torch.save([1, 2, 3], folder / "G_iter80000.pth")
    assert "not an HA-GAN checkpoint" in import_error(folder, tmp_path, capsys)


def test_a_damaged_gsp_file_points_to_the_known_issue(small_folder, tmp_path, capsys):
    folder, _ = small_folder
    (folder / "G_iter80000.pth").write_bytes(b"\x80\x02 not a whole file")
    assert "issues/13" in import_error(folder, tmp_path, capsys, dataset="gsp")


def test_a_missing_module_file(small_folder, tmp_path, capsys, states):
    folder, _ = small_folder
    torch.save({"model": states["G"]}, folder / "G_iter80000.pth")
    (folder / "Sub_E_iter80000.pth").unlink()
    assert "Sub_E_iter80000.pth: missing; the global encoder E^G" in import_error(folder, tmp_path, capsys)


def test_a_missing_key_and_a_wrong_shape_name_the_first_mismatch(small_folder, tmp_path, capsys, states):
    folder, small = small_folder
    torch.save({"model": states["G"]}, folder / "G_iter80000.pth")
    e = dict(small["E"])
    del e["bn2.weight"]
    torch.save({"model": e}, folder / "E_iter80000.pth")
    assert "E_iter80000.pth: tensor bn2.weight is missing" in import_error(folder, tmp_path, capsys)
    e = dict(small["E"])
    e["conv3.weight"] = torch.zeros(64, 32, 3, 3, 3)
    torch.save({"model": e}, folder / "E_iter80000.pth")
    err = import_error(folder, tmp_path, capsys)
    assert "E_iter80000.pth: tensor conv3.weight has shape (64, 32, 3, 3, 3)" in err and "(64, 32, 4, 4, 4)" in err
    e = dict(small["E"]) | {"conv4.weight": torch.zeros(1)}
    torch.save({"model": e}, folder / "E_iter80000.pth")
    assert "unexpected tensor conv4.weight" in import_error(folder, tmp_path, capsys)


def test_the_folder_name_must_say_the_dataset_when_not_given(small_folder, tmp_path, capsys, states):
    folder, _ = small_folder
    torch.save({"model": states["G"]}, folder / "G_iter80000.pth")
    code = main(["import-official", str(folder), "--out", str(tmp_path / "out")])
    assert code == 2 and "pass --dataset copdgene or --dataset gsp" in capsys.readouterr().err


# ----- the whole volume, and the commands, at full size ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dataset", sorted(FLIPS))
@torch.no_grad()
def test_decode_equals_the_authors_eval_forward_on_whole_volumes(states, imported, dataset):
    z = torch.randn(1, LATENT, generator=torch.Generator().manual_seed(4))
    theirs = to_ours(authors_high(states["G"], authors_common(states["G"], z)), dataset)
    model = imported[1][dataset].model
    assert close(model.decode(z), theirs)
    model.tile_depth = 8
    assert close(model.decode(z), theirs)
    model.tile_depth = 0


@pytest.mark.slow
def test_generate_and_encode_commands_on_an_imported_run(imported, tmp_path):
    run_dir = imported[0]["copdgene"]
    assert main(["generate", str(run_dir), "--n", "1", "--out", str(tmp_path / "gen"), "--tile-depth", "8"]) == 0
    image = nib.load(tmp_path / "gen" / "sample_0000.nii.gz")
    assert image.shape == (256, 256, 256) and nib.aff2axcodes(image.affine) == ("S", "A", "R")
    assert image.get_data_dtype() == np.int16  # Hounsfield units
    assert main(["encode", str(run_dir), str(tmp_path / "gen"), "--out", str(tmp_path / "z.npy")]) == 0
    assert np.load(tmp_path / "z.npy").shape == (1, LATENT)
