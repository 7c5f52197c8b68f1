"""The test suite's restart self-check (issue 16: a statefile crcheckpoint
writes always restarts).

When CRELF_TEST_LEDGER names a file, crcheckpoint appends `W <statefile>` for
every restartable statefile it wrote and crrestart `R <statefile>` for every
statefile it restored; tests/conftest.py then fails a test that checkpointed
without restarting what it wrote.  Outside the tests the variable is unset and
this does nothing.
"""

from __future__ import annotations

import os


def note(kind: str, statefile: str) -> None:
    path = os.environ.get("CRELF_TEST_LEDGER")
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{kind} {os.path.realpath(statefile)}\n".encode())
        finally:
            os.close(fd)
    except OSError:
        pass
