"""Unix sockets: peers, names, queues and the bytes in flight.

The kernel tells each unix socket's peer, bound name, state, queue lengths
and shutdown state through sock_diag (NETLINK_SOCK_DIAG, UNIX_DIAG): one dump
per checkpoint gives all of them.  The bytes waiting in a socket's receive
queue are read from a duplicate of the task's fd (pidfd_getfd) with MSG_PEEK,
stepping with SO_PEEK_OFF, so nothing is consumed: a leave-running checkpoint
changes nothing (fds passed in flight, SCM_RIGHTS, arrive in crcheckpoint
itself with each peeked message: statefile/dump/scm.py tells which files they are, and
closes them once the statefile is written).  A datagram socket's queue keeps each message's sender
address.  A path-bound socket whose file is no longer at its path (deleted,
or replaced) is marked `file_gone` (UNIX_DIAG_VFS names the file it was bound
to).  A listening socket's connections waiting to be accepted are named by
their connecting sockets, in queue order (see "connections waiting" below).
Socket options: statefile/dump/sockets.py.
Restored by restorer/restore/unix.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import termios

from statefile.dump import sockets as dump_sockets

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN = \
    1, 2, 4, 8, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS, UNIX_DIAG_RQLEN, \
    UNIX_DIAG_SHUTDOWN = 0, 1, 2, 3, 4, 6
TCP_LISTEN = 10
SO_PEEK_OFF = 42
MAX_INFLIGHT = 16 << 20


def unix_diag() -> dict[int, dict]:
    """inode -> {type, state, peer, name, rqueue, wqueue, shutdown, vfs} for
    every unix socket of this network namespace (vfs: the kernel's device
    number and inode of the socket file a path-bound socket was bound to);
    a listening socket with connections waiting adds `icons`, a connecting
    socket waiting in one `backlog_of` (_mark_backlogs)."""
    out: dict[int, dict] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        req = struct.pack("<BBHIII II", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                          UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS
                          | UDIAG_SHOW_RQLEN,
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
                    _mark_backlogs(out)
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
                    elif atype == UNIX_DIAG_VFS:
                        ino_, dev_ = struct.unpack_from("<II", payload)
                        info["vfs"] = (dev_, ino_)
                    elif atype == UNIX_DIAG_PEER:
                        info["peer"] = struct.unpack_from("<I", payload)[0]
                    elif atype == UNIX_DIAG_RQLEN:
                        info["rqueue"], info["wqueue"] = struct.unpack_from("<II", payload)
                    elif atype == UNIX_DIAG_SHUTDOWN:
                        info["shutdown"] = payload[0]
                    elif atype == UNIX_DIAG_ICONS:
                        info["icons"] = list(struct.unpack(f"<{len(payload) // 4}I",
                                                           payload[:len(payload) // 4 * 4]))
                    a += (alen + 3) & ~3
                out[ino] = info
                off += (ln + 3) & ~3


# ------------------------------------------------------- connections waiting
#
# A connect() to a listening stream or seqpacket socket makes a new socket in
# the kernel (an embryo, no inode, no fd) and queues it on the listener until
# accept() takes it; the connecting socket's peer is that embryo.  sock_diag
# names each waiting connection by its connecting socket's inode
# (UNIX_DIAG_ICONS, in queue order; 0 when that socket has been closed since).
# Bytes the client sent sit in the embryo's receive queue, which nothing but
# accept() reaches: the client's send-buffer charge (UNIX_DIAG_RQLEN's wqueue
# for a connected socket) tells whether there are any, and such a connection
# is refused (statefile/check/support.py) rather than consumed.


def _mark_backlogs(diag: dict[int, dict]) -> None:
    """Each connecting socket waiting in a listener's queue gets `backlog_of`
    (the listener's inode)."""
    for ino, d in diag.items():
        for client in d.get("icons") or ():
            if client and client in diag:
                diag[client]["backlog_of"] = ino


def backlog_details(info: dict, d: dict) -> None:
    """The backlog fields of a listening socket (`backlog`: its waiting
    connections' client inodes in queue order, 0 for a closed one;
    `max_backlog`: listen()'s limit) or of a socket waiting in a backlog
    (`backlog_of`, and `backlog_data` when it has sent bytes or fds that sit
    unaccepted there)."""
    if d["state"] == TCP_LISTEN:
        info["max_backlog"] = d["wqueue"]      # (sk_max_ack_backlog for a listener)
        if d.get("icons"):
            info["backlog"] = list(d["icons"])
    elif d.get("backlog_of"):
        info["backlog_of"] = d["backlog_of"]
        if d["wqueue"]:
            info["backlog_data"] = True


def peer_details(info: dict, d: dict, diag: dict[int, dict], pid: int | None) -> None:
    """A connected datagram socket's peer's name (`peer_name`: {name,
    abstract}, and `file_gone` when its path no longer leads to that peer,
    seen from the task): what a restart connects it to again when the peer
    is outside the tree (policy 'external-unix', restore/unix.py open_external)."""
    if d["type"] != socket.SOCK_DGRAM or not d["peer"]:
        return
    p = diag.get(d["peer"])
    if p is None or not p["name"]:
        return
    info["peer_name"] = {"name": p["name"], "abstract": bool(p.get("abstract"))}
    if not p.get("abstract") and _socket_file(pid, p["name"], p.get("vfs")) is None:
        info["peer_name"]["file_gone"] = True


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


def _passed_fds(anc) -> list[int]:
    """The fds a peeked SCM_RIGHTS message installed in crelf itself."""
    out: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            out += [fd for (fd,) in struct.iter_unpack("i", data[:len(data) - len(data) % 4])]
    return out


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Passed(list):
    """What peek_queue gives its caller of the fds in flight: one list of fds
    (crelf's own, open) per queued message; `truncated` when a message held
    more than crelf could receive (MSG_CTRUNC), or a stream socket's bytes
    before fds more than it peeks (MAX_INFLIGHT)."""
    truncated = False


# room for the most fds one message may carry (SCM_MAX_FD) and credentials
_CMSG_ROOM = socket.CMSG_SPACE(4 * 253) + socket.CMSG_SPACE(12)


def peek_queue(sock: socket.socket, stype: int, senders: list | None = None,
               shut_rd: bool = True, passed: Passed | None = None) -> tuple[list[str], bool]:
    """The receive queue's messages (hex; one string for a stream socket), and
    whether file descriptors are in flight in it (SCM_RIGHTS).  For a datagram
    socket, `senders` gets each message's sender address (_address).  An empty
    seqpacket record reads like end-of-file: it is one while bytes remain
    (SIOCINQ), or when receiving was not shut down (`shut_rd`).

    With `passed`, the fds in flight are kept open for the caller (one list
    per message returned, see Passed), and a stream socket with fds in flight
    gives its bytes in segments, as a reader gets them: a read stops at the
    end of a message that carried fds, and they come with it.  (A peek that
    starts in bytes sent without fds goes on into the next message with fds
    and gets its fds too, even when it copies none of its bytes: where that
    message began cannot be seen without consuming, so the bytes before it,
    back to the previous one with fds, go in its segment.)"""
    msgs: list[bytes] = []
    carried: list[list[int]] = []
    fds_in_flight = False
    total = 0
    inq = 0
    if stype == socket.SOCK_SEQPACKET:
        inq = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    peek_off = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    size = 1 << 20
    try:
        while total < MAX_INFLIGHT:
            try:
                data, anc, flags, addr = sock.recvmsg(
                    size, _CMSG_ROOM, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.ENOTCONN, errno.EINVAL):
                    break  # (EINVAL: a stream socket not connected has no queue)
                raise
            got = _passed_fds(anc)
            if got or flags & socket.MSG_CTRUNC:
                fds_in_flight = True
            if got and passed is not None and stype == socket.SOCK_STREAM \
                    and len(data) == size:
                # A full buffer may end inside (or just before) the message the
                # fds came with: peek it again, whole
                _close_all(got)
                if size >= MAX_INFLIGHT:
                    passed.truncated = True
                    break
                size *= 2
                sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, total)
                continue
            if passed is None:
                _close_all(got)
                got = []
            elif flags & socket.MSG_CTRUNC:
                passed.truncated = True
            if not data and stype == socket.SOCK_STREAM:
                _close_all(got)
                break  # end of stream (peer shut down)
            if not data and stype == socket.SOCK_SEQPACKET and shut_rd and total >= inq:
                _close_all(got)
                break  # end-of-file (trailing empty records cannot be told from it)
            msgs.append(data)
            carried.append(got)
            if senders is not None and stype == socket.SOCK_DGRAM:
                senders.append(_address(addr))
            total += len(data)
    except BaseException:
        for got in carried:
            _close_all(got)
        raise
    finally:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, peek_off)   # (the task's own)
    if stype == socket.SOCK_STREAM and msgs:
        if passed is None or not any(carried):
            msgs, carried = [b"".join(msgs)], [[]]
        else:   # one segment per message that carried fds, the bytes between joined
            segs: list[bytes] = []
            fds: list[list[int]] = []
            for data, got in zip(msgs, carried):
                if segs and not got and not fds[-1]:
                    segs[-1] += data
                else:
                    segs.append(data)
                    fds.append(got)
            msgs, carried = segs, fds
    if passed is not None:
        passed.extend(carried)
    return [m.hex() for m in msgs], fds_in_flight


