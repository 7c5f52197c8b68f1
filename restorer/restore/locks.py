"""File locks, leases and SIGIO owners, taken again by the restored tasks
(saved by statefile/dump/locks.py).

Who takes what, and when:

* OFD locks, flock locks and leases belong to an open file description: one
  task that holds the description takes them again through its own fd (the
  task whose pid the lock showed, if it still holds the description, else the
  first holder), in its own setup code once its fds are in place
  (restore_files.child_setup, step "file locks").  A flock shows its taker's
  pid, a lease's break signal names the fd it was set through, so the taker
  matters.  A lease being broken is taken with the type it had and broken
  again by the task itself (an open of /proc/self/fd/N with O_NONBLOCK that
  conflicts with it and fails with EWOULDBLOCK) while the description has no
  SIGIO owner, so no signal is sent; its owner is set afterwards.
* POSIX locks belong to the process: each task takes its own by injected
  fcntl(F_SETLK) at the very end of its rebuild (restorer/restore/task.py, step
  "cleanup"), after the restorer closed the extra fds it used for the
  mmaps: closing any fd of a file drops every POSIX lock the process holds
  on it.
* The SIGIO owner (F_SETOWN_EX), its signal (F_SETSIG) and O_ASYNC are set
  by injection too, once every task and thread of the tree exists, before the
  task gets its credentials back (restorer/restore/task.py, step "file owners"): the
  kernel records the uid and euid of whoever sets the owner, so the task
  takes the saved ones for the call (setresuid, then back).  O_ASYNC is
  switched off and on again through the task's own fd: the kernel registers
  the fd number it is set through, which the signal carries in si_fd.

The saved locks of the tree never conflict with each other (they were held
together), so the order of the tasks does not matter; a lock that cannot be
taken is held by a process outside the tree (a second restart of the same
statefile, or the checkpointed tree still running): the restart fails with
the file named.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from statefile.format.records import Record  # (transitional: issue 15)
from statefile.dump.locks import FASYNC

from restorer.errors import RestoreError

F_GETFL, F_SETFL, F_SETLK, F_SETSIG, F_SETOWN, F_SETOWN_EX = 3, 4, 6, 10, 8, 15
F_OFD_SETLK = 37
F_SETLEASE = 1024
OWNER_TYPE = {"tid": 0, "pid": 1, "pgrp": 2}
LOCK_TYPE = {"read": fcntl.F_RDLCK, "write": fcntl.F_WRLCK}
_FLOCK = struct.Struct("hhqqi4x")      # struct flock (x86-64): type, whence, start, len, pid
assert _FLOCK.size == 32
NONE = 2**32 - 1                       # (uid_t)-1: leave this id as it is


def flock_struct(lk: dict) -> bytes:
    end = lk.get("end")
    start = lk.get("start", 0)
    length = 0 if end is None else end - start + 1
    return _FLOCK.pack(LOCK_TYPE[lk["type"]], os.SEEK_SET, start, length, 0)


def _needs_owner(f: dict) -> bool:
    return bool(f.get("fown") or f.get("lease") or f.get("flags", 0) & FASYNC)


def _int(v, lo: int = 0, hi: int = 2**63 - 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _range_ok(lk: dict) -> bool:
    end = lk.get("end")
    return _int(lk.get("start")) and (end is None or _int(end, lk["start"]))


def check(sf) -> None:
    """Raise ValueError for lock, lease or owner records this restorer could
    not use (a foreign or damaged writer), before anything is created."""
    def bad(what: str) -> ValueError:
        return ValueError(f"malformed {what}")
    nfiles = len(sf.files)
    for t in sf.tasks:
        fds = {d["fd"] for d in t["fds"]}
        for lk in t.get("locks", []):
            if not (isinstance(lk, (dict, Record)) and lk.get("type") in LOCK_TYPE and _range_ok(lk)
                    and lk.get("fd") in fds and _int(lk.get("file"), 0, nfiles - 1)):
                raise bad(f"POSIX lock of pid {t['pid']}")
    for f in sf.files:
        for lk in f.get("locks", []):
            if not (isinstance(lk, (dict, Record)) and lk.get("type") in LOCK_TYPE and (
                    lk.get("kind") == "flock" or (lk.get("kind") == "ofd" and _range_ok(lk)))):
                raise bad(f"lock of {f['path']}")
        le = f.get("lease")
        if le is not None and not (isinstance(le, (dict, Record)) and (
                (le.get("state") == "active" and le.get("type") in LOCK_TYPE)
                or (le.get("state") == "breaking" and le.get("type") in ("read", "unlck")))):
            raise bad(f"lease of {f['path']}")
        fo = f.get("fown")
        if fo is not None and not (isinstance(fo, (dict, Record)) and fo.get("pid_type") in OWNER_TYPE
                                   and _int(fo.get("pid"), 0, 2**31 - 1)
                                   and _int(fo.get("signum", 0), 0, 64)
                                   and all(_int(fo.get(k, 0), 0, 2**32 - 2)
                                           for k in ("uid", "euid"))):
            raise bad(f"SIGIO owner of {f['path']}")


def assign(sf) -> None:
    """Decide, before the tree is forked, which task takes each description's
    locks and lease (`_locks_by`) and sets its owner (`_fown_by`): [pid, fd]
    (the pids as the tasks see them; statefile pids of a tree that had its own
    pid namespace are translated, as restore_ns.to_inner did for the tasks)."""
    from restorer.restore.ns import own_pidns
    check(sf)
    ids = {int(k): int(v) for k, v in ((own_pidns(sf) or {}).get("ids") or {}).items()}
    holders: dict[int, list[tuple[int, int]]] = {}
    tids: dict[int, int] = {}
    for t in sf.tasks:
        for th in t.get("threads", []):
            tids[th["tid"]] = t["pid"]
        for d in sorted(t["fds"], key=lambda d: d["fd"]):
            holders.setdefault(d["file"], []).append((t["pid"], d["fd"]))

    def prefer(hs: list[tuple[int, int]], pid: int | None) -> list[int]:
        return list(next((h for h in hs if h[0] == pid), hs[0]))
    for f in sf.files:
        hs = holders.get(f["id"])
        if not hs or f.get("skipped"):
            continue
        lk = (f.get("locks") or [{}])[0] if f.get("locks") else f.get("lease")
        if lk:
            f["_locks_by"] = prefer(hs, ids.get(lk.get("pid"), lk.get("pid")))
        if _needs_owner(f):
            fo = f.get("fown") or {}
            owner = ids.get(fo.get("pid"), fo.get("pid"))
            if fo.get("pid_type") == "tid":
                owner = tids.get(owner, owner)
            f["_fown_by"] = prefer(hs, owner)
            f["_fown_pid"] = ids.get(fo.get("pid", 0), fo.get("pid", 0))


def _mine(f: dict, key: str, pid: int, fd: int) -> bool:
    return f.get(key) == [pid, fd]


# --- in the task (restore_files.child_setup) ------------------------------------------

class LockError(Exception):
    pass


def _held_elsewhere(f: dict, what: str, e: OSError) -> LockError:
    if e.errno in (errno.EAGAIN, errno.EACCES):
        return LockError(f"{f['path']}: its {what} cannot be taken again: a process outside "
                         "the restored tree holds a conflicting lock or open (is the "
                         "checkpointed tree still running?)")
    return LockError(f"{f['path']}: its {what} cannot be taken again ({e.strerror or e})")


def take_in_task(task: dict, files: list[dict]) -> None:
    """OFD locks, flock locks and leases of the descriptions this task takes
    (assign() chose it); runs in the task, its fds in place.  Raises LockError."""
    pid = task["pid"]
    for d in sorted(task["fds"], key=lambda d: d["fd"]):
        f, fd = files[d["file"]], d["fd"]
        if not _mine(f, "_locks_by", pid, fd):
            continue
        for lk in f.get("locks", []):
            try:
                if lk["kind"] == "flock":
                    op = fcntl.LOCK_EX if lk["type"] == "write" else fcntl.LOCK_SH
                    fcntl.flock(fd, op | fcntl.LOCK_NB)
                else:
                    fcntl.fcntl(fd, F_OFD_SETLK, flock_struct(lk))
            except OSError as e:
                raise _held_elsewhere(f, "flock" if lk["kind"] == "flock" else "OFD lock",
                                      e) from None
        if f.get("lease"):
            _take_lease(f, fd)


def _take_lease(f: dict, fd: int) -> None:
    le = f["lease"]
    rdonly = f.get("flags", 0) & os.O_ACCMODE == os.O_RDONLY
    if le["state"] == "breaking":
        # being broken to a read lease: it was a write lease, broken by a
        # reader; to no lease: a write or a read lease, broken by a writer
        typ = "write" if le["type"] == "read" or not rdonly else "read"
        breaker = os.O_RDONLY if le["type"] == "read" else os.O_WRONLY
    else:
        typ, breaker = le["type"], None
    try:
        fcntl.fcntl(fd, F_SETLEASE, LOCK_TYPE[typ])
    except (OSError, KeyError) as e:
        if isinstance(e, KeyError):
            raise LockError(f"{f['path']}: lease type {le['type']} unknown") from None
        raise _held_elsewhere(f, f"{typ} lease", e) from None
    if breaker is None:
        return
    fcntl.fcntl(fd, F_SETOWN, 0)     # no owner: breaking it sends no signal
    try:
        probe = os.open(f"/proc/self/fd/{fd}", breaker | os.O_NONBLOCK | os.O_CLOEXEC)
    except BlockingIOError:
        return                       # EWOULDBLOCK: the lease is being broken
    except OSError as e:
        raise LockError(f"{f['path']}: its lease cannot be put back in its breaking state "
                        f"({e.strerror})") from None
    os.close(probe)
    raise LockError(f"{f['path']}: its lease cannot be put back in its breaking state")


# --- by injection (restore_task.TaskRestorer) -------------------------------------------

def _ids(rpid: int, tid: int) -> tuple[int, int]:
    with open(f"/proc/{rpid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                ruid, euid = (int(x) for x in line.split()[1:3])
                return ruid, euid
    return 0, 0


def set_owners(inj, task: dict, files: list[dict], rpid: int, scratch: int) -> None:
    """O_ASYNC, F_SETOWN_EX (with the saved uid/euid) and F_SETSIG for every
    description this task sets up (assign())."""
    pid = task["pid"]
    for d in sorted(task["fds"], key=lambda d: d["fd"]):
        f, fd = files[d["file"]], d["fd"]
        if not _mine(f, "_fown_by", pid, fd):
            continue
        try:
            _set_owner(inj, f, fd, rpid, scratch)
        except OSError as e:
            raise RestoreError("file owners", f"fd {fd} ({f['path']}): {e}") from None


def _set_owner(inj, f: dict, fd: int, rpid: int, scratch: int) -> None:
    if f.get("flags", 0) & FASYNC:
        # registered again through this fd (its number is the signal's si_fd)
        cur = inj.check("fcntl", fd, F_GETFL)
        inj.check("fcntl", fd, F_SETFL, cur & ~FASYNC)
        inj.check("fcntl", fd, F_SETFL, cur | FASYNC)
    fo = f.get("fown") or {}
    owner = f.get("_fown_pid", 0)      # as the tasks see it (assign())
    inj.write(scratch, struct.pack("ii", OWNER_TYPE.get(fo.get("pid_type"), 1), owner))
    now = _ids(rpid, inj.tid)
    want = (fo.get("uid", now[0]), fo.get("euid", now[1]))
    if owner and want != now:
        inj.check("setresuid", want[0], want[1], NONE)
        try:
            inj.check("fcntl", fd, F_SETOWN_EX, scratch)
        finally:
            inj.check("setresuid", now[0], now[1], NONE)
    else:
        inj.check("fcntl", fd, F_SETOWN_EX, scratch)
    inj.check("fcntl", fd, F_SETSIG, fo.get("signum", 0))


def take_posix(inj, task: dict, files: list[dict], scratch: int) -> None:
    """The task's own POSIX locks, by injected fcntl(F_SETLK) through the fd
    each was taken through."""
    for lk in task.get("locks", []):
        f = files[lk["file"]]
        if f.get("skipped") and f["kind"] != "regular":
            continue
        inj.write(scratch, flock_struct(lk))
        res = inj.call("fcntl", lk["fd"], F_SETLK, scratch)
        if res < 0:
            e = OSError(-res, os.strerror(-res))
            raise RestoreError("file locks", str(_held_elsewhere(f, f"POSIX {lk['type']} "
                               "lock", e)))
