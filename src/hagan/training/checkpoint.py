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
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..checks import is_int, read_json_object, short_repr, short_text
from ..data.io import display_path, fsync_path
from ..errors import HaganError
from ..run_folder import STATE, TRAINING_STATE, WEIGHTS, iteration_name, list_checkpoints

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


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


def _unflatten_optimizer(
    path: Path, name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: Any
) -> dict[str, Any]:
    """The state dict of optimizer ``name`` from a training state, checked against ``optimizer`` so that a
    tampered file fails here, naming the file, rather than at the first step."""
    where = display_path(path)
    if not (isinstance(meta, dict) and isinstance(meta.get("param_groups"), list)
            and isinstance(meta.get("scalars"), dict)):
        raise HaganError(f"{where}: optimizer {name!r} lacks its param_groups and scalars")
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise HaganError(f"{where}: optimizer {name!r} has {len(groups)} parameter groups, the model's has "
                         f"{len(optimizer.param_groups)}; the state does not belong to this configuration")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved, own in zip(groups, optimizer.param_groups):
        if not (isinstance(saved, dict) and isinstance(saved.get("params"), list)
                and len(saved["params"]) == len(own["params"])):
            raise HaganError(f"{where}: optimizer {name!r}: a parameter group does not match the model's")
        if not all(is_int(i) and 0 <= i < len(params) for i in saved["params"]):
            raise HaganError(f"{where}: optimizer {name!r}: parameter indices out of range")
        for key in ("lr", "eps", "weight_decay"):
            if key in saved and not _finite_number(saved[key], low=0.0):
                raise HaganError(f"{where}: optimizer {name!r}: {key} is {short_repr(saved[key])}, not a number >= 0")
        betas = saved.get("betas", (0.0, 0.0))
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_finite_number(b, 0.0, 1.0) for b in betas)):
            raise HaganError(f"{where}: optimizer {name!r}: betas is {short_repr(betas)}, not two numbers in [0, 1)")
    state: dict[int, dict[str, Any]] = {}
    for slot, value in list(tensors.items()) + list(meta["scalars"].items()):
        if not slot.startswith(f"{name}/"):
            continue
        parts = slot.split("/", 2)
        if len(parts) != 3 or not parts[1].isascii() or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise HaganError(f"{where}: optimizer slot {short_repr(slot)} names no parameter of the model")
        index, key = int(parts[1]), parts[2]
        if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(params[index].shape):
            raise HaganError(f"{where}: optimizer slot {slot} has shape {tuple(value.shape)}, "
                             f"its parameter {tuple(params[index].shape)}")
        state.setdefault(index, {})[key] = value
    return {"state": state, "param_groups": groups}


