"""Copy-on-write snapshots: keep the time a tree stays frozen short.

While the tree is frozen, each task is made to fork() once by syscall
injection (flags CLONE_FILES|CLONE_FS and no exit signal: the copy shares the
fd table, so it holds no extra reference to any pipe or socket, and its
parent gets no SIGCHLD).  The copy is auto-attached by ptrace and never runs a
single instruction; it only holds the task's memory as it was at the freeze,
copy-on-write.  The tree is then released and its private memory is read from
the copies while it runs on.  Afterwards each copy is killed and the task is
briefly interrupted once more to reap it (an injected wait4), so no zombie is
left behind.

Memory a fork does not copy faithfully (shared mappings, MADV_DONTFORK,
MADV_WIPEONFORK) is read from the frozen tasks before they are released, see
SegmentPlan.frozen_only.
"""

from __future__ import annotations

import os
import signal

from . import procfs
from . import ptrace as pt
from .inject import Injector, InjectError

CLONE_FS = 0x200
CLONE_FILES = 0x400
WALL = 0x40000000


def fork_snapshot(leader: int, syscall_addr: int) -> int:
    """Fork a never-running copy of the task whose (stopped) thread is leader."""
    memfd = os.open(f"/proc/{leader}/mem", os.O_RDONLY)
    try:
        pt.ptrace(pt.PTRACE_SETOPTIONS, leader, 0, pt.PTRACE_O_TRACECLONE)
        try:
            with Injector(leader, syscall_addr, memfd) as inj:
                child = inj.call_clone(CLONE_FILES | CLONE_FS)
        finally:
            pt.ptrace(pt.PTRACE_SETOPTIONS, leader, 0, 0)
    finally:
        os.close(memfd)
    # The copy starts in a ptrace stop; kill it if crcheckpoint dies.
    while True:
        status = pt.wait(child)
        if os.WIFSTOPPED(status):
            break
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise InjectError(0, f"snapshot of {leader} died at once")
    pt.ptrace(pt.PTRACE_SETOPTIONS, child, 0, pt.PTRACE_O_EXITKILL)
    return child


def release_snapshot(task_pid: int, child: int, syscall_addr: int) -> None:
    """Kill the copy, and have the task reap it (it is the task's child)."""
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pt.wait_exit(child)  # as its tracer we see it die first
    # The zombie now waits for its real parent: reap it from inside the task.
    try:
        pt.seize(task_pid)
    except OSError:
        return  # the task is gone (or traced by someone else now)
    try:
        pt.interrupt(task_pid)
        if not pt.wait_interrupt_stop(task_pid, deliver=True):
            return
        memfd = os.open(f"/proc/{task_pid}/mem", os.O_RDONLY)
        try:
            with Injector(task_pid, syscall_addr, memfd) as inj:
                inj.call("wait4", child, 0, WALL, 0)
                deferred = inj.deferred
        finally:
            os.close(memfd)
        pt.detach(task_pid, deferred[0] if deferred else 0)
    except OSError:
        try:
            pt.detach(task_pid)
        except OSError:
            pass


# ------------------------------------------------ the snapshot writes itself

AT_FDCWD = -100
O_WRONLY, O_NONBLOCK, O_CLOEXEC = 0o1, 0o4000, 0o2000000
MAP_PRIVATE_ANON = 0x22


def _limited(path: str) -> bool:
    """A memory cgroup limit file that sets a limit (v2 "max", v1 a huge
    number, mean none)."""
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        return False
    return value != "max" and not (value.isdigit() and int(value) >= 1 << 62)


