"""The ``hagan`` command line: ``main`` parses and runs one command."""

from .commands import main

__all__ = ["main"]
