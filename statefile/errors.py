"""Errors that end a command with a one-line message and a non-zero exit."""


class CrelfError(Exception):
    """A failure to report to the user as one line (no traceback)."""

    exit_code = 1


class TargetError(CrelfError):
    """The target process cannot be checkpointed (missing, not ours, traced...)."""

    exit_code = 3


class OutputError(CrelfError):
    """The statefile could not be written (directory, permissions, disk full)."""

    exit_code = 4


class FormatError(CrelfError):
    """A file is not a readable crelf statefile."""

    exit_code = 5
