"""Text rendering of the views in model.py (the types of views.py)."""

from __future__ import annotations

import shlex


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def header(h, path: str) -> list[str]:
    restart = "yes" if h.restartable else "NO (snapshot only)"
    lines = [f"statefile   {path}",
             f"checkpoint  {h.created} on host {h.host}",
             f"kernel      {h.kernel} ({h.machine})",
             f"crelf       {h.crelf}, format {h.format}, restartable: {restart}"]
    for why in h.not_restartable:
        lines.append(f"            not restartable: {why}")
    lines.append("skipped     " + ("none" if not h.skipped else ""))
    for s in h.skipped:
        lines.append(f"  {s.where}: {s.what} (policy {s.why})")
    return lines


def ps(tasks: list) -> list[str]:
    """The tree drawn in the COMMAND column (tasks come depth-first from model.ps)."""
    by_pid = {t.pid: t for t in tasks}
    rows = [["PID", "PPID", "PGID", "SID", "UID", "THR", "COMMAND"]]

    def walk(t, lead: str, branch: str) -> None:
        cmd = shlex.join(t.cmdline) if t.cmdline else f"[{t.comm}]"
        rows.append([str(t.pid), str(t.ppid), str(t.pgid), str(t.sid),
                     str(t.uid), str(t.threads), lead + branch + cmd])
        kids = [by_pid[k] for k in t.children if k in by_pid]
        for i, k in enumerate(kids):
            last = i == len(kids) - 1
            walk(k, lead + ("" if not branch else "   " if branch == "└─ " else "│  "),
                 "└─ " if last else "├─ ")

    for t in tasks:
        if t.depth == 0:
            walk(t, "", "")
    return table(rows) + crrun_flags(tasks)


def crrun_flags(tasks: list) -> list[str]:
    """One line per state crrun saw a task create (or refused, with --strict)."""
    lines = []
    for t in tasks:
        for f in t.crrun_flags:
            who = f"pid {t.pid}" + (f" (thread {f.tid})" if f.tid != t.pid else "")
            verdict = (f"denied by crrun --strict ({f.errno})" if f.denied else
                       "flagged by crrun")
            reason = f.reason.removeprefix(f"{f.call}: ")
            line = f"  {who}: {verdict} at {f.iso_time}: {f.call} — {reason}"
            if f.policy and not f.denied:
                line += f" [skippable by policy '{f.policy}']"
            lines.append(line)
    return lines


def threads(ths: list) -> list[str]:
    rows = [["PID", "TID", "COMM", "WHERE", "SYSCALL"]]
    for t in ths:
        sc = t.syscall
        call = "-" if not sc or sc.name is None else sc.name
        if sc and sc.restart:
            call += f" ({sc.restart})"
        rows.append([str(t.pid), str(t.tid), t.comm, t.where, call])
    return table(rows)


def memory(maps: list) -> list[str]:
    lines: list[str] = []
    for pid in dict.fromkeys(m.pid for m in maps):
        mine = [m for m in maps if m.pid == pid]
        total, stored = sum(m.size for m in mine), sum(m.stored for m in mine)
        lines.append(f"pid {pid}: {len(mine)} mappings, {size(total)} mapped, "
                     f"{size(stored)} stored")
        rows = [["RANGE", "PERMS", "KIND", "SIZE", "STORED", "PATH"]]
        for m in mine:
            path = m.path + (" (deleted)" if m.deleted else "")
            if m.skipped:
                path += f" [skipped: {m.skipped}]"
            rows.append([f"{m.start:x}-{m.end:x}", m.perms, m.kind,
                         size(m.size), size(m.stored), path])
        lines += table(rows)
    return lines


def files(fds: list) -> list[str]:
    lines: list[str] = []
    for pid in dict.fromkeys(f.pid for f in fds):
        lines.append(f"pid {pid}:")
        rows = [["FD", "KIND", "PATH", "FLAGS", "OFFSET"]]
        for f in (f for f in fds if f.pid == pid):
            flags = f.flags_text + ("|O_CLOEXEC" if f.cloexec else "")
            path = f.path + (" (deleted)" if f.deleted and "(deleted)" not in f.path
                             else "")
            rows.append([str(f.fd), f.kind, path, flags, str(f.offset)])
        lines += table(rows)
    return lines


def notes(ns: list) -> list[str]:
    rows = [["#", "OWNER", "TYPE", "NAME", "SIZE"]]
    rows += [[str(n.index), n.owner, f"{n.type:#x}", n.name, str(n.size)]
             for n in ns]
    return table(rows)