class SelfWriter:
    """The snapshot copies its own memory into the statefile.

    Reading a snapshot's memory from crcheckpoint copies every page twice
    (the snapshot's page into a buffer, the buffer into the page cache); a
    pwrite64() injected into the snapshot copies it once, straight from its
    address space into the statefile's page cache, on the other core while
    crcheckpoint checksums what was written (bench/README.md).  The snapshot
    never runs its own code for this either: each write is one injected
    syscall, through the same vDSO `syscall` instruction.

    Setting it up, in the snapshot only: unshare(CLONE_FILES) and
    close_range() give it a private, empty fd table (it shared the task's,
    where a new fd would be visible to the running task), then it opens the
    temporary statefile by path: its hidden name, or /proc/PID/fd/N of
    crcheckpoint's for an unnamed (O_TMPFILE) one (which needs the ptrace
    read access a task of crcheckpoint's own user has; a snapshot of another
    user is refused, as it is by the 0600 hidden name).  The path must lead
    to our file from the snapshot's root first (/proc/SNAP/root), and the
    file it opened (O_NONBLOCK: never waiting on a FIFO) is checked to be ours
    (device and inode): a chroot, another mount namespace or /proc, or a file
    replaced under the same name make it refuse, and so do a memory cgroup limit (the
    page cache would be charged to the task's cgroup), a seccomp filter (the
    injected calls could be refused or kill the copy) and any failure: then
    the caller reads the memory itself, as before.
    """

    def __init__(self, snap: int, syscall_addr: int, out_fd: int, out_path: str):
        self.snap = snap
        self.syscall_addr = syscall_addr
        self.out_fd = out_fd
        self.out_path = out_path
        self.fd = -1
        self.memfd = -1
        self.inj: Injector | None = None
        self.broken = False
        self.written = 0        # bytes this snapshot wrote itself

    @staticmethod
    def _suitable(snap: int) -> bool:
        try:
            if procfs.status(snap).get("Seccomp", "0") != "0":
                return False
            with open(f"/proc/{snap}/cgroup") as f:
                for line in f:
                    _, controllers, path = line.rstrip("\n").split(":", 2)
                    if controllers == "":          # cgroup v2 (or v2 of a hybrid setup)
                        files = ["/sys/fs/cgroup{}/memory.max",
                                 "/sys/fs/cgroup/unified{}/memory.max"]
                    elif "memory" in controllers.split(","):      # cgroup v1
                        files = ["/sys/fs/cgroup/memory{}/memory.limit_in_bytes"]
                    else:
                        continue
                    path = path.rstrip("/")
                    while True:         # the task's cgroup and every ancestor
                        for name in files:
                            if _limited(name.format(path)):
                                return False
                        if not path:
                            break
                        path = path.rsplit("/", 1)[0]
        except (OSError, IndexError):
            return False
        return True

    def open(self) -> bool:
        if not self._suitable(self.snap):
            return False
        try:
            mine = os.fstat(self.out_fd)
            seen = os.stat(f"/proc/{self.snap}/root{self.out_path}")
            if (mine.st_dev, mine.st_ino) != (seen.st_dev, seen.st_ino):
                return self._fail()
        except OSError:
            return self._fail()
        try:
            self.memfd = os.open(f"/proc/{self.snap}/mem", os.O_RDWR | os.O_CLOEXEC)
            self.inj = inj = Injector(self.snap, self.syscall_addr, self.memfd)
            inj.check("unshare", CLONE_FILES)
            inj.check("close_range", 0, 2**32 - 1, 0)
            path = os.fsencode(self.out_path) + b"\0"
            scratch = inj.check("mmap", 0, 4096 + len(path), 3, MAP_PRIVATE_ANON, 2**64 - 1, 0)
            try:
                inj.write(scratch, path)
                res = inj.call("openat", AT_FDCWD, scratch, O_WRONLY | O_NONBLOCK | O_CLOEXEC, 0)
            finally:
                inj.call("munmap", scratch, 4096 + len(path))
            if res < 0:
                return self._fail()
            self.fd = res
            mine, theirs = os.fstat(self.out_fd), os.stat(f"/proc/{self.snap}/fd/{res}")
            if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
                return self._fail()
            return True
        except OSError:
            return self._fail()

    def _fail(self) -> bool:
        self.broken = True
        self.close()
        return False

    def write(self, addr: int, n: int, off: int) -> int:
        """pwrite64 n bytes from the snapshot's addr at off; returns how many
        were written before any failure (the caller copies the rest)."""
        done = 0
        while done < n and not self.broken:
            try:
                res = self.inj.call("pwrite64", self.fd, addr + done, n - done, off + done)
            except OSError:
                self.broken = True
                break
            if res <= 0:
                break           # EFAULT (unreadable pages), EFBIG...: copied by the caller
            done += res
        self.written += done
        return done

    def close(self) -> None:
        if self.inj is not None:
            try:
                if self.fd >= 0:
                    self.inj.call("close", self.fd)
                self.inj.close()
            except OSError:
                pass
            self.inj = None
        self.fd = -1
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
