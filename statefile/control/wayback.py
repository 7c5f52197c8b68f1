"""The way back: how a thread that crcheckpoint changed returns to its own
state by itself when crcheckpoint dies (docs/CRASHSAFE.md).

Injecting a syscall means giving a stopped thread other registers.  If the
tracer dies (SIGKILL, OOM) while they are set, the kernel detaches the thread
and it runs on with them.  So before a thread's registers are touched, a
signal frame (``struct rt_sigframe``, as the kernel builds for a signal
handler) holding its saved registers, signal mask and whole XSAVE area is put
below its red zone, and every injected syscall runs with the stack pointer on
that frame, through two instructions that are already in the process:

* ``syscall`` in the vDSO followed only by register clearing and ``ret``
  (the vDSO's syscall fallbacks end like that);
* ``mov $15, %eax; syscall`` (rt_sigreturn), which every program that
  installs a signal handler carries (glibc's and musl's ``__restore_rt``,
  Go's ``runtime.sigreturn``).

Normally crcheckpoint reads the result at the syscall-exit stop and sets the
next call or the saved registers.  If it is gone, the thread simply goes on:
``ret`` jumps to the rt_sigreturn instruction and the kernel restores the
registers, mask, XSAVE state and alternate signal stack from the frame: the
thread continues where it was stopped, as if it had returned from a signal
handler.  A thread stopped inside an interrupted syscall gets the restart the
kernel would have done (``rip - 2``, ``rax = orig_rax``).

The same frames chained (each one's stack pointer is the address of the next)
run a short fixed sequence of syscalls with no code of our own: that is how a
copy-on-write snapshot's helper thread reaps the snapshot and ends itself
(statefile/control/snapshot.py).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

PAGE = 4096
RED_ZONE = 128
# struct rt_sigframe: pretcode (8), struct ucontext (304), siginfo (128)
UC = 8                      # offset of the ucontext in the frame
UC_STACK = UC + 16          # uc_stack (stack_t: ss_sp, ss_flags, ss_size)
UC_MCONTEXT = UC + 40       # struct sigcontext, 256 bytes
UC_SIGMASK = UC + 296
LINK_SIZE = 8 + 304         # a chained frame: the siginfo is never read
FRAME_SIZE = LINK_SIZE + 128
UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS = 1, 2, 4
SS_DISABLE = 2
FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
SW_RESERVED = 464           # struct _fpx_sw_bytes in the fxsave area
ALL_SIGNALS = 2**64 - 1     # a sigset with every signal
_U64 = 2**64 - 1
_TF = 0x100

ERESTART = (512, 513, 514, 516)   # ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, _RESTARTBLOCK

# rt_sigreturn as libcs and Go's runtime spell it
_SIGRETURN = (b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05",      # mov $15,%rax; syscall
              b"\xb8\x0f\x00\x00\x00\x0f\x05")              # mov $15,%eax; syscall


@dataclass(frozen=True)
class Gadgets:
    syscall: int      # `syscall` followed by register clearing and `ret` (vDSO)
    sigreturn: int    # `mov $15, %eax; syscall`


class NoWayBack(OSError):
    """This thread cannot be given a way back (no gadget, no stack room)."""


def _returns_after(code: bytes, i: int) -> bool:
    """Whether the bytes after the `syscall` at i only clear registers (`xor
    r32, r32`: 31 /r, or with a REX prefix 45/48/4d 31 /r) or are nops, then ret."""
    j = i + 2
    while j < len(code):
        b = code[j]
        if b == 0xC3:
            return True
        if b == 0x90:
            j += 1
        elif b == 0x31 and j + 1 < len(code) and code[j + 1] >= 0xC0 and \
                (code[j + 1] >> 3 & 7) == (code[j + 1] & 7):
            j += 2
        elif b in (0x45, 0x48, 0x4D) and j + 2 < len(code) and code[j + 1] == 0x31 and \
                code[j + 2] >= 0xC0 and (code[j + 2] >> 3 & 7) == (code[j + 2] & 7):
            j += 3
        else:
            return False
    return False


def _read(pid: int, start: int, end: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, end - start, start)
    finally:
        os.close(fd)


_sigreturn_cache: dict[tuple, int] = {}     # (dev, inode, offset, size) -> offset in mapping


def _syscall_ret(code: bytes) -> int:
    """Offset of a `syscall` followed only by register clearing and `ret`, or -1."""
    i = code.find(b"\x0f\x05")
    while i >= 0 and not _returns_after(code, i):
        i = code.find(b"\x0f\x05", i + 1)
    return i


def executable(maps: list[dict]) -> list[dict]:
    """The task's executable mappings but the vDSO's, libc's first (nearly
    always there)."""
    execs = [m for m in maps if m["perms"][2] == "x" and m["path"] not in ("[vdso]", "[vsyscall]")]
    return sorted(execs, key=lambda m: "libc" not in m["path"])


def find_in_code(pid: int, maps: list[dict], find, vdso: bool = True) -> int:
    """The first address where find(bytes) -> offset (-1: none) finds its
    instruction: in the task's [vdso] (unless vdso=False), else in its other
    code (executable(): a task that unmapped its vDSO); 0 if nowhere."""
    vdsos = [m for m in maps if m["path"] == "[vdso]"] if vdso else []
    for m in vdsos + executable(maps):
        try:
            i = find(_read(pid, m["start"], m["end"]))
        except OSError:
            continue
        if i >= 0:
            return m["start"] + i
    return 0


def find_gadgets(pid: int, maps: list[dict]) -> Gadgets:
    """The two instructions the way back needs, in task pid's own memory:
    the `syscall; ret` in the vDSO, or in the program's code for a task that
    unmapped its vDSO (libc's stubs of calls that cannot fail end so)."""
    syscall = find_in_code(pid, maps, _syscall_ret)
    if not syscall:
        raise NoWayBack(0, f"pid {pid}: no `syscall; ret` in its vDSO or its code")
    for m in executable(maps):
        key = (m.get("dev"), m.get("inode"), m.get("offset"), m["end"] - m["start"], m["path"])
        off = _sigreturn_cache.get(key) if m.get("inode") else None
        if off is None:
            try:
                code = _read(pid, m["start"], m["end"])
            except OSError:
                continue
            found = [code.find(p) for p in _SIGRETURN]
            found = [f for f in found if f >= 0]
            off = min(found) if found else -1
            if m.get("inode"):
                _sigreturn_cache[key] = off
        if off >= 0:
            return Gadgets(syscall, m["start"] + off)
    raise NoWayBack(0, f"pid {pid}: no rt_sigreturn instruction in its code (a program "
                       "without a signal-handling libc)")


def restarted(regs) -> tuple[int, int]:
    """(rip, rax) the thread resumes with: an interrupted syscall restarts,
    as the kernel would do on the way back to user space without a handler."""
    orig = regs.orig_rax
    rax = regs.rax - 2**64 if regs.rax >= 2**63 else regs.rax
    if orig < 2**63 and -rax in ERESTART:
        return regs.rip - 2, orig
    return regs.rip, regs.rax


def link(g: Gadgets, *, rip: int, rsp: int, rax: int, args=(), regs=None, sigmask=ALL_SIGNALS,
         fpstate: int = 0, altstack=(0, SS_DISABLE, 0), cs: int = 0x33, ss: int = 0x2B,
         eflags: int = 0x202) -> bytes:
    """One rt_sigframe without siginfo (LINK_SIZE bytes): rt_sigreturn on it
    sets these registers.  `regs` (a user_regs_struct) gives every register
    not named; `args` are rdi, rsi, rdx, r10, r8, r9."""
    names = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx",
             "rdx", "rax", "rcx", "rsp", "rip")
    v = {n: (getattr(regs, n) if regs is not None else 0) for n in names}
    for reg, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        v[reg] = val & _U64
    v.update(rip=rip, rsp=rsp, rax=rax & _U64)
    if regs is not None:
        cs, ss, eflags = regs.cs, regs.ss, regs.eflags & ~_TF
    mc = struct.pack("<17QQ4H4QQ64x", *(v[n] for n in names), eflags, cs, 0, 0, ss,
                     0, 0, 0, 0, fpstate)
    flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS | (UC_FP_XSTATE if fpstate else 0)
    uc = struct.pack("<QQQi4xQ", flags, 0, altstack[0], altstack[1], altstack[2]) + mc + \
        struct.pack("<Q", sigmask)
    out = struct.pack("<Q", g.sigreturn) + uc
    assert len(out) == LINK_SIZE
    return out


