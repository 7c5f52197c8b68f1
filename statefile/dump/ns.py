"""Namespaces of a tree: which ones its tasks are in, and the state of the
UTS and IPC namespaces it has of its own.

Every task's namespaces are the link texts of /proc/PID/ns/* (`links()`,
recorded in CR_TASK `namespaces`, with the task's pids in its own pid
namespace in `nspid`).  A tree may have a UTS and an IPC namespace of its own
(`unshare --uts --ipc`), shared by all its tasks; then CR_HEADER `namespaces`
holds its hostname and domainname and the IPC namespace's limits, and CR_IPC
every SysV object of that namespace.  A tree may also run in a pid
namespace of its own, its root being that namespace's init (`unshare --pid
--fork`): CR_HEADER `namespaces` `pid` then maps every pid, tid, process
group and session id crelf sees to the one the tasks see (NSpid, NSpgid,
NSsid of /proc/PID/status), and a restart gives the tree a new pid namespace
with those ids.  Other layouts (tasks of one tree in different UTS, IPC or
pid namespaces) and every other namespace kind that is not crelf's own are
refused by the support table (statefile/check/support.py).

The state of a namespace is read from inside it: /proc/sys/kernel/hostname,
/proc/sysvipc/*, semctl, msgrcv and shmat all act in the *caller's*
namespace (/proc/PID/root/proc/sys/kernel/hostname shows the reader's, not
the target's).  So a short-lived thread setns()es into the target's
namespaces (setns moves only the calling thread for UTS and IPC), does the
reading and ends; crcheckpoint's own threads never change namespace.
Restored by restorer/restore/ns.py.
"""

from __future__ import annotations

import ctypes
import os
import threading

from statefile.control import procfs

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


def _ns_ids(pid: int, tid: int | None = None) -> list[tuple[int, int]]:
    """(outer, inner) pairs of a task's pid, process group and session: the
    first and last entries of NSpid, NSpgid and NSsid of its status (inner 0:
    a group or session whose leader is outside the task's pid namespace)."""
    st = procfs.status(pid, tid)
    out = []
    for key in ("NSpid", "NSpgid", "NSsid"):
        ids = [int(x) for x in st.get(key, "").split()]
        if ids:
            out.append((ids[0], ids[-1]))
    return out


def _unreaped_children(pid: int) -> list[int]:
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out += [int(x) for x in procfs.read(f"/proc/{pid}/task/{tid}/children").split()]
        except (OSError, ValueError):
            pass
    return out


def pid_namespace(tasks: list[dict]) -> dict:
    """CR_HEADER namespaces `pid` of a tree in a pid namespace of its own:
    the namespace, and `ids`: {outer id: inner id} for every pid, tid,
    process group and session id of the tree's tasks, threads and unreaped
    children (zombies), as crelf sees them -> as the tasks see them (read
    while the tree is frozen; the root's parent is outside: 0)."""
    ids: dict[str, int] = {}
    mine = {t["pid"] for t in tasks}

    def add(pid: int, tid: int | None = None) -> None:
        try:
            for outer, inner in _ns_ids(pid, tid):
                ids.setdefault(str(outer), inner)
        except OSError:
            pass
    for t in tasks:
        add(t["pid"])
        for th in t.get("threads", []):
            tid = th if isinstance(th, int) else th["tid"]     # (crcheck: bare tids)
            if tid != t["pid"]:
                add(t["pid"], tid)
        for c in _unreaped_children(t["pid"]):
            if c not in mine:
                add(c)                  # a zombie (the tree is frozen: no other child)
    root = tasks[0]
    ids.setdefault(str(root["ppid"]), 0)
    return {"ns": root.get("namespaces", {}).get("pid", ""), "init": root["pid"],
            "level": len(root.get("nspid", [])) - 1, "ids": ids}


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
    if private(tasks, "pid", own):
        out["pid"] = pid_namespace(tasks)   # inner ids (check/support.py: restorable?)
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
    from statefile.dump import ipc as dump_ipc
    if not private(tasks, "ipc"):
        return dump_ipc.dump_ipc(tasks, False)
    try:
        return run_in(tasks[0]["pid"], ("ipc",), lambda: dump_ipc.dump_ipc(tasks, True))
    except JoinError:
        # Cannot join it (no CAP_SYS_ADMIN): support.assess refuses the
        # namespace with the reason recorded by dump_namespaces.
        return {"shm": [], "sem": [], "msg": []}
