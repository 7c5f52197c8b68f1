"""Pseudo-terminals: master/slave pairs with both ends in the tree.

Every fd on a terminal is first a `tty` entry (dump_files.py).  Here:

* a master (`/dev/ptmx`, rdev 5:2) becomes kind `pty-master`, with a `pty`
  record read from a pidfd_getfd duplicate of the task's fd: the pair's index
  (TIOCGPTN), the slave's termios (TCGETS on the master reads the slave's
  settings), window size (TIOCGWINSZ), packet mode (TIOCGPKT), lock
  (TIOCGPTLCK), the session whose controlling terminal it is (TIOCGSID) and
  its foreground process group (TIOCGPGRP), the bytes the master has not read
  yet (FIONREAD) and whether the slave side is closed (POLLHUP);
* a slave (`/dev/pts/N`) gets `pty` `{"index": N, "unread": bytes}`, and
  `/dev/tty` gets the index of its task's controlling terminal when that is a
  pseudo-terminal (`"alias": "/dev/tty"`);
* `pair_up` (run by the support assessment, statefile/support.py, once the
  whole tree is seen) turns a slave whose master is in the tree into kind
  `pty-slave` sharing its master's `pty` record; a slave whose master is
  outside stays `tty`: a shell job, restored on crrestart's own terminal.

Nothing is read from a terminal: bytes queued in either direction cannot be
read without consuming them, so a pair holding some is refused
(`fd:pty-unread`) and a leave-running checkpoint changes nothing the tasks
can observe.  The kernel's counter does not see characters typed ahead in
canonical mode without a newline yet (docs/TREE.md).
Restored by restorer/restore_tty.py.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios

from . import procfs
from . import ptrace as pt

TIOCGPTN = 0x80045430
TIOCGPKT = 0x80045438
TIOCGPTLCK = 0x80045439
TIOCGSID = 0x5429
PTMX = (5, 2)
DEV_TTY = (5, 0)
PTS_MAJORS = range(136, 144)

# support keys (statefile/support.py)
K_PTY, K_EXTERNAL, K_UNREAD, K_SESSION, K_OTHER_TTY = (
    "fd:pty", "fd:pty-external", "fd:pty-unread", "fd:pty-session", "fd:tty-other")


def pts_index(major: int, minor: int) -> int | None:
    """The pty index of a unix98 slave device, or None."""
    if major not in PTS_MAJORS:
        return None
    return (major - 136) * 256 + minor if major != 136 else minor


def tty_nr_dev(tty_nr: int) -> tuple[int, int]:
    """(major, minor) of /proc/PID/stat's tty_nr (new_encode_dev)."""
    return (tty_nr >> 8) & 0xFFF, (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)


def ctty_index(tty_nr: int) -> int | None:
    """The pty index of a controlling terminal (tty_nr), or None."""
    return pts_index(*tty_nr_dev(tty_nr)) if tty_nr else None


