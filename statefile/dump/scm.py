"""File descriptors in flight in unix sockets (SCM_RIGHTS messages sent and
not received yet).

dump/unix.py peek_queue peeks a unix socket's queue with MSG_PEEK and a
control buffer big enough for every fd a message may carry: the kernel then
installs a new fd for each file in flight in crcheckpoint itself, message by
message.  They are kept open (InFlight.note) until every task of the tree has
been dumped, then each is told apart like any fd (InFlight.resolve):

* a file some task of the tree holds (kcmp(KCMP_FILE) against the tree's
  open file descriptions: dump_files.FileTable) is that file's entry;
* any other (its only references are messages in flight: the sender closed
  it) becomes an entry of its own, dumped from crcheckpoint's fd by the same
  code as a task's (dump_files.FileTable), marked `in_flight`; a unix socket
  among them has its own queue peeked in turn, so sockets in flight in each
  other's queues (cycles too) are all found;
* an epoll instance in flight names each file it watches by its entry
  (`file`: kcmp(KCMP_EPOLL_TFD) against the tree's fds and the other files
  in flight), since no task's fd numbers say where it is.

The socket's entry gets `scm`: for each message of `queue`, the ids of the
files its SCM_RIGHTS carried, in order.  crcheckpoint's fds are closed once
the statefile is written (InFlight.close): nothing was consumed, a
leave-running checkpoint changes nothing.  statefile/check/support.py decides what
can be sent again; restored by restorer/restore/scm.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource

from statefile.control import procfs
from statefile.dump.anon import KCMP_EPOLL_TFD, _fields, _kcmp_epoll_slot


class InFlight:
    """crcheckpoint's own fds of the files in flight, until the statefile is
    written; the sockets whose `scm` is still to be resolved."""

    def __init__(self):
        self.kept: set[int] = set()                     # fds that own an entry
        self._pending: list[tuple[dict, list[list[int]]]] = []
        self._room = False

    def make_room(self) -> None:
        """Before a queue is peeked: every fd in flight lands in crcheckpoint
        until resolve (one per message, duplicates too), so its soft
        RLIMIT_NOFILE goes up to the hard one (a message whose fds do not
        fit comes back MSG_CTRUNC: refused, not lost)."""
        if self._room:
            return
        self._room = True
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (OSError, ValueError):
                pass

    def note(self, info: dict, passed) -> None:
        """A unix socket's queue held fds (dump/unix.py Passed: crelf's fds,
        one list per message of info["queue"])."""
        if passed.truncated:
            info["scm_truncated"] = True
        self._pending.append((info, [list(m) for m in passed]))

    def resolve(self, table) -> None:
        """Once every task's fds are in `table` (dump_files.FileTable): each
        socket's `scm`, and an entry for every file held only in flight."""
        me = os.getpid()
        made: list[int] = []
        while self._pending:
            info, passed = self._pending[0]     # (still pending: close() closes the rest)
            scm = []
            for msg in passed:
                ids = []
                while msg:
                    ids.append(self._file_of(table, me, msg.pop(0), made))
                scm.append(ids)
            info["scm"] = scm
            self._pending.pop(0)
        for fid in made:
            if table.files[fid]["kind"] == "anon:eventpoll":
                _epoll_targets(table, table.files[fid], me)

    def _file_of(self, table, me: int, fd: int, made: list[int]) -> int:
        try:
            s = os.stat(f"/proc/self/fd/{fd}")
            ident = (s.st_dev, s.st_ino)
            fid = table._same_as(me, fd, ident)
            if fid is not None:
                os.close(fd)            # (the entry has an owner already)
                return fid
            target = os.readlink(f"/proc/self/fd/{fd}")
            info = procfs.fdinfo(me, fd)
            fid = table._add(me, fd, target, info, s, ident, table.task_locks.setdefault(me, []))
        except BaseException:
            os.close(fd)
            raise
        table.files[fid]["in_flight"] = True
        self.kept.add(fd)
        made.append(fid)
        return fid

    def close(self) -> None:
        """Close every fd still held (pending ones too: a checkpoint that
        failed before resolve)."""
        for _info, passed in self._pending:
            for msg in passed:
                for fd in msg:
                    _close(fd)
        self._pending.clear()
        for fd in self.kept:
            _close(fd)
        self.kept.clear()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _epoll_targets(table, entry: dict, me: int) -> None:
    """An epoll instance held only in flight: which entry each watched file
    is (`file`), found by kcmp(KCMP_EPOLL_TFD) among the fds of the tree's
    tasks and crcheckpoint's fds of the other files in flight with the same
    inode; a watched file found nowhere (outside the tree) keeps no `file`
    (statefile/check/support.py refuses it)."""
    from statefile.control.ptrace import NR_kcmp, syscall
    epfd = entry["owner_fd"]
    lines = procfs.read(f"/proc/self/fdinfo/{epfd}").splitlines()
    raw = [_fields(line) for line in lines if line.startswith("tfd:")]
    cands: dict[tuple, list[tuple[int, int, int]]] = {}     # (ino, dev) -> (pid, fd, fid)
    for pid, fds in table.fds_of.items():
        for d in fds:
            f = table.files[d["file"]]
            cands.setdefault((f["ino"], f["dev"]), []).append((pid, d["fd"], d["file"]))
    for f in table.files:
        if f.get("in_flight"):
            cands.setdefault((f["ino"], f["dev"]), []).append((me, f["owner_fd"], f["id"]))
    seen: dict[int, int] = {}
    for t, r in zip(entry["anon"]["targets"], raw):
        t.pop("fd", None)
        toff = seen.get(t["tfd"], 0)
        seen[t["tfd"]] = toff + 1
        ino, sdev = int(r.get("ino", "0"), 16), int(r.get("sdev", "0"), 16)
        slot = _kcmp_epoll_slot(epfd, t["tfd"], toff)
        for (c_ino, c_dev), lst in cands.items():
            if c_ino != ino or (os.major(c_dev), os.minor(c_dev)) != (sdev >> 20, sdev & 0xFFFFF):
                continue
            for pid, fd, fid in lst:
                try:
                    if syscall(NR_kcmp, pid, me, KCMP_EPOLL_TFD, fd, ctypes.byref(slot)) == 0:
                        t["file"] = fid
                        break
                except OSError as e:
                    if e.errno not in (errno.EBADF, errno.ENOENT, errno.EINVAL):
                        raise
            if "file" in t:
                break
