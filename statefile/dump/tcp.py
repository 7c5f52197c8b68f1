"""Established TCP connections, read with the kernel's TCP repair mode
(Documentation/networking/tcp-repair and the TCP_REPAIR* options in
include/uapi/linux/tcp.h): on a duplicate of the task's fd (pidfd_getfd), with
the connection locked by the firewall first (statefile/control/netlock.py),
TCP_REPAIR on, then the sequence numbers of both queues (TCP_QUEUE_SEQ under
TCP_REPAIR_QUEUE), their bytes (MSG_PEEK reads the chosen queue in repair
mode), how much of the send queue was never sent (SIOCOUTQNSD), the options
the handshake agreed (TCP_INFO, the MSS clamp from TCP_MAXSEG in repair mode),
the windows (TCP_REPAIR_WINDOW) and the timestamp clock (TCP_TIMESTAMP).

Each socket leaves repair mode as soon as it is read (and gets SO_REUSEADDR
back: leaving repair mode clears it): the task is frozen and the lock holds
its packets, so nothing changes, and a crcheckpoint that dies leaves no socket
in repair mode under a task the kernel resumes at once.  A --kill checkpoint
puts them back into repair mode just before it kills the tree, so closing them
sends nothing (no FIN, no reset), and the lock passes to the statefile; a
leave-running one lifts the lock before the thaw.  A guard process (_guard)
holds a duplicate of each socket and removes the lock if crcheckpoint dies.
Outside a checkpoint (crcheck) only the state and queue sizes are read;
nothing is changed.

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
    """The sockets one checkpoint put in repair mode, its lock, and the guard
    that puts both right if crcheckpoint dies (_guard)."""

    def __init__(self):
        self.lock = netlock.NetLock()
        self.repaired: list[tuple[int, int]] = []    # (our dup, SO_REUSEADDR to put back)
        self.guard: socket.socket | None = None
        self.guard_pid = 0

    def start_guard(self) -> None:
        if self.guard is not None:
            return
        owner = netlock.owner_self()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:                      # (the guard: nothing of crcheckpoint's but this)
            try:
                keep = theirs.fileno()
                null = os.open(os.devnull, os.O_RDWR)
                for std in (0, 1, 2):   # (not the caller's pipes: they must see EOF)
                    os.dup2(null, std)
                for name in os.listdir("/proc/self/fd"):
                    if int(name) not in (keep, 0, 1, 2):
                        try:
                            os.close(int(name))
                        except OSError:
                            pass
                _guard(theirs, owner)
            finally:
                os._exit(0)
        theirs.close()
        self.guard, self.guard_pid = ours, pid

    def tell(self, what: bytes, fd: int | None = None) -> None:
        if self.guard is None:
            return
        try:
            if fd is None:
                self.guard.send(what)
            else:
                self.guard.sendmsg([what], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             struct.pack("i", fd))])
        except OSError:
            pass

    def end_guard(self) -> None:
        if self.guard is None:
            return
        self.tell(b"D")
        self.guard.close()
        self.guard = None
        try:
            os.waitpid(self.guard_pid, 0)
        except ChildProcessError:
            pass


def _guard(ctl: socket.socket, owner: str) -> None:
    """A process of its own (its own session: a signal to crcheckpoint's group
    does not reach it) holding a duplicate of every socket put in repair mode.
    If crcheckpoint dies before it says the checkpoint is over ("D"), the
    guard takes every socket out of repair mode and removes the lock's rules
    (docs/NETWORK.md); after "K" (the tree is being killed with the sockets
    in repair mode, on purpose) it only lets them go."""
    import signal
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    held: list[tuple[int, int]] = []
    killing = False
    while True:
        try:
            msg, anc, _flags, _addr = ctl.recvmsg(32, socket.CMSG_SPACE(4))
        except OSError:
            msg, anc = b"", []
        if msg == b"D":
            return
        if not msg:
            break
        if msg == b"K":
            killing = True
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                held.append((struct.unpack("i", data[:4])[0], int(msg[1:] or 0)))
    if killing:
        return
    for fd, reuse in held:
        sock = socket.socket(fileno=fd)
        try:
            sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
        except OSError:
            pass
        finally:
            sock.close()
    try:
        netlock.remove_owner(owner)
    except OSError:
        pass


_session: _Session | None = None


def begin() -> None:
    """A checkpoint starts: TCP connections met from now on are locked and read
    in repair mode (statefile/checkpoint.py)."""
    global _session
    _session = _Session()


def _repair(dup: int, on: bool, reuse: int = 0) -> None:
    sock = socket.socket(fileno=dup)
    try:
        if on:
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        else:
            sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
    finally:
        sock.detach()


def release(keep: bool = False) -> None:
    """The checkpoint is over and the tree runs on (leave-running, or a
    checkpoint that failed): the lock goes (the connections left repair mode
    as soon as they were read).  Before the thaw.  keep (--kill): they go
    back into repair mode, to die with the tree silently (then hand_over)."""
    global _session
    if _session is None:
        return
    if keep:
        _session.tell(b"K")
        for dup, _reuse in _session.repaired:
            try:
                _repair(dup, True)
            except OSError:
                pass
        return
    s, _session = _session, None
    for dup, _reuse in s.repaired:
        os.close(dup)
    try:
        s.lock.unlock()
    finally:
        s.end_guard()


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
    s.end_guard()


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
        _session.start_guard()      # (before anything it would have to undo)
        _session.lock.lock(conn)
    except (OSError, ValueError) as e:
        tcp["error"] = f"cannot lock the connection with nftables: {e.strerror or e}" \
            if isinstance(e, OSError) else str(e)
        return tcp
    reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    dup = os.dup(fd)
    _session.tell(b"F%d" % reuse, dup)      # (the guard holds it before it is repaired)
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
    # Out of repair mode at once (the task is frozen and the lock holds every
    # packet: nothing changes now): if crcheckpoint dies, the task resumes at
    # once, and a recv() or send() on a socket still in repair mode would fail.
    try:
        _repair(dup, False, reuse)
    except OSError as e:
        tcp["error"] = f"leaving repair mode: {e.strerror}"
    if os.environ.get("CRELF_CHECKPOINT_DIE_AT") == "tcp-locked":
        os.kill(os.getpid(), 9)     # test hook: crcheckpoint dies here (tests/test_tcp.py)
    return tcp
