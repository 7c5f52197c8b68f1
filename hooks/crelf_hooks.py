"""crelf_hooks: let an application take part in its own checkpoint and restart.

Copy this one file into an application (standard library only) and call::

    import crelf_hooks
    crelf_hooks.install(before_checkpoint=flush_and_disconnect,
                        after_restart=reconnect,
                        after_resume=reconnect)

* before_checkpoint() runs just before crcheckpoint freezes the process
  (flush buffers, close network connections, drop caches...); crcheckpoint
  waits for it (``crcheckpoint --hook-timeout``, default 10 s);
* after_resume() runs when a leave-running checkpoint is over (also when
  crcheckpoint was killed before it could say so: the hook thread watches it);
* after_restart() runs in the restarted process, as soon as crrestart has
  brought it back (reconnect, reopen scratch files...).

How: a daemon thread listens on the abstract unix socket
``\\0crelf-hooks-<pid>``; crcheckpoint and crrestart connect to it and send one
line ("checkpoint", "resume" or "restart"), and the thread answers "ok" once
the callback returned ("error: ..." if it raised).  The listening socket is
itself checkpointed and restored (it is bound again to the same name), so the
thread that was waiting in accept() at the checkpoint receives the "restart"
after a restart.  C programs: hooks/crelf_hooks.h speaks the same protocol.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading

_callbacks: dict[str, object] = {}
_thread: threading.Thread | None = None


def address(pid: int | None = None) -> bytes:
    return b"\0crelf-hooks-%d" % (pid or os.getpid())


def install(before_checkpoint=None, after_restart=None, after_resume=None) -> None:
    """Register the callbacks (None: nothing to do) and start listening."""
    global _thread
    _callbacks.update(checkpoint=before_checkpoint, restart=after_restart,
                      resume=after_resume)
    if _thread is not None:
        return
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(address())
    srv.listen(4)
    _thread = threading.Thread(target=_serve, args=(srv,), name="crelf-hooks", daemon=True)
    _thread.start()


def _started(pid: str) -> str | None:
    """A process's start time (/proc/PID/stat field 22), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _serve(srv: socket.socket) -> None:
    # After "checkpoint": the crcheckpoint that sent it, which says "resume"
    # when it is done; if it dies first (killed), after_resume runs all the
    # same, unless this process is a restarted copy (its start time is new):
    # then crrestart says "restart".
    pending = None          # (crcheckpoint's pid, its start time, ours)
    while True:
        if pending is not None and not select.select([srv], [], [], 0.5)[0]:
            if _started(pending[0]) != pending[1]:
                fn = _callbacks.get("resume") if _started("self") == pending[2] else None
                pending = None
                if fn is not None:
                    try:
                        fn()
                    except Exception:   # nobody to report it to
                        pass
            continue
        try:
            conn, _ = srv.accept()
        except OSError:
            continue
        with conn:
            try:
                event = conn.makefile("rb").readline().decode().strip()
                if event == "checkpoint":
                    peer = struct.unpack("3i", conn.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                    pending = (str(peer), _started(str(peer)), _started("self"))
                elif event in ("resume", "restart"):
                    pending = None
                fn = _callbacks.get(event)
                if fn is not None:
                    fn()
                reply = b"ok\n"
            except Exception as e:  # the application's callback failed
                reply = f"error: {type(e).__name__}: {e}\n".encode()
            try:
                conn.sendall(reply)
            except OSError:
                pass
