"""pidfds: file descriptors that refer to a process (pidfd_open, clone's
CLONE_PIDFD) or, with PIDFD_THREAD, to one thread.

What the kernel shows of one, in /proc/PID/fdinfo/FD, is all a restart needs:
`Pid:` is the process (or thread) it refers to as crelf sees it, -1 once that
process has exited and been reaped; PIDFD_THREAD is O_EXCL in `flags`,
PIDFD_NONBLOCK is O_NONBLOCK.  Two pidfds of one process share one inode
(pidfs, Linux 6.9), which identifies the process even after it is gone.

A pidfd is restored (restorer/restore/pidfd.py) when it refers to a process
or thread of the tree (opened again by the holder, with the pid it sees), or
to a process that no longer exists (then it refers to an exited process
again, one per saved inode).  A pidfd of a live process outside the tree
cannot be: that process is not restarted with the tree (support table,
fd:pidfd-external).
"""

from __future__ import annotations

import os

PIDFD_THREAD = os.O_EXCL


def parse(info: dict[str, str], ino: int) -> dict | None:
    """The `pidfd` record of an anon_inode:[pidfd] fd from its fdinfo:
    {"pid": as crelf sees it, or -1: exited, "thread": PIDFD_THREAD,
    "ino": the process's pidfs inode}."""
    try:
        pid = int(info.get("Pid", "").split()[0])
    except (ValueError, IndexError):
        return None
    flags = int(info.get("flags", "0"), 8)
    return {"pid": pid, "thread": bool(flags & PIDFD_THREAD), "ino": ino}


def in_tree(rec, tasks, zombies) -> bool:
    """Whether a pidfd (its records.PidfdInfo, None when it was not read) can
    be restored: it refers to a process or thread of the tree (zombies
    included), or to one that has exited (-1)."""
    if rec is None:
        return False
    if rec.pid == -1:
        return True
    ids = {t.pid for t in tasks} | {z.pid for z in zombies}
    if rec.thread:
        ids |= {th.tid for t in tasks for th in t.threads}
    return rec.pid in ids
