"""Established TCP connections (statefile/dump/tcp.py), recreated with the
kernel's TCP repair mode, in the order the kernel requires:

  new socket, TCP_REPAIR on (binding then ignores the port's other users:
  SK_FORCE_REUSE), options, bind to the saved local address, TCP_QUEUE_SEQ of
  both queues (only while closed), connect() (in repair mode: established at
  once, nothing sent), TCP_REPAIR_OPTIONS (only before any byte is sent),
  TCP_TIMESTAMP, the receive queue (sent in repair mode into TCP_RECV_QUEUE: it
  lands there as if received), the part of the send queue the peer may have
  seen (sent in repair mode into TCP_SEND_QUEUE: queued as sent, not
  transmitted, retransmitted if the peer does not acknowledge it), the part never
  sent (sent with repair mode off for that moment, so the kernel transmits it
  when the window opens), TCP_REPAIR_WINDOW (after the queues: it is checked
  against rcv_nxt).

The socket stays in repair mode until crrestart, just before it releases the
tree, turns it off (Live.go_live) and, once the tree runs, lifts the firewall
lock the checkpoint left for these connections (statefile/control/netlock.py).
docs/NETWORK.md."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import msgspec

from statefile.control import netlock
from statefile.control import ptrace as pt
from statefile.format import records
from statefile.dump.tcp import (REPAIRED, SOL_TCP, STATES, TCP_CONGESTION, TCP_NO_QUEUE,
                                TCP_QUEUE_SEQ, TCP_RECV_QUEUE, TCP_REPAIR, TCP_REPAIR_OFF,
                                TCP_REPAIR_OFF_NO_WP, TCP_REPAIR_ON, TCP_REPAIR_OPTIONS,
                                TCP_REPAIR_QUEUE, TCP_REPAIR_WINDOW, TCP_SEND_QUEUE,
                                TCP_TIMESTAMP, WINDOW_FIELDS)

TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_BUF_LOCK = 32, 33, 72
_LIVE_STATES = {"01", "02", "03", "04", "05", "08", "09", "0B"}   # /proc/net/tcp st


def is_connection(f: records.File) -> bool:
    """An established connection this module restores."""
    tcp = getattr(getattr(f, "socket", None), "tcp", None)
    return tcp is not None and tcp.state in REPAIRED and tcp.send_seq is not None \
        and not f.skipped


def _addr_hex(addr: str, port: int, v6: bool) -> str:
    """An address as /proc/net/tcp{,6} prints it."""
    if not v6:
        return f"{struct.unpack('<I', socket.inet_aton(addr))[0]:08X}:{port:04X}"
    raw = socket.inet_pton(socket.AF_INET6, addr)
    return "".join(f"{w:08X}" for w in struct.unpack("<4I", raw)) + f":{port:04X}"


def _still_open(local, peer, v6: bool) -> bool:
    """Whether this host already has a live socket with this connection's
    addresses (the checkpointed one still runs: a second would steal its
    packets)."""
    want = (_addr_hex(local[0].split("%")[0], local[1], v6),
            _addr_hex(peer[0].split("%")[0], peer[1], v6))
    try:
        with open(f"/proc/net/tcp{'6' if v6 else ''}") as t:
            for line in t.read().splitlines()[1:]:
                cols = line.split()
                if (cols[1], cols[2]) == want and cols[3] in _LIVE_STATES:
                    return True
    except OSError:
        pass
    return False


def _u32(v: int) -> bytes:
    return struct.pack("I", v & 0xFFFFFFFF)


def _send_all(sock: socket.socket, data: bytes) -> None:
    off, chunk = 0, min(len(data), 1 << 16)
    while off < len(data):
        try:
            n = sock.send(data[off:off + chunk], socket.MSG_DONTWAIT)
        except OSError as e:
            if chunk > 1024 and e.errno in (errno.ENOMEM, errno.EAGAIN, errno.ENOBUFS):
                chunk //= 2
                continue
            raise
        off += n


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _replay_fin(sock: socket.socket, tcp: records.TcpConnection, local, peer,
                sent_len: int) -> None:
    """The peer's FIN, sent again as the peer's own packet through a raw
    socket (marked: it passes the lock, statefile/control/netlock.py): the
    restored socket takes it as it took the original (end of file for the
    program, CLOSE_WAIT).  Its sequence number is rcv_nxt, it acknowledges
    nothing new (snd_una) and repeats the peer's window."""
    conn = netlock.Conn.of(local, peer)
    seq = tcp.recv_seq
    ack = (tcp.send_seq - sent_len) & 0xFFFFFFFF
    win = tcp.window.snd_wnd >> (tcp.snd_wscale or 0)
    hdr = struct.pack("!HHIIBBHHH", conn.rport, conn.lport, seq, ack, 5 << 4, 0x11,
                      min(win, 0xFFFF), 0, 0)
    if conn.v6:
        src, dst = (socket.inet_pton(socket.AF_INET6, a) for a in (conn.remote, conn.local))
        pseudo = src + dst + struct.pack("!IxxxB", len(hdr), socket.IPPROTO_TCP)
        seg = hdr[:16] + struct.pack("!H", _csum(pseudo + hdr)) + hdr[18:]
        pkt = struct.pack("!IHBB", 6 << 28, len(seg), socket.IPPROTO_TCP, 64) + src + dst + seg
        raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        to = (conn.local, 0)
    else:
        src, dst = socket.inet_aton(conn.remote), socket.inet_aton(conn.local)
        pseudo = src + dst + struct.pack("!xBH", socket.IPPROTO_TCP, len(hdr))
        seg = hdr[:16] + struct.pack("!H", _csum(pseudo + hdr)) + hdr[18:]
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(seg), 0, 0x4000, 64,
                         socket.IPPROTO_TCP, 0) + src + dst
        pkt = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:] + seg
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        to = (conn.local, 0)
    with raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, netlock.MARK)
        before = sock.getsockopt(SOL_TCP, 11, 8)[0]
        raw.sendto(pkt, to)
    for _ in range(100):           # (delivered at once over loopback; a moment at most)
        if sock.getsockopt(SOL_TCP, 11, 8)[0] != before:
            return
        time.sleep(0.002)
    raise OSError(0, "the peer's FIN, sent again, was not taken")


