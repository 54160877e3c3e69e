"""hagan: memory-efficient GANs for high-resolution 3D medical image synthesis.

``hagan.load_run`` and ``hagan.Run`` are imported on first use, so that ``import hagan`` (and every
command-line call) does not pay for torch, TensorBoard and SciPy until it needs them.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Run", "load_run", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Run", "load_run"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'hagan' has no attribute {name!r}")
