"""The crrun monitor: watch a process tree for state crelf cannot checkpoint.

How it works
------------
A classic-BPF seccomp filter is installed in the launched program between
fork and exec.  It returns ``SECCOMP_RET_ALLOW`` for almost every syscall and
``SECCOMP_RET_USER_NOTIF`` only for the few that create state crelf cannot
save (the ``WATCHED`` table below: io_uring_setup, perf_event_open, bpf
loading a program, BTF or a link, userfaultfd, fanotify_init of a permission
class, ptrace attach/seize/traceme, socket of a family other than
unix/inet/inet6/netlink).  Argument checks (socket family, ptrace request,
bpf command, fanotify class) are done in the filter, so allowed calls never
reach userspace.  The
filter is inherited by every thread and descendant, so the whole tree is
watched.  The kernel's seccomp action cache (5.11+) recognises the syscalls
whose verdict is always ALLOW and skips the filter for them entirely, which
is why the overhead on ordinary programs is negligible.

The filter was installed with ``SECCOMP_FILTER_FLAG_NEW_LISTENER``: the child
gets a listener fd, sends it to the parent over a socketpair (SCM_RIGHTS) and
closes it before exec.  The parent (``Monitor``) polls the listener, receives
each notification (``SECCOMP_IOCTL_NOTIF_RECV``), records a flag for the
task's thread group with ``statefile.check.flags.add``, prints one line to stderr
(and a JSON line to the optional log), and answers
(``SECCOMP_IOCTL_NOTIF_SEND``): by default with
``SECCOMP_USER_NOTIF_FLAG_CONTINUE`` (the syscall runs as usual), in strict
mode with an errno (the program sees a failure and stays checkpointable).
The listener reports POLLHUP once every task using the filter is gone.

Architectures: x86-64 syscalls are checked; x32 syscalls (bit 30 of the
number) are refused with ENOSYS; i386 syscalls (``int 0x80`` from a 32-bit
or 64-bit program) are checked with the i386 numbers, ``socketcall`` included
(its socket family sits in the task's memory, so the monitor reads it);
any other architecture value is refused with ENOSYS.

Limits: with CONTINUE a flag is recorded when the syscall is *attempted*
(seccomp runs before the syscall, whose result the monitor never sees), so a
call that then fails (perf_event_open without permission) is flagged too.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from statefile.check import flags, support

# ----------------------------------------------------------------- constants

# <linux/audit.h>
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000

# <linux/seccomp.h>
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1

PR_SET_NO_NEW_PRIVS = 38
NR_SECCOMP = 317          # x86-64
NR_PIDFD_OPEN = 434
NR_PIDFD_GETFD = 438


def _ioc(direction: int, nr: int, size: int) -> int:
    """The kernel's _IOC(dir, '!', nr, size) (asm-generic/ioctl.h)."""
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2


class SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int32), ("arch", ctypes.c_uint32),
                ("instruction_pointer", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6)]


class SeccompNotif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("data", SeccompData)]


class SeccompNotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


class SeccompNotifSizes(ctypes.Structure):
    _fields_ = [("seccomp_notif", ctypes.c_uint16), ("seccomp_notif_resp", ctypes.c_uint16),
                ("seccomp_data", ctypes.c_uint16)]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


assert ctypes.sizeof(SeccompData) == 64
assert ctypes.sizeof(SeccompNotif) == 80
assert ctypes.sizeof(SeccompNotifResp) == 24
assert ctypes.sizeof(SockFilter) == 8
assert ctypes.sizeof(SockFprog) == 16

SECCOMP_IOCTL_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, ctypes.sizeof(SeccompNotif))
SECCOMP_IOCTL_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, ctypes.sizeof(SeccompNotifResp))
SECCOMP_IOCTL_NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, 8)
assert SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
assert SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101
assert SECCOMP_IOCTL_NOTIF_ID_VALID == 0x40082102

# offsets into struct seccomp_data for BPF loads (little endian: low word first)
OFF_NR, OFF_ARCH = 0, 4


def OFF_ARG_LO(i: int) -> int:  # noqa: N802
    return 16 + 8 * i


def OFF_ARG_HI(i: int) -> int:  # noqa: N802
    return 16 + 8 * i + 4


# socket families whose sockets crelf handles (or a policy may skip): these
# are allowed in the filter and never reach the monitor.
ALLOWED_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK)
# ptrace requests that make a task traced
PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_SEIZE = 0, 16, 0x4206
TRACING_REQUESTS = (PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_SEIZE)
SYS_SOCKET = 1  # socketcall(2) call number