def _finite_number(value: Any, low: float, high: float = float("inf")) -> bool:
    """True for an int or float in [low, high); never for NaN or Inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value < high


def _write_reason(err: Exception) -> str:
    """The operating system's reason for a failed write; safetensors gives it only inside its message
    (``... No space left on device (os error 28)``)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    code = re.search(r"os error (\d+)", str(err))
    return os.strerror(int(code[1])) if code else " ".join(str(err).split())


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
    final = directory / iteration_name(iteration)
    tmp = directory / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
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
            fsync_path(tmp / name)
        fsync_path(tmp)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HaganError(
            f"{display_path(final)}: cannot write the checkpoint ({_write_reason(err)}); the previous ones are intact"
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    fsync_path(directory)
    for old in list_checkpoints(directory)[:-keep]:
        _discard(old)
    return final


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
        raise HaganError(f"{display_path(path)}: cannot read weights ({short_text(str(err))})") from err


def check_finite(path: Path, tensors: dict[str, torch.Tensor], order: list[str] | None = None) -> None:
    """Refuse NaN or Inf in any floating-point tensor (weights, EMA copies, spectral-norm vectors,
    optimizer moments), naming the first in ``order`` (default: the file's): they would load silently
    and generate all-NaN volumes."""
    for key in order if order is not None else list(tensors):
        tensor = tensors[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise HaganError(
                f"{display_path(path)}: tensor {short_text(key, 80)} holds non-finite values ({nan} NaN, {inf} Inf "
                f"of {tensor.numel()}); the file is damaged or comes from a diverged run"
            )


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
        raise HaganError(f"{path}: unexpected tensor {short_text(unexpected[0], 80)}; "
                         "the weights do not belong to this configuration")
    check_finite(path, weights, list(expected))
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
    for name in (WEIGHTS, STATE) if optimizers is None and rng is None else (WEIGHTS, STATE, TRAINING_STATE):
        if not (checkpoint / name).is_file():
            raise HaganError(f"{checkpoint}: not a complete checkpoint (no {name})")
    load_weights(model, checkpoint / WEIGHTS)
    state = read_state(checkpoint / STATE)
    if optimizers is not None and "imported" in state:
        raise HaganError(f"{display_path(checkpoint)}: imported from published weights, which hold no training "
                         "state; use it with generate, encode, reconstruct or evaluate, not --resume")
    if optimizers is not None or rng is not None:
        tensors, meta = read_training_state(checkpoint / TRAINING_STATE)
        for name, optimizer in (optimizers or {}).items():
            if name not in meta:
                raise HaganError(f"{display_path(checkpoint / TRAINING_STATE)}: no state for optimizer {name!r}; "
                                 "the state does not belong to this configuration")
            restored = _unflatten_optimizer(checkpoint / TRAINING_STATE, name, optimizer, tensors, meta[name])
            try:
                optimizer.load_state_dict(restored)
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                raise HaganError(f"{display_path(checkpoint / TRAINING_STATE)}: optimizer {name!r} does not fit the "
                                 f"model ({short_text(str(err))})") from err
        if rng is not None:
            try:
                rng.set_state(tensors["rng"])
            except (KeyError, RuntimeError, TypeError) as err:
                raise HaganError(f"{display_path(checkpoint / TRAINING_STATE)}: no usable random-generator state "
                                 "(tensor rng missing or of the wrong size)") from err
    return state


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, its known fields checked: the iteration, the data loader's place,
    the rollback count and learning-rate scale, the model's extra state."""
    state = read_json_object(path)
    where = display_path(path)
    rules = {
        "iteration": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "rollbacks": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        "world_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        "lr_scale": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
        "extra": (lambda v: isinstance(v, dict), "an object"),
        "loader": (lambda v: isinstance(v, dict), "an object"),
    }
    if "iteration" not in state:
        raise HaganError(f"{where}: no iteration; not a checkpoint's state")
    for key, (valid, expected) in rules.items():
        if key in state and not valid(state[key]):
            raise HaganError(f"{where}: {key} must be {expected}, got {short_repr(state[key])}")
    loader = state.get("loader")
    if loader is not None:
        for key in ("epoch", "position"):
            if not (is_int(loader.get(key)) and loader[key] >= 0):
                raise HaganError(f"{where}: loader.{key} must be an integer >= 0, got {short_repr(loader.get(key))}")
        for key in ("seed", "batch_size"):
            if key in loader and not is_int(loader[key]):
                raise HaganError(f"{where}: loader.{key} must be an integer, got {short_repr(loader[key])}")
    return state


def read_training_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``training_state.safetensors`` (optimizer moments, the random generator) and its
    optimizer metadata, refusing a truncated file, missing metadata and non-finite moments."""
    where = display_path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise HaganError(f"{where}: cannot read the training state ({short_text(str(err))})") from err
    if "optimizers" not in metadata:
        raise HaganError(f"{where}: no optimizer metadata; not a hagan training state")
    try:
        meta = json.loads(metadata["optimizers"])
    except (ValueError, RecursionError) as err:
        raise HaganError(f"{where}: optimizer metadata is not valid JSON") from err
    if not isinstance(meta, dict):
        raise HaganError(f"{where}: optimizer metadata must be an object, got {type(meta).__name__}")
    if "rng" in tensors and (tensors["rng"].dtype != torch.uint8 or tensors["rng"].dim() != 1):
        raise HaganError(f"{where}: tensor rng must be a 1-D uint8 random-generator state")
    check_finite(path, tensors)
    return tensors, meta
