"""The guard: what makes a dying crrestart leave all or nothing (docs/RESTORE.md,
"When crrestart dies").

At the start of a restore crrestart clones a small process, the guard, that
*shares crrestart's file table* (clone CLONE_FILES, no CLONE_VM: a copy of
crrestart's memory, so no exec) and sits in a session of its own (a group or
session kill aimed at crrestart does not reach it).  Sharing the table means
every fd crrestart holds or gets later, the userfaultfds of a lazy restore
included (those the kernel hands over for the target's fork()s too), stays
open while the guard lives, even after crrestart is SIGKILLed: the kernel
releases a userfaultfd (unregistering its ranges, so that later faults get
zero pages) only when its last reference goes.

crrestart writes one line per event to a pipe the guard reads (each line one
write, below PIPE_BUF, so it is in the pipe whole or not at all):

    T <pidfd> <pid>       a task (or the pid namespace's init) to kill
    S <kind> <id> <key> <t0>  a SysV object about to be created
    N <kind> <id>         (the id written to /proc/sys/kernel/<kind>_next_id)
    P <t0> <path>         a path about to be created (socket, FIFO, file)
    K <pidfd> <pid>       a lazily served process (killed with its descendants
                          if its server dies before every page is in); one per
                          served task: each has a server of its own
    W <pidfd> <pid> / U <pidfd>  watch / stop watching a serving process
    F <kind> <path>\t<home>  the release freezer's cgroup (restorer/release/freezer.py)
    Q <fd> <n>            the release gate's write end and its n waiting threads
                          (restorer/release/gate.py); O: it is open
    C                     the tree is released: it owns everything now
    G                     the release freezer's cgroup is thawed, emptied, removed
    A                     crrestart ended the restore itself (failed, cleaned up)
    D <pid>               every lazy page of that task is in, or it is gone

The guard watches crrestart (then the lazy daemon) through a pidfd.  When a
watched process dies, the guard first reads every line already written, then:

* before C: SIGKILLs everything in the release freezer's cgroup while it is
  frozen and then thaws it (so a task detached just before crrestart died dies
  without running), SIGKILLs every task (pidfds, no pid-reuse race) and their
  descendants, waits until they are gone, removes the SysV objects, socket
  files, FIFOs and files the restore created (only those whose change time is
  not older than the line announcing them), says so on stderr and in the
  kernel log, and exits;
* after C with a K not yet ended by its D: a server of lazy memory died before
  every page of its task was in: it SIGKILLs each such task and its
  descendants *before* its copy of the userfaultfds goes (a task blocked on a
  fault dies instead of getting a zero page), says so, and exits;
* after C, before G: thaws the release freezer's cgroup (the whole tree runs
  on), moves its processes back to crrestart's cgroup and removes it; after
  C, before O: opens the release gate (writes its n GO bytes);
* after A, or after C with no lazy memory missing (no K, or each K's D read: a
  D before C ends only that task's lazy duty, the rest stays): exits quietly.

The other way round, the lazy server watches the guard's pidfd: a guard that
dies while pages are missing makes the server kill the tree (lazy.py), since
nothing would then stop a dead server's userfaultfd from being released.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import shutil
import signal
import stat as st
import time

from restorer.errors import RestoreError
from restorer.kernel import clone3, clone_args, pidfd_open, prctl

CLONE_FILES = 0x400
CLONE_PIDFD = 0x1000
PR_SET_NAME = 15

_current: "Guard | None" = None
_shares_table = False         # True in a process clone_files() started


def current() -> "Guard | None":
    """The guard of the restore in progress in this process (None if none)."""
    return _current


def clone_files(name: str, body, orphan: bool = False) -> tuple[int, int]:
    """Start a process sharing our file table that runs body() (never
    returning) in a session of its own; returns (pid, pidfd).  Call it only
    while this process has a single thread (as fork_with_pid).  orphan: not
    our child (an intermediate that exits at once starts it), so it is never
    one of our children nor a zombie of ours: its exit is reaped by init or
    the nearest subreaper."""
    if orphan:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            mid, _ = clone_files("crelf-starter", lambda: os.write(w, "{} {}".format(
                *clone_files(name, body)).encode()))
            os.waitpid(mid, 0)
            pid, pidfd = (int(x) for x in os.read(r, 64).split())
        except ValueError:
            raise OSError(errno.ECHILD, "the starter of a process died") from None
        finally:
            os.close(r)
            os.close(w)
        return pid, pidfd
    pidfd = ctypes.c_int32(-1)
    args = clone_args(flags=CLONE_FILES | CLONE_PIDFD, pidfd=ctypes.addressof(pidfd),
                      exit_signal=signal.SIGCHLD)
    res = clone3(args, "CLONE_FILES")
    if res == 0:
        global _shares_table
        _shares_table = True
        code = 1
        try:
            os.setsid()
            comm = ctypes.create_string_buffer(name.encode()[:15])
            prctl(PR_SET_NAME, ctypes.addressof(comm))
            for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(s, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            body()
            code = 0
        except BaseException:  # noqa: BLE001
            pass
        finally:
            os._exit(code)
    return res, pidfd.value


def gone(pidfd: int) -> bool:
    """Has the process behind pidfd exited? (a pidfd polls readable then)"""
    return bool(poll_fds([pidfd], 0))


def poll_fds(fds: list[int], timeout: float | None) -> list[int]:
    """The fds of `fds` that are readable (or hung up, or invalid) within timeout
    seconds (None: wait)."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    while True:
        try:
            return [fd for fd, _ in p.poll(None if timeout is None else timeout * 1000)]
        except InterruptedError:
            continue


