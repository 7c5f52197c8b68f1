"""What every socket shares, whatever its family: family, type and addresses
(socket_info, from a duplicate of the fd), and the socket options saved for unix,
TCP and UDP sockets (SOCKOPTS).  Restored by restorer/restore/sockets.py; each
family has its own module (unix.py, inet.py)."""

from __future__ import annotations

import os
import socket

from statefile.control import ptrace as pt
from statefile.dump import inet as dump_inet
from statefile.dump import unix as dump_unix

# Socket options saved for every unix, TCP and UDP socket and set again at
# restart where they differ from a new socket's (restore/sockets.py set_sockopts).
# name -> (level, option, kind, families): kind "int", or the size in bytes of
# a raw struct; families: which sockets have it (None: every socket).

SOL_SOCKET, SOL_IP, SOL_TCP, SOL_IPV6 = socket.SOL_SOCKET, 0, 6, 41
SO_PEEK_OFF = 42
SO_BUF_LOCK = 72
SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK = 1, 2
INET = (socket.AF_INET, socket.AF_INET6)
SOCKOPTS = {
    "priority": (SOL_SOCKET, 12, "int", None),
    "rcvlowat": (SOL_SOCKET, 18, "int", None),
    "mark": (SOL_SOCKET, 36, "int", None),
    "passcred": (SOL_SOCKET, 16, "int", None),
    "passsec": (SOL_SOCKET, 34, "int", None),
    "dontroute": (SOL_SOCKET, 5, "int", None),
    "no_check": (SOL_SOCKET, 11, "int", None),
    "oobinline": (SOL_SOCKET, 10, "int", None),
    "broadcast": (SOL_SOCKET, 6, "int", None),
    "keepalive": (SOL_SOCKET, 9, "int", None),
    "rcvtimeo": (SOL_SOCKET, 20, 16, None),        # struct timeval
    "sndtimeo": (SOL_SOCKET, 21, 16, None),
    "linger": (SOL_SOCKET, 13, 8, None),           # struct linger
    "buf_lock": (SOL_SOCKET, SO_BUF_LOCK, "int", None),
    "sndbuf": (SOL_SOCKET, 7, "int", None),        # (set again only if locked)
    "rcvbuf": (SOL_SOCKET, 8, "int", None),
    "bindtodevice": (SOL_SOCKET, 25, 16, INET),    # interface name (IFNAMSIZ)
    "peek_off": (SOL_SOCKET, SO_PEEK_OFF, "int", (socket.AF_UNIX,)),
    "ip_tos": (SOL_IP, 1, "int", (socket.AF_INET,)),
    "ip_ttl": (SOL_IP, 2, "int", (socket.AF_INET,)),
    "freebind": (SOL_IP, 15, "int", INET),         # (set before bind: restore/inet.py)
    "transparent": (SOL_IP, 19, "int", INET),
    "ipv6_tclass": (SOL_IPV6, 67, "int", (socket.AF_INET6,)),
    "ipv6_unicast_hops": (SOL_IPV6, 16, "int", (socket.AF_INET6,)),
    "tcp_nodelay": (SOL_TCP, 1, "int", "tcp"),
    "tcp_keepidle": (SOL_TCP, 4, "int", "tcp"),
    "tcp_keepintvl": (SOL_TCP, 5, "int", "tcp"),
    "tcp_keepcnt": (SOL_TCP, 6, "int", "tcp"),
    "tcp_cork": (SOL_TCP, 3, "int", "tcp"),
    "tcp_syncnt": (SOL_TCP, 7, "int", "tcp"),
    "tcp_linger2": (SOL_TCP, 8, "int", "tcp"),
    "tcp_defer_accept": (SOL_TCP, 9, "int", "tcp"),
    "tcp_window_clamp": (SOL_TCP, 10, "int", "tcp"),
    "tcp_user_timeout": (SOL_TCP, 18, "int", "tcp"),
    "tcp_notsent_lowat": (SOL_TCP, 25, "int", "tcp"),
}


def _applies(sock: socket.socket, families) -> bool:
    if families is None:
        return True
    if families == "tcp":
        return sock.family in INET and sock.type == socket.SOCK_STREAM
    return sock.family in families


def sockopts(sock: socket.socket) -> dict:
    """The options of SOCKOPTS this socket has (ints, raw structs in hex);
    an option the kernel does not give for this socket is left out."""
    out: dict = {}
    for name, (level, opt, kind, families) in SOCKOPTS.items():
        if not _applies(sock, families):
            continue
        try:
            if kind == "int":
                out[name] = sock.getsockopt(level, opt)
            else:
                out[name] = sock.getsockopt(level, opt, kind).hex()
        except OSError:
            continue
    return out


_FAMILIES = {socket.AF_UNIX: "unix", socket.AF_INET: "inet", socket.AF_INET6: "inet6",
             socket.AF_NETLINK: "netlink", 17: "packet"}


_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram",
          socket.SOCK_SEQPACKET: "seqpacket", socket.SOCK_RAW: "raw"}


def socket_info(pid: int, fd: int, unix_diag=None, scm=None) -> dict:
    """Family, type and addresses of a task's socket, from a duplicate of its fd
    (pidfd_getfd): nothing is read from or written to the socket.  `scm`
    (dump_scm.InFlight) keeps the fds a unix socket has in flight."""
    try:
        dup = pt.dup_fd_of(pid, fd)
    except OSError:
        return {"family": "unknown"}
    sock = socket.socket(fileno=dup)
    try:
        info = {"family": _FAMILIES.get(sock.family, str(int(sock.family))),
                "type": _TYPES.get(sock.type, str(int(sock.type))),
                "protocol": sock.proto}
        for key, getter in (("local", sock.getsockname), ("peer", sock.getpeername)):
            try:
                addr = getter()
            except OSError:
                continue
            if isinstance(addr, bytes):
                addr = addr.decode(errors="replace")
            info[key] = list(addr) if isinstance(addr, tuple) else addr
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            info.update(dump_inet.details(pid, sock, os.fstat(dup).st_ino))
        if sock.family == socket.AF_UNIX and unix_diag is not None:
            # (the details' own dict: dump_scm fills its `scm` in later)
            details = dump_unix.unix_details(sock, os.fstat(dup).st_ino, unix_diag(),
                                                pid, scm)
            details.update(info)
            info = details
        return info
    finally:
        sock.detach()
        os.close(dup)
