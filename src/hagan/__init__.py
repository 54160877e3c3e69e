"""hagan: memory-efficient GANs for high-resolution 3D medical image synthesis."""

__version__ = "0.1.0"

from .api import Run, load_run  # noqa: E402

__all__ = ["Run", "load_run", "__version__"]
