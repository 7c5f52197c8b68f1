"""Pseudo-terminals: master/slave pairs with both ends in the tree.

Every fd on a terminal is first a `tty` entry (statefile/dump/files.py).  Here:

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
* `pair_up` (run by the support assessment, statefile/check/support.py, once the
  whole tree is seen) turns a slave whose master is in the tree into kind
  `pty-slave` sharing its master's `pty` record; a slave whose master is
  outside stays `tty`: a shell job, restored on crrestart's own terminal.

Bytes queued in a pair of the tree (`save_queues`, run by crcheckpoint on
the frozen tree once the assessment passed): what the master has not read
(the slave's output, echoes) and what the slave has not read (the master's
input as the line discipline keeps it: whole lines in canonical mode, one per
read(), and the line being typed) are read from a duplicate of the master and
a slave opened for it (TIOCGPTPEER), then put back at once (`put_back`, the
same code a restart runs), so the tasks find them as they were.  Bytes go
back with TIOCSTI (a byte into a tty's own input, through its line
discipline, synchronously) under settings that store them unchanged (no
echo, no signals, no input mapping; a literal-next before each byte that
would end a line), then the saved termios is set again.  Where that cannot
be done (no CAP_SYS_ADMIN for TIOCSTI, packet mode, a locked pair, a line
discipline other than N_TTY, EXTPROC) a pair holding bytes the kernel's
counter shows is refused (`fd:pty-unread`); those paths read nothing, and a
line typed in canonical mode without its newline is not seen by the counter
(docs/TREE.md).  Restored by restorer/restore/tty.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import termios

import msgspec

from statefile.control import procfs
from statefile.control import ptrace as pt
from statefile.errors import TargetError
from statefile.format import records

TIOCGPTN = 0x80045430
TIOCGPKT = 0x80045438
TIOCGPTLCK = 0x80045439
TIOCGSID = 0x5429
TIOCSTI = 0x5412
TIOCGETD = 0x5424
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
N_TTY = 0
N_TTY_BUF = 4096           # the line discipline's buffer (N_TTY_BUF_SIZE): 4095 bytes usable
EXTPROC = 0o200000
NEAR_FULL = 256            # a slave holding more than N_TTY_BUF - this is refused up front
PTMX = (5, 2)
DEV_TTY = (5, 0)
PTS_MAJORS = range(136, 144)

# support keys (statefile/check/support.py)
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
    p.register(dup, select.POLLIN | select.POLLPRI)
    events = [ev for _, ev in p.poll(0)]
    info["slave_closed"] = any(ev & select.POLLHUP for ev in events)
    if info["packet"] and any(ev & select.POLLPRI for ev in events):
        info["packet_status"] = True      # a packet-mode status byte waits to be read
    info["ldisc"] = _int_ioctl(dup, TIOCGETD)
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
            entry["pty"] = {"index": index, "unread": _int_ioctl(dup, termios.FIONREAD),
                            "ldisc": _int_ioctl(dup, TIOCGETD)}
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


def problems(tasks: list[records.TaskNote], files: list[records.File]) \
        -> dict[int, tuple[str, str]]:
    """{file id: (support key, why)} for the terminal entries of the tree a
    restart cannot rebuild: what pair_up decided, kept in the records."""
    used = {d.file for t in tasks for d in t.fds}
    return {f.id: tuple(f.tty_check) for f in files if f.id in used
            and isinstance(f, (records.TtyFile, records.PtyMasterFile, records.PtySlaveFile))
            and f.tty_check}


def pair_up(tasks: list[dict], files: list[dict]) -> dict[int, tuple[str, str]]:
    """The dump side, before its dicts become records: pair masters and slaves
    of the tree (their kinds become pty-master/-slave); return {file id:
    (support key, why)} for the terminal entries a restart cannot rebuild.
    Decided once, at checkpoint time (each decision is kept in the entry:
    `tty_check`, read by problems()), so a restart never looks at today's
    processes."""
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
        if info.get("ldisc", N_TTY) != N_TTY:
            master["slave_ldisc"] = info["ldisc"]
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
        elif (info.get("unread") or info.get("slave_unread") or info.get("packet_status")) \
                and queue_problem(msgspec.convert(info, records.PtyInfo)):
            problem = (K_UNREAD, f"pty {i} holds {info.get('unread', 0)} byte(s) the master "
                                 f"has not read and {info.get('slave_unread', 0)} the slave "
                                 "has not read, which crelf cannot save: "
                                 f"{queue_problem(msgspec.convert(info, records.PtyInfo))}")
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


# ------------------------------------------------------------- queued bytes

_CAN_INJECT: list[bool] = []


def can_inject() -> bool:
    """Whether TIOCSTI works here (CAP_SYS_ADMIN in the initial user
    namespace): tried once on a pair of our own."""
    if not _CAN_INJECT:
        ok = False
        try:
            m = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            m = -1
        if m >= 0:
            try:
                fcntl.ioctl(m, TIOCSPTLCK, struct.pack("i", 0))
                fcntl.ioctl(m, TIOCSTI, b"x")
                ok = True
            except OSError:
                pass
            finally:
                os.close(m)
        _CAN_INJECT.append(ok)
    return _CAN_INJECT[0]


def queue_problem(info: records.PtyInfo) -> str | None:
    """Why the bytes queued in the pair of master record `info` cannot be
    saved and put back, or None."""
    if info.packet:
        return "the master is in packet mode"
    if info.locked:
        return "the pair is locked (TIOCSPTLCK): no slave can be opened to read them"
    if info.ldisc != N_TTY or info.slave_ldisc != N_TTY:
        return "a line discipline other than N_TTY"
    if info.termios is not None and info.termios.lflag & EXTPROC:
        return "EXTPROC (line editing done outside the kernel)"
    if info.slave_unread >= N_TTY_BUF - NEAR_FULL:
        return (f"the slave's line discipline buffer is (nearly) full ({info.slave_unread} "
                "bytes): bytes may wait behind it, which reading would run through it")
    if not can_inject():
        return "putting them back needs TIOCSTI, which needs CAP_SYS_ADMIN"
    return None


def _read_all(fd: int, out: bytearray, master: bool) -> None:
    """Append to out everything fd (O_NONBLOCK) gives without blocking.  A
    master reads EIO once its slave is closed and nothing is left; a
    non-canonical slave with VMIN 0 reads 0 bytes when it has nothing."""
    while True:
        try:
            b = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            if master and e.errno == errno.EIO:
                return
            raise
        if not b and not master:
            return
        out += b


def _setattr(fd: int, t: records.Termios) -> None:
    termios.tcsetattr(fd, termios.TCSANOW, [t.iflag, t.oflag, t.cflag, t.lflag,
                                           t.ispeed, t.ospeed, list(t.cc)])


def read_queues(master: int, slave: int | None, t: records.Termios,
                q: records.PtyQueue) -> None:
    """Read (consuming them) the bytes queued in a pair: `master` a descriptor
    of its master (O_NONBLOCK is set on it for the time it takes), `slave` a
    slave opened O_NONBLOCK for this (None: the slave is closed), `t` its
    saved termios.  Fills q, the `pty_queue` record (hex), as it reads (what
    was read is there if it fails): `to_master`; in canonical mode `lines`
    (one per read() of the slave), `partial` (the line being typed: read once a
    newline injected under the refill settings completes it, so ICANON is
    never switched, which would reset the line discipline's state) and
    `lnext` (a literal-next was waiting for its character: the first newline
    became that character), or `to_slave` in non-canonical mode.  put_back()
    puts them back; the slave's termios is left at the refill settings."""
    fl = fcntl.fcntl(master, fcntl.F_GETFL)
    fcntl.fcntl(master, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    buf = bytearray()
    try:
        _read_all(master, buf, True)
    finally:
        q.to_master = buf.hex()
        fcntl.fcntl(master, fcntl.F_SETFL, fl)
    if slave is None:               # no slave is open: nothing waits for one
        return
    if not t.lflag & termios.ICANON:
        buf = bytearray()
        try:
            _read_all(slave, buf, False)
        finally:
            q.to_slave = buf.hex()
        return
    lines: list[bytes] = []
    try:
        _read_lines(slave, lines)
    finally:
        q.lines = [x.hex() for x in lines]
    r, _ = _refill(t, records.PtyQueue())
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTTOU])
    try:
        _setattr(slave, r)
        tail = b""
        for n in (1, 2):
            fcntl.ioctl(slave, TIOCSTI, b"\n")
            got: list[bytes] = []
            _read_lines(slave, got)
            tail = b"".join(got)
            if tail:
                break
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if not tail.endswith(b"\n" * n):
        raise OSError(errno.EIO, "the line being typed could not be read")
    q.partial = tail[:-n].hex()
    if n == 2:
        q.lnext = True


