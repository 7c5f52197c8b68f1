"""Copy-on-write snapshots: keep the time a tree stays frozen short.

While the tree is frozen, each task gets a copy of its memory as it is at
the freeze, copy-on-write: a process that never runs a single instruction of
the program (the snapshot).  The tree is then released and its private memory
is read from the snapshots while it runs on.

A snapshot must not outlive crcheckpoint, even one killed at any moment
without a chance to clean up (docs/CRASHSAFE.md), and a dead process is a
zombie until its parent reaps it: so the snapshot's parent is a helper
thread that crelf adds to the task, which does nothing but wait for it.
Everything runs on chained signal frames (statefile/control/wayback.py), with no code
of ours in the task:

1. the task's leader (frozen, injected with its own way back) clones the
   helper thread (CLONE_THREAD, every signal blocked, its stack pointer on a
   chain of frames written into the unused tail of the task's vDSO page);
2. the helper clones the snapshot (a fork sharing the fd table and fs, so it
   holds no extra reference to any pipe or socket, and with no exit signal:
   the task never gets a SIGCHLD), which is attached by ptrace as it is born
   and killed with crcheckpoint (PTRACE_O_EXITKILL);
3. the helper then waits for its own clone children (wait4 __WCLONE |
   __WNOTHREAD: never a child of the program's) and exits when the snapshot
   is reaped.  Threads leave no zombie.

If crcheckpoint dies, the snapshot is killed, reaped by the helper, and the
helper ends: nothing is left in the task.  A snapshot born after its tracer
died runs only its own frame: exit_group.  Normally crcheckpoint kills the
snapshot at the end, waits until the helper is gone and writes the vDSO tail
back as it was; the snapshot's own copy of that tail is written back before a
byte of it is read, so the statefile holds the task's memory as it was.

Memory a fork does not copy faithfully (shared mappings, MADV_DONTFORK,
MADV_WIPEONFORK) is read from the frozen tasks before they are released, see
SegmentPlan.frozen_only.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from statefile.control import procfs
from statefile.control import ptrace as pt
from statefile.control import wayback
from statefile.errors import TargetError
from statefile.control.inject import Injector, InjectError

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
WCLONE, WNOTHREAD = 0x80000000, 0x20000000
NR_CLONE, NR_WAIT4, NR_EXIT, NR_EXIT_GROUP = 56, 61, 60, 231
HELPER_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
SNAPSHOT_FLAGS = CLONE_FILES | CLONE_FS          # exit signal 0


@dataclass
class Helper:
    task: int           # the task the snapshot copies
    thread: int         # the helper thread (tracer view tid)
    tail: int           # address of the frames in the task's vDSO padding
    size: int           # their length (the padding is zeros again after)


_helpers: dict[int, Helper] = {}     # by snapshot pid


def _vdso_tail(pid: int, memfd: int, g: wayback.Gadgets) -> tuple[int, bytes]:
    """(address, frames): where the snapshot's frames go, in zero padding at
    the end of the task's vDSO image (past its section headers, never
    executed nor read).  A tail that holds these very frames already (left
    by a crcheckpoint that died) is taken again: they are the same bytes."""
    for m in procfs.maps(pid):
        if m["path"] == "[vdso]":
            image = os.pread(memfd, m["end"] - m["start"], m["start"])
            used = len(image.rstrip(b"\0"))
            size = len(_frames(g, 0))
            for start in ((used + 64) & ~15, used - size):      # fresh, left over
                frames = _frames(g, m["start"] + start)
                rest = len(image) - start - size
                if start > 0 and rest >= 0 and start % 16 == 0 and \
                        image[start:] in (bytes(size + rest), frames + bytes(rest)):
                    return m["start"] + start, frames
    raise wayback.NoWayBack(0, f"pid {pid}: no room in its vDSO for a snapshot's frames")


def _frames(g: wayback.Gadgets, tail: int) -> bytes:
    """The helper thread's chain (clone the snapshot, wait for it, exit) and
    the snapshot's own (exit_group, if it ever runs untraced), at tail."""
    L = wayback.LINK_SIZE
    w1, w2, w3, b1 = (tail + i * L for i in range(4))
    return b"".join((
        wayback.link(g, rip=g.syscall, rsp=w2, rax=NR_CLONE, args=(SNAPSHOT_FLAGS, b1, 0, 0, 0)),
        wayback.link(g, rip=g.syscall, rsp=w3, rax=NR_WAIT4,
                     args=(2**64 - 1, 0, WCLONE | WNOTHREAD, 0)),
        wayback.link(g, rip=g.syscall, rsp=w3, rax=NR_EXIT, args=(0,)),
        wayback.link(g, rip=g.syscall, rsp=b1, rax=NR_EXIT_GROUP, args=(0,)),
    ))


