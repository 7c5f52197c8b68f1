"""Shared memory objects that have a file behind them, saved once each.

* memfds (``/memfd:NAME (deleted)``): every fd and every mapping of one memfd,
  in any task of the tree, point to one record;
* files mapped MAP_SHARED after they were deleted (a POSIX shm that was
  ``shm_unlink``ed, a deleted file in /tmp): the same, and the fds of that file;
* with the ``dump_tmpfs`` policy, files on tmpfs mapped MAP_SHARED (POSIX shm in
  /dev/shm) and the fds of those files: a restart on another host recreates
  them at their path before the tree forks.

One object is one (device, inode); its record goes to CR_FILES ``shmem`` and
every file entry and mapping of it gets ``shmem``: the record's index.  The
content is stored once, sparse (only the data ranges, SEEK_DATA/SEEK_HOLE), in
a PT_CRELF_BLOB read while the tree is frozen, through an fd of a task
(``/proc/PID/fd/N``) or a mapping (``/proc/PID/map_files``, root).  A memfd's
seals come from F_GET_SEALS.  Restored by restorer/restore/memfd.py.
"""

from __future__ import annotations

import fcntl
import os

from statefile.control import procfs
from statefile.dump.locks import open_breaks_lease
from statefile.dump.memory import SegmentPlan

F_GET_SEALS = 1034
F_SEAL_SEAL = 1
MEMFD_PREFIX = "/memfd:"
DELETED = " (deleted)"


def is_memfd_path(path: str) -> bool:
    return path.startswith(MEMFD_PREFIX) and path.endswith(DELETED)


def memfd_name(path: str) -> str:
    return path[len(MEMFD_PREFIX):-len(DELETED)]


def _map_key(m: dict) -> tuple[int, int, int]:
    maj, mnr = m["dev"].split(":")
    return int(maj, 16), int(mnr, 16), m["inode"]


def _file_key(f: dict) -> tuple[int, int, int]:
    return os.major(f["dev"]), os.minor(f["dev"]), f["ino"]


def _fstypes(pid: int) -> dict[tuple[int, int], str]:
    """{(major, minor): file system type} of the mounts task pid sees."""
    out = {}
    try:
        text = procfs.read(f"/proc/{pid}/mountinfo")
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 3 and " - " in line:
            maj, _, mnr = fields[2].partition(":")
            out[(int(maj), int(mnr))] = line.split(" - ", 1)[1].split()[0]
    return out


def _data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    runs, pos = [], 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        if d >= size:
            break
        h = min(os.lseek(fd, d, os.SEEK_HOLE), size)
        runs.append((d, h - d))
        pos = h
    return runs