def _read_lines(fd: int, out: list[bytes]) -> None:
    """Append to out every whole line a canonical-mode slave (O_NONBLOCK)
    holds, one per read() (an empty line ended by EOF reads as b"")."""
    for _ in range(N_TTY_BUF + 1):
        try:
            out.append(os.read(fd, N_TTY_BUF * 2))
        except BlockingIOError:
            return


def queue_slots(q: records.PtyQueue, t: records.Termios) -> int:
    """How much of the slave's line-discipline buffer queue q fills (an
    end-of-file mark takes a byte)."""
    if not t.lflag & termios.ICANON:
        return len(q.to_slave) // 2
    lines = [bytes.fromhex(x) for x in q.lines]
    return sum(len(x) + (_ending(x, t) is None) for x in lines) + len(q.partial) // 2


def _ending(line: bytes, t: records.Termios) -> bytes | None:
    """The character that ended a line read in canonical mode, or None when
    it was ended by EOF (which read() does not return)."""
    cc = t.cc
    if line.endswith(b"\n"):
        return b"\n"
    if line and cc[termios.VEOL] and line[-1] == cc[termios.VEOL]:
        return line[-1:]
    if line and cc[termios.VEOL2] and t.lflag & termios.IEXTEN \
            and line[-1] == cc[termios.VEOL2]:
        return line[-1:]
    return None


