"""The tree's own UTS and IPC namespaces, recreated before the tree forks.

When the checkpointed tree had a UTS and/or an IPC namespace of its own
(CR_HEADER `namespaces`, statefile/dump_ns.py), the initiator's main thread
unshare()s them (CLONE_NEWUTS, CLONE_NEWIPC) before it creates anything the
tree shares: it sets the saved hostname and domainname and the IPC limits in
the new namespaces, creates the SysV objects there (restore_ipc.SharedIPC
acts in the caller's IPC namespace), and every task it forks inherits both
namespaces.  Once the tree is rebuilt (or the restore failed) the thread goes
back to crrestart's own namespaces with setns(); the new ones live on with
the tasks, and die with them, SysV objects included.

Creating a namespace needs CAP_SYS_ADMIN: an unprivileged crrestart refuses
with one line instead.
"""

from __future__ import annotations

import os

from statefile.dump_ns import CLONE_NEWIPC, CLONE_NEWUTS, IPC_SYSCTLS, setns

from .errors import RestoreError
from .kernel import unshare

FLAGS = {"uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC}


def saved(sf) -> dict:
    return sf.header.get("namespaces") or {}


def private_kinds(sf) -> list[str]:
    """The namespace kinds the tree had of its own and a restart recreates."""
    ns = saved(sf)
    return [k for k in ("uts", "ipc") if k in ns]


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
            uts = self.ns.get("uts")
            if uts:
                _write("/proc/sys/kernel/hostname", uts.get("hostname", ""))
                _write("/proc/sys/kernel/domainname", uts.get("domainname", ""))
            for name, value in (self.ns.get("ipc") or {}).get("sysctl", {}).items():
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