# ------------------------------------------------------------ what is watched


@dataclass(frozen=True)
class Watch:
    """One watched syscall: its name, the support-table row (statefile/check/support.py)
    of the resource it creates, and the errno --strict answers with.  Why that
    cannot be checkpointed, and which policy class may skip it, come from the
    table row."""
    name: str
    resource: str
    strict_errno: int
    check: str = ""  # "" (always), "socket" (family), "ptrace" (request), "socketcall",
    #                  "fanotify" (a permission class only)

    @property
    def row(self) -> support.Resource:
        return support.BY_KEY[self.resource]

    @property
    def reason(self) -> str:
        return self.row.reason


_IO_URING = Watch("io_uring_setup", "fd:io_uring", errno.ENOSYS)  # liburing falls back
_PERF = Watch("perf_event_open", "fd:perf_event", errno.EPERM)
_BPF = Watch("bpf", "fd:bpf", errno.EPERM, "bpf")
# bpf() commands that make what a checkpoint refuses: a program, a raw
# tracepoint, BTF, a link (maps are checked at checkpoint: most are saved)
BPF_REFUSED_CMDS = {5: "BPF_PROG_LOAD", 13: "BPF_PROG_GET_FD_BY_ID",
                    17: "BPF_RAW_TRACEPOINT_OPEN", 18: "BPF_BTF_LOAD",
                    19: "BPF_BTF_GET_FD_BY_ID", 28: "BPF_LINK_CREATE",
                    30: "BPF_LINK_GET_FD_BY_ID", 33: "BPF_ITER_CREATE", 36: "BPF_TOKEN_CREATE"}
_UFFD = Watch("userfaultfd", "fd:userfaultfd", errno.EPERM)
_FANOTIFY = Watch("fanotify_init", "fd:fanotify-other", errno.EPERM, "fanotify")
FAN_CLASS_PERMISSION = 0x0C    # FAN_CLASS_CONTENT | FAN_CLASS_PRE_CONTENT
_PTRACE = Watch("ptrace", "task:ptrace", errno.EPERM, "ptrace")
_SOCKET = Watch("socket", "fd:socket:other", errno.EAFNOSUPPORT, "socket")
_SOCKETCALL = Watch("socketcall", "fd:socket:other", errno.EAFNOSUPPORT, "socketcall")

#: arch -> {syscall number: Watch}
WATCHED: dict[int, dict[int, Watch]] = {
    AUDIT_ARCH_X86_64: {425: _IO_URING, 298: _PERF, 321: _BPF, 323: _UFFD, 300: _FANOTIFY,
                        101: _PTRACE, 41: _SOCKET},
    AUDIT_ARCH_I386: {425: _IO_URING, 336: _PERF, 357: _BPF, 374: _UFFD, 338: _FANOTIFY,
                      26: _PTRACE, 359: _SOCKET, 102: _SOCKETCALL},
}

# ---------------------------------------------------------------- the filter

BPF_LD_W_ABS = 0x20      # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15         # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35         # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45        # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06         # BPF_RET | BPF_K


class _Asm:
    """A tiny classic-BPF assembler with symbolic labels for jump targets."""

    def __init__(self):
        self.code: list[tuple] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def ld(self, off: int) -> None:
        self.code.append((BPF_LD_W_ABS, None, None, off))

    def jeq(self, k: int, jt, jf=None) -> None:
        self.code.append((BPF_JEQ_K, jt, jf, k))

    def jge(self, k: int, jt, jf=None) -> None:
        self.code.append((BPF_JGE_K, jt, jf, k))

    def jset(self, k: int, jt, jf=None) -> None:
        self.code.append((BPF_JSET_K, jt, jf, k))

    def ret(self, k: int) -> None:
        self.code.append((BPF_RET_K, None, None, k))

    def assemble(self) -> list[tuple[int, int, int, int]]:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            def rel(target):
                if target is None:  # fall through
                    return 0
                off = self.labels[target] - pc - 1
                assert 0 <= off <= 255, f"jump to {target} out of range"
                return off
            out.append((code, rel(jt), rel(jf), k))
        return out


