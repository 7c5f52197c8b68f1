"""File descriptors and the open file descriptions behind them.

Every fd of every task points to an entry of one tree-wide table of open file
descriptions (the CR_FILES note): fds that share a description (dup, fork,
SCM_RIGHTS) share the entry, found with kcmp(KCMP_FILE).  Regular files keep
path, flags, offset and identity (dev, inode, size, mtime) so a restart can
detect a changed file; the content of a deleted-but-open file is stored in a
blob segment.  Restored by restorer/restore/files.py.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat as st

from statefile.dump import (anon as dump_anon, bpf as dump_bpf, fanotify as dump_fanotify,
                            locks as dump_locks, pidfd as dump_pidfd, pipes as dump_pipes,
                            scm as dump_scm, sockets as dump_sockets, tty as dump_tty,
                            unix as dump_unix)
from statefile.control import procfs
from statefile.control import ptrace as pt
from statefile.dump.memory import SegmentPlan
from statefile.format import records

TTY_MAJORS = {4, 5} | set(range(136, 144))
PROC_SUPER_MAGIC = 0x9FA0
NS_LINK = re.compile(r"^(\w+):\[(\d+)\]$")     # an nsfs file: "net:[4026531833]"
DELETED = " (deleted)"
_libc = ctypes.CDLL(None, use_errno=True)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def fs_magic(path: str) -> int:
    """statfs(path).f_type (0 if it cannot be told)."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return 0
    return buf.f_type & 0xFFFFFFFF


def _proc_mounts(pid: int) -> list[str]:
    """Mount points of procfs as task pid sees them, longest first."""
    out = []
    try:
        for line in procfs.read(f"/proc/{pid}/mountinfo").splitlines():
            fields = line.split()
            if " - " in line and line.split(" - ", 1)[1].split()[0] == "proc":
                out.append(fields[4])
    except OSError:
        pass
    return sorted(out, key=len, reverse=True)


def proc_ref(pid: int, link: str, how: str) -> dict | None:
    """A file or directory on procfs (`how`: /proc/PID/fd/N or /proc/PID/cwd)
    under a pid's directory: {"mount", "pid", "rest", "dead"}.  A restart opens
    it again for the restored process of that pid (restorer/restore/files.py),
    or, for a process that had exited ("dead": the link ends in " (deleted)"),
    from a short-lived helper process."""
    if not link.startswith("/") or fs_magic(how) != PROC_SUPER_MAGIC:
        return None
    dead = link.endswith(DELETED)
    path = link[:-len(DELETED)] if dead else link
    for mnt in _proc_mounts(pid):
        if path == mnt or path.startswith(mnt.rstrip("/") + "/"):
            rest = path[len(mnt.rstrip("/")):].lstrip("/")
            first, _, tail = rest.partition("/")
            if first.isdigit():
                return {"mount": mnt, "pid": int(first), "rest": tail, "dead": dead}
            return None
    return None


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400


def file_handle(path: str) -> dict | None:
    """name_to_handle_at of what path leads to: {"type", "handle" (hex),
    "mount_id"}, or None when the file system cannot give one."""
    fh = _FileHandle(handle_bytes=128)
    mnt = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(fh),
                               ctypes.byref(mnt), AT_SYMLINK_FOLLOW) != 0:
        return None
    return {"type": fh.handle_type, "handle": bytes(fh.f_handle[:fh.handle_bytes]).hex(),
            "mount_id": mnt.value}


def ns_link(pid: int, link: str) -> dict | None:
    """An fd on a namespace (nsfs): its kind, inode and which of the task's own
    /proc/PID/ns/* it is ("name"; None: a namespace the task is not in)."""
    m = NS_LINK.match(link)
    if not m:
        return None
    name = None
    try:
        for n in sorted(os.listdir(f"/proc/{pid}/ns")):
            try:
                if os.readlink(f"/proc/{pid}/ns/{n}") == link:
                    name = n if name is None or n == m.group(1) else name
            except OSError:
                continue
    except OSError:
        pass
    return {"type": m.group(1), "ino": int(m.group(2)), "name": name}


def _kind(target: str, mode: int, rdev: int) -> str:
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("anon_inode:"):
        name = target[len("anon_inode:"):].strip("[]")
        return f"anon:{name}"
    if st.S_ISFIFO(mode):
        return "fifo"
    if st.S_ISDIR(mode):
        return "directory"
    if st.S_ISCHR(mode):
        return "tty" if os.major(rdev) in TTY_MAJORS else "chr"
    if st.S_ISBLK(mode):
        return "blk"
    if st.S_ISREG(mode):
        return "regular"
    if st.S_ISLNK(mode):
        return "symlink"        # an O_PATH|O_NOFOLLOW fd on a symbolic link
    return "other"


