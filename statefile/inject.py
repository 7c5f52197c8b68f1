"""Run single syscalls inside a stopped thread (ptrace syscall injection).

The thread's registers are saved, rip is pointed at a ``syscall`` instruction
(found in the task's vDSO, so no code is ever written into the target), the
thread single-steps over it, and the result is read from rax.  ``orig_rax`` is
set to -1 so the kernel's syscall-restart logic leaves the injected call alone;
the original registers (with their own restart state) are put back on close.

Some state is only visible to the task itself (signal handlers, sigaltstack,
clear_child_tid, brk, itimers): this is how the checkpoint reads it.
"""

from __future__ import annotations

import os
import signal

from . import ptrace as pt

SYSCALL_INSN = b"\x0f\x05"

NR = {
    "mmap": 9, "munmap": 11, "brk": 12, "rt_sigaction": 13, "getitimer": 36,
    "sigaltstack": 131, "prctl": 157, "arch_prctl": 158, "timer_gettime": 224,
    "clone": 56, "wait4": 61,
    # the snapshot writing its own memory (snapshot.SelfWriter)
    "close": 3, "pwrite64": 18, "openat": 257, "unshare": 272, "close_range": 436,
}
PR_GET_TID_ADDRESS = 40


class InjectError(OSError):
    pass


def find_syscall_insn(pid: int, maps: list[dict]) -> int:
    """Address of a `syscall` instruction inside the task's [vdso]."""
    for m in maps:
        if m["path"] == "[vdso]":
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
                f.seek(m["start"])
                image = f.read(m["end"] - m["start"])
            i = image.find(SYSCALL_INSN)
            if i >= 0:
                return m["start"] + i
    raise InjectError(0, f"pid {pid}: no [vdso] syscall instruction to inject through")


class Injector:
    """Injects syscalls into one stopped thread; use as a context manager."""

    def __init__(self, tid: int, syscall_addr: int, memfd: int):
        self.tid = tid
        self.addr = syscall_addr
        self.memfd = memfd
        self.saved = pt.getregs(tid)
        self.deferred: list[int] = []
        self.clone_child = 0  # tracer-side pid of a child an injected clone made

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pt.setregs(self.tid, self.saved)

    def call(self, name: str, *args: int) -> int:
        regs = pt.copy_regs(self.saved)
        regs.rax = NR[name]
        regs.orig_rax = 2**64 - 1
        for reg, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, reg, val & (2**64 - 1))
        regs.rip = self.addr
        pt.setregs(self.tid, regs)
        sig = 0
        while True:
            pt.singlestep(self.tid, sig)
            status = pt.wait(self.tid)
            if not os.WIFSTOPPED(status):
                raise InjectError(0, f"thread {self.tid} died during syscall injection")
            s = os.WSTOPSIG(status)
            if (status >> 16) == pt.PTRACE_EVENT_CLONE:
                self.clone_child = pt.geteventmsg(self.tid)
                continue
            if s == signal.SIGTRAP and (status >> 16) == 0:
                break
            if (status >> 16) == 0:
                # Another signal arrived: keep it for delivery after the dump.
                self.deferred.append(s)
            sig = 0
        res = pt.getregs(self.tid).rax
        if res >= 2**63:
            res -= 2**64
        return res

    def call_clone(self, flags: int) -> int:
        """fork()-like clone (same stack, no exit signal) under PTRACE_O_TRACECLONE;
        returns the new child's pid as the tracer sees it."""
        self.clone_child = 0
        self.check("clone", flags, 0, 0, 0, 0)
        if not self.clone_child:
            raise InjectError(0, f"clone in {self.tid} made no traced child")
        return self.clone_child

    def check(self, name: str, *args: int) -> int:
        res = self.call(name, *args)
        if -4096 < res < 0:
            raise InjectError(-res, f"{name} in thread {self.tid}: {os.strerror(-res)}")
        return res

    # scratch memory in the target ------------------------------------------
    def read(self, addr: int, size: int) -> bytes:
        return os.pread(self.memfd, size, addr)

    def write(self, addr: int, data: bytes) -> None:
        os.pwrite(self.memfd, data, addr)