def build_filter() -> list[tuple[int, int, int, int]]:
    """The seccomp program as (code, jt, jf, k) tuples."""
    a = _Asm()
    a.ld(OFF_ARCH)
    a.jeq(AUDIT_ARCH_X86_64, "x86_64")
    a.jeq(AUDIT_ARCH_I386, "i386")
    a.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)          # unknown architecture

    for arch, tag in ((AUDIT_ARCH_X86_64, "x86_64"), (AUDIT_ARCH_I386, "i386")):
        a.label(tag)
        a.ld(OFF_NR)
        if arch == AUDIT_ARCH_X86_64:
            # x32 ABI: refuse.  nr == -1 is what a tracer sets to skip a
            # syscall: let it through untouched (the kernel returns ENOSYS).
            a.jge(X32_SYSCALL_BIT, f"{tag}_x32")
        specials = []
        for nr, w in WATCHED[arch].items():
            if w.check:
                specials.append((nr, w))
                a.jeq(nr, f"{tag}_{w.check}")
            else:
                a.jeq(nr, "notify")
        a.ret(SECCOMP_RET_ALLOW)
        if arch == AUDIT_ARCH_X86_64:
            a.label(f"{tag}_x32")
            a.jeq(0xFFFFFFFF, "allow")
            a.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
        for nr, w in specials:
            a.label(f"{tag}_{w.check}")
            if w.check == "socket":              # socket(int family, ...)
                a.ld(OFF_ARG_LO(0))
                for fam in ALLOWED_FAMILIES:
                    a.jeq(int(fam), "allow")
                a.ret(SECCOMP_RET_USER_NOTIF)
            elif w.check == "ptrace":            # ptrace(long request, ...)
                if arch == AUDIT_ARCH_X86_64:
                    a.ld(OFF_ARG_HI(0))
                    a.jeq(0, None, "allow")
                a.ld(OFF_ARG_LO(0))
                for req in TRACING_REQUESTS:
                    a.jeq(req, "notify")
                a.ret(SECCOMP_RET_ALLOW)
            elif w.check == "socketcall":        # socketcall(int call, ulong *args)
                a.ld(OFF_ARG_LO(0))
                a.jeq(SYS_SOCKET, "notify", "allow")
            elif w.check == "bpf":               # bpf(int cmd, ...)
                a.ld(OFF_ARG_LO(0))
                for cmd in BPF_REFUSED_CMDS:
                    a.jeq(cmd, "notify")
                a.ret(SECCOMP_RET_ALLOW)
            elif w.check == "fanotify":          # fanotify_init(unsigned flags, ...)
                a.ld(OFF_ARG_LO(0))
                a.jset(FAN_CLASS_PERMISSION, "notify", "allow")
    a.label("notify")
    a.ret(SECCOMP_RET_USER_NOTIF)
    a.label("allow")
    a.ret(SECCOMP_RET_ALLOW)
    return a.assemble()


def filter_bytes() -> bytes:
    """The program as the kernel stores it (what PTRACE_SECCOMP_GET_FILTER
    returns), so other tools can recognise crrun's filter on a task."""
    return b"".join(struct.pack("<HBBI", *insn) for insn in build_filter())


# ----------------------------------------------------------- kernel helpers

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def notif_sizes() -> SeccompNotifSizes:
    """seccomp(SECCOMP_GET_NOTIF_SIZES): the kernel's struct sizes."""
    sizes = SeccompNotifSizes()
    _check(_libc.syscall(ctypes.c_long(NR_SECCOMP), ctypes.c_uint(SECCOMP_GET_NOTIF_SIZES),
                         ctypes.c_uint(0), ctypes.byref(sizes)), "seccomp(GET_NOTIF_SIZES)")
    return sizes


