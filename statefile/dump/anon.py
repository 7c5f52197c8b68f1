"""Anonymous-inode files: eventfd, epoll, timerfd, signalfd, inotify.

Their whole state is in /proc/PID/fdinfo, which this module parses into the
`anon` field of the file's CR_FILES entry.  inotify watches are named there by
file handle; they are turned back into paths here (open_by_handle_at, root
only), since a path is what a restart can watch again.  Restored by
restorer/restore/anon.py.

Two kinds need a look through a duplicate of the task's fd (pidfd_getfd: the
same open file, nothing consumed):

* timerfd: a periodic timer that expired while nobody read it counts only
  its first expiration in fdinfo (`ticks: 1`, `it_value: (0, 0)`) until it is
  read or timerfd_gettime'd; timerfd_gettime on the duplicate settles it (the
  kernel adds the expirations that elapsed and re-arms the timer, exactly
  what the task's next read would do, without consuming them), and fdinfo is
  read again: `ticks` is then the exact unread count and `value` the real
  time left to the next expiration;
* inotify: events queued but not read cannot be read without consuming them;
  their byte count (FIONREAD) is saved as `unread` and the checkpoint is
  refused (statefile/check/support.py, fd:inotify-unread).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re

from statefile.control import procfs

_libc = ctypes.CDLL(None, use_errno=True)
FIONREAD = 0x541B


class _itimerspec(ctypes.Structure):
    _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long),
                ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]


def _dup(pid: int, fd: int | None) -> int | None:
    """A duplicate of the task's fd (None when fd is unknown or it cannot be had)."""
    if fd is None:
        return None
    from statefile.control.ptrace import dup_fd_of
    try:
        return dup_fd_of(pid, fd)
    except OSError:
        return None


def _settle_timerfd(pid: int, fd: int | None) -> list[str] | None:
    """timerfd_gettime on a duplicate (counts the expirations a periodic timer
    missed while unread), then the task's fdinfo again; None when it failed."""
    dup = _dup(pid, fd)
    if dup is None:
        return None
    try:
        if _libc.timerfd_gettime(dup, ctypes.byref(_itimerspec())) < 0:
            return None
        return procfs.read(f"/proc/{pid}/fdinfo/{fd}").splitlines()
    finally:
        os.close(dup)


def _unread_bytes(pid: int, fd: int | None) -> int | None:
    """Bytes queued in an inotify instance (FIONREAD on a duplicate)."""
    dup = _dup(pid, fd)
    if dup is None:
        return None
    try:
        n = ctypes.c_int(0)
        if _libc.ioctl(dup, FIONREAD, ctypes.byref(n)) < 0:
            return None
        return n.value
    finally:
        os.close(dup)


class _kcmp_epoll_slot(ctypes.Structure):
    _fields_ = [("efd", ctypes.c_uint32), ("tfd", ctypes.c_uint32), ("toff", ctypes.c_uint32)]


KCMP_EPOLL_TFD = 7


def _epoll_sources(pid: int, epfd: int, targets: list[dict]) -> None:
    """Which fd of the task holds each watched file (`fd`; None when none
    does).  An epoll item is a (file, fd number) pair fixed when it was
    added: the number may since have been closed or hold another file, and
    several items may share a number (their `toff` tells them apart, in
    fdinfo's order).  kcmp(KCMP_EPOLL_TFD) says whether a fd of the task is
    an item's file; the candidates are the item's number first, then the fds
    with the item's inode."""
    from statefile.control.ptrace import NR_kcmp, syscall
    by_ino: dict[tuple[int, int], list[int]] | None = None
    seen: dict[int, int] = {}

    no_kcmp = False

    def same(cand: int, slot) -> bool:
        nonlocal no_kcmp
        try:
            return syscall(NR_kcmp, pid, pid, KCMP_EPOLL_TFD, cand, ctypes.byref(slot)) == 0
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.ENOENT, errno.EINVAL):
                no_kcmp = True      # (no kcmp here: the item's number, as before)
            return False
    for t in targets:
        toff = seen.get(t["tfd"], 0)
        seen[t["tfd"]] = toff + 1
        slot = _kcmp_epoll_slot(epfd, t["tfd"], toff)
        if same(t["tfd"], slot):
            t["fd"] = t["tfd"]
            continue
        if no_kcmp:
            t["fd"] = t["tfd"]
            continue
        if by_ino is None:
            by_ino = {}
            for name in os.listdir(f"/proc/{pid}/fd"):
                try:
                    st_ = os.stat(f"/proc/{pid}/fd/{name}")
                except OSError:
                    continue
                by_ino.setdefault((st_.st_ino, os.major(st_.st_dev), os.minor(st_.st_dev)),
                                  []).append(int(name))
        key = (t["ino"], t["sdev"] >> 20, t["sdev"] & 0xFFFFF)
        t["fd"] = next((c for c in sorted(by_ino.get(key, [])) if same(c, slot)), None)