_IFLAG_OFF = (termios.ICRNL | termios.INLCR | termios.IGNCR | termios.ISTRIP | termios.IUCLC
              | termios.IXON | termios.IXOFF | termios.IXANY | termios.PARMRK | termios.INPCK
              | termios.IMAXBEL)
_LFLAG_OFF = (termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ECHOCTL
              | termios.ECHOPRT | termios.ECHOKE | termios.ISIG | termios.IEXTEN
              | termios.FLUSHO | termios.PENDIN | EXTPROC | termios.TOSTOP)


def _refill(t: records.Termios, q: records.PtyQueue) -> tuple[records.Termios, bytes]:
    """The settings under which the slave's saved queue goes back unchanged,
    and the bytes to inject under them."""
    canon = bool(t.lflag & termios.ICANON)
    cc = list(t.cc)
    r = msgspec.structs.replace(t, iflag=t.iflag & ~_IFLAG_OFF, oflag=t.oflag & ~termios.OPOST,
                                lflag=t.lflag & ~_LFLAG_OFF, cc=cc)
    for i in (termios.VERASE, termios.VKILL, termios.VWERASE, termios.VREPRINT,
              termios.VDISCARD):
        cc[i] = 0
    if not canon:
        return r, bytes.fromhex(q.to_slave)
    # Canonical: IEXTEN for a literal-next; an EOF and a literal-next character
    # that end no saved line; the saved EOL and EOL2 end their lines.
    eol = cc[termios.VEOL]
    eol2 = cc[termios.VEOL2] if t.lflag & termios.IEXTEN else 0
    free = [c for c in range(1, 32) if c not in (10, eol, eol2)]
    cc[termios.VEOF], cc[termios.VLNEXT] = free[0], free[1]
    cc[termios.VEOL2] = eol2
    r.lflag |= termios.IEXTEN
    special = {10, free[0], free[1]} | ({eol} - {0}) | ({eol2} - {0})
    lnext = bytes([free[1]])

    def literal(b: bytes) -> bytes:
        return b"".join(lnext + bytes([c]) if c in special else bytes([c]) for c in b)
    out = bytearray()
    for x in q.lines:
        line = bytes.fromhex(x)
        end = _ending(line, t)
        out += literal(line[:-1]) + end if end else literal(line) + bytes([free[0]])
    out += literal(bytes.fromhex(q.partial))
    if q.lnext:
        out += lnext
    return r, bytes(out)