def install_filter() -> int:
    """Install the filter in the calling process (no new privileges first);
    return the listener fd.  Called in the child between fork and exec."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    insns = build_filter()
    arr = (SockFilter * len(insns))(*[SockFilter(*i) for i in insns])
    prog = SockFprog(len(insns), arr)
    return _check(_libc.syscall(ctypes.c_long(NR_SECCOMP), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                                ctypes.c_uint(SECCOMP_FILTER_FLAG_NEW_LISTENER),
                                ctypes.byref(prog)), "seccomp(SET_MODE_FILTER)")


def launch(argv: list[str], **popen_kwargs) -> tuple[subprocess.Popen, int]:
    """Start argv under the filter.  Returns (Popen, listener fd).

    The child installs the filter in a preexec_fn and passes the listener fd
    to us over a socketpair (SCM_RIGHTS), closing its own copy before exec.
    Call this before starting any thread (preexec_fn and threads do not mix).
    """
    sizes = notif_sizes()
    if sizes.seccomp_notif < ctypes.sizeof(SeccompNotif) or \
            sizes.seccomp_notif_resp < ctypes.sizeof(SeccompNotifResp):
        raise OSError(errno.ENOSYS, "kernel seccomp notification structures are too small")
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child_fileno = child_sock.fileno()

    def preexec():
        listener = install_filter()
        sock = socket.socket(fileno=os.dup(child_fileno))
        socket.send_fds(sock, [b"L"], [listener])
        sock.close()
        os.close(listener)
        os.close(child_fileno)

    try:
        try:
            proc = subprocess.Popen(argv, preexec_fn=preexec, **popen_kwargs)
        finally:
            child_sock.close()
        # The child sent the fd before exec, and Popen returns only after the
        # exec succeeded: the message is already queued (EOF if it was not).
        _msg, fds, _flags, _addr = socket.recv_fds(parent_sock, 1, 1)
    finally:
        parent_sock.close()
    if not fds:
        proc.kill()
        proc.wait()
        raise OSError(errno.EPROTO, "the child did not hand over the seccomp listener")
    os.set_inheritable(fds[0], False)
    return proc, fds[0]


# --------------------------------------------------------------- the monitor


def tgid_of(tid: int) -> int:
    """Thread-group id (the process pid) of a thread id, from /proc."""
    with open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    raise FileNotFoundError(f"/proc/{tid}/status has no Tgid")


def _family_name(fam: int) -> str:
    try:
        return socket.AddressFamily(fam).name
    except ValueError:
        return f"family {fam}"


_PTRACE_NAMES = {PTRACE_TRACEME: "PTRACE_TRACEME", PTRACE_ATTACH: "PTRACE_ATTACH",
                 PTRACE_SEIZE: "PTRACE_SEIZE"}


class Monitor:
    """Serves the listener of one crrun filter until every watched task is gone.

    ``strict``: answer with the watched syscall's errno instead of letting it
    run, except for resources of a policy class in ``skip`` (those run, and
    are recorded with ``"policy": CLASS`` but not announced on stderr: the
    policy says a checkpoint may leave them out).  ``policy_file``: recorded
    in every flag (``"policy_file"``), so crcheck/crcheckpoint can use it.
    ``json_log``: a path to append one JSON line per event to.
    ``out``: where the one-line messages go (stderr).  ``flag_dir``: passed to
    flags.add (None: the default directory).  Counters ``received`` (all
    notifications) and ``events`` (list of the records) are kept for tests.
    """

    def __init__(self, listener: int, strict: bool = False, json_log: str | None = None,
                 out=None, flag_dir: str | None = None,
                 on_event: Callable[[dict], None] | None = None,
                 skip: set[str] | frozenset[str] = frozenset(), policy_file: str | None = None):
        self.listener = listener
        self.strict = strict
        self.skip = set(skip)
        self.policy_file = policy_file
        self.json_log = json_log
        self.out = out if out is not None else sys.stderr
        self.flag_dir = flag_dir
        self.on_event = on_event
        self.received = 0
        self.events: list[dict] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._buf = bytearray(max(notif_sizes().seccomp_notif, ctypes.sizeof(SeccompNotif)))

    # -- loop ------------------------------------------------------------------

    def run(self) -> bool:
        """Serve notifications.  Returns True when the listener hung up (all
        watched tasks gone), False when stop() was called."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            for fd, ev in poller.poll():
                if fd == self._stop_r:
                    os.read(self._stop_r, 1)
                    return False
                if ev & select.POLLIN:
                    self._serve_one()
                elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return True

    def stop(self) -> None:
        """Make run() return (from another thread or a signal handler)."""
        os.write(self._stop_w, b"x")

    def close(self) -> None:
        for fd in (self.listener, self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- one notification ----------------------------------------------------------

    def _serve_one(self) -> None:
        buf = self._buf
        buf[:] = bytes(len(buf))  # the kernel requires a zeroed buffer
        try:
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                return  # the task died (or was signalled) before we got it
            raise
        n = SeccompNotif.from_buffer_copy(buf[:ctypes.sizeof(SeccompNotif)])
        self.received += 1
        watch = WATCHED.get(n.data.arch, {}).get(n.data.nr)
        detail = self._detail(n, watch) if watch else None
        if detail is None:                 # not ours after all: let it run untouched
            self._respond(n.id, 0)
            return
        skippable = bool(watch.row.policy and watch.row.policy in self.skip)
        err = watch.strict_errno if self.strict and not skippable else 0
        # The task is blocked in the syscall: record the flag before it runs.
        self._record(n, watch, detail, err, skippable)
        self._respond(n.id, err)

    def _detail(self, n: SeccompNotif, w: Watch) -> str | None:
        """What exactly was called, or None when the call is not a watched one
        (only possible for socketcall, whose arguments live in memory)."""
        args = n.data.args
        if w.check == "socket":
            return f"socket({_family_name(args[0] & 0xFFFFFFFF)})"
        if w.check == "ptrace":
            req = args[0] & 0xFFFFFFFF
            name = _PTRACE_NAMES.get(req, str(req))
            return f"ptrace({name})" if req == PTRACE_TRACEME else \
                f"ptrace({name}, {args[1] & 0xFFFFFFFF})"
        if w.check == "bpf":
            return f"bpf({BPF_REFUSED_CMDS.get(args[0] & 0xFFFFFFFF, args[0] & 0xFFFFFFFF)})"
        if w.check == "fanotify":
            return f"fanotify_init({args[0] & 0xFFFFFFFF:#x}: a permission class)"
        if w.check == "socketcall":
            fam = self._read_u32(n, args[1])
            if fam is None or fam in ALLOWED_FAMILIES:
                return None
            return f"socketcall(SYS_SOCKET, {_family_name(fam)})"
        return w.name

    def _read_u32(self, n: SeccompNotif, addr: int) -> int | None:
        try:
            with open(f"/proc/{n.pid}/mem", "rb", buffering=0) as f:
                data = os.pread(f.fileno(), 4, addr)
        except OSError:
            return None
        if len(data) != 4 or not self._id_valid(n.id):
            return None
        return struct.unpack("<I", data)[0]

    def _id_valid(self, notif_id: int) -> bool:
        try:
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("<Q", notif_id))
            return True
        except OSError:
            return False

    def _record(self, n: SeccompNotif, w: Watch, detail: str, err: int,
                skippable: bool = False) -> None:
        tid = n.pid
        try:
            pid = tgid_of(tid)
        except OSError:
            return  # gone already
        action = "denied" if err else "flagged"
        reason = f"{detail}: {w.reason}"
        rec = {"tid": tid, "syscall": w.name, "call": detail, "nr": n.data.nr,
               "resource": w.resource, "reason": reason, "action": action}
        if err:
            rec["errno"] = errno.errorcode.get(err, str(err))
        if skippable:
            rec["policy"] = w.row.policy       # skippable by the policy crrun runs under
        if self.policy_file:
            rec["policy_file"] = self.policy_file
        try:
            flags.add(pid, rec, self.flag_dir)
        except (FileNotFoundError, ProcessLookupError):
            return  # died between the notification and now
        now = datetime.datetime.now()
        who = f"pid {pid}" if pid == tid else f"pid {pid} (thread {tid})"
        verdict = (f"denied with {errno.errorcode.get(err, err)}" if err
                   else "not checkpointable")
        try:
            if not skippable:
                print(f"crrun: {who}: {w.name} at {now.isoformat(timespec='milliseconds')}: "
                      f"{verdict} ({reason})", file=self.out, flush=True)
        except (OSError, ValueError):
            pass  # stderr closed: the flag is what matters
        event = {"pid": pid, "time": now.timestamp(), "iso_time": now.isoformat(), **rec}
        self.events.append(event)
        if self.json_log:
            try:
                with open(self.json_log, "a") as f:
                    f.write(json.dumps(event) + "\n")
            except OSError as e:
                print(f"crrun: cannot write {self.json_log}: {e.strerror}", file=self.out)
        if self.on_event:
            self.on_event(event)

    def _respond(self, notif_id: int, err: int) -> None:
        resp = SeccompNotifResp(id=notif_id, val=0, error=-err if err else 0,
                                flags=0 if err else SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        try:
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_SEND, bytearray(resp), True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the task died meanwhile
                raise


def start_thread(mon: Monitor) -> threading.Thread:
    """Run the monitor in a daemon thread; the thread's `hung_up` attribute
    tells afterwards whether the listener hung up (vs stop())."""
    t = threading.Thread(target=lambda: setattr(t, "hung_up", mon.run()),
                         name="crrun-monitor", daemon=True)
    t.hung_up = False
    t.start()
    return t