class Guard:
    """crrestart's side: start the guard, tell it what happens.  The pipe's two
    ends and every pidfd named in a line stay open until the guard is done
    with them: the file table is shared, so closing one here would close it
    for the guard too."""

    def __init__(self, statefile: str):
        global _current
        self.statefile = os.path.abspath(statefile)
        self.owner = os.getpid()
        self.ipc_ns = _ns_ino("ipc")
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        self.me = pidfd_open(self.owner)       # crrestart, watched by the guard
        try:
            self.pid, self.pidfd = clone_files("crelf-guard", self._main, orphan=True)
        except OSError as e:
            for fd in (self.r, self.w, self.me):
                os.close(fd)
            raise RestoreError("guard", f"cannot start the guard process ({e.strerror})") \
                from None
        _current = self

    # --- crrestart's side --------------------------------------------------------
    def note(self, line: str) -> None:
        if os.getpid() != self.owner and not _shares_table:
            return            # a forked task: its fd numbers are its own by now
        try:
            os.write(self.w, (line + "\n").encode(errors="surrogateescape"))
        except OSError:
            pass              # the guard is gone: nothing more it could do

    def task(self, pid: int) -> None:
        """A process of the tree (or its init) exists: killed if crrestart
        dies before the release."""
        try:
            fd = pidfd_open(pid)
        except OSError:
            return
        self.note(f"T {fd} {pid}")

    def sysv(self, kind: str, ident: int, key: int) -> None:
        """Before creating a SysV object (in crelf's IPC namespace; one in the
        tree's own namespace goes with the namespace)."""
        if _ns_ino("ipc") == self.ipc_ns:
            self.note(f"S {kind} {ident} {key} {time.time_ns()}")

    def path(self, path: str) -> None:
        """Before creating a file, socket file or FIFO at path."""
        self.note(f"P {time.time_ns()} {os.path.abspath(path)}")

    def served(self, pid: int) -> None:
        """The lazily served process (before commit())."""
        try:
            fd = pidfd_open(pid)
        except OSError:
            return
        self.note(f"K {fd} {pid}")

    def watch(self, pidfd: int, pid: int) -> None:
        self.note(f"W {pidfd} {pid}")

    def unwatch_me(self) -> None:
        self.note(f"U {self.me}")

    def freezer(self, fz) -> None:
        """The release freezer (before crrestart joins its cgroup)."""
        self.note(f"F {fz.kind} {fz.path}\t{fz.home}")

    def commit(self) -> None:
        self.note("C")

    def gate(self, fd: int, n: int) -> None:
        """The release gate's write end (in the table we share) and how many
        threads wait at it (restorer/release/gate.py)."""
        self.note(f"Q {fd} {n}")

    def gate_open(self) -> None:
        self.note("O")

    def thawed(self) -> None:
        """The release freezer's cgroup is gone (the tree is back home)."""
        self.note("G")

    def abort(self) -> None:
        self.note("A")
        self.forget()

    def done(self, pid: int) -> None:
        """No lazy page of served task pid is missing any more (or it is gone).
        The guard process stays for the other served tasks (and, before the
        release, for the rest); this process, whose only server this is (a
        tree is restored lazily only when it is one task), lets it go."""
        self.note(f"D {pid}")
        self.forget()

    def forget(self) -> None:
        global _current
        if _current is self:
            _current = None

    # --- the guard process -------------------------------------------------------
    def _main(self) -> None:
        tasks: list[tuple[int, int]] = []
        sysv: list[tuple[str, int, int, int]] = []
        paths: list[tuple[int, str]] = []
        watch = {self.me: self.owner}   # pidfd -> pid of each process we watch
        served: dict[int, int] = {}    # pid -> pidfd of each lazily served task, until its D
        lazy_done: set[int] = set()     # the pids whose D was read
        committed = False
        fz = None                       # the release freezer, until G
        gate_fd = None                  # (write end, threads waiting) of the release gate, until O
        os.set_blocking(self.r, False)
        buf = b""

        def drain() -> str:
            """Apply every complete line in the pipe; "A" or "C" when read."""
            nonlocal buf, committed, fz, gate_fd
            end = ""
            while True:
                try:
                    chunk = os.read(self.r, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                if not chunk:
                    break
                buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                w = raw.decode(errors="surrogateescape").split(" ", 2)
                if w[0] == "T":
                    tasks.append((int(w[1]), int(w[2])))
                elif w[0] == "S":
                    kind, ident, key, t0 = w[1], *w[2].split()
                    sysv.append((kind, int(ident), int(key), int(t0)))
                elif w[0] == "P":
                    paths.append((int(w[1]), w[2]))
                elif w[0] == "K" and int(w[2]) not in lazy_done:
                    served[int(w[2])] = int(w[1])
                elif w[0] == "W":
                    watch[int(w[1])] = int(w[2])
                elif w[0] == "U":
                    watch.pop(int(w[1]), None)
                elif w[0] == "F":
                    from restorer.release.freezer import ReleaseFreezer
                    kind, (path, home) = w[1], w[2].split("\t", 1)
                    fz = ReleaseFreezer(path, home, kind)
                elif w[0] == "G":
                    fz = None
                elif w[0] == "Q":
                    gate_fd = (int(w[1]), int(w[2]))
                elif w[0] == "O":
                    gate_fd = None
                elif w[0] == "C":
                    committed, end = True, end or "C"
                elif w[0] == "D":
                    # every lazy page of that task is in (or it is gone): only
                    # its lazy duty ends, for good (a K crrestart sends later,
                    # when its pages were all in before the release, is moot);
                    # the other served tasks, and before the release the
                    # rest, remain
                    served.pop(int(w[1]), None)
                    lazy_done.add(int(w[1]))
                elif w[0] == "A":
                    return w[0]
            return end

        while True:
            poll_fds([self.r, *watch], None)
            end = drain()
            if end == "A" or (committed and not served and fz is None and gate_fd is None):
                return
            dead = [w for w in watch if gone(w)]
            if not dead:
                continue
            end = drain()     # what the dead one wrote before it died
            if end == "A" or (committed and not served and fz is None and gate_fd is None):
                return
            dead = [w for w in watch if gone(w)]
            if not dead:
                continue
            who = watch[dead[0]]
            if not committed:
                if fz is not None:
                    fz.kill_all()     # frozen: nothing of it runs again
                self._undo(who, tasks, sysv, paths)
            elif not served:
                if gate_fd is not None:
                    from restorer.release.gate import open_gate
                    open_gate(*gate_fd)   # released: all of the tree runs on
                if fz is not None:
                    try:
                        fz.thaw()         # released: all of the tree runs on
                    except OSError:
                        pass              # (crrestart had removed it already)
                    fz.move_home()
            else:
                if fz is not None:
                    fz.kill_all()
                from restorer.lazy import kill_tree
                for pid, fd in served.items():
                    kill_tree(fd, pid)
                pids = ", ".join(map(str, served))
                report(f"the server of the lazy memory of pid {pids} (pid {who}) "
                       f"died before every page was in: pid {pids} and descendants were "
                       f"killed (a task must never run on memory it did not get; restart "
                       f"{self.statefile} again)")
            return

    def _undo(self, who, tasks, sysv, paths) -> None:
        """crrestart died before the release: nothing of the restore stays."""
        from restorer.lazy import kill_tree
        for fd, pid in tasks:     # (the root first: its subtree is walked before it dies)
            kill_tree(fd, pid)
        removed = 0
        for kind, ident, key, t0 in sysv:
            removed += _remove_sysv(kind, ident, key, t0)
        for t0, path in paths:
            try:
                s = os.lstat(path)
                if s.st_ctime_ns < t0 - 50_000_000:   # (file times are coarse: a jiffy late)
                    continue      # not the one announced
                if not st.S_ISDIR(s.st_mode):
                    os.unlink(path)
                elif os.path.basename(path).startswith("crelf-"):
                    shutil.rmtree(path, ignore_errors=True)   # a private scratch directory
                else:
                    os.rmdir(path)    # a removed directory made again (empty, or kept)
                removed += 1
            except OSError:
                pass
        report(f"crrestart (pid {who}) died while restoring {self.statefile}, before the "
               f"tree was released: its {len(tasks)} process(es) were killed and "
               f"{removed} object(s) it had created removed; the statefile restarts again")


def journal_path(path: str) -> None:
    """Before creating something at path: removed if crrestart dies before the
    release (a no-op outside a guarded restore, and in the forked tasks)."""
    g = _current
    if g is not None:
        g.path(path)


def _ns_ino(kind: str) -> int:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return 0


def _remove_sysv(kind: str, ident: int, key: int, t0: int) -> int:
    """IPC_RMID the object with this id and key, created at t0 or later."""
    from restorer.restore.ipc import IPC_RMID, _ctl, _libc as ipc_libc, _table
    idname = {"shm": "shmid", "sem": "semid", "msg": "msqid"}[kind]
    try:
        with open(f"/proc/sys/kernel/{kind}_next_id") as f:
            if int(f.read()) == ident:       # written, and the object never created
                with open(f"/proc/sys/kernel/{kind}_next_id", "w") as w:
                    w.write("-1")
    except (OSError, ValueError):
        pass
    for cur in _table(kind):
        if cur[idname] == ident and cur["key"] == key and cur.get("ctime", 0) >= t0 // 10**9 - 1:
            ctl = {"shm": ipc_libc.shmctl, "sem": ipc_libc.semctl, "msg": ipc_libc.msgctl}[kind]
            return 1 if _ctl(ctl, ident, IPC_RMID, None) == 0 else 0
    return 0


def report(msg: str) -> None:
    """One line on stderr (crrestart's, shared) and in the kernel log (root)."""
    try:
        os.write(2, f"crrestart: {msg}\n".encode())
    except OSError:
        pass
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, f"<4>crelf: {msg}\n".encode()[:1000])
        finally:
            os.close(fd)
    except OSError:
        pass