def put_back(master: int, slave: int | None, t: records.Termios,
             q: records.PtyQueue) -> None:
    """Put the bytes of queue record q (read_queues) into a pair whose
    termios is `t`: the slave's into its line discipline by TIOCSTI on
    `slave` under settings that keep them as they were, the master's by
    TIOCSTI on `master` (its own line discipline is raw); what does not fit
    the master's buffer is written through the slave, with output processing
    off (`slave` is O_NONBLOCK; None: the slave is closed, and nothing is
    beyond the master's buffer).  The saved termios is set again last.
    Raises OSError."""
    r, inject = _refill(t, q)
    to_master = bytes.fromhex(q.to_master)
    head, rest = to_master[:N_TTY_BUF - 1], to_master[N_TTY_BUF - 1:]
    if slave is None and (inject or rest):
        raise OSError(errno.EINVAL, "no slave to put the bytes back through")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTTOU])
    try:
        if slave is not None:
            _setattr(slave, r)
        try:
            for c in inject:
                fcntl.ioctl(slave, TIOCSTI, bytes([c]))
            for c in head:
                fcntl.ioctl(master, TIOCSTI, bytes([c]))
            while rest:
                rest = rest[os.write(slave, rest):]
        finally:
            if slave is not None:
                _setattr(slave, t)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    want_slave = (len(q.to_slave) // 2 if not t.lflag & termios.ICANON else
                  sum(len(bytes.fromhex(x)) for x in q.lines))
    got_master = _int_ioctl(master, termios.FIONREAD)
    got_slave = _int_ioctl(slave, termios.FIONREAD) if slave is not None else 0
    if got_master != len(head) or got_slave != want_slave:
        raise OSError(errno.EIO, f"the queues hold {got_master} and {got_slave} byte(s) "
                      f"again, not {len(head)} and {want_slave}")


def _background(slave: int) -> str | None:
    """Why we may not read this slave: it is crcheckpoint's own controlling
    terminal and crcheckpoint is not in its foreground process group (a read
    would stop it with SIGTTIN, or fail)."""
    tty_nr = procfs.stat(os.getpid())["tty_nr"]
    rdev = os.fstat(slave).st_rdev
    if not tty_nr or tty_nr_dev(tty_nr) != (os.major(rdev), os.minor(rdev)):
        return None
    try:
        if os.tcgetpgrp(slave) == os.getpgrp():
            return None
    except OSError:
        pass
    return "it is crcheckpoint's own terminal, and crcheckpoint runs in its background"


def save_queues(tasks: list[records.TaskNote], files: list[records.File]) \
        -> list[tuple[records.PtyMasterFile, str]]:
    """crcheckpoint, the tree frozen and assessed: read the bytes queued in
    every pair of the tree into its master's entry (`pty_queue`) and put them
    back at once (a leave-running tree, or one whose checkpoint fails later,
    finds them as they were).  Returns [(master entry, detail)] for the pairs
    whose bytes turned out not restorable (support key fd:pty-unread)."""
    used = {d.file for t in tasks for d in t.fds}
    out: list[tuple[records.PtyMasterFile, str]] = []
    for f in files:
        if not isinstance(f, records.PtyMasterFile) or f.id not in used or f.tty_check:
            continue
        info = f.pty
        if queue_problem(info) or info.termios is None:
            continue
        t = info.termios
        dup = pt.dup_fd_of(f.owner_pid, f.owner_fd)
        slave = None
        try:
            if not info.slave_closed:
                slave = fcntl.ioctl(dup, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK
                                    | os.O_CLOEXEC)
                why = ("its slave has a line discipline other than N_TTY"
                       if _int_ioctl(slave, TIOCGETD) != N_TTY else _background(slave))
                if why:
                    if info.unread or info.slave_unread:
                        out.append((f, f"pty {info.index}: {why}"))
                    continue
            q = records.PtyQueue()
            full = failed = None
            try:
                read_queues(dup, slave, t, q)
            except OSError as e:
                failed = f"reading its queued bytes: {e.strerror or e}"
            slots = queue_slots(q, t)
            if failed is None and slots >= N_TTY_BUF - 2:
                full = (f, f"pty {info.index}: the slave's line discipline buffer was full "
                           f"({slots} bytes, most of them a line being typed): bytes waiting "
                           "behind it were run through it by the checkpoint's reading; those "
                           "beyond its 4095 bytes are lost")
                out.append(full)
            elif failed is None and slave is None \
                    and len(q.to_master) // 2 >= N_TTY_BUF:
                out.append((f, f"pty {info.index}: more than {N_TTY_BUF - 1} bytes the "
                               "master has not read, and no slave to write them again"))
                q = msgspec.structs.replace(q, to_master=q.to_master[:2 * (N_TTY_BUF - 1)])
            try:
                put_back(dup, slave, t, q)      # (whatever happened: what was read goes back)
            except OSError as e:
                if full is None:        # (refused: as much as fits went back)
                    failed = failed or f"its queued bytes could not be put back: " \
                                       f"{e.strerror or e}"
            if failed:
                raise TargetError(f"pid {f.owner_pid} fd {f.owner_fd}: pty "
                                  f"{info.index}: {failed}")
            if q != records.PtyQueue():
                f.pty_queue = q
        finally:
            os.close(dup)
            if slave is not None:
                os.close(slave)
    return out
