"""TCP and UDP sockets (statefile/dump/inet.py): a listening TCP or unconnected
UDP socket is bound (and listening) again on its saved address with its saved
options; an established TCP connection is restorer/restore/tcp.py's; a network
socket the policy skipped comes back as a new socket."""

from __future__ import annotations

import errno
import os
import socket

from statefile.format import records

from restorer.restore import tcp as restore_tcp
from restorer.restore.sockets import set_sockopts


def bind_inet(sock: socket.socket, addr: tuple,
              info: records.InetSocket | records.Inet6Socket) -> None:
    """Bind a TCP or UDP socket again.  IP_FREEBIND as it was; an address
    that is not on this machine (any more) is bound with IP_FREEBIND set for
    the bind only, as the original could be (it had it when it bound, or the
    address was there then)."""
    freebind = info.sockopts.freebind if info.sockopts is not None else 0
    if freebind:
        sock.setsockopt(socket.SOL_IP, 15, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        if freebind or e.errno != errno.EADDRNOTAVAIL:
            raise
        sock.setsockopt(socket.SOL_IP, 15, 1)
        sock.bind(addr)
        sock.setsockopt(socket.SOL_IP, 15, 0)


_FAMILY = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "netlink": socket.AF_NETLINK}


_SOCKTYPE = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM,
             "seqpacket": socket.SOCK_SEQPACKET, "raw": socket.SOCK_RAW}


def skipped_socket(f: records.SocketFile) -> int:
    """A network socket the checkpoint policy skipped.  Listening sockets and
    bound UDP sockets hold no connection state: they are bound again to their
    address.  A connected socket comes back as a fresh unconnected socket of the
    same family and type: the application sees the connection as broken
    (ENOTCONN/EPIPE), as after a network failure."""
    info = f.socket
    fam = _FAMILY.get(info.family, socket.AF_INET)
    typ = _SOCKTYPE.get(info.type, socket.SOCK_STREAM)
    proto = info.protocol if fam == socket.AF_NETLINK else 0
    if isinstance(info, (records.InetSocket, records.Inet6Socket)) and info.local and (
            info.listening or (typ == socket.SOCK_DGRAM and info.peer is None)):
        try:
            return open_inet(f)
        except OSError:
            pass
    sock = socket.socket(fam, typ, proto)
    sock.setblocking(not f.flags & os.O_NONBLOCK)
    return sock.detach()


def open_inet(f: records.SocketFile) -> int:
    """A listening TCP or unconnected UDP socket, bound (and listening) again
    on its saved address with its saved options (support: fd:socket:inet-listen,
    fd:socket:inet-udp).  Raises OSError (EADDRINUSE...) if it cannot."""
    info = f.socket
    if restore_tcp.is_connection(f):
        return restore_tcp.open_tcp(f)      # an established connection
    fam = _FAMILY[info.family]
    sock = socket.socket(fam, _SOCKTYPE[info.type])
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR,
                        1 if info.listening else info.reuseaddr)
        # (a listener that shared its port with SO_REUSEPORT may have cleared it
        # since: every listener binds with it, then gets its own value back)
        if info.reuseport or info.listening:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6 and info.v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, info.v6only)
        set_sockopts(sock, info)
        local = tuple(info.local)
        if local[1]:                    # port 0: never bound, binds itself when used
            bind_inet(sock, local, info)
        if info.listening:
            with open("/proc/sys/net/core/somaxconn") as s:
                sock.listen(int(s.read()))
            if not info.reuseaddr:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            if not info.reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        sock.setblocking(not f.flags & os.O_NONBLOCK)
        return sock.detach()
    except BaseException:
        sock.close()
        raise
