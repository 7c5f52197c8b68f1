"""File descriptors and the open file descriptions behind them.

Every fd of every task points to an entry of one tree-wide table of open file
descriptions (the CR_FILES note): fds that share a description (dup, fork,
SCM_RIGHTS) share the entry, found with kcmp(KCMP_FILE).  Regular files keep
path, flags, offset and identity (dev, inode, size, mtime) so a restart can
detect a changed file; the content of a deleted-but-open file is stored in a
blob segment.  Restored by restorer/restore_files.py.
"""

from __future__ import annotations

import os
import stat as st

from . import procfs
from . import ptrace as pt
from .dump_memory import SegmentPlan

TTY_MAJORS = {4, 5} | set(range(136, 144))


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
    return "other"


class FileTable:
    """Open file descriptions of the whole tree, deduplicated with kcmp."""

    def __init__(self):
        self.files: list[dict] = []
        self._by_ident: dict[tuple, list[int]] = {}
        self.blobs: list[SegmentPlan] = []

    def _same_as(self, pid: int, fd: int, ident: tuple) -> int | None:
        for fid in self._by_ident.get(ident, []):
            f = self.files[fid]
            try:
                if pt.kcmp_file(f["owner_pid"], pid, f["owner_fd"], fd) == 0:
                    return fid
            except OSError:
                # kcmp unavailable: fall back to identity + offset + flags.
                return None
        return None

    def dump_fds(self, pid: int) -> list[dict]:
        fds = []
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
                fid = len(self.files)
                kind = _kind(target, s.st_mode, s.st_rdev)
                deleted = target.endswith(" (deleted)") and s.st_nlink == 0
                entry = {
                    "id": fid, "kind": kind, "path": target,
                    "flags": flags & ~0o2000000,  # O_CLOEXEC belongs to the fd
                    "pos": int(info.get("pos", "0")), "mode": s.st_mode,
                    "dev": s.st_dev, "ino": s.st_ino, "rdev": s.st_rdev,
                    "size": s.st_size, "mtime_ns": s.st_mtime_ns, "nlink": s.st_nlink,
                    "deleted": deleted, "mnt_id": int(info.get("mnt_id", "0")),
                    "owner_pid": pid, "owner_fd": fd,
                }
                extra = {k: v for k, v in info.items()
                         if k not in ("pos", "flags", "mnt_id", "ino")}
                if extra:
                    entry["fdinfo"] = extra
                if kind == "regular" and deleted:
                    self._blob_deleted(pid, fd, entry)
                self.files.append(entry)
                self._by_ident.setdefault(ident, []).append(fid)
            fds.append({"fd": fd, "file": fid, "cloexec": bool(flags & 0o2000000)})
        return fds

    def _blob_deleted(self, pid: int, fd: int, entry: dict) -> None:
        """Keep the content of a deleted-but-open file (sparse, by SEEK_DATA)."""
        path = f"/proc/{pid}/fd/{fd}"
        size = entry["size"]
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
        entry["blob"] = len(self.blobs)
        self.blobs.append(SegmentPlan(pid, 0, size, "r--p", True, runs, src="file",
                                      src_path=path, src_offset=0,
                                      blob=f"content of deleted file {entry['path']}"))
