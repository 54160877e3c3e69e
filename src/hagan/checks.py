"""Small checks shared by the command line, the config and the files of runs and caches.

Every message that echoes a user value goes through :func:`short_repr`, so a huge or deeply nested
value (a YAML alias bomb, a megabyte string) still gives one short line, in time and memory bounded
by the limit rather than by the value. Files of runs and caches are read with
:func:`read_json_object`, which refuses anything but a JSON object of finite numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import reprlib
from pathlib import Path
from typing import Any

import numpy as np

from .data.io import display_path
from .errors import HaganError, printable

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (``...`` marks a cut); visits a bounded
    number of elements, so an exponentially large value costs no more than a small one."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_text(text: str, limit: int = 120) -> str:
    """The first line of ``text``, control characters escaped, cut to at most ``limit`` characters
    (``...`` marks a cut)."""
    lines = text[: limit + 1].splitlines() or [""]
    cut = len(lines) > 1 or len(text) > limit
    line = printable(lines[0])
    if cut or len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1 (``--n``, ``--batch-size``, ...)."""
    return _bounded_int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type for counts where 0 means off (``--tile-depth``, ``--warmup``, ...)."""
    return _bounded_int(text, 0, "a non-negative integer")


def seed_int(text: str) -> int:
    """An argparse type for random seeds: 0 to 2**64 - 1, what torch's generators accept."""
    value = _bounded_int(text, 0, "a seed from 0 to 2**64 - 1")
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**64 - 1, got {short_repr(text, 40)}")
    return value


def _bounded_int(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {short_repr(text, 40)}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def require_count(name: str, value: Any) -> int:
    """``value`` if it is an integer of at least 1, else a HaganError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise HaganError(f"{name} must be a positive integer, got {short_repr(value)}")
    return int(value)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {short_repr(text, 40)} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object; NaN, Infinity and numbers beyond float range are refused."""
    where = display_path(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise HaganError(f"{where}: cannot read ({err.strerror})") from err
    try:
        value = json.loads(data.decode("utf-8"), parse_float=_finite_float, parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise HaganError(f"{where}: not JSON (not UTF-8 text at byte {err.start})") from err
    except RecursionError as err:
        raise HaganError(f"{where}: not usable JSON (nested too deeply)") from err
    except ValueError as err:
        raise HaganError(f"{where}: not valid JSON ({short_text(str(err))})") from err
    if not isinstance(value, dict):
        raise HaganError(f"{where}: expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def is_int(value: Any) -> bool:
    """True for an integer that is not a bool (JSON and YAML give ``true`` as a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def affine_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as a 4x4 voxel-to-world affine, or None."""
    try:
        affine = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return f"must be a 4x4 matrix of numbers, got {short_repr(value)}"
    if affine.shape != (4, 4):
        return f"must be a 4x4 matrix, got shape {affine.shape}"
    if not np.isfinite(affine).all():
        return "holds NaN or infinite values"
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return "is singular (zero voxel size or collinear axes)"
    return None
