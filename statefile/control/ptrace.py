"""Thin ptrace layer for the requests python-ptrace 0.9.9 lacks.

python-ptrace gives us the syscall name table (used to name what a thread is
blocked in) and the classic requests, but not PTRACE_SEIZE, INTERRUPT, LISTEN,
GETSIGMASK, PEEKSIGINFO, GETREGSET for anything but NT_PRSTATUS, or
process_vm_readv.  Those are issued here through ctypes on libc's ptrace(2) and
syscall(2).  Everything raises OSError with the errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from statefile.format import elfcore as ec

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long

PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_TRACECLONE = 8
PTRACE_O_EXITKILL = 1 << 20

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

NR_get_robust_list = 274
NR_process_vm_readv = 310
NR_process_vm_writev = 311
NR_kcmp = 312
NR_pidfd_open = 434
NR_pidfd_getfd = 438
KCMP_FILE = 0


def _check(res: int, what: str) -> int:
    if res == -1:
        e = ctypes.get_errno()
        if e:
            raise OSError(e, f"{what}: {os.strerror(e)}")
    return res


def ptrace(request: int, tid: int, addr=0, data=0) -> int:
    ctypes.set_errno(0)
    return _check(_libc.ptrace(request, tid, ctypes.c_void_p(addr), ctypes.c_void_p(data)),
                  f"ptrace({request:#x}, {tid})")


def syscall(nr: int, *args) -> int:
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    return _check(_libc.syscall(ctypes.c_long(nr), *cargs), f"syscall {nr}")


def dup_fd_of(pid: int, fd: int) -> int:
    """A duplicate of task pid's fd in this process (pidfd_open + pidfd_getfd:
    the same open file description, so nothing is read from it or changed)."""
    pidfd = os.pidfd_open(pid)
    try:
        return syscall(NR_pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)


def seize(tid: int, options: int = 0) -> None:
    ptrace(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    ptrace(PTRACE_INTERRUPT, tid)


def detach(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_DETACH, tid, 0, sig)


def cont(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_CONT, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    ptrace(PTRACE_SINGLESTEP, tid, 0, sig)


def getregs(tid: int) -> ec.user_regs_struct:
    regs = ec.user_regs_struct()
    ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def copy_regs(regs: ec.user_regs_struct) -> ec.user_regs_struct:
    return ec.user_regs_struct.from_buffer_copy(bytes(regs))


def setregs(tid: int, regs: ec.user_regs_struct) -> None:
    ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t


def process_vm_readv(pid: int, local: "iovec", remote: "iovec") -> int:
    """One-iovec process_vm_readv; returns bytes read or -1 (errno left set)."""
    return _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)


def getregset(tid: int, note_type: int, size: int = 65536) -> bytes:
    buf = ctypes.create_string_buffer(size)
    iov = iovec(ctypes.addressof(buf), size)
    ptrace(PTRACE_GETREGSET, tid, note_type, ctypes.addressof(iov))
    return buf.raw[:iov.iov_len]


def setregset(tid: int, note_type: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    iov = iovec(ctypes.addressof(buf), len(data))
    ptrace(PTRACE_SETREGSET, tid, note_type, ctypes.addressof(iov))


def getsigmask(tid: int) -> int:
    v = ctypes.c_uint64()
    ptrace(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(v))
    return v.value


def setsigmask(tid: int, mask: int) -> None:
    v = ctypes.c_uint64(mask)
    ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(v))


def peeksiginfo(tid: int, shared: bool) -> list[bytes]:
    """Queued signals (without dequeuing them), as raw 128-byte siginfo_t."""
    class args(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                    ("nr", ctypes.c_int32)]
    out: list[bytes] = []
    buf = ctypes.create_string_buffer(128 * 32)
    while True:
        a = args(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, 32)
        n = ptrace(PTRACE_PEEKSIGINFO, tid, ctypes.addressof(a), ctypes.addressof(buf))
        out.extend(buf.raw[i * 128:(i + 1) * 128] for i in range(n))
        if n < 32:
            return out


def getsiginfo(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(128)
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf.raw


def geteventmsg(tid: int) -> int:
    v = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(v))
    return v.value


def rseq_configuration(tid: int) -> dict | None:
    """PTRACE_GET_RSEQ_CONFIGURATION: {"ptr", "len", "sig", "flags"} or None."""
    buf = ctypes.create_string_buffer(32)
    try:
        ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, 32, ctypes.addressof(buf))
    except OSError as e:
        if e.errno in (errno.EIO, errno.EINVAL):
            return None
        raise
    # struct ptrace_rseq_configuration { u64 rseq_abi_pointer; u32 rseq_abi_size;
    #                                     u32 signature; u32 flags; u32 pad; }
    ptr, ln, sig, flags = struct.unpack_from("<QIII", buf.raw)
    return {"ptr": ptr, "len": ln, "sig": sig, "flags": flags}


def get_robust_list(tid: int) -> tuple[int, int]:
    head = ctypes.c_void_p()
    ln = ctypes.c_size_t()
    syscall(NR_get_robust_list, tid, ctypes.byref(head), ctypes.byref(ln))
    return head.value or 0, ln.value


def kcmp_file(pid1: int, pid2: int, fd1: int, fd2: int) -> int:
    """0 when both fds refer to the same open file description."""
    return syscall(NR_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2)


def wait(tid: int) -> int:
    """waitpid(tid, __WALL); returns the raw status."""
    _, status = os.waitpid(tid, 0x40000000)
    return status


def wait_interrupt_stop(tid: int, deliver: bool = False) -> bool:
    """Wait until a seized thread reaches its PTRACE_EVENT_STOP (after
    PTRACE_INTERRUPT, or as a new clone); signal-delivery stops on the way are
    delivered (`deliver`) or suppressed.  False when the thread exited."""
    while True:
        status = wait(tid)
        if not os.WIFSTOPPED(status):
            return False
        if status >> 16 == PTRACE_EVENT_STOP:
            return True
        cont(tid, os.WSTOPSIG(status) if deliver else 0)


def wait_exit(tid: int) -> None:
    """Wait (__WALL) until a traced thread or a child has exited; stops on the
    way are passed over, a tid that is not ours (any more) returns at once."""
    while True:
        try:
            status = wait(tid)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return