def _int_ioctl(fd: int, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0" * 4))[0]


def _termios(fd: int) -> dict:
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    return {"iflag": iflag, "oflag": oflag, "cflag": cflag, "lflag": lflag,
            "ispeed": ispeed, "ospeed": ospeed,
            "cc": [c[0] if isinstance(c, bytes) else c for c in cc]}


def _master(dup: int, entry: dict) -> dict:
    info: dict = {}
    try:
        info["index"] = _int_ioctl(dup, TIOCGPTN)
    except OSError:
        idx = entry.get("fdinfo", {}).get("tty-index")
        if idx is None:
            raise
        info["index"] = int(idx)
    info["termios"] = _termios(dup)
    info["winsize"] = list(struct.unpack("HHHH", fcntl.ioctl(dup, termios.TIOCGWINSZ,
                                                             b"\0" * 8)))
    for key, req in (("packet", TIOCGPKT), ("locked", TIOCGPTLCK)):
        try:
            info[key] = bool(_int_ioctl(dup, req))
        except OSError:
            info[key] = False
    try:        # ENOTTY: nobody's controlling terminal
        info["sid"] = _int_ioctl(dup, TIOCGSID)
        info["fg_pgrp"] = _int_ioctl(dup, termios.TIOCGPGRP)
    except OSError:
        info["sid"] = info["fg_pgrp"] = None
    info["unread"] = _int_ioctl(dup, termios.FIONREAD)   # slave output the master did not read
    p = select.poll()
    p.register(dup, select.POLLIN)
    info["slave_closed"] = any(ev & select.POLLHUP for _, ev in p.poll(0))
    return info


def add(entry: dict, pid: int, fd: int) -> None:
    """Describe the terminal behind task pid's fd in entry (kind `tty` so far)."""
    major, minor = os.major(entry["rdev"]), os.minor(entry["rdev"])
    if (major, minor) == PTMX:
        entry["kind"] = "pty-master"
    index = pts_index(major, minor)
    alias = None
    if (major, minor) == DEV_TTY:
        index = ctty_index(procfs.stat(pid)["tty_nr"])
        alias = "/dev/tty"
    if entry["kind"] != "pty-master" and index is None:
        # another terminal (a console, a virtual console, a serial line): a
        # device node reopened at its path (kind `chr`, `tty_device`: the same
        # device number again); `ctty` when it was the task's controlling
        # terminal (a session leader takes it again by opening it)
        if (major, minor) != DEV_TTY:
            entry["kind"] = "chr"
            entry["tty_device"] = True
            entry["ctty"] = tty_nr_dev(procfs.stat(pid)["tty_nr"]) == (major, minor)
        return
    try:
        dup = pt.dup_fd_of(pid, fd)
    except OSError as e:
        entry["pty"] = {"index": index, "error": f"pidfd_getfd: {e.strerror}"}
        return
    try:
        if entry["kind"] == "pty-master":
            entry["pty"] = _master(dup, entry)
        else:
            entry["pty"] = {"index": index, "unread": _int_ioctl(dup, termios.FIONREAD)}
            if alias:
                entry["pty"]["alias"] = alias
    except OSError as e:
        entry["pty"] = {"index": index, "error": f"{e.strerror or e}"}
    finally:
        os.close(dup)


def _slave_held_outside(indices: set[int], tree: set[int]) -> dict[int, list[int]]:
    """{index: [pids]}: processes outside the tree (and not us) holding a fd
    on /dev/pts/INDEX."""
    out: dict[int, list[int]] = {}
    paths = {f"/dev/pts/{i}": i for i in indices}
    for pid, _, link in procfs.fds_outside(tree):
        i = paths.get(link)
        if i is not None:
            out.setdefault(i, []).append(pid)
    return out


def pair_up(tasks: list[dict], files: list[dict]) -> dict[int, tuple[str, str]]:
    """Pair masters and slaves of the tree; return {file id: (support key,
    why)} for the terminal entries a restart cannot rebuild.  Decided once, at
    checkpoint time (each decision is kept in the entry: `tty_check`), so a
    restart never looks at today's processes."""
    used = {d["file"] for t in tasks for d in t["fds"]}
    # A console or serial line that is the controlling terminal of a session
    # whose leader is outside the tree (a shell job on it): crrestart's own
    # terminal stands in for it, as for a pty slave; reopened at its path only
    # when the session is the tree's own, or it was nobody's terminal here.
    leaders = {t["pid"] for t in tasks if t.get("sid") == t["pid"]}
    for t in tasks:
        for d in t["fds"]:
            f = files[d["file"]]
            if f.get("tty_device") and f.get("ctty") and t.get("sid") not in leaders:
                f["kind"] = "tty"
                del f["tty_device"], f["ctty"]
    ttys = [f for f in files if f["id"] in used
            and f["kind"] in ("tty", "pty-master", "pty-slave")]
    if ttys and all("tty_check" in f for f in ttys):
        return {f["id"]: tuple(f["tty_check"]) for f in ttys if f["tty_check"]}
    masters: dict[int, dict] = {}
    why: dict[int, tuple[str, str]] = {}
    for f in ttys:
        if f["kind"] == "pty-master":
            info = f.get("pty", {})
            if "error" in info or info.get("index") is None:
                why[f["id"]] = (K_EXTERNAL, f"{f['path']} could not be inspected "
                                            f"({info.get('error', 'no index')})")
            elif info["index"] in masters:
                why[f["id"]] = (K_EXTERNAL, f"two masters of pty {info['index']}")
            else:
                masters[info["index"]] = f
    slaves: dict[int, list[dict]] = {}
    for f in ttys:
        info = f.get("pty")
        if f["kind"] == "pty-master" or not info or info.get("index") not in masters:
            continue
        master = masters[info["index"]]["pty"]
        if "error" in info:
            why[f["id"]] = (K_EXTERNAL, f"{f['path']} could not be inspected ({info['error']})")
        f["kind"] = "pty-slave"
        master["slave_unread"] = max(master.get("slave_unread", 0), info.get("unread", 0))
        if info.get("alias"):
            f["pty_alias"] = info["alias"]
        f["pty"] = master
        slaves.setdefault(master["index"], []).append(f)
    # A master alone: its slave must be held by nobody (then it comes back
    # closed, as it was), not by a process outside the tree.
    alone = {i for i in masters if i not in slaves and not masters[i]["pty"]["slave_closed"]}
    outside = _slave_held_outside(alone, {t["pid"] for t in tasks}) if alone else {}
    sessions = {t["pid"] for t in tasks if t.get("sid") == t["pid"]}
    for i, m in masters.items():
        info = m["pty"]
        group = [m] + slaves.get(i, [])
        problem = None
        if i in outside:
            held = ", ".join(map(str, sorted(outside[i])[:5]))
            problem = (K_EXTERNAL, f"the slave /dev/pts/{i} is open in pid {held} outside "
                                   "the tree")
        elif info.get("unread") or info.get("slave_unread"):
            problem = (K_UNREAD, f"pty {i} holds {info.get('unread', 0)} byte(s) the master "
                                 f"has not read and {info.get('slave_unread', 0)} the slave "
                                 "has not read")
        elif info.get("sid") and info["sid"] not in sessions:
            problem = (K_SESSION, f"pty {i} is the controlling terminal of session "
                                  f"{info['sid']}, whose leader is not in the tree")
        if problem:
            for f in group:
                why.setdefault(f["id"], problem)
    # Terminals outside the tree: crrestart's own terminal stands in for one.
    outer: dict[tuple, list[dict]] = {}
    for f in ttys:
        if f["kind"] == "tty":
            idx = (f.get("pty") or {}).get("index")
            dev = ("pts", idx) if idx is not None else ("dev", f["rdev"])
            if f["rdev"] != os.makedev(*DEV_TTY) or idx is not None:
                outer.setdefault(dev, []).append(f)
    for dev in list(outer)[1:]:
        for f in outer[dev]:
            why[f["id"]] = (K_OTHER_TTY, f"{f['path']} is a second terminal outside the tree "
                                         f"(the first is {outer[next(iter(outer))][0]['path']})")
    for f in ttys:
        f["tty_check"] = list(why.get(f["id"], ()))
    return why
