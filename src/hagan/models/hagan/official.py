"""``hagan import-official``: the HA-GAN authors' released checkpoints as a ``hagan`` run.

Sun et al. released two 256^3 models trained for 80000 iterations (github.com/batmanlab/HA-GAN, README
table): COPDGene lung CT and GSP brain MRI. Each is a folder of PyTorch pickles ``G_iter80000.pth``,
``E_iter80000.pth``, ``Sub_E_iter80000.pth`` and ``D_iter80000.pth``, each ``{'model': state_dict, ...}``
whose keys may carry ``nn.DataParallel``'s ``module.`` prefix. Their key names and shapes come from the
authors' ``models/Model_HA_GAN_256.py``; our ``paper-256`` networks have the same layers in the same order
(see ``hagan.models.hagan.networks``), so the import is a renaming, plus the flips below.

What is imported, and why not D:
* G (G^A, G^L, G^H), E^H and E^G: everything ``generate``, ``encode`` and ``reconstruct`` run.
* D is not read. Generation and encoding never call it, and the authors' D^H ends in two dense layers
  (129 -> 64 -> 1) where ours has three (129 -> 64 -> 32 -> 1), so it cannot be carried over exactly. The
  run format holds every module, so the run gets a new, untrained D (seeded); its ``state.json`` says so.

Orientation: the authors never reoriented their scans, while ``hagan`` works on cubes whose array axes
point (S, A, R) (``hagan.data.cube.CANONICAL_AXCODES``), the layout ``hagan encode`` gives its inputs.
Flipping an array axis of every convolution kernel, and of the 4^3 grid that G's first dense layer fills,
flips the network's output along that axis exactly: GroupNorm and nearest upsampling do not care about
order, 3^3 kernels with padding 1 and 4^3 kernels with stride 2 and padding 1 are symmetric about a
voxel pair. So the import flips the axes where the authors' layout differs from ours, and the imported
run generates the authors' volumes mirrored into hagan's layout, voxel for voxel.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ...checks import short_text
from ...config import Config, build_config, save_yaml
from ...data.cube import canonical_affine
from ...data.io import display_path, write_json_atomic
from ...errors import HaganError
from ...run_folder import CHECKPOINTS_DIR, CONFIG_FILE, GEOMETRY_FILE
from ...training.checkpoint import check_finite, save_checkpoint
from .. import build_model

SIZE = 256
PRESET = "paper-256"
ISSUE_13 = "https://github.com/batmanlab/HA-GAN/issues/13"


@dataclass(frozen=True)
class Dataset:
    """What one released model was trained on, from the authors' data code (sources in each docstring)."""

    name: str
    description: str
    recipe: str
    authors_axes: tuple[str, str, str]
    flips: tuple[int, ...]  # array axes flipped to go from the authors' layout to hagan's (S, A, R)
    spacing: tuple[float, float, float]  # nominal voxel size (mm) along hagan's (S, A, R) axes
    intensity: str


DATASETS = {
    # preprocess.py (HEAD): SimpleITK array (z, y, x) with no reorientation, NaN -> -1024, np.interp of
    # [-1024, 600] HU to [-1, 1] (the paper runs used the 600 HU threshold), blank axial planes dropped,
    # skimage resize of the whole scan to 256^3. For COPDGene's axial scans with DICOM's identity
    # direction (LPS), the array axes point (S, P, L). Every scan's extent was squeezed to 256 voxels,
    # so no true spacing exists; 1.3 mm is nominal (a ~330 mm chest field of view over 256 voxels).
    "copdgene": Dataset(
        name="copdgene", description="COPDGene lung CT", recipe="ct", authors_axes=("S", "P", "L"), flips=(1, 2),
        spacing=(1.3, 1.3, 1.3), intensity="HU window [-1024, 600] mapped to [-1, 1]; generated volumes are "
        "written in HU (int16)",
    ),
    # Brain_dataset_GSP_slim.py (commit 7acddd1): FreeSurfer norm.mgz read by nibabel (LIA voxel axes),
    # transposed (1, 2, 0) to (I, A, L), cropped [:, 20:-20, 20:-20], blank planes of axis 0 dropped,
    # resized to 256^3, clipped at 140 and mapped [0, 140] -> [-1, 1]. utils.post_process_brain undoes the
    # resize to 166 x 216 x 216 voxels of 1 mm, which gives the spacing below.
    "gsp": Dataset(
        name="gsp", description="GSP brain MRI (FreeSurfer norm.mgz)", recipe="mri", authors_axes=("I", "A", "L"),
        flips=(0, 2), spacing=(166 / SIZE, 216 / SIZE, 216 / SIZE),
        intensity="norm.mgz intensities [0, 140] mapped to [-1, 1]; generated volumes are written as "
        "intensity / 140 in [0, 1]",
    ),
}

