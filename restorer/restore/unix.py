"""Unix sockets (see statefile/dump/unix.py).

Created by the initiator, before the tree is forked (`open_named`, called by
restore_tree.open_shared), in this order, so that names exist before anyone
connects to them:

* every datagram socket that has a name or is connected to one: bound again
  to its name (a stale socket file left by the killed original, that nobody
  is bound to, is replaced), then connected again to its peer's name; the
  datagrams that were queued are sent again, in order, each from a socket
  holding its sender's name (the sender itself if it is in the tree, else a
  transient socket bound to that name) or from an unnamed socket when the
  sender had none, so recvfrom() gives the same addresses;
* every connected pair with a name at either end (a connection accepted
  from a listening socket: the accepted end has the listener's path): a new
  socketpair whose ends are bound to the saved paths inside a private chroot
  (a forked helper), so getsockname/getpeername give the paths again and the
  real files are left alone; queues and shutdown states as below;
* every listening socket with connections waiting to be accepted
  (_make_backlog): bound again and listening with its saved listen() limit,
  then each waiting client of the tree (bound to its own name first, if it
  had one) connects to it again, in the saved queue order, so accept() gives
  them in that order; a listener whose file is gone does this in its private
  root (below);
* every socket whose file was deleted or replaced since it was bound
  (`file_gone`: listening, unconnected, or a datagram socket): bound to its
  name in a private root of its own (_bind_in_chroot), where the datagram
  sockets connected to it connect again and its queued datagrams are sent
  again; the path is left as it is now (another socket's file, a FIFO,
  nothing, a removed directory). A datagram socket connected to itself is
  bound, then connected to its own name.

Created by the restored task itself (open_unix, from restore_files):

* a connected pair whose two ends are both in the task (socketpair, asyncio's
  self-pipe...): a new socketpair of the same type; each end's saved receive
  queue is sent again from the other end, message by message, then the saved
  shutdown states are applied;
* a listening socket with no connection waiting: bound again to its path (a
  stale socket file left by the killed original is replaced) or abstract
  name, and listening with its saved limit; a relative path from the task's
  saved working directory;
* an unconnected socket: bound again to its name, if it had one;
* a connected socket whose peer has closed (stream, seqpacket, or an unnamed
  datagram socket): one end of a new pair, the other end sends its unread
  data and is closed.

A socket whose queue holds fds in flight, and its peer, are made by the
initiator too (restorer/restore/scm.py, from restore_tree.open_shared): their queues,
shutdown states and SO_PEEK_OFF are left to restore_scm.fill (`defer`), once
every file the messages carry exists.

Every unix socket gets its saved options again (set_sockopts; SO_PEEK_OFF
once its queue is refilled).  set_sockopts and bind_inet serve the TCP and
UDP sockets of restore_files too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import tempfile

from statefile.format.records import File, Sender, SocketFile, TaskNote, UnixName, UnixSocket

from restorer.restore.sockets import finish_sockopts, set_sockopts

from restorer.errors import RestoreError
from restorer.release.guard import journal_path

_TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM,
          "seqpacket": socket.SOCK_SEQPACKET}
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2

# file id -> fd already made for it (the second end of a pair), in this task.
_made: dict[int, int] = {}


def unix_info(f: File) -> UnixSocket | None:
    """The unix socket record of entry f, or None when it is no unix socket."""
    if isinstance(f, SocketFile) and isinstance(f.socket, UnixSocket):
        return f.socket
    return None


def _address(info: UnixSocket | UnixName | Sender):
    name = info.name
    if not name:
        return None
    return bytes.fromhex(name) if info.abstract else name


def _finish(sock: socket.socket, f: SocketFile) -> int:
    info = f.socket
    set_sockopts(sock, info)
    if f.id in _deferred:    # its queue has fds in flight: restore_scm.fill
        sock.setblocking(not f.flags & os.O_NONBLOCK)
        return sock.detach()
    how = info.shutdown & (RCV_SHUTDOWN | SEND_SHUTDOWN)
    if how:
        sock.shutdown({SEND_SHUTDOWN: socket.SHUT_WR, RCV_SHUTDOWN: socket.SHUT_RD}.get(
            how, socket.SHUT_RDWR))
    finish_sockopts(sock, info)
    sock.setblocking(not f.flags & os.O_NONBLOCK)
    return sock.detach()


def _live(path: str) -> bool:
    """Whether a socket is bound to the socket file at path (a datagram probe
    gets ECONNREFUSED only when nobody is)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        except OSError:
            return True      # EPROTOTYPE (a stream socket is bound), EPERM...
        return True


