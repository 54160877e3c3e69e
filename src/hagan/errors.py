"""Exceptions that the command line turns into one-line messages."""

import os


def printable(text: str) -> str:
    """``text`` made safe to print on one line of any terminal.

    Lone surrogates (undecodable file-name bytes) become ``\\xff``; control and other non-printing
    characters (newlines, terminal escape sequences, bidirectional overrides) become ``\\n``,
    ``\\x1b``, ``\\u202e``, so that a file name can neither forge a second message line nor drive
    the terminal.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as text that can always be printed: undecodable bytes of a non-UTF-8 name become ``\xff``."""
    return printable(os.fsdecode(os.fspath(path)))


class HaganError(Exception):
    """An error the user can act on; the CLI prints it as one line without a traceback."""


class VolumeError(HaganError):
    """A file that cannot be used as a 3D volume; the message names the file and the reason."""

    def __init__(self, path: object, reason: str):
        self.path = printable(str(path))
        self.reason = " ".join(printable(line) for line in reason.split())
        super().__init__(f"{self.path}: {self.reason}")


class NoUsableVolumesError(HaganError):
    """A folder in which not a single file could be used."""
