"""Pseudo-terminal pairs of the tree (statefile/dump/tty.py): the initiator
makes one new pair per saved pair, the tasks inherit its ends like pipes, and
each session leader whose controlling terminal it was takes it again.

1. `open_ptys` (initiator, from restore_tree.open_shared): per saved pair,
   open /dev/ptmx, unlock it, set the saved termios and window size through
   the master (both act on the slave), packet mode; one master fd for the
   master's open file description, one slave open (TIOCGPTPEER) per saved
   slave description with its flags, and one more slave fd for the session
   leader that makes it its controlling terminal (key `ctty_key(index)`).  A
   master whose slave was closed gets its slave opened and closed once, so a
   read on it sees EIO as before.  The bytes that were queued in the pair
   (`pty_queue`) go back with statefile/dump/tty.py put_back, the code the
   checkpoint put them back with (TIOCSTI: crrestart must be root).  A saved
   lock is put back last.
2. `plan_ctty` (initiator): which task takes which pair as controlling
   terminal, and the saved foreground process group.
3. `take_ctty` (in the session leader, before it parks, after its subtree is
   forked so every process group of the session exists): TIOCSCTTY, then
   TIOCSPGRP to the saved foreground group.

The new pair has the number the kernel gives it: /dev/pts/N of the
checkpoint may be /dev/pts/M now (a warning says so).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import termios

from msgspec import UNSET

from statefile.dump.tty import put_back
from statefile.format.records import (File, PtyInfo, PtyMasterFile, PtyQueue, PtySlaveFile,
                                      TaskNote)

from restorer.errors import RestoreError
from restorer.kernel import close_all

TIOCSPTLCK = 0x40045431
TIOCGPTN = 0x80045430
TIOCGPTPEER = 0x5441
TIOCPKT = 0x5420
TIOCSCTTY = 0x540E
O_ACCMODE = 3
SETFL_MASK = os.O_NONBLOCK | os.O_APPEND | 0o20000
KINDS = ("pty-master", "pty-slave")


def ctty_key(index: int) -> int:
    """The key (in the {file id: fd} map tasks inherit) of the extra slave fd a
    session leader uses to take pair `index` as its controlling terminal."""
    return -(1 << 24) - index


def _pairs(files: list[File], used: set[int]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for f in files:
        if isinstance(f, (PtyMasterFile, PtySlaveFile)) and f.id in used:
            p = out.setdefault(f.pty.index, {"info": f.pty, "master": None, "slaves": []})
            if isinstance(f, PtyMasterFile):
                p["master"] = f
                p["info"] = f.pty
            else:
                p["slaves"].append(f)
    return out


def _ctty_of(task: TaskNote, pairs: dict[int, dict]) -> int | None:
    """The saved pair index whose slave was this session leader's controlling
    terminal, or None."""
    if task.sid != task.pid:
        return None
    for i, p in pairs.items():
        if p["info"].sid == task.pid and p["master"] is not None:
            return i
    return None


def plan_ctty(tasks: list[TaskNote], files: list[File], plans: dict) -> None:
    """Tell each session leader's plan which inherited fd to take as its
    controlling terminal, and the foreground process group to give it."""
    used = {d.file for t in tasks for d in t.fds}
    pairs = _pairs(files, used)
    for t in tasks:
        i = _ctty_of(t, pairs)
        if i is not None and t.pid in plans:
            fg = pairs[i]["info"].fg_pgrp
            plans[t.pid].ctty = ctty_key(i)
            plans[t.pid].fg_pgrp = None if fg is UNSET else fg or None


def _setfl(fd: int, flags: int) -> None:
    cur = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = (cur & ~SETFL_MASK) | (flags & SETFL_MASK)
    if want != cur:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)


def _open_slave(master: int, flags: int) -> int:
    how = (flags & (O_ACCMODE | os.O_NONBLOCK)) | os.O_NOCTTY | os.O_CLOEXEC
    try:
        return fcntl.ioctl(master, TIOCGPTPEER, how)
    except OSError:   # older kernel: by path
        n = struct.unpack("i", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
        return os.open(f"/dev/pts/{n}", how)


def _put_back(master: int, info: PtyInfo, q: PtyQueue) -> None:
    """The bytes that were queued in the pair (statefile/dump/tty.py
    `pty_queue`), put back as they were, through a slave opened for it (by
    the checkpoint's own code, which takes the records it saved)."""
    slave = None if info.slave_closed else _open_slave(master, os.O_RDWR | os.O_NONBLOCK)
    try:
        put_back(master, slave, info.termios, q)
    except OSError as e:
        if e.errno == errno.EPERM:
            raise RestoreError("pseudo-terminals", f"pty {info.index}: putting back the "
                               "bytes queued in it needs CAP_SYS_ADMIN (TIOCSTI): restart "
                               "as root") from None
        raise
    finally:
        if slave is not None:
            os.close(slave)


def _make_pair(p: dict, ctty: bool, warnings: list[str]) -> dict[int, int]:
    info, m = p["info"], p["master"]
    mflags = m.flags if m is not None else os.O_RDWR
    master = os.open("/dev/ptmx", (mflags & O_ACCMODE) | os.O_NOCTTY | os.O_CLOEXEC)
    out: dict[int, int] = {}
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        t = info.termios
        if t is not None:
            termios.tcsetattr(master, termios.TCSANOW,
                              [t.iflag, t.oflag, t.cflag, t.lflag, t.ispeed, t.ospeed,
                               list(t.cc)])
        if info.winsize:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", *info.winsize))
        if info.packet:
            fcntl.ioctl(master, TIOCPKT, struct.pack("i", 1))
        owned = False
        for f in p["slaves"]:
            fd = _open_slave(master, f.flags)
            _setfl(fd, f.flags)
            out[f.id] = fd
            if not owned:     # the slave's owner and mode (fchown on it)
                owned = True
                if os.geteuid() == 0:
                    os.fchown(fd, f.uid, f.gid)
                os.fchmod(fd, f.mode & 0o7777)
        if ctty:
            out[ctty_key(info.index)] = _open_slave(master, os.O_RDWR)
        if not p["slaves"] and not ctty and info.slave_closed:
            os.close(_open_slave(master, os.O_RDWR))   # hung up, as it was
        if m is not None and m.pty_queue is not None:
            if info.termios is None:
                raise RestoreError("pseudo-terminals", f"pty {info.index}: bytes were "
                                   "saved queued in it but not its termios")
            _put_back(master, info, m.pty_queue)
        if info.locked:
            fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 1))
        new = struct.unpack("i", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
        if m is not None:
            _setfl(master, m.flags)
            out[m.id] = master
        else:
            os.close(master)
    except BaseException:
        for fd in set(out.values()) | {master}:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    if new != info.index and (p["slaves"] or ctty):
        warnings.append(f"pseudo-terminal /dev/pts/{info.index} of the tree is "
                        f"/dev/pts/{new} now (its tasks' ttyname() changes)")
    return out


def open_ptys(files: list[File], tasks: list[TaskNote],
              warnings: list[str]) -> dict[int, int]:
    """Every pseudo-terminal pair of the tree, new: {file id (or ctty_key): fd}."""
    used = {d.file for t in tasks for d in t.fds}
    pairs = _pairs(files, used)
    cttys = {i for i in (_ctty_of(t, pairs) for t in tasks) if i is not None}
    out: dict[int, int] = {}
    try:
        for i, p in sorted(pairs.items()):
            try:
                out.update(_make_pair(p, i in cttys, warnings))
            except OSError as e:
                raise RestoreError("pseudo-terminals", f"pty {i}: {e.strerror or e}") from None
    except BaseException:
        close_all(out)
        raise
    return out


def take_ctty(fd: int, fg_pgrp: int | None) -> None:
    """In a session leader: make the slave behind fd our controlling terminal
    and give its foreground to the saved process group (which exists: every
    task of our subtree is forked and parked)."""
    fcntl.ioctl(fd, TIOCSCTTY, 0)
    if not fg_pgrp or fg_pgrp == os.getpgrp():
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTTOU])
    try:
        os.tcsetpgrp(fd, fg_pgrp)
    except OSError:
        pass   # the group is gone (a job that exited): the leader's group keeps it
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
