"""Syscall numbers, flags and structures the restorer needs (x86-64), and the
few raw syscalls Python has no wrapper for (clone3 with set_tid, unshare)."""

from __future__ import annotations

import ctypes
import os
import signal
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

PAGE = os.sysconf("SC_PAGE_SIZE")
TASK_SIZE = 0x7FFFFFFFF000

# syscall numbers (x86-64)
NR = {
    "read": 0, "write": 1, "open": 2, "close": 3, "mmap": 9, "mprotect": 10, "munmap": 11,
    "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14, "ioctl": 16, "mremap": 25,
    "madvise": 28, "shmat": 30, "pause": 34, "nanosleep": 35, "getitimer": 36, "setitimer": 38,
    "getpid": 39, "clone": 56, "exit": 60, "kill": 62, "fcntl": 72, "umask": 95,
    "setgroups": 116, "setresuid": 117, "setresgid": 119, "capset": 126,
    "rt_sigqueueinfo": 129, "sigaltstack": 131, "personality": 135, "prctl": 157,
    "arch_prctl": 158, "gettid": 186, "set_tid_address": 218, "restart_syscall": 219,
    "clock_nanosleep": 230, "exit_group": 231, "set_robust_list": 273,
    "rt_tgsigqueueinfo": 297, "userfaultfd": 323, "rseq": 334, "clone3": 435,
    "pidfd_open": 434, "pidfd_getfd": 438, "dup3": 292,
    "io_setup": 206, "io_getevents": 208, "io_submit": 209, "openat": 257,
}

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
RSEQ_FLAG_UNREGISTER = 1
PR_SET_MM, PR_SET_MM_MAP, PR_SET_MM_MAP_SIZE = 35, 14, 15
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 8, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM, CLONE_NEWUSER, CLONE_NEWPID = 0x10000, 0x40000, 0x10000000, 0x20000000
CLONE_NEWNS = 0x20000
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM

MADV = {"dd": 16, "dc": 10, "wf": 18, "hg": 14, "nh": 15,
        "sr": 2, "rr": 1, "mg": 12}   # smaps VmFlags -> the madvise advice that sets it
MADV_GUARD_INSTALL = 102
MAP_LOCKED, MAP_DROPPABLE = 0x2000, 0x08
MLOCK_ONFAULT = 1
NR["mlock2"] = 325

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
TIMER_ABSTIME = 1


class clone_args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


assert ctypes.sizeof(clone_args) == 88


class prctl_mm_map(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
        "start_stack", "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


assert ctypes.sizeof(prctl_mm_map) == 104


def errno_of(res: int) -> int:
    """Negative errno of an injected syscall result, else 0."""
    return -res if -4096 < res < 0 else 0


def fork_with_pid(pid: int | None, flags: int = 0) -> int:
    """fork(), the child getting `pid` (clone3 set_tid) when given, and
    clone `flags` (CLONE_FILES) when given.

    Returns like os.fork().  Raises OSError (EEXIST when the pid is taken,
    EPERM without CAP_SYS_ADMIN over the pid namespace).  Only call it while the
    process is single-threaded: the child runs Python without the
    interpreter's after-fork hooks.
    """
    if pid is None and not flags:
        return os.fork()
    if pid is None:
        return clone3(clone_args(flags=flags, exit_signal=signal.SIGCHLD), f"flags={flags:#x}")
    tids = (ctypes.c_int32 * 1)(pid)
    args = clone_args(flags=flags, exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tids),
                      set_tid_size=1)
    return clone3(args, f"set_tid={pid}")


def clone3(args: clone_args, what: str) -> int:
    """The raw clone3 syscall (returns like os.fork(); OSError naming `what`)."""
    ctypes.set_errno(0)
    res = _libc.syscall(ctypes.c_long(NR["clone3"]), ctypes.byref(args),
                        ctypes.c_size_t(ctypes.sizeof(args)))
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"clone3({what}): {os.strerror(e)}")
    return res


def unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare({flags:#x}): {os.strerror(e)}")


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns({nstype:#x}): {os.strerror(e)}")


def children_back_in_own_pidns(own: int) -> None:
    """After unshare(CLONE_NEWPID) and the fork of the new namespace's first
    process: later children (and threads: the kernel refuses CLONE_THREAD
    while the two differ) are made in our own pid namespace again.  `own` is
    an fd of /proc/self/ns/pid opened before the unshare; it is closed."""
    try:
        setns(own, 0x20000000)        # CLONE_NEWPID
    finally:
        os.close(own)


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    res = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(a2), ctypes.c_ulong(a3),
                      ctypes.c_ulong(a4), ctypes.c_ulong(a5))
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")
    return res


def personality(p: int) -> None:
    _libc.personality(ctypes.c_ulong(p))


def pidfd_open(pid: int) -> int:
    res = _libc.syscall(ctypes.c_long(NR["pidfd_open"]), ctypes.c_int(pid), ctypes.c_uint(0))
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"pidfd_open({pid}): {os.strerror(e)}")
    return res


def pidfd_getfd(pidfd: int, fd: int) -> int:
    res = _libc.syscall(ctypes.c_long(NR["pidfd_getfd"]), ctypes.c_int(pidfd), ctypes.c_int(fd),
                        ctypes.c_uint(0))
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"pidfd_getfd({fd}): {os.strerror(e)}")
    return res


def pack_sigaction(handler: int, flags: int, restorer: int, mask: int) -> bytes:
    return struct.pack("<QQQQ", handler, flags, restorer, mask)


def close_all(fds) -> None:
    """Close every fd of a {key: fd} dict or of an iterable, ignoring errors:
    the clean-up after a failure."""
    for fd in set(fds.values() if isinstance(fds, dict) else fds):
        try:
            os.close(fd)
        except OSError:
            pass
