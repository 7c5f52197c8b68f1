"""Talk to applications that opted in to checkpoint/restart hooks.

An application that uses hooks/crelf_hooks.py (or hooks/crelf_hooks.h)
listens on the abstract unix socket ``\\0crelf-hooks-<pid>``.  crcheckpoint
sends it "checkpoint" before freezing and "resume" after a leave-running
checkpoint; crrestart sends "restart" once the process runs again.  Each
exchange is one line each way; the answer is "ok" or "error: ...".
"""

from __future__ import annotations

import errno
import socket

from .errors import CrelfError

EVENTS = ("checkpoint", "resume", "restart")


class HookError(CrelfError):
    exit_code = 6


def notify(pid: int, event: str, timeout: float = 10.0) -> str | None:
    """Send one event; the application's answer ("ok", "error: ..."), or None
    when the task has no hooks.  Raises HookError on timeout."""
    assert event in EVENTS
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(b"\0crelf-hooks-%d" % pid)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return None
            raise
        s.sendall(event.encode() + b"\n")
        try:
            f = s.makefile("rb")
            reply = f.readline().decode(errors="replace").strip()
            f.read()  # until the application has closed its end: no fd left over
        except TimeoutError:
            raise HookError(f"pid {pid}: its {event} hook did not answer within "
                            f"{timeout:g} s") from None
        if not reply:
            raise HookError(f"pid {pid}: its {event} hook closed the connection without an "
                            "answer")
        return reply
    finally:
        s.close()


def has_hooks(pid: int) -> bool:
    """True when the task listens for hook events (the abstract name is bound)."""
    try:
        with open("/proc/net/unix") as f:
            return any(line.rstrip().endswith(f"@crelf-hooks-{pid}") for line in f)
    except OSError:
        return False


__all__ = ["notify", "has_hooks", "HookError"]
