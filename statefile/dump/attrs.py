"""Task attributes outside credentials, limits and signals: scheduling (policy,
priority, nice, per thread), OOM score adjustment, audit login uid (per
thread), the THP-disable prctl, the dumpable flag and membarrier
registrations (per mm).

Restored by restorer/restore/attrs.py.  The fields are described in
docs/FORMAT.md ("Task attributes").
"""

from __future__ import annotations

import ctypes
import os
import struct

from statefile.control import procfs
from statefile.control.inject import Injector

NR_SCHED_GETATTR = 315
SCHED_ATTR_SIZE = 56            # SCHED_ATTR_SIZE_VER1: with the utilization clamps
PR_GET_DUMPABLE = 3
PR_GET_THP_DISABLE = 42
PR_GET_SECUREBITS = 27
MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9
INVALID_UID = 2**32 - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def sched_of(tid: int) -> dict:
    """sched_getattr(tid): policy, flags, nice, rt priority, deadline
    parameters, utilization clamps."""
    buf = ctypes.create_string_buffer(SCHED_ATTR_SIZE)
    res = _libc.syscall(ctypes.c_long(NR_SCHED_GETATTR), ctypes.c_int(tid), buf,
                        ctypes.c_uint(SCHED_ATTR_SIZE), ctypes.c_uint(0))
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"sched_getattr({tid}): {os.strerror(e)}")
    (_size, policy, flags, nice, prio, runtime, deadline, period,
     umin, umax) = struct.unpack("<IIQiIQQQII", buf.raw)
    return {"policy": policy, "flags": flags, "nice": nice, "priority": prio,
            "runtime": runtime, "deadline": deadline, "period": period,
            "util_min": umin, "util_max": umax}


def loginuid_of(pid: int, tid: int) -> int | None:
    """The audit login uid (per thread; 4294967295: unset); None without audit."""
    try:
        return int(procfs.read(f"/proc/{pid}/task/{tid}/loginuid").strip())
    except (OSError, ValueError):
        return None


def oom_score_adj_of(pid: int) -> int:
    return int(procfs.read(f"/proc/{pid}/oom_score_adj").strip())


def thread_attrs(pid: int, tid: int) -> dict:
    out: dict = {"sched": sched_of(tid)}
    luid = loginuid_of(pid, tid)
    if luid is not None:
        out["loginuid"] = luid
    return out


def process_attrs(pid: int, inj: Injector) -> dict:
    """Per-process attributes; the prctl and membarrier values are only
    visible to the task itself (injected)."""
    out: dict = {"oom_score_adj": oom_score_adj_of(pid)}
    thp = inj.call("prctl", PR_GET_THP_DISABLE, 0, 0, 0, 0)
    if thp >= 0:
        out["thp_disable"] = thp     # 0, 1 (completely), 3 (except advised)
    sb = inj.call("prctl", PR_GET_SECUREBITS, 0, 0, 0, 0)
    if sb >= 0:
        out["securebits"] = sb       # SECBIT_* of the leader (keep-caps, noroot, ...)
    dumpable = inj.call("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0)
    if dumpable >= 0:
        out["dumpable"] = dumpable   # 0, 1, 2 (suid_dumpable's root-only)
    mb = inj.call("membarrier", MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0)
    if mb >= 0:
        out["membarrier"] = mb       # the MEMBARRIER_CMD_REGISTER_* bits registered
    return out


def _has_cap(bit: int) -> bool:
    try:
        return bool(int(procfs.status(os.getpid())["CapEff"], 16) >> bit & 1)
    except (OSError, KeyError, ValueError):
        return False


def attr_problems(task) -> list[tuple[str, str]]:
    """(support key, detail) for attributes of a records.TaskNote (one with
    `attrs`) a restart here could not set back."""
    out = []
    oom = task.attrs.oom_score_adj
    if oom_floor_problem(oom):
        out.append(("task:oom-score-low", oom_floor_problem(oom)))
    if not _has_cap(23):           # CAP_SYS_NICE
        lim = task.rlimits
        rtprio = lim.rtprio[0] if lim is not None else 0
        nice_rlim = lim.nice[0] if lim is not None else 0
        for th in task.threads:
            s = th.attrs.sched if th.attrs is not None else None
            if s is None:
                continue
            if s.policy in (1, 2) and s.priority > rtprio:
                out.append(("task:sched-privileged", f"thread {th.tid}: real-time priority "
                            f"{s.priority} above its RLIMIT_RTPRIO {rtprio}"))
            elif s.policy == 6:
                out.append(("task:sched-privileged", f"thread {th.tid}: SCHED_DEADLINE"))
            elif 20 - s.nice > nice_rlim and s.nice < _own_nice():
                out.append(("task:sched-privileged", f"thread {th.tid}: nice {s.nice} "
                            f"below what its RLIMIT_NICE {nice_rlim} allows"))
    return out


def _own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def oom_floor_problem(value: int) -> str:
    """Why a restart here could not set oom_score_adj back to `value`, or "".
    Lowering it below the restarter's own floor needs CAP_SYS_RESOURCE; the
    floor is not visible, but it is never above crelf's own value."""
    if value >= oom_score_adj_of(os.getpid()) or _has_cap(24):    # CAP_SYS_RESOURCE
        return ""
    return (f"oom_score_adj {value} is below crelf's own "
            f"({oom_score_adj_of(os.getpid())}) and crelf lacks CAP_SYS_RESOURCE")
