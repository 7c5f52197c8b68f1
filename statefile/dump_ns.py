"""Namespaces of a tree: which ones its tasks are in, and the state of the
UTS and IPC namespaces it has of its own.

Every task's namespaces are the link texts of /proc/PID/ns/* (`links()`,
recorded in CR_TASK `namespaces`, with the task's pids in its own pid
namespace in `nspid`).  A tree may have a UTS and an IPC namespace of its own
(`unshare --uts --ipc`), shared by all its tasks; then CR_HEADER `namespaces`
holds its hostname and domainname and the IPC namespace's limits, and CR_IPC
every SysV object of that namespace.  Other layouts (tasks of one tree in
different UTS or IPC namespaces) and every other namespace kind that is not
crelf's own are refused by the support table (statefile/support.py).

The state of a namespace is read from inside it: /proc/sys/kernel/hostname,
/proc/sysvipc/*, semctl, msgrcv and shmat all act in the *caller's*
namespace (/proc/PID/root/proc/sys/kernel/hostname shows the reader's, not
the target's).  So a short-lived thread setns()es into the target's
namespaces (setns moves only the calling thread for UTS and IPC), does the
reading and ends; crcheckpoint's own threads never change namespace.
Restored by restorer/restore_ns.py.
"""

from __future__ import annotations

import ctypes
import os
import threading

from . import procfs

KINDS = ("pid", "ipc", "uts", "mnt", "net", "user", "cgroup", "time")
CLONE_NEWUTS, CLONE_NEWIPC = 0x04000000, 0x08000000
FLAGS = {"uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC}

# Per-IPC-namespace limits (/proc/sys/kernel/*) worth carrying over; the
# *_next_id files are set per object by restore_ipc and are -1 at rest.
IPC_SYSCTLS = ("msgmax", "msgmnb", "msgmni", "sem", "shmall", "shmmax", "shmmni",
               "shm_rmid_forced")

_libc = ctypes.CDLL(None, use_errno=True)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def links(pid: int | str) -> dict[str, str]:
    """{kind: "uts:[4026531838]", ...} of a task ("self" for crelf itself)."""
    return {ns: _readlink(f"/proc/{pid}/ns/{ns}") for ns in KINDS}


def nspid(pid: int) -> list[int]:
    """The task's pid in every pid namespace it is in, outermost first
    (NSpid of /proc/PID/status)."""
    try:
        return [int(x) for x in procfs.status(pid).get("NSpid", str(pid)).split()]
    except (OSError, ValueError):
        return [pid]


class JoinError(OSError):
    """A namespace of the target could not be joined (no CAP_SYS_ADMIN)."""


def setns(fd: int, flag: int) -> None:
    if _libc.setns(fd, flag) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def run_in(pid: int, kinds: tuple[str, ...], fn):
    """fn() run by a thread that has joined pid's namespaces of `kinds`
    (uts, ipc); returns what fn returned, raises what it raised (OSError when
    a namespace cannot be joined: JoinError)."""
    box: dict = {}

    def body():
        try:
            for kind in kinds:
                fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(fd, FLAGS[kind])
                except OSError as e:
                    raise JoinError(e.errno, f"cannot enter the {kind} namespace of pid {pid} "
                                  f"(setns: {e.strerror})") from None
                finally:
                    os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
    t = threading.Thread(target=body, name=f"crelf-ns-{pid}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().rstrip("\n")


def _uts_state() -> dict:
    return {"hostname": _read("/proc/sys/kernel/hostname"),
            "domainname": _read("/proc/sys/kernel/domainname")}


def _ipc_state() -> dict:
    out = {}
    for name in IPC_SYSCTLS:
        try:
            out[name] = _read(f"/proc/sys/kernel/{name}")
        except OSError:
            pass
    return {"sysctl": out}


def private(tasks: list[dict], kind: str, own: dict[str, str] | None = None) -> bool:
    """True when the tree's root is in a `kind` namespace other than crelf's."""
    own = own or links("self")
    link = tasks[0].get("namespaces", {}).get(kind, "")
    return bool(link and own.get(kind) and link != own[kind])


def dump_namespaces(tasks: list[dict]) -> dict:
    """CR_HEADER `namespaces`: crelf's own namespaces, the root's, and for a
    UTS or IPC namespace of the tree's own its state.  A namespace that
    cannot be read is named in the root task's `ns_errors` (the support
    table refuses it)."""
    own = links("self")
    root = tasks[0]
    for t in tasks:
        t["nspid"] = nspid(t["pid"])
    out: dict = {"crelf": own, "root": dict(root.get("namespaces", {}))}
    for kind, read in (("uts", _uts_state), ("ipc", _ipc_state)):
        if not private(tasks, kind, own):
            continue
        try:
            out[kind] = {"ns": out["root"][kind], **run_in(root["pid"], (kind,), read)}
        except OSError as e:
            root.setdefault("ns_errors", {})[kind] = str(e.strerror or e)
    return out


def dump_ipc_objects(tasks: list[dict]) -> dict:
    """CR_IPC: the tree's SysV objects, read inside the root's IPC namespace
    when it has its own (then every object in it belongs to the tree)."""
    from . import dump_ipc
    if not private(tasks, "ipc"):
        return dump_ipc.dump_ipc(tasks, False)
    try:
        return run_in(tasks[0]["pid"], ("ipc",), lambda: dump_ipc.dump_ipc(tasks, True))
    except JoinError:
        # Cannot join it (no CAP_SYS_ADMIN): support.assess refuses the
        # namespace with the reason recorded by dump_namespaces.
        return {"shm": [], "sem": [], "msg": []}