def _bind(sock: socket.socket, addr, info: UnixSocket | None = None) -> bool:
    """Bind sock to a saved name.  A socket file at the path that nobody is
    bound to (the killed original's) is replaced; one a live socket holds is
    left alone (EADDRINUSE).  The new socket file gets the saved owner and
    mode (`info`'s file_owner).  Returns whether the path did not exist before."""
    new = False
    if isinstance(addr, str):
        journal_path(addr)      # (removed if crrestart dies before the release)
        try:
            st_ = os.lstat(addr)
        except FileNotFoundError:
            new = True
        else:
            if stat.S_ISSOCK(st_.st_mode) and not _live(addr):
                os.unlink(addr)
        sock.bind(addr)
    else:
        bind_abstract(sock, addr)
    owner = info.file_owner if info is not None else None
    if owner and isinstance(addr, str):
        # bound by crrestart (root): root's file, mode from the umask, else
        try:
            if os.geteuid() == 0:
                try:
                    os.chown(addr, owner[0], owner[1], follow_symlinks=False)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EINVAL):
                        raise
                    # (root of a user namespace that does not map the saved
                    # ids: the file stays crrestart's, its mode comes back)
            os.chmod(addr, owner[2])
        except OSError as e:
            raise RestoreError("unix socket", f"cannot give the socket file {addr} its "
                               f"owner and mode back: {e.strerror}") from None
    return new


def _fill_pair(a: socket.socket, b: socket.socket, fa: SocketFile, fb: SocketFile) -> None:
    """Each end's saved queue sent again from the other end (one with fds in
    flight: later, by restore_scm.fill)."""
    if not fa.socket.scm:
        for data in fa.socket.queue:
            b.sendall(bytes.fromhex(data))
    if not fb.socket.scm:
        for data in fb.socket.queue:
            a.sendall(bytes.fromhex(data))


# --- fds in flight (restorer/restore/scm.py): what is left for it to do -----------------

_deferred: set[int] = set()        # file ids whose queue, shutdown and SO_PEEK_OFF wait
_standins: dict[int, int] = {}      # file id -> the other end of its pair (peer closed)


def defer(ids: set[int]) -> None:
    """Sockets (file ids) whose queue has fds in flight, and their peers:
    _finish leaves their shutdown state and SO_PEEK_OFF to finish_deferred,
    _fill_pair and open_unix their queue to restore_scm.fill."""
    _deferred.clear()
    _deferred.update(ids)
    _standins.clear()


def deferred() -> set[int]:
    return set(_deferred)


def standins() -> dict[int, int]:
    """{file id: fd} of the sending end made for a socket whose peer had
    closed (restore_scm.fill sends its queue from it, then closes it)."""
    return _standins


def bind_abstract(sock: socket.socket, addr: bytes, wait: float = 2.0) -> None:
    """Bind to an abstract name, waiting a while for it to be free: the
    killed original's sockets that were only in flight in each other's
    queues (a cycle) keep their names until the kernel's unix garbage
    collector frees them, which it does when some unix socket is released.
    A name a live socket holds is still EADDRINUSE, only later."""
    import time
    deadline = time.monotonic() + wait
    while True:
        try:
            sock.bind(addr)
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
        # the kernel schedules its collector when a unix socket is released
        # (unix_release_sock): release one, else it may not run for long
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()
        time.sleep(0.01)


