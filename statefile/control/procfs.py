"""Readers for the /proc files the checkpoint side needs."""

from __future__ import annotations

import os
import re

PF_KTHREAD = 0x00200000


def read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="surrogateescape")


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stat(pid: int, tid: int | None = None) -> dict:
    """Parsed /proc/PID[/task/TID]/stat (field numbers as in proc(5))."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    raw = read(path)
    lp, rp = raw.index("("), raw.rindex(")")
    comm = raw[lp + 1:rp]
    f = raw[rp + 2:].split()
    # f[0] is field 3 (state)
    num = lambda n: int(f[n - 3])  # noqa: E731
    tck = os.sysconf("SC_CLK_TCK")
    return {
        "pid": int(raw[:lp]), "comm": comm, "state": f[0], "ppid": num(4),
        "pgid": num(5), "sid": num(6), "tty_nr": num(7), "flags": num(9),
        "utime": num(14) / tck, "stime": num(15) / tck, "nice": num(19),
        "num_threads": num(20), "starttime": num(22),
        "start_code": num(26), "end_code": num(27), "start_stack": num(28),
        "exit_signal": num(38),
        "start_data": num(45), "end_data": num(46), "start_brk": num(47),
        "arg_start": num(48), "arg_end": num(49), "env_start": num(50),
        "env_end": num(51), "exit_code": num(52),
    }


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    out = {}
    for line in read(path).splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def threads(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = threads(pid)
    except FileNotFoundError:
        return kids
    for tid in tids:
        try:
            kids += [int(c) for c in read(f"/proc/{pid}/task/{tid}/children").split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return sorted(set(kids))


def descendants(root: int) -> list[int]:
    """root and all its descendants, parents before children."""
    order, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        if pid in order:
            continue
        order.append(pid)
        queue.extend(children(pid))
    return order


_MAPS_RE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$")


def smaps(pid: int) -> list[dict]:
    """Mappings of /proc/PID/smaps with their VmFlags and page counters."""
    maps: list[dict] = []
    cur = None
    for line in read(f"/proc/{pid}/smaps").splitlines():
        k, _, v = line.partition(":")
        if " " not in k and cur is not None:      # "Rss:   4 kB", "VmFlags: rd wr"
            if k == "VmFlags":
                cur["vmflags"] = v.split()
            elif k in ("Rss", "Anonymous", "Swap"):
                cur[k.lower() + "_kb"] = int(v.split()[0])
            elif k == "KernelPageSize" and v.split()[0] != "4":
                cur["page_kb"] = int(v.split()[0])     # a hugetlb mapping's page size
            continue
        cur = _mapping(line)
        if cur is not None:
            maps.append(cur)
    return maps


def _mapping(line: str) -> dict | None:
    m = _MAPS_RE.match(line)
    if not m:
        return None
    return {"start": int(m[1], 16), "end": int(m[2], 16), "perms": m[3],
            "offset": int(m[4], 16), "dev": f"{m[5]}:{m[6]}", "inode": int(m[7]),
            "path": m[8], "vmflags": []}


def maps(pid: int) -> list[dict]:
    """Mappings of /proc/PID/maps: like smaps() without VmFlags and page
    counters, and far cheaper (the kernel walks no page tables)."""
    return [m for m in map(_mapping, read(f"/proc/{pid}/maps").splitlines()) if m]


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    out = {}
    for line in read(f"/proc/{pid}/fdinfo/{fd}").splitlines():
        k, _, v = line.partition(":")
        if k and k not in out:
            out[k] = v.strip()
    return out


def fds_outside(tree: set[int]):
    """(pid, path of /proc/PID/fd/N, link text) for every fd of every process
    outside `tree` and other than us: who else holds a pipe, FIFO or pty."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in tree or int(name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{name}/fd/{fd}"
            try:
                yield int(name), path, os.readlink(path)
            except OSError:
                continue


def is_kernel_thread(pid: int) -> bool:
    return bool(stat(pid)["flags"] & PF_KTHREAD)


def crrun_monitored(pid: int) -> bool:
    """True when the task's only seccomp filter is crrun's monitor (crrun marks
    the programs it starts with CRELF_CRRUN in their environment)."""
    st = status(pid)
    if st.get("Seccomp") != "2" or st.get("Seccomp_filters") != "1":
        return False
    try:
        env = read_bytes(f"/proc/{pid}/environ")
    except OSError:
        return False
    return any(v.startswith(b"CRELF_CRRUN=") for v in env.split(b"\0"))