def take_back_leftovers(pid: int, memfd: int, g: wayback.Gadgets, regs: list) -> None:
    """Before a task is dumped: a thread running on frames in the vDSO is
    another crcheckpoint's snapshot helper (that checkpoint is still
    writing): refuse; frames a dead crcheckpoint left in the vDSO tail are
    zeroed again, so the vDSO is saved as the kernel made it."""
    for m in procfs.maps(pid):
        if m["path"] != "[vdso]":
            continue
        for r in regs:
            if m["start"] <= r.user_regs().rsp < m["end"]:
                raise TargetError(f"pid {pid}: another crcheckpoint of it is still running "
                                  "(its snapshot helper thread is there)")
        try:
            tail, frames = _vdso_tail(pid, memfd, g)
        except wayback.NoWayBack:
            return
        if os.pread(memfd, len(frames), tail) == frames:
            os.pwrite(memfd, bytes(len(frames)), tail)


def fork_snapshot(leader: int, gadgets: wayback.Gadgets, task: int | None = None) -> int:
    """A never-running copy of the (frozen) task whose thread is leader;
    returns its pid (tracer view)."""
    task = task or leader
    g = gadgets
    memfd = os.open(f"/proc/{task}/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        tail, frames = _vdso_tail(task, memfd, g)
        zeros = bytes(len(frames))
        os.pwrite(memfd, frames, tail)
        thread = 0
        try:
            with Injector(leader, g, memfd, options=pt.PTRACE_O_TRACECLONE) as inj:
                inj.check("clone", HELPER_FLAGS, tail, 0, 0, 0)
                thread = inj.clone_child
            if not thread:
                raise InjectError(0, f"clone in {leader} made no traced helper thread")
            pt.ptrace(pt.PTRACE_SETOPTIONS, leader, 0, 0)
            child = _start_helper(thread)
        except BaseException:
            if not _helper_alive(task, thread):
                os.pwrite(memfd, zeros, tail)
            raise
        _helpers[child] = Helper(task, thread, tail, len(frames))
        try:            # the snapshot's own copy of the tail, as the task's was
            with open(f"/proc/{child}/mem", "r+b", buffering=0) as f:
                f.seek(tail)
                f.write(zeros)
        except OSError:
            release_snapshot(child)
            raise
        return child
    finally:
        os.close(memfd)


def _start_helper(thread: int) -> int:
    """Let the new helper thread (stopped as it was born) clone the snapshot;
    return the snapshot's pid once it is stopped and bound to our life."""
    if not pt.wait_interrupt_stop(thread):
        raise InjectError(0, f"helper thread {thread} died at once")
    pt.cont(thread)
    while True:
        status = pt.wait(thread)
        if not os.WIFSTOPPED(status):
            raise InjectError(0, f"helper thread {thread} died before its snapshot")
        if status >> 16 == pt.PTRACE_EVENT_CLONE:
            child = pt.geteventmsg(thread)
            break
        pt.cont(thread, 0)
    pt.detach(thread)           # it only waits for the snapshot now
    while True:
        status = pt.wait(child)
        if os.WIFSTOPPED(status):
            break
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise InjectError(0, "snapshot died at once")
    pt.ptrace(pt.PTRACE_SETOPTIONS, child, 0, pt.PTRACE_O_EXITKILL)
    return child


def _helper_alive(task: int, thread: int) -> bool:
    if not thread:
        return False
    try:
        return procfs.stat(task, thread)["state"] not in ("Z", "X")
    except (OSError, KeyError):
        return False


def release_snapshot(child: int, timeout: float = 5.0) -> None:
    """Kill the copy; its helper thread reaps it and ends; then the task's
    vDSO tail is written back (the task itself is never stopped for this)."""
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pt.wait_exit(child)  # as its tracer we see it die first; the helper reaps it
    h = _helpers.pop(child, None)
    if h is None:
        return
    end = time.monotonic() + timeout
    while _helper_alive(h.task, h.thread):
        if time.monotonic() > end:
            return          # still running its frames: they stay (never seen so far)
        time.sleep(0.001)
    try:
        with open(f"/proc/{h.task}/mem", "r+b", buffering=0) as f:
            f.seek(h.tail)
            f.write(bytes(h.size))
    except OSError:
        pass                # the task is gone


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