def finish_deferred(fd: int, f: SocketFile) -> None:
    """What _finish left for later: the shutdown state, then SO_PEEK_OFF."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        how = f.socket.shutdown & (RCV_SHUTDOWN | SEND_SHUTDOWN)
        if how:
            sock.shutdown({SEND_SHUTDOWN: socket.SHUT_WR, RCV_SHUTDOWN: socket.SHUT_RD}.get(
                how, socket.SHUT_RDWR))
        finish_sockopts(sock, f.socket)
    finally:
        sock.close()


def open_unix(f: SocketFile, files: list[File], cwd: str | None = None) -> int:
    """The task's own unix socket (see the module docstring); `cwd` is the
    task's saved working directory, where a relative name is bound again."""
    if f.id in _made:
        return _made.pop(f.id)
    info = f.socket
    stype = _TYPES[info.type]
    if info.listening:
        sock = socket.socket(socket.AF_UNIX, stype)
        with _in_dir(cwd):
            _bind(sock, _address(info), info)  # (replacing the killed original's file)
        sock.listen(info.max_backlog)
        return _finish(sock, f)
    peer = next((g for g in files if info.peer_ino and (u := unix_info(g)) is not None
                 and u.ino == info.peer_ino), None)
    if peer is None and info.state == 1 and not (
            stype == socket.SOCK_DGRAM and _named(info)):
        # Connected, but its peer has closed: a pair whose other end sends
        # the unread data and closes (stream and seqpacket reads then see
        # end-of-file, writes EPIPE; a datagram socket's writes ECONNREFUSED).
        a, b = socket.socketpair(socket.AF_UNIX, stype)
        if info.scm:       # fds in flight: sent by restore_scm.fill, then closed
            _standins[f.id] = b.detach()
            return _finish(a, f)
        for data in info.queue:
            b.sendall(bytes.fromhex(data))
        b.close()
        return _finish(a, f)
    if peer is None:  # unconnected socket (datagram, or stream not connected yet)
        sock = socket.socket(socket.AF_UNIX, stype)
        addr = _address(info)
        if addr:
            with _in_dir(cwd):
                _bind(sock, addr, info)
        return _finish(sock, f)
    a, b = socket.socketpair(socket.AF_UNIX, stype)
    _fill_pair(a, b, f, peer)
    _made[peer.id] = _finish(b, peer)
    return _finish(a, f)


# ------------------------------------------------------------ in the initiator

def _named(info: UnixSocket) -> bool:
    return bool(info.name)


def _bind_in_chroot(binds: list[tuple[socket.socket, str]],
                    then=None) -> bool:
    """Bind sockets to paths inside a private, empty root (a forked helper
    chroots into a temporary directory; unprivileged, inside a user namespace
    of its own): the sockets get those names, the real files at those paths
    are left as they are.  `then()`, if given, runs in the helper afterwards,
    in the same root (connecting clients to the names just bound).  False if
    the helper cannot."""
    tmp = tempfile.mkdtemp(prefix="crelf-names-")
    journal_path(tmp)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    os.chroot(tmp)
                except PermissionError:
                    _own_user_ns()
                    os.chroot(tmp)
                os.chdir("/")
                for sock, path in binds:
                    d = os.path.dirname(path)
                    if d:
                        os.makedirs(d, exist_ok=True)
                    sock.bind(path)
                if then is not None:
                    then()
                code = 0
            except BaseException:  # noqa: BLE001 - reported by the exit status
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _own_user_ns() -> None:
    """Enter a user namespace of our own, our uid and gid mapped to
    themselves (files made in it belong to us), to chroot unprivileged."""
    from restorer.kernel import CLONE_NEWUSER, unshare
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)


@contextlib.contextmanager
def _in_dir(path: str | None):
    """Relative names are bound where the task was (its saved cwd)."""
    if not path:
        yield
        return
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.chdir(path)
        except OSError:
            pass
        yield
    finally:
        os.fchdir(here)
        os.close(here)


def _err(f: SocketFile, what: str, e: OSError) -> RestoreError:
    name = f.socket.name or f.path
    return RestoreError("sockets", f"unix socket {name}: {what}: {e.strerror or e}")


def _gone(info: UnixSocket) -> bool:
    """A socket bound to a path whose file was deleted or replaced since."""
    return info.file_gone and isinstance(_address(info), str)


