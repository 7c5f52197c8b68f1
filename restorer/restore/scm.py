"""File descriptors in flight in unix sockets (see statefile/dump/scm.py).

Made by the initiator (restore_tree.open_shared), before the tree is forked:

1. `prepare`: which files take part (`make`): every unix socket of the tree
   whose queue holds messages with fds (`scm`), the peer that sends them
   again, every file those messages carry, the files an epoll in flight
   watches, and so on for the sockets among them (sockets in flight in each
   other's queues, cycles too).  Their queues, shutdown states and SO_PEEK_OFF
   are left for later (restore/unix.py defers them: `defer`).  The files held
   only in flight (`in_flight`, no task holds them) are counted as used, so
   that a pipe gets the ends only a message holds.
2. open_shared makes every file of `make` in the initiator, as it makes
   shared ones (the tasks that hold one inherit it: the same open file
   description), once everything is created;
3. `fill`: an epoll in flight gets its watched files again (under the fd
   numbers they were added with); each queue is sent again, message by
   message, from the socket's peer (or, when the peer had closed, from the
   other end of the new pair, closed afterwards), each message carrying its
   files in one SCM_RIGHTS (same message boundaries; a stream socket's
   segments each sent with the fds that came with it); then the deferred
   shutdowns and options; then crrestart closes its fds of the files held
   only in flight: the messages hold the only references, as they did.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
from dataclasses import dataclass, field

from statefile.format.records import EpollFile, File, SocketFile, TaskNote

from restorer.restore import unix as restore_unix
from restorer.errors import RestoreError


@dataclass
class ScmPlan:
    sockets: list[int] = field(default_factory=list)     # ids of sockets whose queue has fds
    make: set[int] = field(default_factory=set)          # ids made by the initiator
    in_flight: set[int] = field(default_factory=set)     # ids held only by messages


_unix = restore_unix.unix_info


def _peer(files: list[File], f: File) -> SocketFile | None:
    info = _unix(f)
    if info is None or not info.peer_ino:
        return None
    return next((g for g in files if (u := _unix(g)) is not None and u.ino == info.peer_ino),
                None)


def prepare(files: list[File], tasks: list[TaskNote], users: dict[int, set[int]]) -> ScmPlan:
    """The files of the tree that take part in messages in flight (see the
    module docstring); files held only in flight are added to `users`."""
    plan = ScmPlan()
    held = {d.file for t in tasks for d in t.fds}
    todo = [fid for fid in held if (u := _unix(files[fid])) is not None and u.scm]
    while todo:
        fid = todo.pop()
        if fid in plan.make:
            continue
        plan.make.add(fid)
        f = files[fid]
        if fid not in held:
            plan.in_flight.add(fid)
        info = _unix(f)
        peer = _peer(files, f)
        if peer is not None:
            todo.append(peer.id)
        if info is not None and info.scm:
            plan.sockets.append(fid)
            todo += [g for ids in info.scm for g in ids]
        if isinstance(f, EpollFile) and fid not in held:
            todo += [t.file for t in f.anon.targets if t.file is not None]
    for fid in plan.in_flight:
        users.setdefault(fid, set()).add(0)
    restore_unix.defer(set(plan.sockets) | {p.id for p in (
        _peer(files, files[s]) for s in plan.sockets) if p is not None})
    return plan


def fill(plan: ScmPlan, files: list[File], out: dict[int, int]) -> None:
    """Steps 3 (module docstring), once every file of plan.make is in `out`
    ({file id: fd}); the fds of the files held only in flight leave `out`."""
    missing = [fid for fid in plan.make if fid not in out]
    if missing:
        f = files[missing[0]]
        raise RestoreError("sockets", f"{f.path}, in flight in a unix socket, was not "
                           "made again")
    try:
        for fid in sorted(plan.in_flight):
            f = files[fid]
            if isinstance(f, EpollFile):
                _epoll_targets(f, out)
        for fid in plan.sockets:
            _send_queue(files, files[fid], out)
        for fid in restore_unix.deferred():
            if fid in out:
                restore_unix.finish_deferred(out[fid], files[fid])
    finally:
        for fd in restore_unix.standins().values():
            os.close(fd)
        restore_unix.defer(set())
    for fid in plan.in_flight:
        os.close(out.pop(fid))


def _send_queue(files: list[File], f: SocketFile, out: dict[int, int]) -> None:
    """f's saved queue sent again to it, each message with its files."""
    info = f.socket
    peer = _peer(files, f)
    src = out.get(peer.id) if peer is not None else restore_unix.standins().get(f.id)
    if src is None:
        raise RestoreError("sockets", f"unix socket {f.path}: nothing to send its "
                           "messages in flight again from")
    sock = socket.socket(fileno=os.dup(src))
    try:
        stream = sock.type == socket.SOCK_STREAM
        for data, ids in zip(info.queue, info.scm):
            data = bytes.fromhex(data)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                    array.array("i", [out[i] for i in ids]))] if ids else []
            try:
                done = sock.sendmsg([data], anc, socket.MSG_DONTWAIT)
                while stream and done < len(data):
                    done += sock.send(data[done:], socket.MSG_DONTWAIT)
            except OSError as e:
                raise RestoreError("sockets", f"unix socket {f.path}: cannot queue its "
                                   f"messages with fds in flight again: "
                                   f"{e.strerror or e}") from None
    finally:
        sock.close()


def _epoll_targets(f: EpollFile, out: dict[int, int]) -> None:
    """An epoll held only in flight: each watched file added again with its
    events and data under the fd number it was added with (put there for the
    epoll_ctl only, and the number given back what it held in crrestart)."""
    from restorer.restore.anon import epoll_add_as, epoll_event
    for t in f.anon.targets:
        epfd, src, tfd = out[f.id], out[t.file], t.tfd
        if epfd == tfd:     # (the epoll itself is at that number in crrestart)
            epfd = fcntl.fcntl(epfd, fcntl.F_DUPFD_CLOEXEC, 3)
        try:
            try:
                cloexec = bool(fcntl.fcntl(tfd, fcntl.F_GETFD))
            except OSError:
                cloexec = False
            epoll_add_as(epfd, src, tfd, epoll_event(t.events, t.data), cloexec)
        except OSError as e:
            raise RestoreError("epoll", f"an epoll in flight: {e}") from None
        finally:
            if epfd != out[f.id]:
                os.close(epfd)
