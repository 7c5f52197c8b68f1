"""fanotify groups (statefile/dump/fanotify.py): created again by the task
that holds them (in child_setup): fanotify_init with the saved flags; then,
once every fd and mapped file of the task is in place (finish_fanotify, with
inotify's watches), every mark added on its path (inode marks on the file,
mount marks on the mount point, filesystem marks on a mount of the file
system), with its mask and its ignored mask.  Marks added before would queue
the restorer's own opens of the task's files (its executable and libraries,
reported with the program's own pid) as events the program never caused."""

from __future__ import annotations

import ctypes
import os

from statefile.format.records import FanotifyFile, FanotifyState, FdRef, File

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]

KIND = "anon:fanotify"
FAN_CLOEXEC = 0x1
FAN_MARK_ADD, FAN_MARK_MOUNT, FAN_MARK_IGNORED_MASK = 0x1, 0x10, 0x20
FAN_MARK_FILESYSTEM = 0x100
FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_EVICTABLE, FAN_MARK_IGNORE = 0x40, 0x200, 0x400
AT_FDCWD = -100
_TYPE_FLAGS = {"inode": 0, "mount": FAN_MARK_MOUNT, "filesystem": FAN_MARK_FILESYSTEM}


class FanotifyError(OSError):
    pass


def open_fanotify(f: FanotifyFile) -> int:
    """The group, without its marks (finish_fanotify adds them)."""
    rec = f.anon
    fd = _libc.fanotify_init(rec.flags & ~FAN_CLOEXEC, rec.event_flags)
    if fd < 0:
        e = ctypes.get_errno()
        raise FanotifyError(e, f"fanotify_init: {os.strerror(e)}")
    return fd


def add_marks(fd: int, rec: FanotifyState) -> None:
    for m in reversed(rec.marks):   # (fdinfo lists the newest first)
        base = FAN_MARK_ADD | _TYPE_FLAGS[m.type] | m.mflags & FAN_MARK_EVICTABLE
        ignore = FAN_MARK_IGNORE if m.mflags & FAN_MARK_IGNORE else FAN_MARK_IGNORED_MASK
        ignore |= m.mflags & (FAN_MARK_IGNORED_SURV_MODIFY | FAN_MARK_EVICTABLE)
        for flags, mask in ((base, m.mask), (base | ignore, m.ignored_mask)):
            if not mask:
                continue
            if m.path is None:
                raise FanotifyError(0, f"fanotify mark on inode {m.ino}: its path was not found "
                                    "at checkpoint")
            if _libc.fanotify_mark(fd, flags, mask, AT_FDCWD, m.path.encode()) < 0:
                e = ctypes.get_errno()
                raise FanotifyError(e, f"fanotify mark on {m.path}: {os.strerror(e)}")


def finish_fanotify(fds: list[FdRef], files: list[File]) -> None:
    """Every group's marks, once every fd and mapped file of the task is in
    place (so that setting those up queues no event); a group open on
    several fds gets its marks once."""
    done = set()
    for d in fds:
        f = files[d.file]
        if not isinstance(f, FanotifyFile) or d.file in done:
            continue
        done.add(d.file)
        add_marks(d.fd, f.anon)
