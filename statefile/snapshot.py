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
