"""Unix sockets: peers, names, queues and the bytes in flight.

The kernel tells each unix socket's peer, bound name, state, queue lengths
and shutdown state through sock_diag (NETLINK_SOCK_DIAG, UNIX_DIAG): one dump
per checkpoint gives all of them.  The bytes waiting in a socket's receive
queue are read from a duplicate of the task's fd (pidfd_getfd) with MSG_PEEK,
stepping with SO_PEEK_OFF, so nothing is consumed: a leave-running checkpoint
changes nothing (fds passed in flight, SCM_RIGHTS, are noted and closed
again in crelf).  A datagram socket's queue keeps each message's sender
address.  Restored by restorer/restore_sockets.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 1, 4, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 2, 4, 6
TCP_LISTEN = 10
SO_PEEK_OFF = 42
MAX_INFLIGHT = 16 << 20


def unix_diag() -> dict[int, dict]:
    """inode -> {type, state, peer, name, rqueue, wqueue, shutdown} for every
    unix socket of this network namespace."""
    out: dict[int, dict] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        req = struct.pack("<BBHIII II", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                          UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN,
                          0xFFFFFFFF, 0xFFFFFFFF)
        hdr = struct.pack("<IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        nl.send(hdr + req)
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _flags, _seq, _pid = struct.unpack_from("<IHHII", data, off)
                if typ == NLMSG_DONE:
                    return out
                if typ == NLMSG_ERROR:
                    err = -struct.unpack_from("<i", data, off + 16)[0]
                    raise OSError(err, f"sock_diag: {os.strerror(err)}")
                body = data[off + 16:off + ln]
                fam, styp, state, _pad, ino = struct.unpack_from("<BBBBI", body)
                info = {"type": styp, "state": state, "peer": 0, "name": None,
                        "rqueue": 0, "wqueue": 0, "shutdown": 0}
                a = 16
                while a + 4 <= len(body):
                    alen, atype = struct.unpack_from("<HH", body, a)
                    payload = body[a + 4:a + alen]
                    if atype == UNIX_DIAG_NAME:
                        info["name"] = payload.hex() if payload[:1] == b"\0" else \
                            payload.rstrip(b"\0").decode(errors="surrogateescape")
                        if payload[:1] == b"\0":
                            info["abstract"] = True
                    elif atype == UNIX_DIAG_PEER:
                        info["peer"] = struct.unpack_from("<I", payload)[0]
                    elif atype == UNIX_DIAG_RQLEN:
                        info["rqueue"], info["wqueue"] = struct.unpack_from("<II", payload)
                    elif atype == UNIX_DIAG_SHUTDOWN:
                        info["shutdown"] = payload[0]
                    a += (alen + 3) & ~3
                out[ino] = info
                off += (ln + 3) & ~3


def _address(addr) -> dict | None:
    """A sender address as recvmsg gives it: None (unnamed), a path, or an
    abstract name (bytes with a leading NUL) -> {name, abstract} in the
    notation of sock_diag names (hex for an abstract one)."""
    if not addr:
        return None
    if isinstance(addr, bytes):
        return {"name": addr.hex(), "abstract": True} if addr[:1] == b"\0" else \
            {"name": addr.decode(errors="surrogateescape"), "abstract": False}
    return {"name": addr, "abstract": False}


def _close_passed_fds(anc) -> bool:
    """Close the fds a peeked SCM_RIGHTS message installed in crelf itself;
    whether there was one."""
    found = False
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            found = True
            for (fd,) in struct.iter_unpack("i", data[:len(data) - len(data) % 4]):
                try:
                    os.close(fd)
                except OSError:
                    pass
    return found


def peek_queue(sock: socket.socket, stype: int, senders: list | None = None,
               shut_rd: bool = True) -> tuple[list[str], bool]:
    """The receive queue's messages (hex; one string for a stream socket), and
    whether file descriptors are in flight in it (SCM_RIGHTS).  For a datagram
    socket, `senders` gets each message's sender address (_address).  An empty
    seqpacket record reads like end-of-file: it is one while bytes remain
    (SIOCINQ), or when receiving was not shut down (`shut_rd`)."""
    msgs: list[bytes] = []
    fds_in_flight = False
    total = 0
    inq = 0
    if stype == socket.SOCK_SEQPACKET:
        inq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        while total < MAX_INFLIGHT:
            try:
                data, anc, _flags, addr = sock.recvmsg(
                    1 << 20, socket.CMSG_SPACE(4 * 253), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.ENOTCONN):
                    break
                raise
            if _close_passed_fds(anc):
                fds_in_flight = True
            if not data and stype == socket.SOCK_STREAM:
                break  # end of stream (peer shut down)
            if not data and stype == socket.SOCK_SEQPACKET and shut_rd and total >= inq:
                break  # end-of-file (trailing empty records cannot be told from it)
            msgs.append(data)
            if senders is not None and stype == socket.SOCK_DGRAM:
                senders.append(_address(addr))
            total += len(data)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
    if stype == socket.SOCK_STREAM:
        msgs = [b"".join(msgs)] if msgs else []
    return [m.hex() for m in msgs], fds_in_flight


def unix_details(sock: socket.socket, ino: int, diag: dict[int, dict]) -> dict:
    d = diag.get(ino)
    if d is None:
        return {"diag": False}
    info = {"ino": ino, "peer_ino": d["peer"], "name": d["name"],
            "abstract": d.get("abstract", False), "shutdown": d["shutdown"],
            "listening": d["state"] == TCP_LISTEN, "state": d["state"]}
    if info["listening"]:
        info["backlog_queued"] = d["rqueue"]
        return info
    senders: list = []
    queue, fds = peek_queue(sock, sock.type, senders, bool(d["shutdown"] & 1))
    info["queue"] = queue
    info["fds_in_flight"] = fds
    if sock.type == socket.SOCK_DGRAM and queue:
        # Who sent each queued datagram (recvfrom's address): a restart sends
        # it again from a socket of that name.  `bound`: the sockets of this
        # network namespace holding the name now (if one is outside the tree
        # the name cannot be taken again: statefile/support.py refuses).
        info["senders"] = senders
        for s in senders:
            if s is not None:
                s["bound"] = [i for i, d in diag.items() if i != ino
                              and d["name"] == s["name"]
                              and bool(d.get("abstract")) == s["abstract"]]
    return info
