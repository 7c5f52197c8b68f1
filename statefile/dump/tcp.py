"""Established TCP connections, read with the kernel's TCP repair mode
(Documentation/networking/tcp-repair and the TCP_REPAIR* options in
include/uapi/linux/tcp.h): on a duplicate of the task's fd (pidfd_getfd), with
the connection locked by the firewall first (statefile/control/netlock.py),
TCP_REPAIR on, then the sequence numbers of both queues (TCP_QUEUE_SEQ under
TCP_REPAIR_QUEUE), their bytes (MSG_PEEK reads the chosen queue in repair
mode), how much of the send queue was never sent (SIOCOUTQNSD), the options
the handshake agreed (TCP_INFO, the MSS clamp from TCP_MAXSEG in repair mode),
the windows (TCP_REPAIR_WINDOW) and the timestamp clock (TCP_TIMESTAMP).

A checkpoint keeps the sockets in repair mode until it ends: a --kill
checkpoint kills the tree with them in it, so closing them sends nothing (no
FIN, no reset) and the lock passes to the statefile; a leave-running one turns
repair off again (and puts SO_REUSEADDR back: leaving repair mode clears it)
before the tree runs, and lifts the lock.  Outside a checkpoint (crcheck) only
the state and queue sizes are read; nothing is changed.

The `tcp` record of the socket's info (docs/FORMAT.md); restored by
restorer/restore/tcp.py; what each state gets: docs/NETWORK.md."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct

from statefile.control import netlock

SOL_TCP = 6
TCP_MAXSEG, TCP_INFO, TCP_CONGESTION = 2, 11, 13
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
WINDOW_FIELDS = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")

# Read and restored in repair mode: established connections, and those that
# sent their FIN and received none (FIN_WAIT1: not acknowledged yet, or
# FIN_WAIT2).  A FIN received cannot be put back without a packet.
REPAIRED = ("established", "fin_wait1", "fin_wait2", "close_wait", "last_ack", "closing")
FIN_SENT = ("fin_wait1", "fin_wait2", "last_ack", "closing")
FIN_UNACKED = ("fin_wait1", "closing", "last_ack")
FIN_RECEIVED = ("close_wait", "last_ack", "closing")

STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
          6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen",
          11: "closing", 12: "new_syn_recv"}


def _ioctl_int(fd: int, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0" * 4))[0]


def _int(sock: socket.socket, opt: int) -> int:
    return sock.getsockopt(SOL_TCP, opt)


class _Session:
    """The sockets one checkpoint put in repair mode, and its lock."""

    def __init__(self):
        self.lock = netlock.NetLock()
        self.repaired: list[tuple[int, int]] = []    # (our dup, SO_REUSEADDR to put back)


_session: _Session | None = None


def begin() -> None:
    """A checkpoint starts: TCP connections met from now on are locked and read
    in repair mode (statefile/checkpoint.py)."""
    global _session
    _session = _Session()


def _leave_repair() -> None:
    s = _session
    while s.repaired:
        dup, reuse = s.repaired.pop()
        try:
            sock = socket.socket(fileno=dup)
            try:
                sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
                sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
            finally:
                sock.close()
        except OSError:
            pass


def release() -> None:
    """The tree runs on (leave-running, or a checkpoint that failed): every
    connection leaves repair mode, then the lock goes.  Before the thaw."""
    global _session
    if _session is None:
        return
    try:
        _leave_repair()
    finally:
        lock, _session = _session.lock, None
        lock.unlock()


def hand_over(statefile: str) -> None:
    """After a --kill checkpoint killed the tree: our duplicates go (the sockets
    die in repair mode: nothing is sent), and the lock stays, owned by the
    statefile, until crrestart lifts it."""
    global _session
    if _session is None:
        return
    s, _session = _session, None
    for dup, _reuse in s.repaired:
        os.close(dup)
    try:
        s.lock.hand_over(statefile)
    except OSError:
        pass        # (the rules stay ours: the next crelf run removes them)


def _queue(sock: socket.socket, which: int, size: int) -> tuple[int, bytes]:
    sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, which)
    seq = struct.unpack("I", sock.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0]
    data = b""
    while len(data) < size:
        # (MSG_PEEK in repair mode copies from the start of the chosen queue)
        chunk = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if not chunk or len(chunk) <= len(data):
            break
        data = chunk
    if len(data) != size:
        raise OSError(0, f"read {len(data)} of the {size} bytes queued")
    return seq, data


def dump(sock: socket.socket) -> dict:
    """The `tcp` record of a TCP socket that is neither listening nor new."""
    ti = sock.getsockopt(SOL_TCP, TCP_INFO, 8)
    tcp: dict = {"state": STATES.get(ti[0], str(ti[0]))}
    fd = sock.fileno()
    if tcp["state"] not in REPAIRED:
        return tcp
    try:
        tcp["inq"], tcp["outq"] = _ioctl_int(fd, SIOCINQ), _ioctl_int(fd, SIOCOUTQ)
    except OSError:
        pass
    why = netlock.available()
    if why:
        tcp["error"] = why
        return tcp
    if _session is None:
        return tcp            # crcheck: nothing more is read from a running task
    try:
        conn = netlock.Conn.of(sock.getsockname(), sock.getpeername())
        _session.lock.lock(conn)
    except (OSError, ValueError) as e:
        tcp["error"] = f"cannot lock the connection with nftables: {e.strerror or e}" \
            if isinstance(e, OSError) else str(e)
        return tcp
    reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    dup = os.dup(fd)
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    except OSError as e:
        os.close(dup)
        tcp["error"] = f"TCP_REPAIR: {e.strerror}"
        return tcp
    _session.repaired.append((dup, reuse))
    try:
        # (nothing moves now: the task is frozen, the connection's packets dropped)
        tcp["inq"], tcp["outq"] = _ioctl_int(fd, SIOCINQ), _ioctl_int(fd, SIOCOUTQ)
        tcp["unsent"] = _ioctl_int(fd, SIOCOUTQNSD)
        if tcp["state"] in FIN_SENT:
            # our FIN takes a sequence number but no byte of the queue; the
            # restart puts it back with shutdown(SHUT_WR)
            tcp["fin_sent"] = True
            if tcp["state"] in FIN_UNACKED:
                tcp["outq"] -= 1
                tcp["unsent"] = max(tcp["unsent"] - 1, 0)
        tcp["send_seq"], sendq = _queue(sock, TCP_SEND_QUEUE, tcp["outq"])
        if tcp.get("fin_sent"):
            tcp["send_seq"] = (tcp["send_seq"] - 1) & 0xFFFFFFFF
        tcp["recv_seq"], recvq = _queue(sock, TCP_RECV_QUEUE, tcp["inq"])
        if tcp["state"] in FIN_RECEIVED:
            # the peer's FIN too (rcv_nxt counts it); the restart replays it
            tcp["fin_received"] = True
            tcp["recv_seq"] = (tcp["recv_seq"] - 1) & 0xFFFFFFFF
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        tcp["send_queue"], tcp["recv_queue"] = sendq.hex(), recvq.hex()
        tcp["mss"] = _int(sock, TCP_MAXSEG)          # (the MSS clamp, in repair mode)
        opts = ti[5]
        tcp["sack"] = bool(opts & TCPI_OPT_SACK)
        tcp["timestamps"] = bool(opts & TCPI_OPT_TIMESTAMPS)
        if opts & TCPI_OPT_WSCALE:
            tcp["snd_wscale"], tcp["rcv_wscale"] = ti[6] & 0xF, ti[6] >> 4
        tcp["timestamp"] = struct.unpack("I", sock.getsockopt(SOL_TCP, TCP_TIMESTAMP, 4))[0]
        tcp["window"] = dict(zip(WINDOW_FIELDS, struct.unpack(
            "5I", sock.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))))
        tcp["congestion"] = sock.getsockopt(SOL_TCP, TCP_CONGESTION, 16) \
            .split(b"\0")[0].decode()
        # shutdown(SHUT_RD) changes no TCP state: poll() shows it (POLLRDHUP;
        # on an established connection only SHUT_RD sets it, a FIN received
        # would have made it CLOSE_WAIT)
        p = select.poll()
        p.register(fd, select.POLLRDHUP)
        if any(ev & select.POLLRDHUP for _fd, ev in p.poll(0)):
            tcp["shut_rd"] = True
        tcp["sndbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        tcp["rcvbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except OSError as e:
        tcp["error"] = f"reading it in repair mode: {e.strerror or e}"
    return tcp
