"""SysV IPC objects of a tree: shared memory segments, semaphore sets and
message queues, with their ids, keys, owners, permissions and contents.

Which objects belong to the tree: a shm segment created by a task of the tree
or attached by one (its mappings say /SYSV<key>, inode = shmid); a semaphore
set whose last operation (semctl GETPID) came from the tree; a message queue
last sent to or received from by the tree.  (A tree with its own IPC
namespace owns every object in it.)

Contents are read without changing them: semaphore values with GETALL,
messages with msgrcv(MSG_COPY) one by one (the queue stays as it was), a shm
segment's bytes are already in the segments of the tasks that attach it; an
unattached segment is attached read-only for the copy.

Semaphore undo lists (SEM_UNDO) are per task and their adjustments are not
visible from outside, so they cannot be saved (CRIU neither saves nor
detects them); what can be seen is whether a task has a list at all:
kcmp(KCMP_SYSVSEM) compares two tasks' undo-list pointers, and a task that
never did a semop with SEM_UNDO and never created a thread has none (NULL),
like a child freshly forked without CLONE_SYSVSEM (what each task is compared
with: this process itself may have started threads).  Creating a thread (CLONE_SYSVSEM,
which glibc's pthread_create passes) allocates an empty list shared by the
threads, so a list is not proof of adjustments.  And an entry of a list
lives only as long as its semaphore set.  So, when the tree has semaphore
sets (the `sem` list) and a task has a list (kcmp(task, blank child) != 0), `sem_undo`
names it: {"pid", "threads"}, and statefile/check/support.py refuses the
checkpoint (ipc:sem-undo): "holds SEM_UNDO adjustments" for a single-
threaded task, "may hold" for a multi-threaded one (its list may be only the
threads' empty one).  A tree without semaphore sets of its own is never
refused for this: an undo entry on a set the tree does not use (its last
operations are another process's) is missed.
Restored by restorer/restore/ipc.py.
"""

from __future__ import annotations

import ctypes
import errno
import os

from statefile.control import procfs

_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.msgrcv.restype = ctypes.c_ssize_t

IPC_NOWAIT = 0o4000
MSG_NOERROR = 0o10000
MSG_COPY = 0o40000
SHM_RDONLY = 0o10000
GETPID, GETALL = 11, 13
MAX_MSG = 1 << 16
NR_kcmp, KCMP_SYSVSEM = 312, 6


def _table(kind: str) -> list[dict]:
    try:
        lines = procfs.read(f"/proc/sysvipc/{kind}").splitlines()
    except FileNotFoundError:
        return []
    head = lines[0].split()
    rows = [dict(zip(head, (int(x) for x in line.split()))) for line in lines[1:] if line.strip()]
    for r in rows:
        r["perms"] = int(str(r["perms"]), 8)  # printed in octal
    return rows


def _sem_values(semid: int, nsems: int) -> tuple[list[int], list[int]]:
    vals = (ctypes.c_ushort * nsems)()
    if _libc.semctl(semid, 0, GETALL, vals) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"semctl(GETALL) of semaphore set {semid}: {os.strerror(e)}")
    pids = [_libc.semctl(semid, i, GETPID) for i in range(nsems)]
    return list(vals), pids


def _messages(msqid: int, qnum: int) -> list[dict]:
    buf = ctypes.create_string_buffer(8 + MAX_MSG)
    out = []
    for i in range(qnum):
        n = _libc.msgrcv(msqid, buf, MAX_MSG, i, IPC_NOWAIT | MSG_COPY | MSG_NOERROR)
        if n < 0:
            e = ctypes.get_errno()
            if e == errno.ENOMSG:
                break
            raise OSError(e, f"msgrcv(MSG_COPY) of queue {msqid}: {os.strerror(e)}")
        mtype = int.from_bytes(buf.raw[:8], "little", signed=True)
        out.append({"type": mtype, "data": buf.raw[8:8 + n].hex()})
    return out


def _shm_content(shmid: int, size: int) -> str:
    addr = _libc.shmat(shmid, None, SHM_RDONLY)
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, f"shmat of segment {shmid}: {os.strerror(e)}")
    try:
        return ctypes.string_at(addr, size).rstrip(b"\0").hex()
    finally:
        _libc.shmdt(ctypes.c_void_p(addr))


def sem_undo_tasks(tasks: list[dict]) -> list[dict]:
    """The tasks that have a SEM_UNDO list ({"pid", "threads"}; see the
    module's docstring).  Each is compared (kcmp) with a child forked for it:
    fork() without CLONE_SYSVSEM gives a task no undo list, while this
    process may well have one (any thread it ever started, such as the one
    that reads an IPC namespace from inside, made one)."""
    r, w = os.pipe()
    blank = os.fork()
    if blank == 0:              # holds no undo list; waits until we are done
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    out = []
    try:
        for t in tasks:
            res = _libc.syscall(NR_kcmp, t["pid"], blank, KCMP_SYSVSEM, 0, 0)
            if res < 0:
                e = ctypes.get_errno()
                if e == errno.ESRCH:
                    continue
                raise OSError(e, f"kcmp(KCMP_SYSVSEM) of pid {t['pid']}: {os.strerror(e)}")
            if res != 0:
                out.append({"pid": t["pid"], "threads": len(t.get("threads") or [1])})
    finally:
        os.close(w)
        os.waitpid(blank, 0)
    return out


def dump_ipc(tasks: list[dict], own_namespace: bool) -> dict:
    pids = {t["pid"] for t in tasks}
    attached = {m["inode"] for t in tasks for m in t["mappings"] if m["kind"] == "sysv-shm"}
    shms, sems, msgs = [], [], []
    for s in _table("shm"):
        if not (own_namespace or s["cpid"] in pids or s["shmid"] in attached):
            continue
        entry = {k: s[k] for k in ("key", "shmid", "perms", "size", "uid", "gid", "cuid",
                                   "cgid", "cpid", "nattch", "ctime")}
        if s["shmid"] not in attached:
            entry["content"] = _shm_content(s["shmid"], s["size"])
        shms.append(entry)
    for s in _table("sem"):
        try:
            vals, lastpids = _sem_values(s["semid"], s["nsems"])
        except PermissionError:
            # Not readable by us (another user's set, and we are not root):
            # the tasks we may checkpoint run as us, so it is not theirs.
            continue
        if not (own_namespace or pids.intersection(lastpids)):
            continue
        entry = {k: s[k] for k in ("key", "semid", "perms", "nsems", "uid", "gid", "cuid", "cgid",
                                   "ctime")}
        entry["values"] = vals
        entry["pids"] = lastpids
        sems.append(entry)
    for s in _table("msg"):
        if not (own_namespace or s["lspid"] in pids or s["lrpid"] in pids):
            continue
        entry = {k: s[k] for k in ("key", "msqid", "perms", "cbytes", "qnum", "uid", "gid",
                                   "cuid", "cgid", "lspid", "lrpid", "ctime")}
        entry["messages"] = _messages(s["msqid"], s["qnum"])
        msgs.append(entry)
    out = {"shm": shms, "sem": sems, "msg": msgs}
    undo = sem_undo_tasks(tasks) if sems else []
    if undo:
        out["sem_undo"] = undo
    return out
