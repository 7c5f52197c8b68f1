"""Anonymous-inode files: eventfd, epoll, timerfd, signalfd, inotify.

Created by the restored task itself (in child_setup, before it parks) from the
`anon` field statefile/dump/anon.py saved:

* eventfd: the counter value (any 64-bit value: written, not passed to
  eventfd()) and semaphore mode;
* timerfd: clock, remaining time and interval (relative: the remaining time
  counts from the restart, the time the tree spent checkpointed does not
  count), then the expirations not yet read (TFD_IOC_SET_TICKS, after
  timerfd_settime, which clears them): the first read after the restart
  returns the saved count, plus any expiration of the restored timer itself
  that fell due since the restart;
* signalfd: its signal mask;
* epoll: created empty; once every fd of the task is in place, each watched
  file is added back with its events and data under the fd number it was
  added with (finish_epoll), also when that number was closed since or holds
  another file now;
* inotify: created empty; once every fd and mapped file of the task is in
  place (finish_inotify), each watch added again on its path (a file deleted
  since: on its inode through the task's fd still open on it) with its mask, with the same
  watch descriptor numbers (the counter is advanced with throw-away watches
  where the original had gaps); events queued at the checkpoint are never
  in a statefile (crcheckpoint refuses them: fd:inotify-unread).
"""

from __future__ import annotations

import ctypes
import os

from msgspec import UNSET

from statefile.format.records import (EpollFile, EventfdFile, FdRef, File, InotifyFile,
                                      SignalfdFile, TimerfdFile)

_libc = ctypes.CDLL(None, use_errno=True)

KINDS = ("anon:eventfd", "anon:eventpoll", "anon:timerfd", "anon:signalfd", "anon:inotify")
EPOLL_CTL_ADD = 1
TFD_IOC_SET_TICKS = 0x40085400   # _IOW('T', 0, u64)


class AnonError(OSError):
    pass


def _check(res: int, what: str) -> int:
    if res < 0:
        e = ctypes.get_errno()
        raise AnonError(e, f"{what}: {os.strerror(e)}")
    return res


class itimerspec(ctypes.Structure):
    _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long),
                ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]


class epoll_event(ctypes.Structure):
    _pack_ = 1  # x86-64 packs struct epoll_event (12 bytes)
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


assert ctypes.sizeof(epoll_event) == 12


def open_anon(f: File) -> int:
    nonblock = f.flags & os.O_NONBLOCK
    match f:
        case EventfdFile(anon=a):
            flags = (os.EFD_SEMAPHORE if a.semaphore else 0) | (os.EFD_NONBLOCK if nonblock else 0)
            fd = os.eventfd(0, flags)
            if a.count:          # eventfd() takes an unsigned int; the counter is 64-bit
                os.eventfd_write(fd, a.count)
            return fd
        case TimerfdFile(anon=a):
            fd = _check(_libc.timerfd_create(a.clockid, os.O_NONBLOCK if nonblock else 0),
                        "timerfd_create")
            value = a.value
            if value == [0, 0] and a.interval != [0, 0]:
                value = [0, 1]  # a periodic timer is always armed: next expiration due now
            spec = itimerspec(a.interval[0], a.interval[1], value[0], value[1])
            _check(_libc.timerfd_settime(fd, 0, ctypes.byref(spec), None), "timerfd_settime")
            if a.ticks:
                ticks = ctypes.c_uint64(a.ticks)
                _check(_libc.ioctl(fd, TFD_IOC_SET_TICKS, ctypes.byref(ticks)),
                       "timerfd ioctl(TFD_IOC_SET_TICKS)")
            return fd
        case SignalfdFile(anon=a):
            mask = ctypes.c_uint64(a.sigmask)
            return _check(_libc.signalfd(-1, ctypes.byref(mask),
                                         os.O_NONBLOCK if nonblock else 0), "signalfd")
        case EpollFile():
            return _check(_libc.epoll_create1(0), "epoll_create1")
        case InotifyFile():
            # its watches come once every fd of the task is in place (finish_inotify)
            return _check(_libc.inotify_init1(os.O_NONBLOCK if nonblock else 0),
                          "inotify_init1")
    raise AnonError(0, f"{f.kind} is not restored")


def finish_inotify(fds: list[FdRef], files: list[File]) -> None:
    """Add every inotify instance's watches back with their numbers, once
    every fd and mapped file of the task is in place (so that setting those
    up queues no event), a watch on a file deleted since on that inode
    through the task's fd still open on it (/proc/self/fd/N)."""
    fd_of = {}
    for d in fds:
        fd_of.setdefault(d.file, d.fd)
    for d in fds:
        f = files[d.file]
        if not isinstance(f, InotifyFile):
            continue
        fd, next_wd = d.fd, 1
        for w in sorted(f.anon.watches, key=lambda w: w.wd):
            path = w.path
            if not path and w.file in fd_of:
                path = f"/proc/self/fd/{fd_of[w.file]}"
            if not path:
                raise AnonError(0, f"inotify watch {w.wd}: its file was not found at "
                                "checkpoint")
            while next_wd < w.wd:  # the original had removed watches here
                tmp = _check(_libc.inotify_add_watch(fd, b"/", 0x100), "inotify_add_watch")
                _libc.inotify_rm_watch(fd, tmp)
                next_wd = tmp + 1
            wd = _check(_libc.inotify_add_watch(fd, path.encode(), w.mask),
                        f"inotify_add_watch {path}")
            if wd != w.wd:
                raise AnonError(0, f"inotify watch on {path} got wd {wd}, not {w.wd}")
            next_wd = wd + 1


def finish_epoll(fds: list[FdRef], files: list[File]) -> None:
    """Add every epoll instance's watched files back, now that all fds are in
    place.  An item is added under the fd number it had (`tfd`); when that
    number does not hold the item's file now (the original closed it or put
    another file there), the file (at `fd`) is put at that number for the
    epoll_ctl only, and the number given back what it held."""
    cloexec = {d.fd: d.cloexec for d in fds}
    for d in fds:
        f = files[d.file]
        if not isinstance(f, EpollFile):
            continue
        for t in f.anon.targets:
            ev = epoll_event(t.events, t.data)
            tfd, src = t.tfd, (t.tfd if t.fd is UNSET else t.fd)
            if src is None:
                raise AnonError(0, f"epoll fd {d.fd}: the file watched as fd {tfd} "
                                "was not open in the task")
            epoll_add_as(d.fd, src, tfd, ev, cloexec.get(tfd, False))


def epoll_add_as(epfd: int, src: int, tfd: int, ev, cloexec: bool) -> None:
    """epoll_ctl(ADD) of the file at `src` under fd number `tfd`: put there
    for the call only when it is elsewhere, and the number given back what
    it held (with its close-on-exec flag `cloexec`)."""
    import fcntl
    saved = None
    if src != tfd:
        try:
            saved = fcntl.fcntl(tfd, fcntl.F_DUPFD_CLOEXEC, 3)
        except OSError:
            saved = None
        _room_for(tfd)
        os.dup2(src, tfd)
    try:
        _check(_libc.epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, ctypes.byref(ev)),
               f"epoll_ctl(ADD fd {tfd})")
    finally:
        if src != tfd:
            if saved is not None:
                os.dup2(saved, tfd, inheritable=not cloexec)
                os.close(saved)
            else:
                os.close(tfd)


def _room_for(fd: int) -> None:
    """Let fd number `fd` be used (RLIMIT_NOFILE raised if it is below it: the
    saved limits are set again afterwards, restore_files' rlimits step)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if fd >= soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd + 1, max(hard, fd + 1)))
        except (OSError, ValueError):
            pass
