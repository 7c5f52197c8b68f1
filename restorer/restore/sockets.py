"""Socket options of every family (statefile/dump/sockets.py SOCKOPTS), set again
on a new socket where they differ from its defaults."""

from __future__ import annotations

import socket

from statefile.dump.sockets import SOCK_RCVBUF_LOCK, SOCK_SNDBUF_LOCK, SOCKOPTS
from statefile.format.records import Socket


def set_sockopts(sock: socket.socket, info: Socket, before_bind: bool = False) -> None:
    """Set the saved options (dump/sockets.py SOCKOPTS) that differ from this new
    socket's.  Buffer sizes only when the application had fixed them (SO_BUF_LOCK);
    IP_FREEBIND is left to bind_inet, SO_PEEK_OFF to the end (after the queue is
    refilled).  Raises OSError naming the option it cannot set."""
    saved = info.sockopts
    if saved is None:
        return
    lock = saved.buf_lock
    for name in saved.__struct_fields__:
        value = getattr(saved, name)
        if value is None or name in ("freebind", "peek_off", "buf_lock") \
                or name not in SOCKOPTS:
            continue
        if name == "sndbuf" and not lock & SOCK_SNDBUF_LOCK:
            continue
        if name == "rcvbuf" and not lock & SOCK_RCVBUF_LOCK:
            continue
        level, opt, kind, _fam = SOCKOPTS[name]
        try:
            now = sock.getsockopt(level, opt) if kind == "int" else \
                sock.getsockopt(level, opt, kind).hex()
        except OSError:
            now = None
        if now == value:
            continue
        try:
            if name in ("sndbuf", "rcvbuf"):
                # (the kernel doubles what is set; SO_*BUFFORCE passes the
                # system maximum where crrestart may)
                try:
                    sock.setsockopt(level, 32 if name == "sndbuf" else 33, value // 2)
                except PermissionError:
                    sock.setsockopt(level, opt, value // 2)
            elif kind == "int":
                sock.setsockopt(level, opt, value)
            elif name == "bindtodevice":
                sock.setsockopt(level, opt, bytes.fromhex(value).rstrip(b"\0"))
            else:
                sock.setsockopt(level, opt, bytes.fromhex(value))
        except OSError as e:
            raise OSError(e.errno, f"cannot set socket option {name} = {value} again: "
                          f"{e.strerror}") from None
    if lock:
        sock.setsockopt(socket.SOL_SOCKET, 72, lock)    # SO_BUF_LOCK


def finish_sockopts(sock: socket.socket, info: Socket) -> None:
    """Options set once the socket holds its data again (SO_PEEK_OFF)."""
    off = info.sockopts.peek_off if info.sockopts is not None else -1
    if off != -1:
        sock.setsockopt(socket.SOL_SOCKET, 42, off)
