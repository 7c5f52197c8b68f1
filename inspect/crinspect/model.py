"""The views crinspect shows, as plain JSON-able dicts with stable keys.

Every function takes a loaded Statefile (statefile.format.reader.load) and returns
lists/dicts; render.py turns them into text, cli.py into JSON.
"""

from __future__ import annotations

from statefile.format import notes as nt
from statefile.format import reader

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


def header(sf) -> dict:
    h = sf.header
    return {
        "created": h.get("created"), "created_unix": h.get("created_unix"),
        "host": h.get("host"), "kernel": h.get("kernel"), "machine": h.get("machine"),
        "crelf": h.get("crelf"), "format": h.get("format"), "page_size": h.get("page_size"),
        "root_pid": h.get("root_pid", sf.root["pid"]),
        "restartable": h.get("restartable", True),
        "not_restartable": list(h.get("not_restartable", [])),
        "skipped": list(h.get("skipped", [])),
        "zombies": list(h.get("zombies", [])),
    }


def ps(sf) -> list[dict]:
    """Tasks in tree order (depth-first from the root), with their depth."""
    by_pid = {t["pid"]: t for t in sf.tasks}
    kids: dict[int, list[int]] = {}
    roots = []
    for t in sf.tasks:
        if t["ppid"] in by_pid and t["ppid"] != t["pid"]:
            kids.setdefault(t["ppid"], []).append(t["pid"])
        else:
            roots.append(t["pid"])
    out: list[dict] = []

    def walk(pid: int, depth: int) -> None:
        if any(e["pid"] == pid for e in out):
            return
        t = by_pid[pid]
        creds = t.get("creds", {})
        out.append({
            "pid": pid, "ppid": t["ppid"], "pgid": t["pgid"], "sid": t["sid"],
            "uid": creds.get("uid", [None])[0], "euid": creds.get("uid", [None, None])[1],
            "comm": t.get("comm", ""), "cmdline": list(t.get("cmdline", [])),
            "exe": t.get("exe", ""), "cwd": t.get("cwd", ""), "state": t.get("state", ""),
            "threads": len(t.get("threads", [])), "depth": depth,
            "children": sorted(kids.get(pid, [])),
            "crrun": bool(t.get("crrun")), "crrun_flags": crrun_flags(t),
        })
        for k in sorted(kids.get(pid, [])):
            walk(k, depth + 1)

    for r in roots:
        walk(r, 0)
    return out


def crrun_flags(t: dict) -> list[dict]:
    """What crrun saw the task create (statefile/check/flags.py), with the time."""
    from statefile.check.support import flag_time
    return [{"syscall": f.get("syscall"), "call": f.get("call") or f.get("syscall"),
             "reason": f.get("reason", ""), "time": f.get("time"), "iso_time": flag_time(f),
             "denied": f.get("action") == "denied", "errno": f.get("errno"),
             "resource": f.get("resource"), "tid": f.get("tid"), "policy": f.get("policy")}
            for f in t.get("crrun_flags", [])]


def syscall_name(nr) -> str | None:
    if nr is None or nr < 0:
        return None
    return SYSCALL_NAMES.get(nr, f"syscall_{nr}")


def threads(sf, symbolizer: Symbolizer | None = None) -> list[dict]:
    sym = symbolizer or Symbolizer(sf)
    out = []
    for t in sf.tasks:
        for th in t["threads"]:
            regs = sf.regs.get(th["tid"])
            rip = regs.user_regs().rip if regs else None
            loc = sym.locate(t, rip) if rip is not None else {
                "object": None, "symbol": None, "offset": None, "where": "no registers"}
            sc = th.get("syscall")
            out.append({
                "pid": t["pid"], "tid": th["tid"], "comm": th.get("comm", ""),
                "rip": rip, "where": loc["where"], "object": loc["object"],
                "symbol": loc["symbol"], "symbol_offset": loc["offset"],
                "syscall": None if not sc else {
                    "nr": sc.get("nr"), "name": syscall_name(sc.get("nr")),
                    "restart": sc.get("restart") or None},
                "sigmask": th.get("sigmask", 0), "sigpend": th.get("sigpend", 0),
            })
    return out


def memory(sf) -> list[dict]:
    out = []
    for t in sf.tasks:
        for m in t["mappings"]:
            segs = [sf.segment(p) for p in m.get("segments", [])]
            out.append({
                "pid": t["pid"], "start": m["start"], "end": m["end"],
                "size": m["end"] - m["start"], "perms": m["perms"], "kind": m.get("kind", ""),
                "path": m.get("path", ""), "offset": m.get("offset", 0),
                "deleted": bool(m.get("deleted")),
                "stored": sum(ln for s in segs for _, ln in s.get("runs", [])),
                "resident": m.get("rss_kb", 0) * 1024,
                "segments": [s["phdr"] for s in segs],
                "skipped": m.get("skipped"),
            })
    return out


def files(sf) -> list[dict]:
    by_id = {f["id"]: f for f in sf.files}
    users: dict[int, list[dict]] = {}
    for t in sf.tasks:
        for fd in t.get("fds", []):
            users.setdefault(fd["file"], []).append({"pid": t["pid"], "fd": fd["fd"]})
    out = []
    for t in sf.tasks:
        for fd in t.get("fds", []):
            f = by_id.get(fd["file"], {})
            entry = {
                "pid": t["pid"], "fd": fd["fd"], "file": fd["file"],
                "kind": f.get("kind", "?"), "path": f.get("path", ""),
                "flags": f.get("flags", 0), "flags_text": open_flags(f.get("flags", 0)),
                "offset": f.get("pos", 0), "cloexec": bool(fd.get("cloexec")),
                "deleted": bool(f.get("deleted")), "size": f.get("size"),
                "shared_with": [o for o in users[fd["file"]]
                                if (o["pid"], o["fd"]) != (t["pid"], fd["fd"])],
            }
            if "socket" in f:
                entry["socket"] = f["socket"]
            if "skipped" in f:
                entry["skipped"] = f["skipped"]
            out.append(entry)
    return out


def note_list(sf) -> list[dict]:
    out = []
    for i, n in enumerate(sf.notes):
        kind = nt.kind_of(n.owner.encode(), n.n_type)
        out.append({"index": i, "owner": n.owner, "type": n.n_type,
                    "name": kind.name if kind else "unknown", "size": len(n.desc)})
    return out


def note_problems(sf) -> list[str]:
    """Cheap check of the note checksums only (no segment data is read)."""
    return reader.verify_notes(sf)


def summary(sf) -> dict:
    from .shared import objects
    return {"header": header(sf), "tasks": ps(sf), "threads": threads(sf),
            "memory": memory(sf), "files": files(sf), "shared": objects(sf)["objects"]}
