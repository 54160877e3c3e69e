"""Checkpoints without pickle: weights and optimizer tensors in safetensors, the rest in JSON.

A checkpoint is a folder ``iter_NNNNNNNN`` written under a temporary name (``.tmp-iter_...``), its
files fsynced, and renamed when complete, so a run killed at any moment (SIGKILL, power loss after
the rename) never leaves a half-written latest checkpoint. Old checkpoints are pruned by renaming them
to ``.trash-...`` first, so a kill during deletion never leaves a half-deleted folder that looks
complete. Leftovers of either kind are removed by :func:`clean_partial` when a run starts.

Weights load from safetensors only; pickle files (``.pt``, ``.pth``, ...) are refused unless the
caller passes ``allow_pickle=True``, and are then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import HaganError

WEIGHTS = "weights.safetensors"
TRAINING_STATE = "training_state.safetensors"
STATE = "state.json"
PREFIX = "iter_"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk; best effort where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a checkpoint folder so that no moment of the removal leaves it looking complete."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(directory: Path) -> list[Path]:
    """Remove what a killed run left behind: unfinished (``.tmp-``) and half-pruned (``.trash-``) folders."""
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def checkpoint_name(iteration: int) -> str:
    return f"{PREFIX}{iteration:08d}"


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            slot = f"{name}/{index}/{key}"
            if torch.is_tensor(value):
                tensors[slot] = value.detach().cpu().contiguous()
            else:
                scalars[slot] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for slot, value in list(tensors.items()) + list(meta["scalars"].items()):
        if slot.startswith(f"{name}/"):
            _, index, key = slot.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    iteration: int,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    rng: torch.Generator,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``directory/iter_N`` atomically and prune all but the newest ``keep`` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(iteration)
    tmp = directory / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS))
    tensors: dict[str, torch.Tensor] = {"rng": rng.get_state()}
    optimizer_meta = {}
    for name, optimizer in optimizers.items():
        flat, meta = _flatten_optimizer(name, optimizer)
        tensors.update(flat)
        optimizer_meta[name] = meta
    save_file(tensors, str(tmp / TRAINING_STATE), metadata={"optimizers": json.dumps(optimizer_meta)})
    (tmp / STATE).write_text(json.dumps({"iteration": iteration, **extra}, indent=2))
    for name in (WEIGHTS, TRAINING_STATE, STATE):
        _fsync_path(tmp / name)
    _fsync_path(tmp, directory=True)
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    _fsync_path(directory, directory=True)
    for old in list_checkpoints(directory)[:-keep]:
        _discard(old)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX}*")
             if p.is_dir() and all((p / name).is_file() for name in (STATE, WEIGHTS, TRAINING_STATE))]
    return sorted(found, key=lambda p: p.name)


def is_pickle_file(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A name -> tensor mapping from safetensors, or (only with ``allow_pickle``) from a torch pickle
    read with ``weights_only=True``, which refuses anything but tensors and plain containers."""
    path = Path(path)
    if is_pickle_file(path):
        if not allow_pickle:
            raise HaganError(
                f"{path}: refusing to load a pickle checkpoint ({path.suffix}): unpickling can run arbitrary code. "
                "Use safetensors weights, or if you trust the file pass allow_pickle=True (--allow-pickle); "
                "it is then read with torch.load(weights_only=True)"
            )
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise HaganError(f"{path}: cannot read weights ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
        for key in ("state_dict", "model", "weights"):
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in loaded.items()):
            raise HaganError(f"{path}: not a mapping of tensor names to tensors")
        return loaded
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise HaganError(f"{path}: cannot read weights ({err})") from err


def load_weights(model: nn.Module, path: Path, allow_pickle: bool = False) -> None:
    """Load safetensors weights, naming the first tensor whose name or shape differs from the model.

    Pickle files are refused unless ``allow_pickle`` (then read with ``torch.load(weights_only=True)``).
    """
    weights = read_weights(path, allow_pickle)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            raise HaganError(f"{path}: tensor {key} is missing; the weights do not belong to this configuration")
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise HaganError(
                f"{path}: tensor {key} has shape {tuple(weights[key].shape)}, the model expects {tuple(tensor.shape)}"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise HaganError(f"{path}: unexpected tensor {unexpected[0]}; the weights do not belong to this configuration")
    model.load_state_dict(weights)


def load_checkpoint(
    checkpoint: Path,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer] | None,
    rng: torch.Generator | None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Restore weights (and, for resuming, optimizers and the random stream); returns ``state.json``.

    ``checkpoint`` is a checkpoint folder, or a bare weights file (safetensors; a pickle only with
    ``allow_pickle``), which restores weights only and reports iteration 0.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        if optimizers is not None or rng is not None:
            raise HaganError(f"{checkpoint}: a bare weights file cannot be resumed from; pass a checkpoint folder")
        load_weights(model, checkpoint, allow_pickle)
        return {"iteration": 0}
    if not checkpoint.is_dir():
        raise HaganError(f"{checkpoint}: no such checkpoint")
    for name in (WEIGHTS, STATE):
        if not (checkpoint / name).is_file():
            raise HaganError(f"{checkpoint}: not a complete checkpoint (no {name})")
    load_weights(model, checkpoint / WEIGHTS)
    try:
        state = json.loads((checkpoint / STATE).read_text())
    except (OSError, ValueError) as err:
        raise HaganError(f"{checkpoint / STATE}: unreadable ({err})") from err
    if optimizers is not None or rng is not None:
        tensors = load_file(str(checkpoint / TRAINING_STATE))
        with safe_open(str(checkpoint / TRAINING_STATE), "pt") as handle:
            meta = json.loads(handle.metadata()["optimizers"])
        for name, optimizer in (optimizers or {}).items():
            optimizer.load_state_dict(_unflatten_optimizer(name, tensors, meta[name]))
        if rng is not None:
            rng.set_state(tensors["rng"])
    return state
