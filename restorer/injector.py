"""Syscall injection for restoring: statefile.control.inject's Injector with numbered
syscalls, a movable trampoline (the vDSO moves during a restore), clone events
and counters."""

from __future__ import annotations

import os
import signal

from statefile.control import ptrace as pt
from statefile.control.inject import InjectError, Injector

from .kernel import NR, errno_of

PTRACE_EVENT_CLONE = pt.PTRACE_EVENT_CLONE
_MASK = 2**64 - 1


class RestoreInjector(Injector):
    """Injects syscalls into one stopped thread.

    ``call(name_or_nr, *args)`` returns the raw (signed) result; ``check``
    raises InjectError on -errno.  ``self.addr`` is the address of a
    ``syscall`` instruction and may be changed between calls.  New threads
    created by an injected clone are collected in ``self.new_threads`` (tracer
    view tids, from PTRACE_EVENT_CLONE).
    """

    count = 0  # injections by every instance (for statistics)

    def __init__(self, tid: int, syscall_addr: int, memfd: int):
        super().__init__(tid, syscall_addr, memfd)
        self.new_threads: list[int] = []

    def call(self, name, *args: int) -> int:
        nr = NR[name] if isinstance(name, str) else name
        regs = pt.copy_regs(self.saved)
        regs.rax = nr
        regs.orig_rax = _MASK
        for reg, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, reg, val & _MASK)
        regs.rip = self.addr
        regs.eflags &= ~0x100  # singlestep sets TF itself
        pt.setregs(self.tid, regs)
        RestoreInjector.count += 1
        while True:
            pt.singlestep(self.tid, 0)
            status = pt.wait(self.tid)
            if not os.WIFSTOPPED(status):
                raise InjectError(0, f"thread {self.tid} died during injected syscall {name}"
                                  f" (status {status:#x})")
            s, event = os.WSTOPSIG(status), status >> 16
            if event == PTRACE_EVENT_CLONE:
                self.new_threads.append(pt.geteventmsg(self.tid))
                continue
            if s == signal.SIGTRAP and event == 0:
                break
            if event == 0:
                self.deferred.append(s)
        res = pt.getregs(self.tid).rax
        if res >= 2**63:
            res -= 2**64
        return res

    def check(self, name, *args: int) -> int:
        res = self.call(name, *args)
        e = errno_of(res)
        if e:
            raise InjectError(e, f"{name}{tuple(hex(a) for a in args)} in thread {self.tid}: "
                              f"{os.strerror(e)}")
        return res
