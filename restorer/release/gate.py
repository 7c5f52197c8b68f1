"""The release gate: an atomic release where no freezer can be had (docs/RESTORE.md,
"The release is atomic").

Without root (or with no writable freezer) crrestart cannot freeze the tree
around its detach loop, and a crrestart killed inside that loop used to leave
the tasks detached so far running (for the few ms until the guard killed
them) while the rest died.  The gate makes the loop harmless: every thread is
detached *into a read(2) on a pipe*, with every signal blocked, and the tree
runs when crrestart writes one GO byte per waiting thread.  The pipe's write
end is in crrestart's fd table only, which the guard shares
(restorer/release/guard.py), so:

* crrestart dies before the release ("C" not told): the guard kills every
  task, each one still blocked in its read or still traced, then exits;
* crrestart writes the bytes after telling the guard "C": the whole tree runs;
* crrestart dies between the two: the guard writes them (it was told the
  fd and the count, line "Q");
* crrestart and the guard both die before the bytes are written: every
  waiting thread reads end-of-file and kills its own process (below), the
  traced ones die by PTRACE_O_EXITKILL: nothing of the tree runs.

Each thread reads from an fd of its own (a duplicate of the task's
inherited read end, made by injection above the program's fds), so that it
can close it without disturbing its siblings.  The thread gets there with
registers crrestart sets and three signal frames it writes below the
thread's red zone (statefile/control/wayback.py), run through instructions already
in the process (the vDSO's `syscall; ret`, libc's rt_sigreturn):

    read(fd, &K.rax, 1)       -> ret -> rt_sigreturn on frame K
    K: kill(pid, SIGKILL), its rax byte 62 turned into 39 (getpid) by GO
                              -> ret -> rt_sigreturn on frame C
    C: close(fd)              -> ret -> rt_sigreturn on frame F
    F: the thread's own registers, signal mask, XSAVE state and alternate stack

A thread that cannot be gated (no room on its stack, no rt_sigreturn in its
code, inside an rseq critical section) is detached as before, with a
warning; a group-stopped task is released ahead of the others anyway
(restore_task.release_stopped).  CRELF_NO_GATE=1 turns the gate off (the
negative check of tests/test_crashsafe.py)."""

from __future__ import annotations

import os
import struct

from statefile.format import elfcore as ec, records as R
from statefile.control import ptrace as pt
from statefile.control import procfs, wayback

GATE_ID = -7            # the read end's key among the files the tasks inherit
F_DUPFD_CLOEXEC = 1030
NR_READ, NR_CLOSE, NR_ACCESS, NR_KILL = 0, 3, 21, 62
NR_GETPID = 39
GO = bytes([NR_GETPID])     # the byte that turns the kill (62, 0x3e) into getpid (39, 0x27)
RAX_IN_FRAME = wayback.UC_MCONTEXT + 13 * 8     # sigcontext: r8..r15, rdi, rsi, rbp, rbx, rdx, rax


def wanted() -> bool:
    return not os.environ.get("CRELF_NO_GATE")


def make() -> tuple[int, int]:
    """(read end, write end); the write end stays with crrestart alone (the
    tasks and a --pidns init close every inherited fd they do not use)."""
    return os.pipe2(os.O_CLOEXEC)


def extra_fd(extras) -> int:
    """The fd number the gate's read end gets in a task: above its extras."""
    return max((e.fd for e in extras), default=2) + 1


def gadgets(rpid: int) -> wayback.Gadgets | None:
    try:
        return wayback.find_gadgets(rpid, procfs.maps(rpid))
    except OSError:
        return None


def _pread(memfd: int, n: int, addr: int, touch) -> bytes:
    try:
        return os.pread(memfd, n, addr)
    except OSError as e:
        if e.errno != 5:
            raise
        touch(addr & ~4095)           # (lazy memory: see write_frames)
        return os.pread(memfd, n, addr)


def _in_rseq_cs(memfd: int, th: R.Thread, touch) -> bool:
    """Whether the thread's rseq area names a critical section (a rseq_cs
    pointer, cleared by the kernel once the thread returns elsewhere: the
    gate's detour would let it go on inside the section unaborted)."""
    r = th.rseq
    if r is None or not r.ptr:
        return False
    try:
        cs = _pread(memfd, 8, r.ptr + 8, touch)
    except OSError:
        return True
    return len(cs) != 8 or struct.unpack("<Q", cs)[0] != 0