def open_named(files: list[File], tasks: list[TaskNote],
               warnings: list[str]) -> dict[int, int]:
    """Create the named unix sockets of the tree and the sockets connected to
    them (see the module docstring); returns {file id: fd} for the tasks to
    inherit."""
    cwd: dict[int, str] = {}
    for t in tasks:
        for d in t.fds:
            cwd.setdefault(d.file, t.cwd or "")
    by_ino = {f.socket.ino: f for f in files
              if f.id in cwd and unix_info(f) is not None and f.socket.ino and not f.skipped}

    def peer_of(f: SocketFile) -> SocketFile | None:
        return by_ino.get(f.socket.peer_ino or -1)

    dgram, pairs, ghosts, backlogs = [], [], [], []
    for f in by_ino.values():
        info = f.socket
        if info.type not in _TYPES:
            continue
        peer = peer_of(f)
        mutual = peer is not None and peer is not f and peer_of(peer) is f
        if info.backlog or info.backlog_of:
            if info.backlog:
                backlogs.append(f)  # (with the clients waiting in it: _make_backlog)
            continue
        if info.listening or (info.type != "dgram" and not mutual):
            if _gone(info) and (info.listening or info.state != 1):
                ghosts.append(f)    # (listening, or not connected): its name, no file
            continue
        if not (_named(info) or (peer is not None and _named(peer.socket))):
            continue
        if mutual:
            if f.id < peer.id:
                pairs.append((f, peer))
        elif info.type == "dgram":
            dgram.append(f)
            if _gone(info):
                ghosts.append(f)
    socks: dict[int, socket.socket] = {}
    made: list[str] = []            # transient socket files to remove again
    out: dict[int, int] = {}
    try:
        for fa, fb in pairs:
            _make_pair(fa, fb, socks, warnings)
        for f in ghosts:
            if f.socket.type != "dgram":
                socks[f.id] = socket.socket(socket.AF_UNIX, _TYPES[f.socket.type])
        for f in dgram:             # bound first ...
            s = socks[f.id] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            if _named(f.socket) and not _gone(f.socket):
                with _in_dir(cwd[f.id]):
                    try:
                        _bind(s, _address(f.socket), f.socket)
                    except OSError as e:
                        raise _err(f, "cannot bind it again", e) from None
        senders = {(g.socket.name, g.socket.abstract): socks[g.id]
                   for g in dgram + [g for p in pairs for g in p]
                   if g.socket.type == "dgram" and _named(g.socket)}
        for f in ghosts:            # ... a name without a file: in a private root,
            _make_ghost(f, socks, [c for c in dgram if peer_of(c) is f],
                        senders, peer_of(f))
        waiting = {f.id: _make_backlog(f, by_ino, socks, cwd) for f in backlogs}
        for f in dgram:             # ... then connected
            peer = peer_of(f)
            if peer is None:
                if f.socket.peer_ino:
                    raise RestoreError("sockets", f"unix socket {f.path}: its peer is "
                                       "not in the tree")
                continue
            if _gone(peer.socket):
                continue            # (connected in the ghost's private root)
            with _in_dir(cwd[peer.id]):
                try:
                    socks[f.id].connect(_address(peer.socket))
                except OSError as e:
                    raise _err(peer, "cannot connect to it again", e) from None
        for f in dgram:
            if not _gone(f.socket):
                _resend(f, socks, peer_of(f), senders, made, cwd)
        for f in ghosts:
            if f.socket.listening:
                socks[f.id].listen(128)
        for f in dgram + [g for g in ghosts if g.socket.type != "dgram"]:
            out[f.id] = _finish(socks.pop(f.id), f)
        for fa, fb in pairs:
            out[fa.id] = _finish(socks.pop(fa.id), fa)
            out[fb.id] = _finish(socks.pop(fb.id), fb)
        for f in backlogs:
            for g in [f] + waiting[f.id]:
                out[g.id] = _finish(socks.pop(g.id), g)
    except BaseException as e:
        for s in socks.values():
            s.close()
        for fd in out.values():
            os.close(fd)
        if isinstance(e, OSError):      # (listen, an option: one line, not a traceback)
            raise RestoreError("sockets", f"unix socket: {e.strerror or e}") from None
        raise
    finally:
        for path in made:
            try:
                os.unlink(path)
            except OSError:
                pass
    return out