def collect(tasks: list[dict], files, dump_tmpfs: bool = False) -> list[dict]:
    """Find the tree's memfds and shared file objects, mark their fds and
    mappings, plan their content (blobs in `files.blobs`); returns the records
    (also kept as `files.shmem`)."""
    objs: dict[tuple, dict] = {}
    sources: dict[tuple, list[tuple[int, str]]] = {}
    fstypes: dict[int, dict] = {}

    def obj(key: tuple, kind: str, path: str) -> dict:
        o = objs.get(key)
        if o is None:
            o = objs[key] = {"id": len(objs), "kind": kind, "dev": f"{key[0]:x}:{key[1]:x}",
                             "ino": key[2]}
            if kind == "memfd":
                o["name"] = memfd_name(path)
            else:
                o["path"] = path[:-len(DELETED)] if kind == "deleted" else path
            sources[key] = []
        return o

    for t in tasks:
        pid = t["pid"]
        for m in t["mappings"]:
            kind = m["kind"]
            if kind == "memfd":
                okind = "memfd"
            elif kind == "file-shared" and m.get("deleted"):
                okind = "deleted"
            elif kind == "file-shared" and dump_tmpfs:
                if pid not in fstypes:
                    fstypes[pid] = _fstypes(pid)
                key = _map_key(m)
                if fstypes[pid].get(key[:2]) not in ("tmpfs", "ramfs"):
                    continue
                okind = "tmpfs"
            else:
                continue
            key = _map_key(m)
            o = obj(key, okind, m["path"])
            m["shmem"] = o["id"]
            if "ht" in m.get("vmflags", []):
                o["hugetlb"] = True      # (its page size: _describe)
            sources[key].append((pid, f"/proc/{pid}/map_files/{m['start']:x}-{m['end']:x}"))
    anon_objects = {_map_key(m) for t in tasks for m in t["mappings"]
                    if m["kind"] in ("anon-shared", "shmem-private")}
    for f in files.files:
        if f["kind"] != "regular":
            continue
        key = _file_key(f)
        if is_memfd_path(f["path"]) and f.get("deleted"):
            o = obj(key, "memfd", f["path"])
        elif f.get("deleted") and "proc" not in f and not open_breaks_lease(f.get("lease")) \
                and key not in anon_objects:
            # (an fd on a shared anonymous object a task maps, "/dev/zero
            # (deleted)" through map_files, is restore_ipc's: one memfd)
            # (under a lease an open would break: not read, refused as
            # fd:lease-deleted)
            # a deleted-but-open file: one object for all its open file
            # descriptions (same inode again) and private mappings
            o = obj(key, "deleted", f["path"])
        elif key in objs:
            o = objs[key]       # a deleted or tmpfs file that is also mapped shared
        else:
            continue
        f["shmem"] = o["id"]
        if "blob" in f:         # a deleted file's content: now the object's
            o["_blob"] = f.pop("blob")
        # an fd is the better source: /proc/PID/fd/N opens without root
        sources[key].insert(0, (f["owner_pid"], f"/proc/{f['owner_pid']}/fd/{f['owner_fd']}"))

    # A private mapping of a deleted file one of the fds above holds: mapped
    # from the object again, so writes through the fd show in its pages not
    # copied-on-write (its own copied pages are written on top).
    for t in tasks:
        for m in t["mappings"]:
            if m["kind"] == "file-private" and m.get("deleted") and m.get("shmem") is None:
                key = _map_key(m)
                if key in objs and objs[key]["kind"] == "deleted":
                    m["shmem"] = objs[key]["id"]
    out = sorted(objs.values(), key=lambda o: o["id"])
    for key, o in objs.items():
        _describe(o, sources[key], files)
    files.shmem = out
    return out


def _describe(o: dict, sources: list[tuple[int, str]], files) -> None:
    """Size, mode, owner, seals and the content's blob of object o."""
    fd, path, pid, err = -1, "", 0, ""
    for pid, path in sources:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            break
        except OSError as e:
            err = e.strerror or str(e)
    if fd < 0:
        o.setdefault("unsupported", f"its content cannot be read ({err}; mapped-only "
                                    "memfds and deleted files need root)")
        o.pop("_blob", None)
        return
    try:
        s = os.fstat(fd)
        o.update(size=s.st_size, mode=s.st_mode & 0o7777, uid=s.st_uid, gid=s.st_gid)
        if o["kind"] == "deleted":   # put back on the new file (content first)
            o.update(atime_ns=s.st_atime_ns, mtime_ns=s.st_mtime_ns)
            base = os.path.basename(o["path"])
            if base == f"#{o['ino']}":
                o["tmpfile"] = True      # made by O_TMPFILE, never named
        if s.st_blksize > os.sysconf("SC_PAGE_SIZE") or o.get("hugetlb"):
            # on hugetlbfs (MFD_HUGETLB, MAP_HUGETLB shared memory, a
            # hugetlbfs file): recreated as a hugetlb memfd of that page size
            o["hugetlb"] = s.st_blksize
        if o["kind"] == "memfd":
            try:
                o["seals"] = fcntl.fcntl(fd, F_GET_SEALS)
            except OSError:
                o["seals"] = F_SEAL_SEAL
        if "unsupported" in o:
            o.pop("_blob", None)
            return
        if "_blob" in o:
            o["blob"] = o.pop("_blob")
            return
        runs = _data_runs(fd, s.st_size)
    finally:
        os.close(fd)
    what = {"memfd": f"content of memfd {o.get('name')}",
            "deleted": f"content of deleted file {o.get('path')}",
            "tmpfs": f"content of tmpfs file {o.get('path')}"}[o["kind"]]
    o["blob"] = len(files.blobs)
    files.blobs.append(SegmentPlan(pid, 0, o["size"], "r--p", True, runs, src="file",
                                   src_path=path, src_offset=0, blob=what))
