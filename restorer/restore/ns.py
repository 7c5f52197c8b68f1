"""The tree's own UTS and IPC namespaces, recreated before the tree forks.

When the checkpointed tree had a UTS and/or an IPC namespace of its own
(CR_HEADER `namespaces`, statefile/dump/ns.py), the initiator's main thread
unshare()s them (CLONE_NEWUTS, CLONE_NEWIPC) before it creates anything the
tree shares: it sets the saved hostname and domainname and the IPC limits in
the new namespaces, creates the SysV objects there (restore_ipc.SharedIPC
acts in the caller's IPC namespace), and every task it forks inherits both
namespaces.  Once the tree is rebuilt (or the restore failed) the thread goes
back to crrestart's own namespaces with setns(); the new ones live on with
the tasks, and die with them, SysV objects included.

Creating a namespace needs CAP_SYS_ADMIN: an unprivileged crrestart refuses
with one line instead.

A tree that ran in a pid namespace of its own, its root being the
namespace's init (CR_HEADER namespaces `pid`), is restored into a new pid
namespace whose init is the root itself: `to_inner()` rewrites every id the
restart uses (tasks' pid, ppid, pgid, sid and thread ids, zombies, the
registers' keys, a pty's session and foreground group) to the ones the tasks
saw inside, before the tree is planned; restorer/restart.py then unshare()s
CLONE_NEWPID and forks the root as pid 1, and every task forks its children
with their inner pids (clone3 set_tid acts in the caller's namespace).
"""

from __future__ import annotations

import os
from dataclasses import replace

from statefile.format import records as R
from statefile.dump.ns import CLONE_NEWIPC, CLONE_NEWUTS, IPC_SYSCTLS, setns

from restorer.errors import RestoreError
from restorer.kernel import unshare

FLAGS = {"uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC}


def saved(sf) -> R.HeaderNamespaces | None:
    """CR_HEADER namespaces (None: a statefile without them)."""
    ns = sf.header.namespaces
    return None if ns is R.UNSET else ns


def private_kinds(sf) -> list[str]:
    """The namespace kinds the tree had of its own and a restart recreates."""
    ns = saved(sf)
    return [k for k in ("uts", "ipc") if ns is not None and getattr(ns, k) is not None]


def own_pidns(sf) -> R.PidNamespace | None:
    """CR_HEADER namespaces `pid`: the tree ran in a pid namespace of its own."""
    ns = saved(sf)
    pid = ns.pid if ns is not None else None
    return pid if pid is not None and pid.ids else None


def to_inner(sf) -> dict[int, int]:
    """Rewrite, in place, every pid, tid, process group and session id of the
    loaded statefile that the restart uses from crelf's view at checkpoint
    time to the tasks' own (CR_HEADER namespaces `pid` `ids`).  Returns the
    map {outer: inner}.  Raises RestoreError for an id missing from it."""
    info = own_pidns(sf)
    ids = {int(k): int(v) for k, v in info.ids.items()} if info is not None else {}

    def inner(pid: int, what: str) -> int:
        if pid in ids:
            return ids[pid]
        raise RestoreError("pid namespace", f"{what} {pid} has no id inside the tree's pid "
                           "namespace in the statefile")
    for t in sf.tasks:
        outer = t.pid
        t.pid, t.tgid, t.ppid, t.pgid, t.sid = (
            inner(getattr(t, key), f"pid {outer}: {key}")
            for key in ("pid", "tgid", "ppid", "pgid", "sid"))
        for th in t.threads:
            th.tid = inner(th.tid, f"pid {outer}: thread")
    regs = {}
    for tid, r in sf.regs.items():
        regs[inner(tid, "registers of thread")] = replace(r, pid=ids.get(r.pid, r.pid),
                                                          tid=inner(tid, "thread"))
    sf.regs = regs
    hdr = sf.header
    for z in hdr.zombies:
        outer = z.pid
        z.pid, z.ppid, z.pgid, z.sid = (inner(getattr(z, key), f"zombie {outer}: {key}")
                                        for key in ("pid", "ppid", "pgid", "sid"))
    for e in hdr.tree:
        e.pid, e.ppid = ids.get(e.pid, e.pid), ids.get(e.ppid, e.ppid)
    hdr.root_pid = ids.get(hdr.root_pid, hdr.root_pid)
    done: set[int] = set()
    for f in sf.files:
        pty = f.pty if isinstance(f, (R.PtyMasterFile, R.PtySlaveFile, R.TtyFile)) else None
        if pty is not None and id(pty) not in done:
            done.add(id(pty))
            if pty.sid:         # a pty's session and foreground group (null, unset: none)
                pty.sid = ids.get(pty.sid, 0)
            if pty.fg_pgrp:
                pty.fg_pgrp = ids.get(pty.fg_pgrp, 0)
        if isinstance(f, R.PidfdFile) and f.pidfd is not None and f.pidfd.pid > 0:
            f.pidfd.pid = ids.get(f.pidfd.pid, 0)   # (restore_pidfd)
    return ids


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Namespaces:
    """enter() before the shared resources are created, leave() at the end."""

    def __init__(self, sf):
        self.ns = saved(sf)
        self.kinds = private_kinds(sf)
        self.back: dict[str, int] = {}     # kind -> fd of crrestart's own namespace

    def enter(self) -> None:
        if not self.kinds:
            return
        what = " and ".join(k.upper() for k in self.kinds)
        if os.geteuid() != 0:
            raise RestoreError("namespaces", f"the tree had its own {what} namespace; "
                               "recreating it needs root (CAP_SYS_ADMIN)")
        for kind in self.kinds:
            self.back[kind] = os.open(f"/proc/thread-self/ns/{kind}",
                                      os.O_RDONLY | os.O_CLOEXEC)
        flags = 0
        for kind in self.kinds:
            flags |= FLAGS[kind]
        try:
            unshare(flags)
        except OSError as e:
            self.leave()
            raise RestoreError("namespaces", f"cannot create a new {what} namespace "
                               f"({e.strerror})") from None
        try:
            uts = self.ns.uts
            if uts is not None:
                _write("/proc/sys/kernel/hostname", uts.hostname)
                _write("/proc/sys/kernel/domainname", uts.domainname)
            for name, value in self.ns.ipc.sysctl.items() if self.ns.ipc is not None else ():
                if name in IPC_SYSCTLS:
                    _write(f"/proc/sys/kernel/{name}", value)
        except OSError as e:
            self.leave()
            raise RestoreError("namespaces", f"cannot set up the new {what} namespace: "
                               f"{e.filename}: {e.strerror}") from None

    def leave(self) -> None:
        """Back to crrestart's own namespaces (the tasks stay in the new ones)."""
        for kind, fd in self.back.items():
            try:
                setns(fd, FLAGS[kind])
            finally:
                os.close(fd)
        self.back = {}
