"""Freeze a process tree with PTRACE_SEIZE + PTRACE_INTERRUPT, and thaw it.

Every thread of every task is seized and interrupted; the tree is re-scanned
until no new thread or child appears.  Seizing does not change what the tasks
observe: an interrupted syscall is restarted transparently on detach, a task
that was group-stopped stays stopped, and no SIGCHLD reaches the real parent.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field

from statefile.control import procfs
from statefile.control import ptrace as pt
from statefile.errors import TargetError

GROUP_STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


@dataclass
class FrozenThread:
    tid: int
    group_stop: bool = False
    stop_signal: int = 0       # the signal that group-stopped it (SIGSTOP, SIGTSTP, ...)
    # Signals that arrived while we held the thread; re-delivered on detach.
    deferred: list[int] = field(default_factory=list)


@dataclass
class FrozenTask:
    pid: int
    state_before: str
    threads: dict[int, FrozenThread] = field(default_factory=dict)
    syscall_addr: int = 0  # a `syscall` instruction in its vDSO, for injection
    gadgets: object = None  # wayback.Gadgets: the crash-safe way to inject


def tracer_of(pid: int, tid: int | None = None) -> tuple[int, str]:
    """(pid, comm) of the tracer of a task (or of its thread tid); (0, "") if none."""
    try:
        tracer = int(procfs.status(pid, tid).get("TracerPid", "0"))
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return 0, ""
    if not tracer:
        return 0, ""
    try:
        return tracer, procfs.stat(tracer)["comm"]
    except (FileNotFoundError, ProcessLookupError):
        return tracer, ""


def check_target(pid: int) -> None:
    """Clear, early refusals for a pid that cannot be checkpointed."""
    if pid <= 0:
        raise TargetError(f"invalid pid {pid}")
    if pid == os.getpid():
        raise TargetError("cannot checkpoint crcheckpoint itself")
    try:
        st = procfs.stat(pid)
        status = procfs.status(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetError(f"no process with pid {pid}") from None
    if st["flags"] & procfs.PF_KTHREAD:
        raise TargetError(f"pid {pid} ({st['comm']}) is a kernel thread")
    if st["state"] == "Z":
        raise TargetError(f"pid {pid} ({st['comm']}) is a zombie")
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        raise TargetError(f"pid {pid} ({st['comm']}) is already traced by pid {tracer}; "
                          "detach the other tracer first")
    uid = int(status["Uid"].split()[0])
    if os.geteuid() != 0 and uid != os.geteuid():
        raise TargetError(f"pid {pid} ({st['comm']}) belongs to uid {uid}, "
                          f"not to you (uid {os.geteuid()})")


class Freezer:
    def __init__(self, root: int):
        self.root = root
        self.tasks: dict[int, FrozenTask] = {}
        # Children that exited and were not reaped yet: nothing to seize, their
        # exit status is recorded (pid -> /proc/PID/stat).
        self.zombies: dict[int, dict] = {}
        # Tasks other than the root traced by another tracer (pid -> (tracer
        # pid, tracer comm)): left running, not frozen, for the checkpoint to
        # refuse with every reason (support "task:traced").
        self.traced: dict[int, tuple[int, str]] = {}

    # -- freeze ---------------------------------------------------------
    def freeze(self) -> None:
        try:
            while True:
                new = self._seize_round()
                if not new:
                    break
        except BaseException:
            self.thaw()
            raise
        if self.root not in self.tasks:
            raise TargetError(f"pid {self.root} exited during the checkpoint")

    def _seize_round(self) -> list[int]:
        new: list[int] = []
        for pid in procfs.descendants(self.root):
            try:
                st = procfs.stat(pid)
                state = st["state"]
                tids = procfs.threads(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            if state in ("Z", "X") and pid != self.root:
                self.zombies[pid] = st
                continue
            if pid in self.traced:
                continue
            if pid != self.root:
                try:
                    if procfs.is_kernel_thread(pid):
                        continue
                except FileNotFoundError:
                    continue
            task = self.tasks.setdefault(pid, FrozenTask(pid, state))
            for tid in tids:
                if tid in task.threads:
                    continue
                try:
                    pt.seize(tid)
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        continue
                    if e.errno == errno.EPERM:
                        tracer = tracer_of(pid, tid)
                        if tracer[0] and pid != self.root:
                            self._untraceable(task, tracer, new)
                            break
                        if tracer[0]:
                            raise TargetError(
                                f"pid {pid} is already traced by pid {tracer[0]}") from None
                        raise TargetError(
                            f"not permitted to trace pid {pid} (check ownership and "
                            "/proc/sys/kernel/yama/ptrace_scope)") from None
                    raise
                task.threads[tid] = FrozenThread(tid)
                new.append(tid)
                pt.interrupt(tid)
        new = [tid for tid in new if self._find(tid)]   # not those of a traced task
        for tid in new:
            self._wait_stopped(tid)
        # Threads that vanished while being seized.
        for task in list(self.tasks.values()):
            for tid in [t for t, ft in task.threads.items() if ft.tid < 0]:
                del task.threads[tid]
            if not task.threads:
                del self.tasks[task.pid]
        return new

    def _untraceable(self, task: FrozenTask, tracer: tuple[int, str], new: list[int]) -> None:
        """A thread of `task` is traced by another tracer: let go of the
        threads of it already seized (those seized in this round, `new`, once
        their interrupt stop came) and leave the whole task running."""
        self.traced[task.pid] = tracer
        for ft in list(task.threads.values()):
            try:
                if ft.tid in new:
                    self._wait_stopped(ft.tid)
                if ft.tid > 0:
                    pt.detach(ft.tid, ft.deferred[0] if ft.deferred else 0)
            except OSError:
                pass
        del self.tasks[task.pid]

    def _find(self, tid: int) -> FrozenThread | None:
        for task in self.tasks.values():
            if tid in task.threads:
                return task.threads[tid]
        return None

    def _wait_stopped(self, tid: int) -> None:
        ft = self._find(tid)
        while True:
            try:
                status = pt.wait(tid)
            except ChildProcessError:
                ft.tid = -1
                return
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                ft.tid = -1
                return
            if not os.WIFSTOPPED(status):
                continue
            sig = os.WSTOPSIG(status)
            event = status >> 16
            if event == pt.PTRACE_EVENT_STOP:
                ft.group_stop = sig in GROUP_STOP_SIGNALS
                ft.stop_signal = sig if ft.group_stop else 0
                return
            # A signal-delivery stop came before our interrupt: let the signal
            # be delivered as it would have been, then wait for the interrupt.
            pt.cont(tid, sig)

    # -- thaw -----------------------------------------------------------
    def thaw(self, kill: bool = False) -> None:
        if kill:
            for pid in self.tasks:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for task in self.tasks.values():
            for ft in task.threads.values():
                if ft.tid < 0:
                    continue
                try:
                    pt.detach(ft.tid, 0 if kill else (ft.deferred[0] if ft.deferred else 0))
                    if not kill:
                        for extra in ft.deferred[1:]:
                            pt.syscall(234, task.pid, ft.tid, extra)  # tgkill
                except OSError:
                    pass
        if kill:
            _reap_killed([ft.tid for task in self.tasks.values()
                          for ft in task.threads.values() if ft.tid > 0])
            for pid in self.tasks:
                _wait_gone(pid)
        self.tasks = {}

    def all_tids(self) -> list[tuple[int, int]]:
        return [(t.pid, tid) for t in self.tasks.values() for tid in t.threads]


def _reap_killed(tids: list[int], timeout: float = 5.0) -> None:
    """A killed thread is no longer stopped, so PTRACE_DETACH failed and it is
    still ours: collect its exit (waitpid __WALL, as its tracer) so the kernel
    hands it to its real parent.  Else the init of a pid namespace of the
    tree, killed too, waits for its killed tasks until crcheckpoint exits."""
    import time
    left = set(tids)
    end = time.monotonic() + timeout
    while left and time.monotonic() < end:
        for tid in list(left):
            try:
                got, status = os.waitpid(tid, os.WNOHANG | 0x40000000)   # __WALL
            except ChildProcessError:
                left.discard(tid)
                continue
            if got == tid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                left.discard(tid)
        if left:
            time.sleep(0.002)


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if procfs.stat(pid)["state"] in ("Z", "X"):
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.005)