def _socket_file(pid: int | None, name: str,
                 vfs: tuple[int, int] | None) -> os.stat_result | bool | None:
    """The socket file a socket was bound to, if it is still at its name;
    None if it is not (deleted, or replaced by another file: the socket keeps
    the name, nobody can connect to it by that name any more); True when
    there is no telling.  The name is looked up the way the task sees it (its
    root; a relative name from its working directory)."""
    if pid is None or vfs is None:
        return True
    where = f"/proc/{pid}/root{name}" if name.startswith("/") else f"/proc/{pid}/cwd/{name}"
    try:
        st_ = os.lstat(where)
    except OSError:
        return None
    dev, ino = vfs
    if (stat.S_ISSOCK(st_.st_mode) and (st_.st_ino & 0xFFFFFFFF) == ino
            and os.major(st_.st_dev) == dev >> 20 and os.minor(st_.st_dev) == dev & 0xFFFFF):
        return st_
    return None


def unix_details(sock: socket.socket, ino: int, diag: dict[int, dict],
                 pid: int | None = None, scm=None) -> dict:
    d = diag.get(ino)
    if d is None:
        return {"diag": False}
    info = {"ino": ino, "peer_ino": d["peer"], "name": d["name"],
            "abstract": d.get("abstract", False), "shutdown": d["shutdown"],
            "listening": d["state"] == TCP_LISTEN, "state": d["state"]}
    if d["name"] and not info["abstract"]:
        st_ = _socket_file(pid, d["name"], d.get("vfs"))
        if st_ is None:
            # Its file was deleted or replaced: a restart gives it the name back
            # without a file (restorer/restore/unix.py), and leaves what is at the path.
            info["file_gone"] = True
        elif st_ is not True:
            # who may connect to it: the file's owner and mode come back with it
            info["file_owner"] = [st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)]
    backlog_details(info, d)
    peer_details(info, d, diag, pid)
    info["sockopts"] = dump_sockets.sockopts(sock)
    if info["listening"]:
        info["backlog_queued"] = d["rqueue"]
        return info
    senders: list = []
    passed = Passed() if scm is not None else None
    if scm is not None and d["rqueue"]:
        scm.make_room()
    queue, fds = peek_queue(sock, sock.type, senders, bool(d["shutdown"] & 1), passed)
    info["queue"] = queue
    info["fds_in_flight"] = fds
    if fds and scm is not None:
        scm.note(info, passed)      # `scm`: which files they are (statefile/dump/scm.py)
    if sock.type == socket.SOCK_DGRAM and queue:
        # Who sent each queued datagram (recvfrom's address): a restart sends
        # it again from a socket of that name.  `bound`: the sockets of this
        # network namespace holding the name now (if one is outside the tree
        # the name cannot be taken again: statefile/check/support.py refuses).
        info["senders"] = senders
        for s in senders:
            if s is not None:
                s["bound"] = [i for i, d in diag.items() if i != ino
                              and d["name"] == s["name"]
                              and bool(d.get("abstract")) == s["abstract"]]
    return info