def sigframe_xstate(xstate: bytes) -> bytes:
    """A PTRACE_GETREGSET NT_X86_XSTATE area as a signal frame's fpstate:
    struct _fpx_sw_bytes in the fxsave area's software-reserved bytes (where
    ptrace puts XCR0) and FP_XSTATE_MAGIC2 after it, so rt_sigreturn restores
    every component with XRSTOR, not just the legacy area."""
    xcr0 = struct.unpack_from("<Q", xstate, SW_RESERVED)[0]
    sw = struct.pack("<IIQI28x", FP_XSTATE_MAGIC1, len(xstate) + 4, xcr0, len(xstate))
    return (xstate[:SW_RESERVED] + sw + xstate[SW_RESERVED + len(sw):]
            + struct.pack("<I", FP_XSTATE_MAGIC2))


@dataclass
class Frame:
    """Where a thread's way back sits on its stack: [low, top) is saved before
    and written back after."""
    low: int
    top: int
    frame: int          # the rt_sigframe (its pretcode slot); rsp of every call
    fpstate: int
    scratch: int        # SCRATCH bytes the injected calls may use for their data
    saved: bytes = b""


SCRATCH = 1024


def place(rsp: int, xstate_len: int) -> Frame:
    top = rsp - RED_ZONE
    fp = (top - xstate_len - 4) & ~63
    frame = (fp - FRAME_SIZE) & ~15
    scratch = (frame - SCRATCH) & ~63
    return Frame(scratch, top, frame, fp, scratch)


def build(g: Gadgets, regs, sigmask: int, xstate: bytes, f: Frame,
          altstack=(0, SS_DISABLE, 0)) -> list[tuple[int, bytes]]:
    """The frame returning to `regs` (restart applied), as writes."""
    rip, rax = restarted(regs)
    fr = link(g, rip=rip, rsp=regs.rsp, rax=rax, regs=regs, sigmask=sigmask,
              fpstate=f.fpstate, altstack=altstack) + bytes(128)
    return [(f.frame, fr), (f.fpstate, sigframe_xstate(xstate))]


__all__ = ["Gadgets", "NoWayBack", "find_gadgets", "link", "build", "place", "Frame",
           "restarted", "UC_STACK", "LINK_SIZE", "ALL_SIGNALS", "SCRATCH"]
