"""TCP and UDP sockets (AF_INET, AF_INET6): what a listening TCP socket or an
unconnected UDP socket needs to be bound again (reuse flags, v6only, queued
connections or datagrams), whether a TCP socket was never used, and a TCP
connection's `tcp` record (statefile/dump/tcp.py).  Restored by
restorer/restore/inet.py."""

from __future__ import annotations

import socket
import struct

from statefile.control import procfs
from statefile.dump import sockets as dump_sockets
from statefile.dump import tcp as dump_tcp

SOL_TCP = 6


def tcp_fresh(sock: socket.socket) -> bool:
    """Whether a TCP socket that is neither connected nor listening never
    sent or received a segment (TCP_INFO: closed, segs_out = segs_in = 0): a
    new socket is then the same thing, not a connection that ended."""
    try:
        ti = sock.getsockopt(SOL_TCP, 11, 144)          # TCP_INFO
    except OSError:
        return False
    if len(ti) < 144:
        return False
    state = ti[0]
    segs_out, segs_in = struct.unpack_from("<II", ti, 136)
    return state == 7 and segs_out == 0 and segs_in == 0   # TCP_CLOSE


def details(pid: int, sock: socket.socket, ino: int) -> dict:
    """What a listening TCP or an unconnected UDP socket needs to be bound
    again: its options, and whether anything is queued in it (connections
    waiting to be accepted, datagrams not read), from /proc/PID/net/*
    (rx_queue of the socket's inode; the task's own network namespace)."""
    info = {"reuseaddr": sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
            "reuseport": sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)}
    if sock.family == socket.AF_INET6:
        info["v6only"] = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    proto = "tcp" if sock.type == socket.SOCK_STREAM else "udp"
    if sock.type == socket.SOCK_STREAM:
        info["listening"] = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        if not info["listening"] and tcp_fresh(sock):
            info["fresh"] = True        # never connected (support: fd:socket:inet-fresh)
        elif not info["listening"]:
            info["tcp"] = dump_tcp.dump(sock)     # a connection (statefile/dump/tcp.py)
    info["sockopts"] = dump_sockets.sockopts(sock)
    table = f"/proc/{pid}/net/{proto}{'6' if sock.family == socket.AF_INET6 else ''}"
    try:
        for line in procfs.read(table).splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[9] == str(ino):
                info["queued"] = int(cols[4].split(":")[1], 16)
                break
    except OSError:
        pass
    return info
