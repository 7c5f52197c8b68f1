"""File locks, leases and the SIGIO owner of open file descriptions.

What the kernel shows (fs/locks.c, fs/fcntl.c), read while the tree is frozen:

* `/proc/PID/fdinfo/N` has one `lock:` line per lock held through fd N's open
  file description: a POSIX (fcntl F_SETLK) lock of the task that owns the
  fd table, or an OFD lock (F_OFD_SETLK), a flock(2) lock or a lease
  (F_SETLEASE) of the description itself.  (/proc/locks is no substitute: it
  hides a lock whose taker has exited, and names no fd.)
* The owner that gets SIGIO/SIGURG (F_SETOWN/F_SETOWN_EX), the uid and euid
  recorded when it was set (F_GETOWNER_UIDS) and the signal (F_SETSIG) are
  read from a duplicate of the fd (pidfd_getfd): they belong to the
  description, so nothing is changed in the task.

Recorded in the statefile (docs/FORMAT.md):

* task `locks`: the task's POSIX locks, each with the fd it was taken through;
* file entry `locks`: its OFD and flock locks; `lease`: its lease (active, or
  breaking with the type it is being broken to); `fown`: its SIGIO owner;
  `locks_other`: lock lines of kinds crelf does not restore (statefile/check/support.py).

Restored by restorer/restore/locks.py.
"""

from __future__ import annotations

import fcntl
import os
import struct

from msgspec import UNSET

from statefile.control import procfs
from statefile.control import ptrace as pt

F_SETSIG, F_GETSIG = 10, 11
F_GETOWN_EX = 16
F_GETOWNER_UIDS = 17
OWNER_TYPES = {0: "tid", 1: "pid", 2: "pgrp"}   # F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP
FASYNC = 0o20000
_TYPES = {"READ": "read", "WRITE": "write", "UNLCK": "unlck"}


def parse_lock_line(text: str) -> dict | None:
    """One `lock:` line of fdinfo (without the "lock:" prefix), e.g.
    ``1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 0 EOF``; None if it is not a
    lock crelf restores (its text goes to `locks_other`)."""
    tok = text.split()
    if len(tok) < 8 or not tok[0].endswith(":") or tok[5].count(":") != 2:
        return None
    kind, attr, typ = tok[1], tok[2], _TYPES.get(tok[3])
    try:
        pid = int(tok[4])
        start = int(tok[6])
        end = None if tok[7] == "EOF" else int(tok[7])
    except ValueError:
        return None
    if typ is None:
        return None
    if kind in ("POSIX", "OFDLCK", "FLOCK") and attr == "ADVISORY" and typ != "unlck":
        lk = {"kind": {"POSIX": "posix", "OFDLCK": "ofd", "FLOCK": "flock"}[kind],
              "type": typ, "pid": pid}
        if kind != "FLOCK":
            lk["start"], lk["end"] = start, end
        return lk
    if kind == "LEASE" and attr in ("ACTIVE", "BREAKING"):
        return {"kind": "lease", "state": attr.lower(), "type": typ, "pid": pid}
    return None


def lock_lines(pid: int, fd: int) -> list[str]:
    try:
        text = procfs.read(f"/proc/{pid}/fdinfo/{fd}")
    except OSError:
        return []
    return [line[len("lock:"):].strip() for line in text.splitlines()
            if line.startswith("lock:")]


def scan_fd(task_locks: list[dict], entry: dict, fid: int, pid: int, fd: int,
            first: bool) -> None:
    """Record the locks fd `fd` of task `pid` shows: the task's POSIX locks in
    `task_locks`, the description's own (OFD, flock, lease) on `entry` the
    first time the description is met (`first`)."""
    for text in lock_lines(pid, fd):
        lk = parse_lock_line(text)
        if lk is None:
            if first:
                entry.setdefault("locks_other", []).append(text)
            continue
        kind = lk.pop("kind")
        if kind == "posix":
            # shown on every fd of this description in the owning task: once
            rec = {"fd": fd, "file": fid, **lk}
            if not any(r["file"] == fid and (r["type"], r["start"], r["end"])
                       == (lk["type"], lk["start"], lk["end"]) for r in task_locks):
                task_locks.append(rec)
        elif not first:
            continue
        elif kind == "lease":
            entry["lease"] = lk
        else:
            entry.setdefault("locks", []).append({"kind": kind, **lk})


