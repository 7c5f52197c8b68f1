"""The test suite's restart self-check (issue 16: a statefile crcheckpoint
writes always restarts).

When CRELF_TEST_LEDGER names a file, crcheckpoint appends `W <identity>
<statefile>` for every restartable statefile it wrote and crrestart `R ...` for
every statefile it restored (identity: inode, size and mtime, so that a file
the test damaged or forged afterwards is told apart); tests/conftest.py then fails a test that checkpointed
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
            real = os.path.realpath(statefile)
            try:
                st = os.stat(real)
                ident = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                ident = "-"
            os.write(fd, f"{kind} {ident} {real}\n".encode())
        finally:
            os.close(fd)
    except OSError:
        pass