def _make_ghost(f: SocketFile, socks: dict, clients: list[SocketFile], senders: dict,
                peer: SocketFile | None) -> None:
    """A socket whose file was deleted or replaced: bound to its name in a
    private root (so it has the name, and the path is left as it is now),
    where the datagram sockets connected to it connect again and its queued
    datagrams are sent to it again."""
    sock, name = socks[f.id], _address(f.socket)

    def then() -> None:
        for c in clients:
            socks[c.id].connect(name)
        if f.socket.type == "dgram":
            _resend(f, socks, peer, senders, None, {})
    if not _bind_in_chroot([(sock, name)], then):
        raise RestoreError("sockets", f"unix socket {name}: its file was deleted or "
                           "replaced, and it cannot get its name again without one "
                           "(no private root could be made)")


def _make_backlog(f: SocketFile, by_ino: dict[int, SocketFile], socks: dict,
                  cwd: dict[int, str]) -> list[SocketFile]:
    """A listening socket with connections waiting to be accepted: bound
    again and listening, then each waiting client (a named one bound to its
    name first) connects to it again, in the saved queue order, so accept()
    gives them in that order; the listen() limit is the saved one (raised
    while they connect if the program had lowered it below the queue).  A
    listener whose file is gone does so in its private root.  Returns the
    clients' file entries (their sockets are in `socks`)."""
    info = f.socket
    stype = _TYPES[info.type]
    name = _address(info)
    try:
        clients = [by_ino[i] for i in info.backlog]
    except KeyError:
        raise RestoreError("sockets", f"unix socket {_shown(info)}: a connection waiting "
                           "to be accepted is not in the tree") from None
    lsk = socks[f.id] = socket.socket(socket.AF_UNIX, stype)
    for c in clients:
        csk = socks[c.id] = socket.socket(socket.AF_UNIX, stype)
        addr = _address(c.socket)
        if not addr:
            continue
        if _gone(c.socket):
            ok = _bind_in_chroot([(csk, addr)])
        else:
            with _in_dir(cwd.get(c.id)):
                try:
                    _bind(csk, addr, c.socket)
                    ok = True
                except OSError:
                    ok = False
        if not ok:
            raise RestoreError("sockets", f"unix socket {_shown(c.socket)}: cannot bind "
                               "it again (its connection waits to be accepted)")
    limit = info.max_backlog

    def connect_all() -> None:
        lsk.listen(max(limit, len(clients)))
        for c in clients:
            socks[c.id].setblocking(False)    # (never waits: the queue has room)
            socks[c.id].connect(name)
        if limit < len(clients):
            lsk.listen(limit)
    if _gone(info):
        if not _bind_in_chroot([(lsk, name)], connect_all):
            raise RestoreError("sockets", f"unix socket {_shown(info)}: its file was deleted "
                               "or replaced, and it cannot get its name and its waiting "
                               "connections back without one (no private root could be made)")
        return clients
    with _in_dir(cwd.get(f.id)):
        try:
            _bind(lsk, name, info)
        except OSError as e:
            raise _err(f, "cannot bind it again", e) from None
        try:
            connect_all()
        except OSError as e:
            raise _err(f, "cannot connect its waiting connections again", e) from None
    return clients


def reconnects(info: UnixSocket) -> bool:
    """Whether policy 'external-unix' connects this socket to its peer's name
    again (statefile/check/support.py: fd:socket:unix-external-dgram), rather than
    restoring it as a connection its peer has closed."""
    name = info.peer_name
    return info.type == "dgram" and name is not None and not name.file_gone


