"""Checkpoints without pickle: weights and optimizer tensors in safetensors, the rest in JSON.

A checkpoint is a folder ``iter_NNNNNNN`` written under a temporary name and renamed when complete,
so a killed run never leaves a half-written latest checkpoint.
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
    tmp = directory / f".tmp-{final.name}"
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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights, naming the first tensor whose name or shape differs from the model."""
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise HaganError(f"{path}: cannot read weights ({err})") from err
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
    checkpoint: Path, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer] | None, rng: torch.Generator | None
) -> dict[str, Any]:
    """Restore weights (and, for resuming, optimizers and the random stream); returns ``state.json``."""
    load_weights(model, checkpoint / WEIGHTS)
    state = json.loads((checkpoint / STATE).read_text())
    if optimizers is not None or rng is not None:
        tensors = load_file(str(checkpoint / TRAINING_STATE))
        with safe_open(str(checkpoint / TRAINING_STATE), "pt") as handle:
            meta = json.loads(handle.metadata()["optimizers"])
        for name, optimizer in (optimizers or {}).items():
            optimizer.load_state_dict(_unflatten_optimizer(name, tensors, meta[name]))
        if rng is not None:
            rng.set_state(tensors["rng"])
    return state