def owner_of(pid: int, fd: int) -> dict | None:
    """The SIGIO owner and signal of fd's description, or None when neither is
    set (pid numbers as crelf sees them)."""
    try:
        dup = pt.dup_fd_of(pid, fd)
    except OSError:
        return None
    try:
        ex = fcntl.fcntl(dup, F_GETOWN_EX, bytes(8))
        otype, opid = struct.unpack("ii", ex)
        signum = fcntl.fcntl(dup, F_GETSIG)
        if not opid and not signum:
            return None
        out = {"pid": opid, "pid_type": OWNER_TYPES.get(otype, str(otype)), "signum": signum}
        if opid:
            uid, euid = struct.unpack("II", fcntl.fcntl(dup, F_GETOWNER_UIDS, bytes(8)))
            out.update(uid=uid, euid=euid)
        return out
    except OSError:
        return None
    finally:
        os.close(dup)


def add_fd(files, task_locks: list[dict], entry: dict, fid: int, pid: int, fd: int,
           info: dict, first: bool) -> None:
    """Called by FileTable.dump_fds for every fd (`info`: its parsed fdinfo)."""
    if "lock" in info:
        scan_fd(task_locks, entry, fid, pid, fd, first)
    if first:
        fown = owner_of(pid, fd)
        if fown is not None:
            entry["fown"] = fown


def open_breaks_lease(le) -> bool:
    """Whether opening the file to read its content (a deleted file's blob)
    would break its lease `le` (a file's "lease": a dict of the dump side, a
    records.Lease, or None), and wait for the frozen holder to give it up: any
    lease but an active read lease conflicts with a reader."""
    if not le:
        return False
    state, kind = (le["state"], le["type"]) if isinstance(le, dict) else (le.state, le.type)
    return not (state == "active" and kind == "read")


# --- what the support table says about them (statefile/check/support.py) -------------------

def findings(tasks, files, zombies):
    """(key, pid, where, detail) for every lock, lease and SIGIO owner of the
    tree (records: the tasks' and files' of statefile/format/records.py)."""
    pids = {t.pid for t in tasks} | {z.pid for z in zombies}
    pgids = {t.pgid for t in tasks} | {z.pgid for z in zombies}
    thread_of = {th.tid: t.pid for t in tasks for th in t.threads}
    seen: set[int] = set()
    for t in tasks:
        pid = t.pid
        for lk in t.locks:
            f = files[lk.file] if 0 <= lk.file < len(files) else None
            yield ("fd:lock", pid, f"pid {pid} fd {lk.fd}",
                   f"POSIX {lk.type} lock on {f.path if f is not None else '?'} {_range(lk)}")
        for d in t.fds:
            fid = d.file
            if fid in seen:
                continue
            seen.add(fid)
            f = files[fid]
            where = f"pid {pid} fd {d.fd}"
            for lk in f.locks:
                what = "flock" if lk.kind == "flock" else f"OFD lock {_range(lk)}"
                yield ("fd:lock", pid, where, f"{what} ({lk.type}) on {f.path}")
            for text in f.locks_other:
                yield ("fd:lock-other", pid, where, f"{f.path}: {text}")
            le = f.lease
            if le is not None:
                yield ("fd:lease", pid, where, f"{le.state} lease ({le.type}) on {f.path}")
                if f.deleted and f.kind == "regular" and open_breaks_lease(le) \
                        and f.shmem is None and not f.path.startswith("/memfd:"):
                    what = (f"a {le.type} lease" if le.state == "active"
                            else f"a lease being broken (to {le.type})")
                    yield ("fd:lease-deleted", pid, where, f"{f.path}: deleted, under "
                           f"{what}")
            fo = f.fown
            if fo is not None:
                o, ty = fo.pid, fo.pid_type
                holders = {t2.pid for t2 in tasks if any(d2.file == fid for d2 in t2.fds)}
                inside = (not o or (ty == "pid" and o in pids) or (ty == "pgrp" and o in pgids)
                          or (ty == "tid" and o in thread_of))
                if not inside:
                    yield ("fd:fown-external", pid, where, f"{f.path}: SIGIO goes to "
                           f"{ty} {o}, outside the tree")
                elif ty == "tid" and o and thread_of[o] not in holders:
                    yield ("fd:fown-thread", pid, where, f"{f.path}: SIGIO goes to thread "
                           f"{o} of pid {thread_of[o]}, which does not hold the file")
                else:
                    yield ("fd:fown", pid, where, f"{f.path}: SIGIO owner {ty} {o}, "
                           f"signal {fo.signum}")


def _range(lk) -> str:
    """A records.PosixLock's or records.FileLock's byte range."""
    end = "EOF" if lk.end is None or lk.end is UNSET else lk.end
    return f"bytes {lk.start}-{end}"
