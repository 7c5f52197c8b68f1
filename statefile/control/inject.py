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
import struct

from statefile.control import procfs
from statefile.control import ptrace as pt
from statefile.control import wayback
from statefile.format.elfcore import NT_X86_XSTATE

SYSCALL_INSN = b"\x0f\x05"

NR = {
    "mmap": 9, "munmap": 11, "brk": 12, "rt_sigaction": 13, "getitimer": 36,
    "sigaltstack": 131, "prctl": 157, "arch_prctl": 158, "timer_gettime": 224,
    "clone": 56, "wait4": 61, "membarrier": 324,
    # the snapshot writing its own memory (snapshot.SelfWriter)
    "close": 3, "pwrite64": 18, "openat": 257, "unshare": 272, "close_range": 436,
}
PR_GET_TID_ADDRESS = 40


class InjectError(OSError):
    pass


def _signed(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


def find_syscall_insn(pid: int, maps: list[dict], vdso: bool = True) -> int:
    """Address of a `syscall` instruction inside the task's [vdso], or (a
    task without one, or vdso=False) in its code, libc's first."""
    addr = wayback.find_in_code(pid, maps, lambda code: code.find(SYSCALL_INSN), vdso)
    if not addr:
        raise InjectError(0, f"pid {pid}: no syscall instruction to inject through")
    return addr


class Injector:
    """Injects syscalls into one stopped thread; use as a context manager.

    With `gadgets` (a wayback.Gadgets), the crash-safe way (docs/CRASHSAFE.md):
    a signal frame holding the thread's own state is put below its red zone
    first, every call runs on it and is stepped with PTRACE_SYSCALL (never
    the trap flag, which a dead tracer would leave set: SIGTRAP kills), and
    every signal stays blocked meanwhile (none is taken out of its queue, so
    none can be lost); if crcheckpoint dies at any point, the thread returns
    to its own registers, mask and stack by itself.  `self.scratch` is
    wayback.SCRATCH bytes of that stack area for the calls' data.

    With a bare address (a `syscall` instruction), single-stepping: for
    processes that die with the tracer anyway (snapshots, restored tasks).
    """

    def __init__(self, tid: int, syscall_addr, memfd: int, options: int = 0):
        self.tid = tid
        self.memfd = memfd
        self.saved = pt.getregs(tid)
        self.deferred: list[int] = []
        self.clone_child = 0  # tracer-side pid of a child an injected clone made
        self.frame: wayback.Frame | None = None
        self.masked = False
        self.altstack: tuple[int, int, int] | None = None
        if isinstance(syscall_addr, wayback.Gadgets):
            self.gadgets = syscall_addr
            self.addr = syscall_addr.syscall
            self._set_up_way_back(options)
        else:
            self.gadgets = None
            self.addr = syscall_addr
            self.scratch = 0

    def _set_up_way_back(self, options: int) -> None:
        tid = self.tid
        self.sigmask = pt.getsigmask(tid)
        try:
            xstate = pt.getregset(tid, NT_X86_XSTATE, 1 << 16)
        except OSError as e:
            raise wayback.NoWayBack(e.errno, f"thread {tid}: no XSAVE state to return to") from None
        f = wayback.place(self.saved.rsp, len(xstate))
        stack = [m for m in procfs.maps(tid) if m["start"] < self.saved.rsp <= m["end"]]
        if not stack or f.low < stack[0]["start"] or "w" not in stack[0]["perms"]:
            raise wayback.NoWayBack(0, f"thread {tid}: no room below its stack pointer "
                                       f"{self.saved.rsp:#x} for the way back")
        try:
            f.saved = os.pread(self.memfd, f.top - f.low, f.low)
        except OSError:
            f.saved = b""
        if len(f.saved) != f.top - f.low:
            raise wayback.NoWayBack(0, f"thread {tid}: no room below its stack pointer "
                                       f"{self.saved.rsp:#x} for the way back")
        pt.ptrace(pt.PTRACE_SETOPTIONS, tid, 0, pt.PTRACE_O_TRACESYSGOOD | options)
        for addr, data in wayback.build(self.gadgets, self.saved, self.sigmask, xstate, f):
            os.pwrite(self.memfd, data, addr)
        self.frame = f
        self.scratch = f.scratch
        # The first call fills in the frame's alternate signal stack, where
        # rt_sigreturn reads it from: the frame is complete before any other
        # call can run.
        try:
            self.check("sigaltstack", 0, f.frame + wayback.UC_STACK)
            self.altstack = sp, flags, size = struct.unpack(
                "<Qi4xQ", self.read(f.frame + wayback.UC_STACK, 24))
            if flags & 1 and f.low < sp:     # SS_ONSTACK: in a handler, on a small stack
                raise wayback.NoWayBack(0, f"thread {tid}: its alternate signal stack has no "
                                           "room for the way back (try again)")
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Back to the saved state, in an order where a tracer dying between
        two steps still leaves a way back: mask (the frame restores it too),
        registers, then the stack bytes under the red zone."""
        if self.gadgets is None:
            pt.setregs(self.tid, self.saved)
            return
        if self.masked:
            pt.setsigmask(self.tid, self.sigmask)
            self.masked = False
        pt.setregs(self.tid, self.saved)
        f, self.frame = self.frame, None
        if f is not None:
            os.pwrite(self.memfd, f.saved, f.low)

    def call(self, name: str, *args: int) -> int:
        regs = pt.copy_regs(self.saved)
        regs.rax = NR[name]
        regs.orig_rax = 2**64 - 1
        for reg, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, reg, val & (2**64 - 1))
        regs.rip = self.addr
        if self.gadgets is None:
            return self._singlestep(regs)
        regs.rsp = self.frame.frame
        regs.eflags &= ~0x100
        pt.setregs(self.tid, regs)
        if not self.masked:
            pt.setsigmask(self.tid, wayback.ALL_SIGNALS)
            self.masked = True
        stops = 0           # syscall stops: entry, then exit
        sig = 0
        while True:
            pt.ptrace(pt.PTRACE_SYSCALL, self.tid, 0, sig)
            sig = 0
            status = pt.wait(self.tid)
            if not os.WIFSTOPPED(status):
                raise InjectError(0, f"thread {self.tid} died during syscall injection")
            s, event = os.WSTOPSIG(status), status >> 16
            if s == signal.SIGTRAP | 0x80:
                stops += 1
                if stops == 2:
                    break
            elif event == pt.PTRACE_EVENT_CLONE:
                self.clone_child = pt.geteventmsg(self.tid)
            elif event == 0:
                # Only what no mask blocks (SIGSTOP): delivered after the dump.
                self.deferred.append(s)
        return _signed(pt.getregs(self.tid).rax)

    def _singlestep(self, regs) -> int:
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
        return _signed(pt.getregs(self.tid).rax)

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
