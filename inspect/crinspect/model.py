"""The views crinspect shows, built from the statefile's records.

Every function takes a loaded Statefile (statefile.format.reader.load) and returns
the typed views of views.py; render.py turns them into text, cli.py into JSON.
"""

from __future__ import annotations

from datetime import datetime

from msgspec import UNSET

from statefile.format import notes as nt
from statefile.format import reader, records

from . import views as v
from .symbols import Symbolizer

try:
    from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES
except ImportError:  # pragma: no cover - python-ptrace is a dependency
    SYSCALL_NAMES = {}

_O_FLAGS = ((0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"),
            (0o20000, "O_ASYNC"), (0o40000, "O_DIRECT"), (0o100000, "O_LARGEFILE"),
            (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"),
            (0o4000000, "O_SYNC"), (0o10000000, "O_PATH"))


def open_flags(flags: int) -> str:
    names = [("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[flags & 3]]
    names += [name for bit, name in _O_FLAGS if flags & bit]
    return "|".join(names)


def header(sf) -> v.HeaderView:
    h = sf.header
    return v.HeaderView(
        created=h.created, created_unix=h.created_unix, host=h.host, kernel=h.kernel,
        machine=h.machine, crelf=h.crelf, format=h.format, page_size=h.page_size,
        root_pid=h.root_pid, restartable=h.restartable,
        not_restartable=list(h.not_restartable), skipped=list(h.skipped),
        zombies=list(h.zombies))


def ps(sf) -> list[v.PsTask]:
    """Tasks in tree order (depth-first from the root), with their depth."""
    by_pid = {t.pid: t for t in sf.tasks}
    kids: dict[int, list[int]] = {}
    roots = []
    for t in sf.tasks:
        if t.ppid in by_pid and t.ppid != t.pid:
            kids.setdefault(t.ppid, []).append(t.pid)
        else:
            roots.append(t.pid)
    out: list[v.PsTask] = []
    seen: set[int] = set()

    def walk(pid: int, depth: int) -> None:
        if pid in seen:
            return
        seen.add(pid)
        t = by_pid[pid]
        out.append(v.PsTask(
            pid=pid, ppid=t.ppid, pgid=t.pgid, sid=t.sid,
            uid=t.creds.uid[0], euid=t.creds.uid[1],
            comm=t.comm, cmdline=list(t.cmdline), exe=t.exe, cwd=t.cwd, state=t.state,
            threads=len(t.threads), depth=depth, children=sorted(kids.get(pid, [])),
            crrun=t.crrun, crrun_flags=crrun_flags(t)))
        for k in sorted(kids.get(pid, [])):
            walk(k, depth + 1)

    for r in roots:
        walk(r, 0)
    return out


def _iso_time(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):
        return "an unknown time"


def crrun_flags(t) -> list[v.CrrunFlagView]:
    """What crrun saw the task create (statefile/check/flags.py), with the time."""
    return [v.CrrunFlagView(syscall=f.syscall, call=f.call or f.syscall, reason=f.reason,
                            time=f.time, iso_time=_iso_time(f.time),
                            denied=f.action == "denied", errno=f.errno,
                            resource=f.resource, tid=f.tid, policy=f.policy)
            for f in t.crrun_flags]


def syscall_name(nr) -> str | None:
    if nr is None or nr < 0:
        return None
    return SYSCALL_NAMES.get(nr, f"syscall_{nr}")


def threads(sf, symbolizer: Symbolizer | None = None) -> list[v.ThreadView]:
    sym = symbolizer or Symbolizer(sf)
    out = []
    for t in sf.tasks:
        for th in t.threads:
            regs = sf.regs.get(th.tid)
            rip = regs.user_regs().rip if regs else None
            loc = sym.locate(t, rip) if rip is not None else {
                "object": None, "symbol": None, "offset": None, "where": "no registers"}
            sc = th.syscall
            out.append(v.ThreadView(
                pid=t.pid, tid=th.tid, comm=th.comm, rip=rip, where=loc["where"],
                object=loc["object"], symbol=loc["symbol"], symbol_offset=loc["offset"],
                syscall=None if sc is None else v.SyscallView(
                    nr=sc.nr, name=syscall_name(sc.nr), restart=sc.restart or None),
                sigmask=th.sigmask, sigpend=th.sigpend))
    return out


def memory(sf) -> list[v.MappingView]:
    out = []
    for t in sf.tasks:
        for m in t.mappings:
            segs = [sf.segment(p) for p in m.segments]
            out.append(v.MappingView(
                pid=t.pid, start=m.start, end=m.end, size=m.end - m.start, perms=m.perms,
                kind=m.kind, path=m.path, offset=m.offset, deleted=m.deleted,
                stored=sum(ln for s in segs for _, ln in s.runs),
                resident=m.rss_kb * 1024, segments=[s.phdr for s in segs],
                skipped=m.skipped))
    return out


def files(sf) -> list[v.FdView]:
    by_id = {f.id: f for f in sf.files}
    users: dict[int, list[v.FdUser]] = {}
    for t in sf.tasks:
        for fd in t.fds:
            users.setdefault(fd.file, []).append(v.FdUser(pid=t.pid, fd=fd.fd))
    out = []
    for t in sf.tasks:
        for fd in t.fds:
            f = by_id[fd.file]      # (the loader checked every fd names a file)
            out.append(v.FdView(
                pid=t.pid, fd=fd.fd, file=fd.file, kind=f.kind, path=f.path,
                flags=f.flags, flags_text=open_flags(f.flags), offset=f.pos,
                cloexec=fd.cloexec, deleted=f.deleted, size=f.size,
                shared_with=[o for o in users[fd.file] if (o.pid, o.fd) != (t.pid, fd.fd)],
                socket=f.socket if isinstance(f, records.SocketFile) else UNSET,
                skipped=f.skipped))
    return out


def note_list(sf) -> list[v.NoteView]:
    out = []
    for i, n in enumerate(sf.notes):
        kind = nt.kind_of(n.owner.encode(), n.n_type)
        out.append(v.NoteView(index=i, owner=n.owner, type=n.n_type,
                              name=kind.name if kind else "unknown", size=len(n.desc)))
    return out


def note_problems(sf) -> list[str]:
    """Cheap check of the note checksums only (no segment data is read)."""
    return reader.verify_notes(sf)


def summary(sf, path: str) -> v.SummaryView:
    from .shared import objects
    return v.SummaryView(statefile=path, header=header(sf), tasks=ps(sf), threads=threads(sf),
                         memory=memory(sf), files=files(sf), shared=objects(sf))
