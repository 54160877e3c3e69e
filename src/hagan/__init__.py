"""hagan: memory-efficient GANs for high-resolution 3D medical image synthesis."""

__version__ = "0.1.0"