def _fields(line: str) -> dict[str, str]:
    """'tfd:  3 events: 19 data: 3 ...' -> {'tfd': '3', 'events': '19', ...}"""
    return dict(re.findall(r"([\w-]+):\s*(\S+)", line))


def parse(kind: str, lines: list[str], pid: int, fd: int | None = None) -> dict | None:
    """The `anon` state of the task's fd (fd None: from fdinfo `lines` alone,
    without the timerfd settling and the inotify queue check)."""
    if kind == "anon:timerfd":
        lines = _settle_timerfd(pid, fd) or lines
    kv = {}
    for line in lines:
        k, _, v = line.partition(":")
        kv.setdefault(k.strip(), v.strip())
    if kind == "anon:eventfd":
        return {"count": int(kv.get("eventfd-count", "0"), 16),   # printed in hex
                "semaphore": kv.get("eventfd-semaphore", "0") == "1"}
    if kind == "anon:eventpoll":
        targets = []
        for line in lines:
            if line.startswith("tfd:"):
                f = _fields(line)
                targets.append({"tfd": int(f["tfd"]), "events": int(f["events"], 16),
                                "data": int(f["data"], 16),
                                "ino": int(f.get("ino", "0"), 16),
                                "sdev": int(f.get("sdev", "0"), 16)})
        if fd is not None:
            _epoll_sources(pid, fd, targets)
        for t in targets:
            del t["ino"], t["sdev"]
        return {"targets": targets}
    if kind == "anon:timerfd":
        def pair(text):
            a, b = (int(x) for x in text.strip("()").split(","))
            return [a, b]
        return {"clockid": int(kv.get("clockid", "1")), "ticks": int(kv.get("ticks", "0")),
                "settime_flags": int(kv.get("settime flags", "0"), 8),
                "value": pair(kv.get("it_value", "(0, 0)")),
                "interval": pair(kv.get("it_interval", "(0, 0)"))}
    if kind == "anon:signalfd":
        return {"sigmask": int(kv.get("sigmask", "0"), 16)}
    if kind == "anon:inotify":
        watches = []
        for line in lines:
            if line.startswith("inotify "):
                f = _fields(line[len("inotify "):])
                w = {"wd": int(f["wd"], 16), "ino": int(f["ino"], 16),
                     "mask": int(f["mask"], 16), "ignored_mask": int(f["ignored_mask"], 16)}
                target = _handle_target(pid, int(f["sdev"], 16), int(f["fhandle-type"], 16),
                                        bytes.fromhex(f["f_handle"]))
                w["path"] = None if target is None or target.endswith(" (deleted)") else target
                if target is not None and target.endswith(" (deleted)"):
                    # a file deleted since: restorable through an fd of the
                    # tree still open on it (support.assess sets `file`)
                    w["deleted"] = target[:-len(" (deleted)")]
                    w["sdev"] = int(f["sdev"], 16)
                watches.append(w)
        out = {"watches": watches}
        unread = _unread_bytes(pid, fd)
        if unread:
            out["unread"] = unread
        return out
    return None


class _file_handle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def _handle_path(pid: int, sdev: int, htype: int, handle: bytes) -> str | None:
    """Path of the inode an inotify watch names (None when it cannot be found
    or was deleted)."""
    target = _handle_target(pid, sdev, htype, handle)
    return None if target is None or target.endswith(" (deleted)") else target


def _handle_target(pid: int, sdev: int, htype: int, handle: bytes) -> str | None:
    """The /proc link text of the inode a watch or mark names (None when it
    cannot be opened)."""
    major, minor = sdev >> 20, sdev & 0xFFFFF
    mount = None
    for line in procfs.read(f"/proc/{pid}/mountinfo").splitlines():
        f = line.split()
        if f[2] == f"{major}:{minor}":
            mount = f"/proc/{pid}/root{f[4]}"
            break
    if mount is None:
        return None
    try:
        mfd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fh = _file_handle(len(handle), htype)
        ctypes.memmove(fh.f_handle, handle, len(handle))
        fd = _libc.open_by_handle_at(mfd, ctypes.byref(fh), os.O_PATH)
        if fd < 0:
            return None
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    finally:
        os.close(mfd)