def open_external(f: SocketFile, cwd: str | None = None) -> int:
    """A socket connected to a process outside the tree (policy
    'external-unix').  A datagram socket whose peer has a name: a new one,
    bound again to its own name if it had one, connected to the peer's name
    (a relative one from the task's saved working directory); raises OSError
    naming the peer when nothing is bound there any more.  Any other: one end
    of a new pair whose other end sends the bytes it had not read and closes,
    as if the process outside had gone."""
    info = f.socket
    if not reconnects(info):
        a, b = socket.socketpair(socket.AF_UNIX, _TYPES[info.type])
        with b:
            for data in info.queue:
                b.sendall(bytes.fromhex(data))
        return _finish(a, f)
    peer = _address(info.peer_name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with _in_dir(cwd):
            addr = _address(info)
            if addr:
                _bind(sock, addr, info)
            try:
                sock.connect(peer)
            except OSError as e:
                raise OSError(e.errno, f"unix socket connected to {shown_peer(f)} outside "
                              f"the tree: cannot connect to it again: {e.strerror}") from None
        return _finish(sock, f)
    except BaseException:
        sock.close()
        raise


def shown_peer(f: SocketFile) -> str:
    """The name of a socket's peer outside the tree, as a user writes it."""
    peer = f.socket.peer_name
    return (_shown(peer) if peer is not None else "") or "?"


def _make_pair(fa: SocketFile, fb: SocketFile, socks: dict, warnings: list[str]) -> None:
    """A connected pair with a name at one end or both: a socketpair whose ends
    get the saved names (paths in a private chroot, one per end: both may have
    the same name; abstract names of a datagram pair bound here; an accepted
    stream connection's abstract name, the listener's, cannot be held by a
    second socket: left out)."""
    stype = _TYPES[fa.socket.type]
    a, b = socket.socketpair(socket.AF_UNIX, stype)
    socks[fa.id], socks[fb.id] = a, b
    lost = []
    for sock, f in ((a, fa), (b, fb)):
        addr = _address(f.socket)
        if isinstance(addr, str):           # (a relative name stays relative)
            if not _bind_in_chroot([(sock, addr)]):
                lost.append(f)
        elif addr and stype == socket.SOCK_DGRAM:
            try:
                bind_abstract(sock, addr)
            except OSError:
                lost.append(f)
        elif addr:
            lost.append(f)
    for f in lost:
        warnings.append(f"unix socket {f.path}: its name "
                        f"{_shown(f.socket)} was not given back (it comes back unnamed)")
    _fill_pair(a, b, fa, fb)


def _shown(info: UnixSocket | UnixName | Sender) -> str:
    name = info.name or ""
    if info.abstract:
        return "@" + bytes.fromhex(name)[1:].decode(errors="replace")
    return name


def _resend(f: SocketFile, socks: dict, peer: SocketFile | None, by_name: dict,
            made: list[str] | None,
            cwd: dict) -> None:
    """Send f's queued datagrams again, in order, each from its sender's name.
    made None: in a ghost's private root (_make_ghost), where a transient
    sender is bound inside that root and nothing is recorded."""
    info = f.socket
    queue = info.queue
    if not queue:
        return
    senders = info.senders or [None] * len(queue)
    dest = _address(info)
    transient: dict[tuple, socket.socket] = {}
    try:
        for data, who in zip(queue, senders):
            data = bytes.fromhex(data)
            if peer is not None:        # a connected socket hears only its peer
                src = socks.get(peer.id)
            elif who is None:
                src = None
            else:
                key = (who.name, bool(who.abstract))
                src = by_name.get(key) or transient.get(key)
                if src is None:
                    src = transient[key] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    addr = _address(who)
                    try:
                        if made is None:
                            if isinstance(addr, str) and os.path.dirname(addr):
                                os.makedirs(os.path.dirname(addr), exist_ok=True)
                            src.bind(addr)
                        else:
                            with _in_dir(cwd.get(f.id)):
                                if _bind(src, addr):
                                    made.append(os.path.abspath(addr))
                    except OSError as e:
                        raise RestoreError("sockets", f"unix socket {_shown(info)}: cannot "
                                           f"send a queued datagram again from "
                                           f"{_shown(who)}: {e.strerror or e}") from None
            one = src if src is not None else socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                one.setblocking(False)
                with _in_dir(cwd.get(f.id)):
                    if dest is None:
                        one.send(data)
                    else:
                        one.sendto(data, dest)
            except OSError as e:
                raise _err(f, "cannot queue its datagrams again", e) from None
            finally:
                if src is None:
                    one.close()
    finally:
        for s in transient.values():
            s.close()
