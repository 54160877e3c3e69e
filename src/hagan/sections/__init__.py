"""Config sections of the models beside HA-GAN, one module each, so that each model owns its options.

Each module defines a dataclass (a section of :class:`hagan.config.Config`) with a ``problems()``
method that lists what is wrong with its values, and ``PRESETS`` to merge into the named presets.
They import nothing from hagan but :mod:`hagan.checks` (which imports no config), so that
``hagan.config`` can import them without a cycle.
"""
