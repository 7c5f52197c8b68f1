"""Fd tables shared between processes (clone with CLONE_FILES, not a thread).

Tasks of the tree that share one files_struct (kcmp KCMP_FILES) get
``fdt``: the pid of the group's owner, the member whose parent is outside the
group; every other member's parent must be a member (then each one can be
cloned with CLONE_FILES by its parent again: restorer/tree.py).  A
group that is not so connected (a sharer whose parent exited) gets
``fdt_unsupported`` on its members, which statefile/check/support.py refuses.
"""

from __future__ import annotations

import ctypes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_KCMP = 312
KCMP_FILES = 2


def same_files(a: int, b: int) -> bool | None:
    """Whether tasks a and b share their fd table (None: kcmp refused)."""
    res = _libc.syscall(ctypes.c_long(NR_KCMP), ctypes.c_int(a), ctypes.c_int(b),
                        ctypes.c_int(KCMP_FILES), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return None if res < 0 else res == 0


def mark_groups(tasks: list[dict]) -> None:
    """Set ``fdt`` (and ``fdt_unsupported``) on the tasks that share fd tables."""
    groups: list[list[dict]] = []
    for t in tasks:
        for g in groups:
            if same_files(g[0]["pid"], t["pid"]):
                g.append(t)
                break
        else:
            groups.append([t])
    for g in groups:
        if len(g) < 2:
            continue
        pids = {t["pid"] for t in g}
        owners = [t for t in g if t["ppid"] not in pids]
        for t in g:
            t["fdt"] = owners[0]["pid"]
            if len(owners) != 1:
                t["fdt_unsupported"] = (
                    "shares its fd table (CLONE_FILES) with pids "
                    f"{sorted(pids - {t['pid']})}, not through a chain of parents "
                    "and children")
