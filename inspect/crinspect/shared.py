"""`crinspect shared`: the objects tasks of the tree share, and who holds them.

Derived from the notes alone (CR_TASK fd tables and mappings, CR_FILES,
CR_IPC): every pipe, FIFO and socket (even with one end only in the tree),
every SysV IPC object, every shared memory object mapped more than once
(MAP_SHARED anonymous memory, memfd, shared file mappings), and every other
open file description held by more than one fd.  A file kind this module does
not know (new kinds land in CR_FILES over time) is shown generically by its
kind, path and any record it carries.

The JSON structure is stable: {"objects": [OBJECT, ...]}, each OBJECT with at
least "kind", "id" (unique in the statefile), "pids" (the tasks involved) and
"holders" (each {"pid", "fd", "file", "role", "start", "end", "perms"}: fd
holders have "fd" and "file" (CR_FILES id), mapping holders "start", "end"
and "perms"; the others are null).
"""

from __future__ import annotations

import os

from statefile.format.records import Record  # (transitional: issue 15)

O_ACCMODE, O_NONBLOCK = 3, 0o4000
SHM_DEST = 0o1000
_ACCESS = ("read", "write", "read-write", "?")
_KIND_ORDER = ("pipe", "fifo", "unix-pair", "unix-listen", "unix-socket", "socket", "pty",
               "sysv-shm", "sysv-sem", "sysv-msg")


def _holder(pid, fd=None, file=None, role="", start=None, end=None, perms=None) -> dict:
    return {"pid": pid, "fd": fd, "file": file, "role": role, "start": start, "end": end,
            "perms": perms}


def _shutdown(bits: int) -> str:
    # sk_shutdown: RCV_SHUTDOWN 1, SEND_SHUTDOWN 2
    return {0: "none", 1: "read", 2: "write", 3: "read+write"}.get(bits or 0, str(bits))


def _tcp_view(s: dict, socks: dict) -> dict:
    """A TCP connection's state, bytes queued each way, and whether its peer
    is a socket of the tree (statefile/dump/tcp.py; {} for other sockets)."""
    tcp = s.get("tcp")
    if not tcp:
        return {}
    inside = any((g.get("socket") or {}).get("local") == s.get("peer")
                 and (g.get("socket") or {}).get("peer") == s.get("local")
                 for g in socks.values())
    return {"tcp_state": tcp.get("state"), "queued_in": tcp.get("inq"),
            "queued_out": tcp.get("outq"),
            "peer_where": "in the tree" if inside else "outside the tree"}


