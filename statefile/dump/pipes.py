"""Pipes and FIFOs: size, which end each open file description is, and the
bytes in flight, read without consuming them.

The bytes in flight are captured while the tree is frozen: a duplicate of a
task's read end (pidfd_getfd) is tee()d into a pipe of our own, and that copy
is read.  tee() duplicates the buffers without advancing the source pipe, so
a leave-running checkpoint changes nothing the tasks can observe.  The copy
goes into a memfd that the writer stores as a PT_CRELF_BLOB segment (the
`blob` of the file entry that was tee()d, see docs/FORMAT.md).

A pipe whose read end no task of the tree holds cannot be read without
consuming it; if a process outside the tree holds one of its ends, the pipe
is "external" (docs/SUPPORT.md: fd:pipe-external) and refused.
Restored by restorer/tree.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time

from statefile.control import procfs
from statefile.control import ptrace as pt
from statefile.format import records

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
FIONREAD = 0x541B
SPLICE_F_NONBLOCK = 0x02
O_ACCMODE = 3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.tee.restype = ctypes.c_ssize_t
_libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]


def readable(flags: int) -> bool:
    return flags & O_ACCMODE in (os.O_RDONLY, os.O_RDWR)


def writable(flags: int) -> bool:
    return flags & O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def in_flight(fd: int) -> int:
    """Bytes in the pipe (FIONREAD works on either end)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, FIONREAD, buf)
    return struct.unpack("<i", buf)[0]


def tee_copy(fd: int, size: int) -> bytes:
    """The bytes in flight in the pipe whose read end is fd, without consuming
    them: tee() into a pipe of our own at least as big, then read the copy."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        try:
            cap = fcntl.fcntl(w, F_SETPIPE_SZ, max(size, 4096))
        except OSError:   # bigger than this user may make a pipe: copy what fits
            cap = fcntl.fcntl(w, F_GETPIPE_SZ)
        out = bytearray()
        res = _libc.tee(fd, w, cap, SPLICE_F_NONBLOCK)
        if res < 0:
            e = ctypes.get_errno()
            if e != errno.EAGAIN:   # EAGAIN: empty pipe
                raise OSError(e, f"tee: {os.strerror(e)}")
        while True:
            try:
                chunk = os.read(r, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(r)
        os.close(w)


class PipeTable:
    """One record per pipe inode, shared by every open file description of
    that pipe (the same dict object sits in each CR_FILES entry as `pipe`)."""

    def __init__(self):
        self.by_inode: dict[tuple[int, int], dict] = {}
        self._keep: list = []          # memfds holding captured bytes until written
        # crcheck surveys a tree that runs: its pipes' contents change while
        # they are read (in a frozen tree only an outside process could do that)
        self.live = False

    def add(self, files, entry: dict, pid: int, fd: int) -> None:
        """Describe the pipe/FIFO behind task pid's fd in entry (a new CR_FILES
        entry); capture its bytes in flight at the first read end seen."""
        key = (entry["dev"], entry["ino"])
        info = self.by_inode.get(key)
        try:
            dup = pt.dup_fd_of(pid, fd)
        except OSError as e:
            entry["pipe"] = info or {"ino": entry["ino"], "unread": "unknown",
                                     "error": f"pidfd_getfd: {e.strerror}"}
            return
        try:
            if info is None:
                info = {"ino": entry["ino"], "size": fcntl.fcntl(dup, F_GETPIPE_SZ),
                        "unread": "unknown", "bytes": in_flight(dup)}
                self.by_inode[key] = info
            entry["pipe"] = info
            if info["unread"] == "unknown" and readable(entry["flags"]):
                for _ in range(5):
                    want = in_flight(dup)
                    try:
                        data = tee_copy(dup, info["size"])
                    except OSError as e:
                        info["error"] = f"tee: {e.strerror}"
                        return
                    if len(data) == want == in_flight(dup):
                        break       # a copy of what is in the pipe, and it held still
                    time.sleep(0.001)
                else:
                    if not self.live:
                        info["error"] = f"tee copied {len(data)} of {want} bytes in flight"
                        return
                info["unread"] = len(data)
                info["bytes"] = len(data)
                if data:
                    info["data_file"] = entry["id"]
                    self._store(files, entry, data)
        finally:
            os.close(dup)

    def _store(self, files, entry: dict, data: bytes) -> None:
        mfd = os.memfd_create("crelf-pipe", os.MFD_CLOEXEC)
        os.write(mfd, data)
        f = os.fdopen(mfd, "rb")
        self._keep.append(f)           # closed when the table is collected
        from statefile.dump.memory import SegmentPlan
        entry["blob"] = len(files.blobs)
        files.blobs.append(SegmentPlan(entry["owner_pid"], 0, len(data), "r--p", True,
                                       [(0, len(data))], src="file",
                                       src_path=f"/proc/{os.getpid()}/fd/{mfd}", src_offset=0,
                                       blob=f"bytes in flight in {entry['path']}"))


def _holders_outside(keys: set[tuple], tree: set[int]) -> dict:
    """{key: [pids]}: processes outside the tree (and not us) holding one of
    these pipes (key ("pipe", 0, ino)) or FIFOs (key ("fifo", dev, ino))."""
    out: dict = {}
    pipes = {k[2]: k for k in keys if k[0] == "pipe"}
    fifos = {(k[1], k[2]): k for k in keys if k[0] == "fifo"}
    for pid, path, link in procfs.fds_outside(tree):
        try:
            if link.startswith("pipe:["):
                k = pipes.get(int(link[6:-1]))
            elif fifos and link.startswith("/"):
                s = os.stat(path)
                k = fifos.get((s.st_dev, s.st_ino))
            else:
                continue
        except (OSError, ValueError):
            continue
        if k is not None:
            out.setdefault(k, set()).add(pid)
    return out


def pipe_key(f: dict) -> tuple:
    return ("pipe", 0, f["ino"]) if f["kind"] == "pipe" else ("fifo", f["dev"], f["ino"])


def external(tasks: list[dict], files: list[dict]) -> dict[int, str]:
    """The dump side, before its dicts become records: {file id: why} for
    pipe/FIFO descriptions a restart cannot rebuild: an end is held by a
    process outside the tree (an "external" pipe), or the pipe could not be
    inspected.  A pipe with an end missing that nobody else holds is fine: the
    restart rebuilds it without that end, as it was.  Decided once, at
    checkpoint time, and kept in each entry (`pipe.checked`, `pipe.external`:
    problems() reads them), so a restart never looks at today's processes."""
    ends: dict[tuple, set[str]] = {}
    by_key: dict[tuple, list[dict]] = {}
    used = {d["file"] for t in tasks for d in t["fds"]}
    for f in files:
        if f["kind"] not in ("pipe", "fifo") or f["id"] not in used:
            continue
        k = pipe_key(f)
        by_key.setdefault(k, []).append(f)
        e = ends.setdefault(k, set())
        if readable(f["flags"]):
            e.add("r")
        if writable(f["flags"]):
            e.add("w")
    why: dict[int, str] = {}
    for k, fs in by_key.items():
        err = next((f["pipe"]["error"] for f in fs if "error" in f.get("pipe", {})), None)
        if err:
            for f in fs:
                why[f["id"]] = f"{f['path']} could not be inspected ({err})"
    incomplete = {k for k, e in ends.items() if e != {"r", "w"} or k[0] == "fifo"}
    if incomplete:
        outside = _holders_outside(incomplete, {t["pid"] for t in tasks})
        for k, pids in outside.items():
            held = ", ".join(map(str, sorted(pids)[:5]))
            for f in by_key[k]:
                unread = f.get("pipe", {}).get("unread")
                why[f["id"]] = (f"{f['path']} is also open in pid {held} outside the tree"
                                + (" (its read end: the bytes in flight cannot be read without "
                                   "consuming them)" if unread == "unknown" else ""))
    for fs in by_key.values():
        for f in fs:
            if "pipe" in f:
                f["pipe"] = dict(f["pipe"], checked=True)
                if f["id"] in why:
                    f["pipe"]["external"] = why[f["id"]]
    return why