def open_tcp(f: dict) -> int:
    """The restored socket of an established connection, in repair mode.
    Raises OSError with a one-line reason."""
    from restorer.restore.sockets import set_sockopts
    info = f.socket
    tcp = info.tcp
    v6 = info.family == "inet6"
    local, peer = tuple(info.local), tuple(info.peer)
    where = f"TCP connection {local[0]} port {local[1]} -> {peer[0]} port {peer[1]}"
    why = netlock.available()
    if why:
        raise OSError(errno.EPERM, f"{where}: {why}")
    if _still_open(local, peer, v6):
        raise OSError(errno.EADDRINUSE, f"{where} is still open on this host (the "
                      "checkpointed program runs on?): a second socket would take its packets")
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        if v6 and info.v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, info.v6only)
        if info.reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_sockopts(sock, info)
        if info.sockopts is not None and info.sockopts.freebind:
            sock.setsockopt(socket.SOL_IP, 15, 1)
        try:
            sock.bind(local)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise OSError(e.errno, f"{where}: the local address {local[0]} does not exist "
                              "on this host") from None
            raise OSError(e.errno, f"{where}: binding {local[0]} port {local[1]}: "
                          f"{e.strerror}") from None
        sendq = bytes.fromhex(tcp.send_queue or "")
        recvq = bytes.fromhex(tcp.recv_queue or "")
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        sock.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _u32(tcp.recv_seq - len(recvq)))
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _u32(tcp.send_seq - len(sendq)))
        sock.connect(peer)            # (repair mode: established, nothing sent)
        opts = [(TCPOPT_MAXSEG, tcp.mss)]
        if tcp.sack:
            opts.append((TCPOPT_SACK_PERM, 0))
        if tcp.snd_wscale is not None:
            opts.append((TCPOPT_WINDOW, tcp.snd_wscale | tcp.rcv_wscale << 16))
        if tcp.timestamps:
            opts.append((TCPOPT_TIMESTAMP, 0))
        sock.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS,
                        b"".join(struct.pack("II", c, v) for c, v in opts))
        if tcp.timestamps:
            sock.setsockopt(SOL_TCP, TCP_TIMESTAMP, _u32(tcp.timestamp))
        # room for the queues (the saved sizes, or more); the buffer locks as
        # they were afterwards (autotuning again where it was on)
        lock = sock.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)
        for opt, size in ((SO_SNDBUFFORCE, max(tcp.sndbuf or 0, 2 * len(sendq))),
                          (SO_RCVBUFFORCE, max(tcp.rcvbuf or 0, 2 * len(recvq)))):
            if size:
                sock.setsockopt(socket.SOL_SOCKET, opt, size // 2 + 4096)
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        _send_all(sock, recvq)
        sent = len(sendq) - min(tcp.unsent or 0, len(sendq))
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        _send_all(sock, sendq[:sent])
        if sent < len(sendq):
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
            _send_all(sock, sendq[sent:])
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        sock.setsockopt(socket.SOL_SOCKET, SO_BUF_LOCK, lock)
        w = msgspec.structs.asdict(tcp.window)
        if (w["rcv_wup"] - tcp.recv_seq) & 0x80000000 == 0:
            w["rcv_wup"] = tcp.recv_seq   # (it may count a FIN: replayed below)
        sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW,
                        struct.pack("5I", *(w[k] for k in WINDOW_FIELDS)))
        # FINs: the peer's replayed as its packet (CLOSE_WAIT; before ours for
        # LAST_ACK, after ours for CLOSING); ours with shutdown(SHUT_WR)
        if tcp.fin_received and tcp.state != "closing":
            _replay_fin(sock, tcp, local, peer, len(sendq))
        if tcp.fin_sent:
            # our FIN after the queue, transmitted by the kernel (again: a peer
            # that had it acknowledges it again, and FIN_WAIT2 follows)
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
            sock.shutdown(socket.SHUT_WR)
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        if tcp.fin_received and tcp.state == "closing":
            _replay_fin(sock, tcp, local, peer, len(sendq))
        state = sock.getsockopt(SOL_TCP, 11, 8)[0]
        # (FIN_WAIT2 comes back FIN_WAIT1: its FIN is acknowledged again)
        if STATES.get(state) != {"fin_wait2": "fin_wait1"}.get(tcp.state, tcp.state):
            raise OSError(0, f"came back {STATES.get(state, state)}, not {tcp.state}")
        if tcp.shut_rd:
            sock.shutdown(socket.SHUT_RD)     # (a flag only: nothing is sent)
        cc = tcp.congestion
        if cc and sock.getsockopt(SOL_TCP, TCP_CONGESTION, 16).split(b"\0")[0].decode() != cc:
            try:
                sock.setsockopt(SOL_TCP, TCP_CONGESTION, cc.encode())
            except OSError as e:
                raise OSError(e.errno, f"{where}: congestion control {cc}: "
                              f"{e.strerror}") from None
        sock.setblocking(not f.flags & os.O_NONBLOCK)
        return sock.detach()
    except OSError as e:
        sock.close()
        if where in str(e):
            raise
        raise OSError(e.errno, f"{where}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise


class Live:
    """crrestart's side: the restored connections of the tree, out of repair
    mode just before the release (go_live), the firewall lock lifted once the
    tree runs (lift); if the restart fails, back into repair mode (abort) so
    that killing the tree sends nothing to the peers."""

    def __init__(self, sf, pids: dict[int, int]):
        # (tracer-view pid, fd, socket record)
        self.where: list[tuple[int, int, records.InetSocket | records.Inet6Socket]] = []
        self.dups: list[tuple[int, records.InetSocket | records.Inet6Socket]] = []
        seen: set[int] = set()
        for t in sf.tasks:
            for d in t.fds:
                f = sf.files[d.file]
                if d.file not in seen and is_connection(f) and t.pid in pids:
                    seen.add(d.file)
                    self.where.append((pids[t.pid], d.fd, f.socket))

    def go_live(self) -> None:
        for pid, fd, info in self.where:
            dup = pt.dup_fd_of(pid, fd)
            self.dups.append((dup, info))
            sock = socket.socket(fileno=dup)
            try:
                sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)   # (a window probe)
                # leaving repair mode clears SO_REUSEADDR: as the program had it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,
                                info.reuseaddr)
            finally:
                sock.detach()

    def conns(self) -> list:
        return [netlock.Conn.of(i.local, i.peer) for _p, _f, i in self.where]

    def lift(self) -> list[str]:
        """Lift the lock; [] or the warning to give (the rules then stay until
        they expire, docs/NETWORK.md)."""
        for dup, _info in self.dups:
            os.close(dup)
        self.dups = []
        try:
            netlock.lift(self.conns())
        except OSError as e:
            return [f"the firewall lock of the restored TCP connections was not lifted: "
                    f"{e.strerror or e}"]
        return []

    def abort(self) -> None:
        for dup, _info in self.dups:
            sock = socket.socket(fileno=dup)
            try:
                sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
            except OSError:
                pass
            finally:
                sock.close()
        self.dups = []
