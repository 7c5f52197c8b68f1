"""Task attributes saved by statefile/dump/attrs.py: THP-disable, membarrier
registrations, audit login uid (injected: only the task itself may set them),
then scheduling and the OOM score adjustment (set from the tracer, last, so
the restore itself runs at crrestart's own priority and a SCHED_RESET_ON_FORK
policy is not reset by the threads being cloned)."""

from __future__ import annotations

import ctypes
import os
import struct

from statefile.format import records as R

from restorer.errors import RestoreError

NR_SCHED_SETATTR, NR_SCHED_GETATTR = 314, 315
NR_MEMBARRIER = 324
NR_OPENAT, NR_SETFSUID, NR_SETFSGID = 257, 122, 123
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_SET_THP_DISABLE = 41
AT_FDCWD = -100
O_WRONLY, O_CLOEXEC = 1, 0o2000000
SCHED_ATTR_SIZE = 56
SCHED_FLAG_RESET_ON_FORK, SCHED_FLAG_RECLAIM, SCHED_FLAG_DL_OVERRUN = 1, 2, 4
SCHED_FLAG_UTIL_CLAMP = 0x20 | 0x40
# The membarrier registrations, in the order they are made again.
MEMBARRIER_REGISTER = (1 << 2, 1 << 4, 1 << 6, 1 << 8)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def locked(m: R.Mapping) -> bool:
    """A mapping that was mlock()ed (restore_memory locks it again): under
    --lazy its content is copied at once rather than served on fault."""
    return "lo" in m.vmflags


def process_state(inj, task: R.TaskNote) -> None:
    """THP-disable (PR_GET_THP_DISABLE's value: bit 0 disabled, the rest its
    flags) and the membarrier registrations of the task's mm."""
    a = task.attrs
    if a is None:
        return
    thp = a.thp_disable
    if thp:
        inj.check("prctl", PR_SET_THP_DISABLE, 1, thp & ~1, 0, 0)
    mb = a.membarrier
    for cmd in MEMBARRIER_REGISTER:
        if mb & cmd:
            inj.check(NR_MEMBARRIER, cmd, 0, 0)
    left = mb & ~sum(MEMBARRIER_REGISTER)
    if left:
        raise RestoreError("membarrier", f"unknown membarrier registrations {left:#x}")