def _pipes(tasks: list[records.TaskNote], files: list[records.File]) \
        -> list[records.PipeFile | records.FifoFile]:
    used = {d.file for t in tasks for d in t.fds}
    return [f for f in files if isinstance(f, (records.PipeFile, records.FifoFile))
            and f.id in used]


def problems(tasks: list[records.TaskNote], files: list[records.File]) -> dict[int, str]:
    """{file id: why} for the pipe/FIFO descriptions of the tree a restart
    cannot rebuild: what external() decided, kept in the records."""
    return {f.id: f.pipe.external for f in _pipes(tasks, files) if f.pipe.external}


STDIO = frozenset((0, 1, 2))


def stdio_passthrough(tasks: list[records.TaskNote],
                      files: list[records.File]) -> dict[int, int]:
    """{file id: fd number} for the external pipes a restart can still give
    back: a pipe whose other end a process outside the tree holds (the
    harness that started the program, the shell reading its output), held in
    the tree only as stdin, stdout or stderr.  crrestart connects them to its
    own fd of that number, as it does with a terminal (CRIU's inherit-fd);
    the bytes in flight stay in the old pipe, with the outside process."""
    ext = problems(tasks, files)
    if not ext:
        return {}
    by_id = {f.id: f for f in files}
    numbers: dict[int, set[int]] = {}
    for t in tasks:
        for d in t.fds:
            if d.file in ext:
                numbers.setdefault(d.file, set()).add(d.fd)
    groups: dict[int, list[records.PipeFile]] = {}
    for fid in numbers:
        f = by_id[fid]
        if isinstance(f, records.PipeFile) and f.pipe.error is None:
            groups.setdefault(f.ino, []).append(f)
    out: dict[int, int] = {}
    for group in groups.values():
        nums = set().union(*(numbers[f.id] for f in group))
        ends = {e for f in group for e, ok in (("r", readable(f.flags)),
                                               ("w", writable(f.flags))) if ok}
        if nums <= STDIO and len(ends) == 1:    # one end only, at stdio numbers only
            for f in group:
                out[f.id] = min(numbers[f.id])
    return out