# the authors' checkpoint files that are imported, by the module name in their file names
FILES = {"G": "generator (G^A, G^L, G^H)", "E": "slab encoder E^H", "Sub_E": "global encoder E^G"}


def key_map() -> dict[str, list[tuple[str, str]]]:
    """For each authors' file, (their layer, our layer) pairs; both carry ``.weight`` and ``.bias``."""
    generator = [("fc1", "common.fc")]
    for i, index in enumerate((0, 2, 4, 6, 8), start=1):  # tp_conv1-5, each followed by bn1-5
        generator += [(f"tp_conv{i}", f"common.body.{index}.0"), (f"bn{i}", f"common.body.{index}.1")]
    generator += [("tp_conv6", "high_gen.body.1.0"), ("bn6", "high_gen.body.1.1"), ("tp_conv7", "high_gen.body.3"),
                  ("sub_G.tp_conv1", "low_gen.body.0.0"), ("sub_G.bn1", "low_gen.body.0.1"),
                  ("sub_G.tp_conv2", "low_gen.body.1.0"), ("sub_G.bn2", "low_gen.body.1.1"),
                  ("sub_G.tp_conv3", "low_gen.body.2")]
    slab = []
    for i in range(1, 4):
        slab += [(f"conv{i}", f"slab_encoder.body.{i - 1}.0"), (f"bn{i}", f"slab_encoder.body.{i - 1}.1")]
    whole = []
    for i in range(1, 5):
        whole += [(f"conv{i}", f"global_encoder.body.{i - 1}.0"), (f"bn{i}", f"global_encoder.body.{i - 1}.1")]
    whole.append(("conv5", "global_encoder.body.4"))
    return {"G": generator, "E": slab, "Sub_E": whole}


def tensor_map() -> dict[str, dict[str, str]]:
    """Each authors' file's tensor names to ours, in the order their model defines them."""
    return {
        module: {f"{theirs}.{p}": f"{ours}.{p}" for theirs, ours in layers for p in ("weight", "bias")}
        for module, layers in key_map().items()
    }


