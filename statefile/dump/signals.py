"""Signals and timers: dispositions, masks, pending signals, sigaltstack, itimers.

Restored by restorer/restore/signals.py.
"""

from __future__ import annotations

import struct

from statefile.control import procfs
from statefile.control import ptrace as pt
from statefile.control.inject import Injector

NSIG = 64
SIG_DFL, SIG_IGN = 0, 1
ITIMERS = ("real", "virtual", "prof")


def dump_sigactions(inj: Injector, scratch: int) -> list[dict]:
    """Every disposition that is not SIG_DFL with no flags (rt_sigaction, injected)."""
    out = []
    for sig in range(1, NSIG + 1):
        if sig in (9, 19):  # SIGKILL/SIGSTOP cannot be changed
            continue
        if inj.call("rt_sigaction", sig, 0, scratch, 8) < 0:
            continue
        handler, flags, restorer, mask = struct.unpack("<QQQQ", inj.read(scratch, 32))
        if handler == SIG_DFL and flags == 0 and mask == 0:
            continue
        out.append({"sig": sig, "handler": handler, "flags": flags,
                    "restorer": restorer, "mask": mask})
    return out


def dump_itimers(inj: Injector, scratch: int) -> dict:
    out = {}
    for which, name in enumerate(ITIMERS):
        inj.check("getitimer", which, scratch)
        isec, iusec, vsec, vusec = struct.unpack("<qqqq", inj.read(scratch, 32))
        if isec or iusec or vsec or vusec:
            out[name] = {"interval": [isec, iusec], "value": [vsec, vusec]}
    return out


def sigaltstack_of(altstack: tuple[int, int, int]) -> dict | None:
    """The thread's sigaltstack (stack_t: sp, flags, size), as the injector's
    first call read it into the thread's way-back frame."""
    sp, flags, size = altstack
    if flags & 2:  # SS_DISABLE
        return None
    return {"sp": sp, "flags": flags, "size": size}


def dump_thread_signals(pid: int, tid: int) -> dict:
    """Blocked mask and the queued (not yet delivered) signals of one thread."""
    st = procfs.status(pid, tid)
    return {
        "sigmask": pt.getsigmask(tid),
        "sigpend": int(st.get("SigPnd", "0"), 16),
        "pending": [s.hex() for s in pt.peeksiginfo(tid, shared=False)],
    }


def dump_process_signals(pid: int, tid: int) -> dict:
    st = procfs.status(pid)
    return {
        "shared_sigpend": int(st.get("ShdPnd", "0"), 16),
        "shared_pending": [s.hex() for s in pt.peeksiginfo(tid, shared=True)],
        "sigign": int(st.get("SigIgn", "0"), 16),
        "sigcgt": int(st.get("SigCgt", "0"), 16),
    }