def link_target(pid: int, fd: int) -> str | None:
    """What the symbolic link behind task pid's (O_PATH) fd points to:
    readlinkat(fd, "") on a duplicate of it, or None."""
    try:
        dup = pt.dup_fd_of(pid, fd)
    except OSError:
        return None
    try:
        return os.readlink("", dir_fd=dup)
    except OSError:
        return None
    finally:
        os.close(dup)


class FileTable:
    """Open file descriptions of the whole tree, deduplicated with kcmp."""

    def __init__(self):
        self.files: list[dict] = []
        self._by_ident: dict[tuple, list[int]] = {}
        self.blobs: list[SegmentPlan] = []
        self.pipes = dump_pipes.PipeTable()   # pipe/FIFO records, bytes in flight
        self.shmem: list[dict] = []             # memfds and shared file objects (dump_memfd)
        self.task_locks: dict[int, list[dict]] = {}   # pid -> its POSIX locks (dump_locks)
        self._diag: dict | None = None
        self.scm = dump_scm.InFlight()          # fds in flight in unix sockets (dump_scm)
        self.fds_of: dict[int, list[dict]] = {}   # pid -> its fds (dump_fds)

    def unix_diag(self) -> dict:
        """sock_diag's view of every unix socket, taken once per checkpoint."""
        if self._diag is None:
            self._diag = dump_unix.unix_diag()
        return self._diag

    def _same_as(self, pid: int, fd: int, ident: tuple) -> int | None:
        """The entry fd's open file description already has, or None.

        Entries of one inode are kept sorted in kcmp's order (kcmp also says
        less/greater), so a binary search finds a match: 10000 opens of one
        file cost 10000 log 10000 kcmp calls, not 10000 squared."""
        fids = self._by_ident.setdefault(ident, [])
        lo, hi = 0, len(fids)
        while lo < hi:
            mid = (lo + hi) // 2
            f = self.files[fids[mid]]
            try:
                r = pt.kcmp_file(f["owner_pid"], pid, f["owner_fd"], fd)
            except OSError:
                r = 1  # kcmp unavailable: treat as a description of its own
            if r == 0:
                return fids[mid]
            if r == 1:  # the saved one sorts before fd's
                lo = mid + 1
            else:
                hi = mid
        self._insert_at = lo
        return None

    def dump_fds(self, pid: int) -> list[dict]:
        fds = []
        posix = self.task_locks.setdefault(pid, [])
        for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            fd = int(name)
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                info = procfs.fdinfo(pid, fd)
                s = os.stat(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            flags = int(info.get("flags", "0"), 8)
            ident = (s.st_dev, s.st_ino)
            fid = self._same_as(pid, fd, ident)
            if fid is None:
                fid = self._add(pid, fd, target, info, s, ident, posix)
            else:
                dump_locks.add_fd(self, posix, self.files[fid], fid, pid, fd, info, False)
            fds.append({"fd": fd, "file": fid, "cloexec": bool(flags & 0o2000000)})
        self.fds_of[pid] = fds
        return fds

    def _add(self, pid: int, fd: int, target: str, info: dict, s: os.stat_result,
             ident: tuple, posix: list) -> int:
        """A new entry for task pid's fd (a description not seen yet); its id."""
        fid = len(self.files)
        flags = int(info.get("flags", "0"), 8)
        kind = _kind(target, s.st_mode, s.st_rdev)
        deleted = target.endswith(" (deleted)") and s.st_nlink == 0
        entry = {
            "id": fid, "kind": kind, "path": target,
            "flags": flags & ~0o2000000,  # O_CLOEXEC belongs to the fd
            "pos": int(info.get("pos", "0")), "mode": s.st_mode,
            "dev": s.st_dev, "ino": s.st_ino, "rdev": s.st_rdev,
            "size": s.st_size, "mtime_ns": s.st_mtime_ns, "nlink": s.st_nlink,
            "atime_ns": s.st_atime_ns, "uid": s.st_uid, "gid": s.st_gid,
            "deleted": deleted, "mnt_id": int(info.get("mnt_id", "0")),
            "owner_pid": pid, "owner_fd": fd,
        }
        extra = {k: v for k, v in info.items()
                 if k not in ("pos", "flags", "mnt_id", "ino", "lock")}
        if extra:
            entry["fdinfo"] = extra
        # locks and owner first: whether its content may be read (dump_locks)
        dump_locks.add_fd(self, posix, entry, fid, pid, fd, info, True)
        if kind == "socket":
            entry["socket"] = dump_sockets.socket_info(pid, fd, self.unix_diag, self.scm)
        if kind in ("pipe", "fifo"):
            self.pipes.add(self, entry, pid, fd)
        if kind == "symlink":
            entry["symlink"] = link_target(pid, fd)
            if fs_magic(f"/proc/{pid}/fd/{fd}") == PROC_SUPER_MAGIC:
                entry["proc_link"] = True      # (support: fd:symlink-proc)
        if kind == "tty":     # a pty master or slave gets its `pty` record
            dump_tty.add(entry, pid, fd)
        if kind.startswith("anon:"):
            anon = dump_anon.parse(
                kind, procfs.read(f"/proc/{pid}/fdinfo/{fd}").splitlines(), pid, fd)
            if anon is not None:
                entry["anon"] = anon
        if kind == "anon:pidfd":
            rec = dump_pidfd.parse(info, s.st_ino)
            if rec is not None:
                entry["pidfd"] = rec
        if kind == "anon:fanotify":
            entry["anon"] = dump_fanotify.parse(
                pid, fd, procfs.read(f"/proc/{pid}/fdinfo/{fd}").splitlines())
        if kind == "anon:bpf-map":
            entry["bpf"] = dump_bpf.parse(pid, fd, info)
        # (the content of a deleted file or memfd is saved once per
        # object, for every fd and mapping of it: statefile/dump/memfd.py)
        if kind in ("regular", "directory"):
            proc = proc_ref(pid, target, f"/proc/{pid}/fd/{fd}")
            if proc is not None:
                entry["proc"] = proc
        if kind == "regular" and "proc" not in entry:
            ns = ns_link(pid, target)
            if ns is not None:
                entry["nsfs"] = ns
            elif target.endswith(DELETED) and not deleted and s.st_nlink > 0:
                # its name was removed, other hard links keep it: opened
                # again through a file handle (same inode)
                # (open_by_handle_at needs root: none saved otherwise)
                entry["linked"] = (file_handle(f"/proc/{pid}/fd/{fd}")
                                   if os.geteuid() == 0 else None) or {}
        self.files.append(entry)
        self._by_ident[ident].insert(self._insert_at, fid)
        return fid

    def dump_cwd(self, task: dict) -> None:
        """A working directory that was removed (rmdir), or that is the /proc
        directory of a process that exited: `cwd_ghost`, what a restart needs
        to make one again (restorer/restore/files.py)."""
        pid, link = task["pid"], task.get("cwd") or ""
        if not link.endswith(DELETED):
            return
        try:
            s = os.stat(f"/proc/{pid}/cwd")
        except OSError:
            return
        g = {"path": link, "dev": s.st_dev, "ino": s.st_ino, "mode": s.st_mode,
             "uid": s.st_uid,
             "gid": s.st_gid, "atime_ns": s.st_atime_ns, "mtime_ns": s.st_mtime_ns}
        proc = proc_ref(pid, link, f"/proc/{pid}/cwd")
        if proc is not None:
            g["proc"] = proc
        task["cwd_ghost"] = g

    def add_blob(self, entry, what: str) -> None:
        """Keep the content of an open file (sparse, by SEEK_DATA) in a blob
        segment: `entry` a dict of the dump side, or a record (a tmpfs file's,
        dump_tmpfs_contents)."""
        if isinstance(entry, dict):
            pid, fd, size = entry["owner_pid"], entry["owner_fd"], entry["size"]
        else:
            pid, fd, size = entry.owner_pid, entry.owner_fd, entry.size
        path = f"/proc/{pid}/fd/{fd}"
        runs, pos = [], 0
        with open(path, "rb") as f:
            while pos < size:
                try:
                    d = os.lseek(f.fileno(), pos, os.SEEK_DATA)
                except OSError:
                    break
                h = min(os.lseek(f.fileno(), d, os.SEEK_HOLE), size)
                runs.append((d, h - d))
                pos = h
        if isinstance(entry, dict):
            entry["blob"] = len(self.blobs)
        else:
            entry.blob = len(self.blobs)
        self.blobs.append(SegmentPlan(pid, 0, size, "r--p", True, runs, src="file",
                                      src_path=path, src_offset=0,
                                      blob=what))

    def dump_tmpfs_contents(self) -> None:
        """Policy dump_tmpfs: keep the content of regular files on tmpfs (/dev/shm...);
        the files are records by then (statefile/checkpoint.py)."""
        for entry in self.files:
            if isinstance(entry, records.RegularFile) and entry.blob is None \
                    and entry.shmem is None and not dump_locks.open_breaks_lease(entry.lease) \
                    and fstype(entry.owner_pid, entry.mnt_id) in ("tmpfs", "ramfs"):
                self.add_blob(entry, f"content of tmpfs file {entry.path}")


def fstype(pid: int, mnt_id: int) -> str:
    """File system type of mount mnt_id as task pid sees it (/proc/PID/mountinfo)."""
    for line in procfs.read(f"/proc/{pid}/mountinfo").splitlines():
        fields = line.split()
        if fields and int(fields[0]) == mnt_id and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return ""
