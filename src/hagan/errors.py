"""Exceptions that the command line turns into one-line messages."""


class HaganError(Exception):
    """An error the user can act on; the CLI prints it as one line without a traceback."""


class VolumeError(HaganError):
    """A file that cannot be used as a 3D volume; the message names the file and the reason."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NoUsableVolumesError(HaganError):
    """A folder in which not a single file could be used."""
