"""Signal state of a restored task, set by injected syscalls: dispositions,
itimers, queued signals (process-wide and per thread)."""

from __future__ import annotations

import struct

from statefile.format import records as R

from restorer.kernel import pack_sigaction

NSIG = 64
SA_RESTORER = 0x04000000


def _current_nondefault(rpid: int) -> set[int]:
    """Signals whose disposition in the (restorer-forked) task is not SIG_DFL."""
    bits = 0
    with open(f"/proc/{rpid}/status") as f:
        for line in f:
            if line.startswith(("SigIgn:", "SigCgt:")):
                bits |= int(line.split()[1], 16)
    return {s for s in range(1, NSIG + 1) if bits >> (s - 1) & 1}


def restore_sigactions(inj, rpid: int, task: R.TaskNote, scratch: int) -> None:
    saved = {a.sig: a for a in task.sigactions}
    todo = sorted((_current_nondefault(rpid) | set(saved)) - {9, 19})
    if not todo:
        return
    # One write for every struct, then one rt_sigaction each.
    blob = b"".join(pack_sigaction(saved[s].handler, saved[s].flags, saved[s].restorer,
                                   saved[s].mask) if s in saved else pack_sigaction(0, 0, 0, 0)
                    for s in todo)
    inj.write(scratch, blob)
    for i, s in enumerate(todo):
        inj.check("rt_sigaction", s, scratch + 32 * i, 0, 8)


def restore_itimers(inj, task: R.TaskNote, scratch: int) -> None:
    for which, name in enumerate(("real", "virtual", "prof")):
        t = getattr(task.itimers, name)
        if t is None:
            continue
        value = t.value
        if name == "real" and value == [0, 0]:
            # Expired, its SIGALRM not taken yet: the kernel arms a periodic
            # ITIMER_REAL again only when that SIGALRM is dequeued, and
            # setitimer with a zero value would disarm it for good.  Expiring
            # at once leaves it so again (the SIGALRM it sends merges with the
            # pending one queued after).
            value = [0, 1]
        inj.write(scratch, struct.pack("<qqqq", *t.interval, *value))
        inj.check("setitimer", which, scratch, 0)


def queue_signals(inj, vpid: int, vtid: int | None, infos: list[str], scratch: int) -> None:
    """Queue saved siginfos again: process-wide (vtid None) or to one thread."""
    for h in infos:
        info = bytes.fromhex(h)
        sig = struct.unpack_from("<i", info)[0]
        inj.write(scratch, info)
        if vtid is None:
            inj.check("rt_sigqueueinfo", vpid, sig, scratch)
        else:
            inj.check("rt_tgsigqueueinfo", vpid, vtid, sig, scratch)
