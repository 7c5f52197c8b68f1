"""pidfds (statefile/dump/pidfd.py).

* A pidfd of a process or thread of the tree is opened again by the task that
  held it, once every task exists: injected `pidfd_open(pid, flags)` with the
  pid that task sees (in a restored pid namespace, the namespace's), then
  `dup3` to its number (`inject`).  Before that, child_setup leaves its number
  free.  Several fds of one open file description share one pidfd again.
* A pidfd of a process that had exited (`Pid: -1`): crrestart forks a child
  that exits at once, opens one pidfd per saved open file description on it
  before reaping it, and the tasks inherit those like every other shared file
  (`corpses`).  One child per saved inode, so pidfds that referred to one
  process still share an inode and those of different processes do not.
"""

from __future__ import annotations

import os

from statefile.dump.pidfd import PIDFD_THREAD
from statefile.format.records import File, PidfdFile, TaskNote

from restorer.errors import RestoreError

KIND = "anon:pidfd"


def is_dead(f: File) -> bool:
    return isinstance(f, PidfdFile) and f.pidfd is not None and f.pidfd.pid == -1


def corpses(files: list[File], tasks: list[TaskNote]) -> dict[int, int]:
    """{file id: fd} of a pidfd on an exited process for every saved pidfd
    whose process had exited (in crrestart, before the tree is forked)."""
    used = {d.file for t in tasks for d in t.fds}
    by_ino: dict[int, list[PidfdFile]] = {}
    for f in files:
        if f.id in used and is_dead(f):
            by_ino.setdefault(f.pidfd.ino, []).append(f)
    out: dict[int, int] = {}
    try:
        for group in by_ino.values():
            child = os.fork()
            if child == 0:
                os._exit(0)
            try:
                for f in group:
                    out[f.id] = os.pidfd_open(child, f.flags & os.O_NONBLOCK |
                                              (PIDFD_THREAD if f.pidfd.thread else 0))
            finally:
                os.waitpid(child, 0)
    except OSError as e:
        for fd in out.values():
            os.close(fd)
        raise RestoreError("pidfds", f"cannot make a pidfd of an exited process: "
                           f"{e.strerror or e}") from None
    return out


def inject(inj, task: TaskNote, files: list[File]) -> None:
    """Open the task's pidfds of live processes of the tree again (their pids
    are the ones the tasks see: restore_ns.to_inner rewrote them)."""
    opened: dict[int, int] = {}       # file id -> the task's fd holding it
    for d in sorted(task.fds, key=lambda d: d.fd):
        f = files[d.file]
        if not isinstance(f, PidfdFile) or is_dead(f):
            continue
        cloexec = os.O_CLOEXEC if d.cloexec else 0
        if d.file in opened:       # one open file description, several fds
            inj.check("dup3", opened[d.file], d.fd, cloexec)
            continue
        rec = f.pidfd
        if rec is None:
            raise RestoreError("pidfds", f"fd {d.fd}: the process of this pidfd was not saved")
        flags = f.flags & os.O_NONBLOCK | (PIDFD_THREAD if rec.thread else 0)
        try:
            fd = inj.check("pidfd_open", rec.pid, flags)
        except OSError as e:
            raise RestoreError("pidfds", f"fd {d.fd}: cannot open a pidfd of pid "
                               f"{rec.pid} again ({e.strerror or e})") from None
        if fd != d.fd:
            inj.check("dup3", fd, d.fd, cloexec)
            inj.check("close", fd)
        elif not cloexec:
            inj.check("fcntl", fd, 2, 0)      # F_SETFD: pidfd_open sets FD_CLOEXEC
        opened[d.file] = d.fd