def flip_tensor(name: str, tensor: torch.Tensor, flips: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` (our name ``name``) with the volume axes ``flips`` reversed; see the module docstring."""
    if not flips:
        return tensor
    if tensor.dim() == 5:  # a Conv3d kernel (out, in, d, h, w)
        return tensor.flip([2 + a for a in flips]).contiguous()
    if name.startswith("common.fc."):  # G's first layer fills a (channels, 4, 4, 4) grid
        grid = tensor.reshape(-1, 4, 4, 4, *tensor.shape[1:])
        return grid.flip([1 + a for a in flips]).reshape(tensor.shape).contiguous()
    return tensor  # GroupNorm scales and shifts, convolution biases: one value per channel


# ----- reading the authors' files -------------------------------------------------------------------


def find_iteration(folder: Path) -> int:
    """The latest iteration with a generator file in ``folder`` (the release has only 80000)."""
    if not folder.is_dir():
        raise HaganError(f"{display_path(folder)}: no such folder")
    found = [int(m[1]) for p in folder.iterdir() if (m := re.fullmatch(r"G_iter(\d+)\.pth", p.name))]
    if not found:
        raise HaganError(f"{display_path(folder)}: no G_iter*.pth; not a folder of the HA-GAN authors' checkpoints "
                         "(G_iter80000.pth, E_iter80000.pth, Sub_E_iter80000.pth)")
    return max(found)


def load_failure(err: Exception) -> str:
    """torch.load's reason in a few words: its weights-only refusals span paragraphs of advice."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        detail = next((line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines()
                       if line.strip()), "")
        return f"it holds objects other than tensors, which a weights-only load refuses: {short_text(detail, 80)}"
    first = re.split(r"(?<=[.:])\s", text.strip(), maxsplit=1)[0] if text.strip() else ""
    return f"{type(err).__name__}: {short_text(first, 120)}"


def read_state_dict(path: Path, hint: str = "") -> dict[str, torch.Tensor]:
    """The ``'model'`` state dict of one authors' checkpoint, read with ``torch.load(weights_only=True)``:
    the unpickler builds tensors and plain containers only and refuses anything else, so no code in the
    file ever runs. The ``module.`` prefix of ``nn.DataParallel`` is removed."""
    where = display_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol; refusals raise anyway
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a file torch cannot read safely is the file's fault
        raise HaganError(f"{where}: cannot read it as a plain PyTorch checkpoint ({load_failure(err)}){hint}") from err
    state = loaded.get("model") if isinstance(loaded, dict) and "model" in loaded else loaded
    if not isinstance(state, dict) or not state:
        raise HaganError(f"{where}: not an HA-GAN checkpoint (expected {{'model': state_dict, ...}}, "
                         f"got {type(loaded).__name__})")
    for key, value in state.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            raise HaganError(f"{where}: not an HA-GAN checkpoint (entry {short_text(str(key), 60)} of its state dict "
                             "is not a named tensor)")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def map_module(path: Path, module: str, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
               flips: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Our tensors from the authors' ``module`` file, refusing the first missing, extra or misshapen key."""
    where = display_path(path)
    names = tensor_map()[module]
    out = {}
    for theirs, ours in names.items():
        if theirs not in state:
            raise HaganError(f"{where}: tensor {theirs} is missing; not the authors' 256^3 {FILES[module]}")
        shape, want = tuple(state[theirs].shape), tuple(expected[ours].shape)
        if shape != want:
            raise HaganError(f"{where}: tensor {theirs} has shape {shape}, the authors' 256^3 {FILES[module]} has "
                             f"{want}; not a checkpoint of Model_HA_GAN_256.py")
        out[ours] = flip_tensor(ours, state[theirs].to(expected[ours].dtype), flips)
    extra = [key for key in state if key not in names]
    if extra:
        raise HaganError(f"{where}: unexpected tensor {short_text(extra[0], 80)}; not the authors' 256^3 "
                         f"{FILES[module]}")
    check_finite(path, {theirs: state[theirs] for theirs in names})
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def guess_dataset(folder: Path) -> str:
    """The dataset named by the folder (the downloads unpack to ``COPD_...`` and ``GSP_...``), or an error."""
    name = folder.resolve().name.lower()
    matches = [key for key, token in (("copdgene", "copd"), ("gsp", "gsp")) if token in name]
    if len(matches) != 1:
        raise HaganError(f"{display_path(folder)}: cannot tell from the folder name which model this is; "
                         "pass --dataset copdgene or --dataset gsp")
    return matches[0]


# ----- writing the run ------------------------------------------------------------------------------


def reference_affine(dataset: Dataset) -> list[list[float]]:
    """The canonical geometry of hagan's generated cubes (``canonical_affine``) at the dataset's spacing."""
    return canonical_affine(dataset.spacing, SIZE).tolist()


def import_config(latent_dim: int, num_classes: int, iteration: int) -> Config:
    """``paper-256`` with the latent size and classes the checkpoint was trained with (the authors'
    ``--latent-dim`` and ``--num-class``), and its iteration count."""
    overrides = [{"model": {"latent_dim": latent_dim, "num_classes": num_classes}},
                 {"train": {"iterations": max(iteration, 1)}}]
    return build_config(PRESET, overrides=overrides)


def import_official(folder: str | os.PathLike, out: str | os.PathLike, dataset: str | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Convert the authors' checkpoint folder into the run ``out``; returns what was imported.

    ``out`` appears only when complete: the run is written under a hidden temporary name and renamed.
    """
    folder, out = Path(folder), Path(out)
    iteration = find_iteration(folder)
    dataset_name = dataset or guess_dataset(folder)
    if dataset_name not in DATASETS:
        raise HaganError(f"unknown dataset {dataset_name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[dataset_name]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HaganError(f"{display_path(out)}: already exists; choose a new --out folder")
    paths = {module: folder / f"{module}_iter{iteration}.pth" for module in FILES}
    for module, path in paths.items():
        if not path.is_file():
            raise HaganError(f"{display_path(path)}: missing; the {FILES[module]} of iteration {iteration} is "
                             "needed (the release has G, E, Sub_E and D files)")
    hint = f"; the authors' GSP file is reported damaged ({ISSUE_13})" if dataset_name == "gsp" else ""
    states = {}
    for module, path in tqdm(paths.items(), desc="read", unit="file", disable=not progress):
        states[module] = read_state_dict(path, hint)

    # the latent size is E^G's output channels, the classes what G's first layer takes beyond it
    latent_key, fc_key = "conv5.weight", "fc1.weight"
    for module, key in (("Sub_E", latent_key), ("G", fc_key)):
        if key not in states[module] or states[module][key].dim() not in (2, 5):
            raise HaganError(f"{display_path(paths[module])}: tensor {key} is missing or misshapen; "
                             f"not the authors' 256^3 {FILES[module]}")
    latent_dim = int(states["Sub_E"][latent_key].shape[0])
    num_classes = int(states["G"][fc_key].shape[1]) - latent_dim
    if num_classes < 0:
        raise HaganError(f"{display_path(paths['G'])}: fc1 takes {states['G'][fc_key].shape[1]} inputs, fewer than "
                         f"the {latent_dim}-d latent of {paths['Sub_E'].name}; the files are of different models")
    config = import_config(latent_dim, num_classes, iteration)
    with torch.device("meta"):  # names and shapes only, to check every file before any real allocation
        expected = build_model(config).state_dict()
    mapped = {}
    for module, path in paths.items():
        mapped.update(map_module(path, module, states[module], expected, info.flips))
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the new D's weights, the same on every import
        model = build_model(config)
    model.load_state_dict({**model.state_dict(), **mapped})

    imported = {
        "source": "github.com/batmanlab/HA-GAN (Sun et al., IEEE JBHI 2022)",
        "dataset": info.name,
        "iteration": iteration,
        "modules": ["G_A", "G_L", "G_H", "E_H", "E_G"],
        "discriminator": "not imported: a new, untrained D (the authors' D^H head differs from ours)",
        "axes": {"authors": list(info.authors_axes), "run": ["S", "A", "R"], "flipped": list(info.flips)},
        "files": {path.name: sha256(path) for path in paths.values()},
    }
    tmp = out.with_name(f".{out.name}.import-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(tmp / CHECKPOINTS_DIR, iteration, model, {}, torch.Generator().manual_seed(0),
                        {"imported": imported}, keep=1)
        save_yaml(config, tmp / CONFIG_FILE)
        write_json_atomic(tmp / GEOMETRY_FILE, {
            "reference_affine": reference_affine(info), "recipe": info.recipe, "mode": "resize", "size": SIZE,
            "num_classes": num_classes,
        })
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**imported, "latent_dim": latent_dim, "num_classes": num_classes, "description": info.description,
            "intensity": info.intensity}


def cmd_import_official(args: argparse.Namespace) -> None:
    result = import_official(args.folder, args.out, args.dataset, progress=True)
    axes = result["axes"]
    classes = f", {result['num_classes']} classes" if result["num_classes"] else ""
    print(f"imported G (G^A, G^L, G^H), E^H and E^G of {result['description']} (iteration {result['iteration']}, "
          f"{SIZE}^3, latent {result['latent_dim']}{classes}) into {display_path(args.out)}")
    print("D not imported: generation and encoding never run it, and the authors' D^H head (two dense layers) "
          "does not fit ours (three); the run holds a new, untrained D, so it is for generate/encode/reconstruct/"
          "evaluate, not for resuming training")
    print(f"intensities: {result['intensity']}")
    print(f"axes: the authors' ({', '.join(axes['authors'])}) flipped along axes {tuple(axes['flipped'])} to "
          f"hagan's (S, A, R); voxel sizes are nominal (every scan was resized to {SIZE}^3)")
    print(f"next: hagan generate {display_path(args.out)} --n 2 --out generated/ --tile-depth 8")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-official", help="convert the HA-GAN authors' released 256^3 checkpoints into a hagan run",
        description="convert the HA-GAN authors' released 256^3 checkpoints into a hagan run.\n\n"
                    "Reads G_iterN.pth, E_iterN.pth and Sub_E_iterN.pth (D_iterN.pth is not read: generation and "
                    "encoding do not use D) with torch.load(weights_only=True), so no code in them runs, and writes a "
                    "run for hagan generate / encode / reconstruct / evaluate.",
        epilog="example:\n  hagan import-official COPD_HA_GAN_pretrained --out runs/copdgene",
    )
    p.add_argument("folder", help="folder holding G_iterN.pth, E_iterN.pth and Sub_E_iterN.pth (the latest N is used)")
    p.add_argument("--out", required=True, help="run folder to create (must not exist, or be empty)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                   help="what the model was trained on, which sets the run's intensities and orientation "
                        "(default: from the folder name, COPD... or GSP...)")
    p.set_defaults(func=cmd_import_official)