def _frames(final, xstate_len: int) -> tuple[wayback.Frame, int, int]:
    """The final frame (wayback's layout) and below it the close frame and
    the kill-or-go frame."""
    f = wayback.place(final.rsp, xstate_len)
    close_frame = (f.low - wayback.LINK_SIZE) & ~15
    return f, close_frame, (close_frame - wayback.LINK_SIZE) & ~15


def check(th: R.Thread, final: ec.user_regs_struct, xstate_len: int, memfd: int,
          mappings: list[dict], touch) -> str | None:
    """Why this thread cannot be gated, or None (before anything is changed).
    `mappings`: the task's now (restore/memory.parse_maps)."""
    if _in_rseq_cs(memfd, th, touch):
        return "inside an rseq critical section"
    if not xstate_len:
        return "no XSAVE state"
    _, _, low = _frames(final, xstate_len)
    ss = th.sigaltstack
    if ss is not None and ss.sp <= final.rsp < ss.sp + ss.size and low < ss.sp:
        return "its alternate signal stack has no room for the gate"
    stack = [m for m in mappings if m["start"] < final.rsp <= m["end"]]
    if not stack or low < stack[0]["start"] or "w" not in stack[0]["perms"]:
        return f"no room below its stack pointer {final.rsp:#x}"
    return None


def write_frames(th: R.Thread, vpid: int, final: ec.user_regs_struct, xstate: bytes, gfd: int,
                 g: wayback.Gadgets, memfd: int, touch) -> tuple[int, int]:
    """Write the three frames of a thread that passed check().  The read
    puts the byte it gets (GO) into the low byte of the first frame's rax,
    which is kill(vpid, SIGKILL) as written: with the byte, getpid(), a
    no-op; at end-of-file (crrestart and the guard both gone before the
    release, nobody wrote), the task kills itself.  Then close(gfd), then the
    thread's own state.  `touch(addr)` makes the task itself fault a page in
    (lazy memory, which /proc/PID/mem cannot fault: EIO).  Returns (stack
    pointer, read buffer) for enter()."""
    f, close_frame, go_frame = _frames(final, len(xstate))
    ss = th.sigaltstack
    altstack = (ss.sp, ss.flags & ~1, ss.size) if ss is not None else (0, wayback.SS_DISABLE, 0)
    # (final's syscall restart is done already: orig_rax -1, build changes nothing)
    writes = wayback.build(g, final, th.sigmask, xstate, f, altstack) + [
        (close_frame, wayback.link(g, rip=g.syscall, rsp=f.frame, rax=NR_CLOSE, args=(gfd,))),
        (go_frame, wayback.link(g, rip=g.syscall, rsp=close_frame, rax=NR_KILL,
                                args=(vpid, 9)))]
    for addr, data in writes:
        try:
            os.pwrite(memfd, data, addr)
        except OSError as e:
            if e.errno != 5:
                raise
            for page in range(addr & ~4095, addr + len(data), 4096):
                touch(page)
            os.pwrite(memfd, data, addr)
    return go_frame, go_frame + RAX_IN_FRAME


def enter(rtid: int, final: ec.user_regs_struct, g: wayback.Gadgets, gfd: int, sp: int,
          buf: int) -> None:
    """The thread's registers at the gate (after its own were set, XSAVE
    state included): read(gfd, buf, 1) with every signal blocked,
    returning through the frames write_frames() wrote."""
    r = pt.copy_regs(final)
    r.rip, r.rsp, r.rax, r.orig_rax = g.syscall, sp, NR_READ, 2**64 - 1
    r.rdi, r.rsi, r.rdx = gfd, buf, 1
    r.eflags &= ~0x100
    pt.setsigmask(rtid, wayback.ALL_SIGNALS)
    pt.setregs(rtid, r)


def open_gate(fd: int, n: int, timeout: float = 10.0) -> None:
    """Give n waiting threads their GO byte (crrestart at the release, or
    the guard finishing it); beyond the pipe's capacity the writes wait for
    readers, which are running by then."""
    import select
    import time
    left, end = n, time.monotonic() + timeout
    os.set_blocking(fd, False)
    while left and time.monotonic() < end:
        try:
            left -= os.write(fd, GO * min(left, 65536))
        except BlockingIOError:
            select.select([], [fd], [], 0.05)
