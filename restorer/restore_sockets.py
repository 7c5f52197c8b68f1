"""Unix sockets, created by the restored task itself (see dump_sockets.py):

* a connected pair whose two ends are both in the task (socketpair, asyncio's
  self-pipe...): a new socketpair of the same type; each end's saved receive
  queue is sent again from the other end, message by message, then the saved
  shutdown states are applied;
* a listening socket: bound again to its path (a stale socket file left by the
  killed original is replaced) or abstract name, and listening;
* an unconnected socket: bound again to its name, if it had one;
* a connected stream or seqpacket socket whose peer has closed: one end of a
  new pair, the other end sends its unread data and is closed.
"""

from __future__ import annotations

import os
import socket
import stat

_TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM,
          "seqpacket": socket.SOCK_SEQPACKET}
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2

# file id -> fd already made for it (the second end of a pair), in this task.
_made: dict[int, int] = {}


def _address(info: dict):
    name = info.get("name")
    if not name:
        return None
    return bytes.fromhex(name) if info.get("abstract") else name


def _finish(sock: socket.socket, f: dict) -> int:
    info = f["socket"]
    if info.get("shutdown", 0) & SEND_SHUTDOWN:
        sock.shutdown(socket.SHUT_WR)
    sock.setblocking(not f.get("flags", 0) & os.O_NONBLOCK)
    return sock.detach()


def open_unix(f: dict, files: list[dict]) -> int:
    if f["id"] in _made:
        return _made.pop(f["id"])
    info = f["socket"]
    stype = _TYPES[info["type"]]
    if info.get("listening"):
        sock = socket.socket(socket.AF_UNIX, stype)
        addr = _address(info)
        if isinstance(addr, str):
            try:
                if stat.S_ISSOCK(os.lstat(addr).st_mode):
                    os.unlink(addr)  # the killed original's socket file
            except FileNotFoundError:
                pass
        sock.bind(addr)
        sock.listen(128)
        return _finish(sock, f)
    peer = next((g for g in files if g.get("socket", {}).get("ino") == info.get("peer_ino")
                 and info.get("peer_ino")), None)
    if peer is None and info.get("state") == 1 and stype != socket.SOCK_DGRAM:
        # Connected, but its peer has closed: a pair whose other end sends
        # the unread data and closes (reads then see EOF, writes EPIPE).
        a, b = socket.socketpair(socket.AF_UNIX, stype)
        for data in info.get("queue", []):
            b.sendall(bytes.fromhex(data))
        b.close()
        a.setblocking(not f.get("flags", 0) & os.O_NONBLOCK)
        return a.detach()
    if peer is None:  # unconnected socket (datagram, or stream not connected yet)
        sock = socket.socket(socket.AF_UNIX, stype)
        addr = _address(info)
        if addr:
            sock.bind(addr)
        return _finish(sock, f)
    a, b = socket.socketpair(socket.AF_UNIX, stype)
    for data in info.get("queue", []):          # what a had not read yet, sent by b
        b.sendall(bytes.fromhex(data))
    for data in peer["socket"].get("queue", []):  # and the other way round
        a.sendall(bytes.fromhex(data))
    _made[peer["id"]] = _finish(b, peer)
    return _finish(a, f)
