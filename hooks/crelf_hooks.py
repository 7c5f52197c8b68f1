"""crelf_hooks: let an application take part in its own checkpoint and restart.

Copy this one file into an application (standard library only) and call::

    import crelf_hooks
    crelf_hooks.install(before_checkpoint=flush_and_disconnect,
                        after_restart=reconnect,
                        after_resume=reconnect)

* before_checkpoint() runs just before crcheckpoint freezes the process
  (flush buffers, close network connections, drop caches...); crcheckpoint
  waits for it (``crcheckpoint --hook-timeout``, default 10 s);
* after_resume() runs when a leave-running checkpoint is over;
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
import socket
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


def _serve(srv: socket.socket) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            continue
        with conn:
            try:
                event = conn.makefile("rb").readline().decode().strip()
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
