"""One exception type for every restore failure: it names the failed step."""

from __future__ import annotations


class RestoreError(Exception):
    """A restore failed (or was refused) at `step`; str() is one line for the user."""

    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class ValidationError(RestoreError):
    """The environment does not match the statefile; nothing was touched."""

    def __init__(self, message: str):
        super().__init__("validation", message)