def _queued(sock: dict) -> tuple[int | None, int | None]:
    """(bytes, messages) waiting in a socket's receive queue, None if not recorded."""
    q = sock.get("queue")
    if q is None:
        return None, None
    return sum(len(m) // 2 for m in q), len(q)


def _map_dev(dev: str) -> int | None:
    try:
        major, minor = (int(x, 16) for x in str(dev).split(":"))
    except ValueError:
        return None
    return os.makedev(major, minor)


def _pty_role(f: dict) -> str:
    if f["kind"] == "pty-master":
        return "master"
    return f"slave ({f['pty_alias']})" if f.get("pty_alias") else "slave"


def _number(o: dict) -> int:
    for k in ("ino", "shmid", "semid", "msqid", "inode", "file"):
        if isinstance(o.get(k), int):
            return o[k]
    return 0


def objects(sf) -> dict:
    files = {f["id"]: f for f in sf.files}
    fd_users: dict[int, list[tuple[int, int]]] = {}   # file id -> [(pid, fd)]
    for t in sf.tasks:
        for fd in sorted(t.get("fds", []), key=lambda e: e["fd"]):
            fd_users.setdefault(fd["file"], []).append((t["pid"], fd["fd"]))
    out: list[dict] = []
    used_files: set[int] = set()

    def fd_holders(fids, role_of) -> list[dict]:
        return [_holder(pid, fd, fid, role_of(files[fid]))
                for fid in fids for pid, fd in fd_users.get(fid, [])]

    # --- pipes and FIFOs: one object per pipe inode -----------------------------
    pipes: dict[tuple, list[int]] = {}
    for f in sf.files:
        if f.get("kind") in ("pipe", "fifo"):
            rec = f.get("pipe") or {}
            key = (f["kind"], f.get("dev") if f["kind"] == "fifo" else None,
                   rec.get("ino", f.get("ino")))
            pipes.setdefault(key, []).append(f["id"])
    for (kind, _dev, ino), fids in pipes.items():
        first = files[fids[0]]
        rec = first.get("pipe") or {}
        holders = fd_holders(fids, lambda f: _ACCESS[f.get("flags", 0) & O_ACCMODE] + " end")
        roles = {h["role"] for h in holders}
        obj = {"kind": kind, "id": f"{kind}:[{ino}]", "ino": ino,
               "path": first.get("path") if kind == "fifo" else None,
               "capacity": rec.get("size"), "bytes": rec.get("bytes"),
               "unread": rec.get("unread"),
               "readers": any(r.startswith("read") for r in roles),
               "writers": any(r.startswith(("write", "read-write")) for r in roles),
               "external": rec.get("external"), "error": rec.get("error"),
               "nonblock": sorted({h["fd"] for h in holders
                                   if files[h["file"]].get("flags", 0) & O_NONBLOCK}),
               "holders": holders}
        out.append(obj)
        used_files.update(fids)

    # --- sockets ----------------------------------------------------------------
    socks = {f["id"]: f for f in sf.files if f.get("kind") == "socket"}
    by_ino: dict[int, list[int]] = {}
    for fid, f in socks.items():
        s = f.get("socket") or {}
        by_ino.setdefault(s.get("ino", f.get("ino")), []).append(fid)
    done: set[int] = set()

    def end_info(ino: int, label: str) -> dict:
        s = socks[by_ino[ino][0]].get("socket") or {}
        qbytes, qmsgs = _queued(s)
        return {"label": label, "ino": ino, "name": s.get("name"),
                "abstract": bool(s.get("abstract")), "queued": qbytes, "messages": qmsgs,
                "fds_in_flight": bool(s.get("fds_in_flight")),
                "in_flight_files": [i for ids in s.get("scm") or [] for i in ids],
                "shutdown": _shutdown(s.get("shutdown", 0))}

    for ino in sorted(by_ino):
        if ino in done:
            continue
        fids = by_ino[ino]
        s = socks[fids[0]].get("socket") or {}
        peer = s.get("peer_ino") or 0
        if s.get("family") == "unix" and not s.get("listening") and peer in by_ino \
                and peer not in done and peer != ino:
            a, b = sorted((ino, peer))
            holders = (fd_holders(by_ino[a], lambda f: "end A")
                       + fd_holders(by_ino[b], lambda f: "end B"))
            out.append({"kind": "unix-pair", "id": f"unix-pair:[{a},{b}]",
                        "type": s.get("type"), "ends": [end_info(a, "A"), end_info(b, "B")],
                        "holders": holders})
            done.update((a, b))
            used_files.update(by_ino[a] + by_ino[b])
            continue
        done.add(ino)
        used_files.update(fids)
        if s.get("family") == "unix" and s.get("listening"):
            out.append({"kind": "unix-listen", "id": f"socket:[{ino}]", "ino": ino,
                        "type": s.get("type"), "name": s.get("name"),
                        "abstract": bool(s.get("abstract")),
                        "backlog_queued": s.get("backlog_queued"),
                        "holders": fd_holders(fids, lambda f: "listening")})
        elif s.get("family") == "unix":
            qbytes, qmsgs = _queued(s)
            out.append({"kind": "unix-socket", "id": f"socket:[{ino}]", "ino": ino,
                        "type": s.get("type"), "name": s.get("name"),
                        "abstract": bool(s.get("abstract")), "peer_ino": peer or None,
                        "peer": (f"socket:[{peer}] in the tree" if peer in by_ino
                                 else "outside the tree") if peer else "not connected",
                        "queued": qbytes, "messages": qmsgs,
                        "shutdown": _shutdown(s.get("shutdown", 0)),
                        "holders": fd_holders(fids, lambda f: "socket")})
        else:
            out.append({"kind": "socket", "id": f"socket:[{ino}]", "ino": ino,
                        "family": s.get("family"), "type": s.get("type"),
                        "local": s.get("local"), "peer": s.get("peer"),
                        "listening": bool(s.get("listening")),
                        **_tcp_view(s, socks),
                        "holders": fd_holders(fids, lambda f: "listening" if (
                            f.get("socket") or {}).get("listening") else "socket")})

    # --- pseudo-terminal pairs with both ends in the tree (kinds pty-master and
    # pty-slave, both carrying the pair's `pty` record) ---------------------------
    ptys: dict[int, list[int]] = {}
    for f in sf.files:
        rec = f.get("pty")
        if f.get("kind") in ("pty-master", "pty-slave") and isinstance(rec, (dict, Record)) \
                and isinstance(rec.get("index"), int):
            ptys.setdefault(rec["index"], []).append(f["id"])
    for index, fids in sorted(ptys.items()):
        fids.sort(key=lambda i: files[i]["kind"] != "pty-master")
        rec = next((files[i]["pty"] for i in fids if files[i]["kind"] == "pty-master"),
                   files[fids[0]]["pty"])
        q = next((files[i].get("pty_queue") for i in fids
                  if files[i]["kind"] == "pty-master"), None) or {}
        saved = None
        if isinstance(q, (dict, Record)) and q:       # the bytes saved (statefile/dump/tty.py)
            lines = [x for x in q.get("lines", ()) if isinstance(x, str)]
            saved = {"to_master": len(str(q.get("to_master", ""))) // 2,
                     "to_slave": (len(str(q.get("to_slave", ""))) + sum(map(len, lines))
                                  + len(str(q.get("partial", "")))) // 2,
                     "lines": len(lines), "partial": bool(q.get("partial"))}
        out.append({"kind": "pty", "id": f"pty:[{index}]", "index": index,
                    "path": f"/dev/pts/{index}",
                    "master": any(files[i]["kind"] == "pty-master" for i in fids),
                    "unread": rec.get("unread"), "slave_unread": rec.get("slave_unread"),
                    "slave_closed": rec.get("slave_closed"), "sid": rec.get("sid"),
                    "fg_pgrp": rec.get("fg_pgrp"), "saved": saved,
                    "holders": fd_holders(fids, _pty_role)})
        used_files.update(fids)

    # --- SysV IPC ---------------------------------------------------------------
    ipc = getattr(sf, "ipc", None) or {}
    for shm in ipc.get("shm", []):
        holders = [_holder(t["pid"], role="attached", start=m["start"], end=m["end"],
                           perms=m["perms"])
                   for t in sf.tasks for m in t.get("mappings", [])
                   if m.get("kind") == "sysv-shm" and m.get("inode") == shm.get("shmid")]
        attaching = {(h["pid"], h["start"]) for h in holders}
        nattch = shm.get("nattch")
        out.append({"kind": "sysv-shm", "id": f"shm:{shm.get('shmid')}",
                    "shmid": shm.get("shmid"), "key": shm.get("key"), "size": shm.get("size"),
                    "perms": shm.get("perms"), "cpid": shm.get("cpid"), "nattch": nattch,
                    "outside": max(0, nattch - len(attaching)) if nattch is not None else None,
                    "removed": bool((shm.get("perms") or 0) & SHM_DEST),
                    "holders": holders})
    for sem in ipc.get("sem", []):
        pids = {t["pid"] for t in sf.tasks}
        holders = [_holder(p, role=f"last semop on sem {i}")
                   for i, p in enumerate(sem.get("pids") or []) if p in pids]
        out.append({"kind": "sysv-sem", "id": f"sem:{sem.get('semid')}",
                    "semid": sem.get("semid"), "key": sem.get("key"),
                    "nsems": sem.get("nsems"), "values": sem.get("values"),
                    "holders": holders})
    for msg in ipc.get("msg", []):
        pids = {t["pid"] for t in sf.tasks}
        holders = [_holder(msg[k], role=role) for k, role in
                   (("lspid", "last sent"), ("lrpid", "last received"))
                   if msg.get(k) in pids]
        out.append({"kind": "sysv-msg", "id": f"msg:{msg.get('msqid')}",
                    "msqid": msg.get("msqid"), "key": msg.get("key"), "qnum": msg.get("qnum"),
                    "cbytes": msg.get("cbytes"), "holders": holders})

    # --- shared memory objects mapped more than once ----------------------------
    # One object per shmem record of CR_FILES (memfds, POSIX shm...) when the
    # statefile has them, else per device and inode of the mappings; fds of the
    # same object are holders too.
    records = list(getattr(sf, "shmem", None) or [])
    groups: dict[tuple, dict] = {}

    def group(key) -> dict:
        return groups.setdefault(key, {"maps": [], "fids": []})

    for t in sf.tasks:
        for m in t.get("mappings", []):
            if m.get("perms", "")[3:4] != "s" or m.get("kind") == "sysv-shm" \
                    or not m.get("inode"):
                continue
            rec = m.get("shmem")
            key = ("shmem", rec) if isinstance(rec, int) and rec < len(records) \
                else (m.get("dev"), m["inode"])
            group(key)["maps"].append((t["pid"], m))
    by_dev_ino = {(_map_dev(k[0]), k[1]): k for k in groups if k[0] != "shmem"}
    for f in sf.files:
        if f["id"] in used_files:
            continue
        rec = f.get("shmem")
        if isinstance(rec, int) and rec < len(records):
            group(("shmem", rec))["fids"].append(f["id"])
        elif f.get("ino") and (f.get("dev"), f["ino"]) in by_dev_ino:
            groups[by_dev_ino[(f.get("dev"), f["ino"])]]["fids"].append(f["id"])
    for key, g in groups.items():
        ms, fids = g["maps"], g["fids"]
        holders = [_holder(pid, role="maps", start=m["start"], end=m["end"], perms=m["perms"])
                   for pid, m in ms]
        holders += fd_holders(fids, lambda f: _ACCESS[f.get("flags", 0) & O_ACCMODE])
        if len(holders) < 2:
            continue
        used_files.update(fids)
        rec = records[key[1]] if key[0] == "shmem" else None
        first = ms[0][1] if ms else {}
        kind = ("memfd" if rec and rec.get("kind") == "memfd"
                else first.get("kind") or (rec or {}).get("kind") or "shmem")
        dev = first.get("dev", (rec or {}).get("dev"))
        inode = first.get("inode", (rec or {}).get("ino"))
        obj = {"kind": kind, "id": f"{kind}:[{inode}@{dev}]", "dev": dev, "inode": inode,
               "path": first.get("path") or (files[fids[0]].get("path") if fids else None),
               "size": max([m["end"] - m["start"] for _, m in ms]
                           or [(rec or {}).get("size") or 0]),
               "holders": holders}
        if rec is not None:
            obj["shmem"] = {k: v for k, v in rec.items() if k not in ("blob", "runs")}
        out.append(obj)

    # --- any other open file description held by several fds ---------------------
    for f in sf.files:
        users = fd_users.get(f["id"], [])
        if f["id"] in used_files or len(users) < 2:
            continue
        details = {k: v for k, v in f.items() if isinstance(v, (dict, Record)) and k != "fdinfo"}
        out.append({"kind": f.get("kind") or "other", "id": f"file:{f['id']}",
                    "file": f["id"], "path": f.get("path"), "offset": f.get("pos"),
                    "flags": f.get("flags"), "deleted": bool(f.get("deleted")),
                    "details": details,
                    "holders": fd_holders([f["id"]],
                                          lambda f: _ACCESS[f.get("flags", 0) & O_ACCMODE])})

    for o in out:
        o["pids"] = sorted({h["pid"] for h in o["holders"]})
    rank = {k: i for i, k in enumerate(_KIND_ORDER)}
    out.sort(key=lambda o: (rank.get(o["kind"], len(rank) + (0 if "inode" in o else 1)),
                            o["kind"], _number(o), o["id"]))
    return {"objects": out}


# --- text ----------------------------------------------------------------------

def _size(n) -> str:
    from .render import size
    return "?" if n is None else size(n)


def _name(name, abstract) -> str:
    if not name:
        return "unnamed"
    if abstract:
        try:
            return "@" + bytes.fromhex(name)[1:].decode(errors="replace")
        except ValueError:
            return f"@{name}"
    return name


def _who(h: dict) -> str:
    if h["fd"] is not None:
        return f"pid {h['pid']} fd {h['fd']} ({h['role']})"
    if h["start"] is not None:
        verb = "attaches" if h["role"] == "attached" else "maps"
        return f"pid {h['pid']} {verb} {h['start']:x}-{h['end']:x} {h['perms']}"
    return f"pid {h['pid']} ({h['role']})"


def _title(o: dict) -> str:
    k = o["kind"]
    if k in ("pipe", "fifo"):
        where = f" {o['path']}" if o.get("path") else ""
        inflight = "?" if o.get("bytes") is None else str(o["bytes"])
        saved = ", not saved: no reader in the tree" if o.get("unread") == "unknown" else ""
        t = (f"{k}{where}, capacity {_size(o.get('capacity'))}, "
             f"{inflight} bytes in flight{saved}")
        if not o["readers"]:
            t += ", no read end in the tree"
        if not o["writers"]:
            t += ", no write end in the tree"
        if o.get("external"):
            t += f", also held outside the tree ({o['external']})"
        return t
    if k == "unix-pair":
        return f"unix {o.get('type')} socket pair"
    if k == "unix-listen":
        return (f"listening unix {o.get('type')} socket {_name(o.get('name'), o['abstract'])}"
                f", {o.get('backlog_queued') or 0} connection(s) waiting")
    if k == "unix-socket":
        return (f"unix {o.get('type')} socket {_name(o.get('name'), o['abstract'])}, peer "
                f"{o['peer']}, {_size(o.get('queued'))} queued, shutdown {o['shutdown']}")
    if k == "socket":
        return (f"{o.get('family')} {o.get('type')} socket"
                + (f" local {o['local']}" if o.get("local") else "")
                + (f" peer {o['peer']}" if o.get("peer") else "")
                + (", listening" if o.get("listening") else "")
                + (f", TCP {o['tcp_state']}, {_size(o.get('queued_in'))} to read, "
                   f"{_size(o.get('queued_out'))} not acknowledged, peer {o['peer_where']}"
                   if o.get("tcp_state") else ""))
    if k == "pty":
        t = f"pseudo-terminal {o['path']}" + ("" if o["master"] else ", master not in the tree")
        if o.get("sid"):
            t += f", controlling terminal of session {o['sid']} (foreground {o.get('fg_pgrp')})"
        if o.get("slave_closed"):
            t += ", slave closed"
        q = o.get("saved")
        if q:
            t += (f", queued: {q['to_master']} byte(s) for the master, {q['to_slave']} for the "
                  f"slave ({q['lines']} line(s)" + (" and one being typed)" if q["partial"]
                                                    else ")"))
        return t
    if k == "sysv-shm":
        key = o.get("key")
        t = (f"SysV shm key {key:#x}" if isinstance(key, int) else "SysV shm") + \
            f", {_size(o.get('size'))}, {o.get('nattch')} attached"
        if o.get("outside"):
            t += f" ({o['outside']} outside the tree)"
        if o.get("removed"):
            t += ", removed (IPC_RMID)"
        if not o["holders"]:
            t += ", not attached in the tree"
        return t
    if k == "sysv-sem":
        key = o.get("key")
        return (f"SysV semaphore set key {key:#x}" if isinstance(key, int) else "SysV sem") + \
            f", {o.get('nsems')} semaphore(s), values {o.get('values')}"
    if k == "sysv-msg":
        key = o.get("key")
        return (f"SysV message queue key {key:#x}" if isinstance(key, int) else "SysV msg") + \
            f", {o.get('qnum')} message(s), {_size(o.get('cbytes'))}"
    if "inode" in o:
        rec = o.get("shmem") or {}
        what = f'"{rec["name"]}"' if rec.get("name") else (o.get("path") or rec.get("path")
                                                              or "")
        mapped = any(h["start"] is not None for h in o["holders"])
        t = f"{k} {what}, {_size(o.get('size'))} {'mapped' if mapped else 'in size'}"
        if rec.get("seals"):
            t += f", seals {rec['seals']:#x}"
        return t.replace("  ", " ")
    t = f"{k} {o.get('path') or ''}".rstrip()
    if o.get("offset") is not None:
        t += f", offset {o['offset']}"
    for name, rec in (o.get("details") or {}).items():
        scalars = ", ".join(f"{a}={b}" for a, b in rec.items()
                            if isinstance(b, (int, float, str, bool)) or b is None)
        if scalars:
            t += f", {name}: {scalars}"
    return t


def render(objs: list[dict]) -> list[str]:
    if not objs:
        return ["  none"]
    lines: list[str] = []
    for o in objs:
        lines.append(f"  {o['id']}  {_title(o)}")
        for e in o.get("ends", []):
            queued = "?" if e["queued"] is None else _size(e["queued"])
            if e.get("messages") and o.get("type") != "stream":
                queued += f" in {e['messages']} message(s)"
            lines.append(f"    end {e['label']} socket:[{e['ino']}]: "
                         f"{_name(e['name'], e['abstract'])}, {queued} queued, "
                         f"shutdown {e['shutdown']}"
                         + (", fds in flight" if e["fds_in_flight"] else "")
                         + (" (files " + ", ".join(map(str, e["in_flight_files"])) + ")"
                            if e.get("in_flight_files") else ""))
        for h in o["holders"]:
            lines.append(f"    {_who(h)}")
    return lines