def dumpable(inj, task: R.TaskNote) -> None:
    """The dumpable flag, last of all that is injected: the credentials set
    before it reset it (to fs.suid_dumpable) on any uid or gid change, and a
    task that is not dumpable has its /proc files owned by root.  prctl sets
    only 0 or 1; a saved 2 (suid_dumpable's root-only dumps) is what the
    kernel set after the credentials where fs.suid_dumpable is 2."""
    want = task.attrs.dumpable if task.attrs is not None else None
    if want is None:
        return
    if want in (0, 1):
        inj.check("prctl", PR_SET_DUMPABLE, want, 0, 0, 0)
    got = inj.call("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0)
    if got != want:
        raise RestoreError("dumpable", f"the task's dumpable flag was {want}, it is {got} "
                           "here (fs.suid_dumpable differs?)")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def thread_loginuid(inj, rpid: int, rtid: int, th: R.Thread, scratch: int) -> None:
    """The audit login uid: /proc/self/loginuid is writable only by the thread
    itself (with CAP_AUDIT_CONTROL), so it is written by injection."""
    want = th.attrs.loginuid if th.attrs is not None else None
    if want is None:
        return
    try:
        cur = int(_read(f"/proc/{rpid}/task/{rtid}/loginuid"))
    except (OSError, ValueError):
        raise RestoreError("loginuid", "this kernel has no audit login uid "
                           f"(/proc/PID/loginuid); the task's was {want}") from None
    if cur == want:
        return
    path = b"/proc/thread-self/loginuid\0"
    val = str(want).encode()
    inj.write(scratch, path + val)
    fd = inj.check(NR_OPENAT, AT_FDCWD, scratch, O_WRONLY | O_CLOEXEC, 0)
    try:
        n = inj.call("write", fd, scratch + len(path), len(val))
    finally:
        inj.call("close", fd)
    if n != len(val):
        err = -n if n < 0 else 0
        raise RestoreError("loginuid", f"cannot set the login uid to {want}"
                           + (f": {os.strerror(err)}" if err else ""))


def _getattr(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(SCHED_ATTR_SIZE)
    if _libc.syscall(ctypes.c_long(NR_SCHED_GETATTR), ctypes.c_int(tid), buf,
                     ctypes.c_uint(SCHED_ATTR_SIZE), ctypes.c_uint(0)) < 0:
        e = ctypes.get_errno()
        raise RestoreError("scheduling", f"sched_getattr({tid}): {os.strerror(e)}")
    return buf.raw


FIELDS = ("size", "policy", "flags", "nice", "priority", "runtime", "deadline", "period",
          "util_min", "util_max")
FAIR = (0, 3, 5)        # SCHED_OTHER, SCHED_BATCH, SCHED_IDLE
FLAG_MASK = SCHED_FLAG_RESET_ON_FORK | SCHED_FLAG_RECLAIM | SCHED_FLAG_DL_OVERRUN


def _unpack(raw: bytes) -> dict:
    return dict(zip(FIELDS, struct.unpack("<IIQiIQQQII", raw)))


def _wanted(s: R.Sched, cur: dict) -> dict | None:
    """The sched_attr to set for saved `s` over current `cur`, None if equal.
    For the fair policies sched_getattr's runtime is the time slice: a slice
    equal to the current (default) one is left default (runtime 0), another
    one is a custom slice.  Utilization clamps are set only if they differ
    (a kernel without them reports 0 and refuses the flags)."""
    w = {k: getattr(s, k) for k in FIELDS[1:]}
    w["flags"] &= FLAG_MASK
    same_rt = s.runtime == cur["runtime"]
    if s.policy in FAIR and same_rt:
        w["runtime"] = 0
    same_util = (s.util_min, s.util_max) == (cur["util_min"], cur["util_max"])
    if not same_util:
        w["flags"] |= SCHED_FLAG_UTIL_CLAMP
    if (same_rt and same_util and all(w[k] == cur[k] & (FLAG_MASK if k == "flags" else ~0)
                                      for k in ("policy", "flags", "nice", "priority",
                                                "deadline", "period"))):
        return None
    return w


_POLICY = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH",
           5: "SCHED_IDLE", 6: "SCHED_DEADLINE"}


def thread_sched(rtid: int, th: R.Thread) -> None:
    """Policy, priority and nice of one thread, by sched_setattr from the tracer."""
    s = th.attrs.sched if th.attrs is not None else None
    if s is None:
        return
    cur = _unpack(_getattr(rtid))
    if s.policy not in FAIR and s.nice != cur["nice"]:
        # a real-time or deadline policy keeps the nice value (used again if
        # the policy goes back to SCHED_OTHER) but does not set it: set it first
        _setattr(rtid, th, s, dict(dict.fromkeys(FIELDS[1:], 0), nice=s.nice))
        cur = _unpack(_getattr(rtid))
    w = _wanted(s, cur)
    if w is not None:
        _setattr(rtid, th, s, w)


def _setattr(rtid: int, th: R.Thread, s: R.Sched, w: dict) -> None:
    raw = struct.pack("<IIQiIQQQII", SCHED_ATTR_SIZE, *(w[k] for k in FIELDS[1:]))
    buf = ctypes.create_string_buffer(raw, SCHED_ATTR_SIZE)
    if _libc.syscall(ctypes.c_long(NR_SCHED_SETATTR), ctypes.c_int(rtid), buf,
                     ctypes.c_uint(0)) < 0:
        e = ctypes.get_errno()
        pol = _POLICY.get(s.policy, str(s.policy))
        raise RestoreError("scheduling", f"thread {th.tid}: cannot set {pol} priority "
                           f"{s.priority} nice {s.nice}: {os.strerror(e)}")


def oom_score_adj(rpid: int, task: R.TaskNote) -> None:
    want = task.attrs.oom_score_adj if task.attrs is not None else None
    if want is None:
        return
    path = f"/proc/{rpid}/oom_score_adj"
    if int(_read(path)) == want:
        return
    try:
        with open(path, "w") as f:
            f.write(str(want))
    except OSError as e:
        raise RestoreError("oom_score_adj", f"cannot set oom_score_adj {want}: "
                           f"{e.strerror} (lowering it needs CAP_SYS_RESOURCE)") from None
