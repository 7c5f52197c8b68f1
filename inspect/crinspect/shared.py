"""`crinspect shared`: the objects tasks of the tree share, and who holds them.

Derived from the notes alone (CR_TASK fd tables and mappings, CR_FILES,
CR_IPC): every pipe, FIFO and socket (even with one end only in the tree),
every SysV IPC object, every shared memory object mapped more than once
(MAP_SHARED anonymous memory, memfd, shared file mappings), and every other
open file description held by more than one fd.  A file kind this module does
not know (new kinds land in CR_FILES over time) is shown generically by its
kind, path and any record it carries.

The objects are the typed views of views.py (SharedObject: a union tagged on
"object"), each with "kind", "id" (unique in the statefile), "pids" (the tasks
involved) and "holders" (views.Holder: fd holders have "fd" and "file"
(CR_FILES id), mapping holders "start", "end" and "perms"; the others are
null); docs/CRINSPECT-JSON.md describes them, `crinspect schema` prints their
JSON Schema.
"""

from __future__ import annotations

import os

import msgspec

from statefile.format import records as R

from . import views as v

O_ACCMODE, O_NONBLOCK = 3, 0o4000
SHM_DEST = 0o1000
_ACCESS = ("read", "write", "read-write", "?")
_KIND_ORDER = ("pipe", "fifo", "unix-pair", "unix-listen", "unix-socket", "socket", "pty",
               "sysv-shm", "sysv-sem", "sysv-msg")


def _holder(pid, fd=None, file=None, role="", start=None, end=None, perms=None) -> v.Holder:
    return v.Holder(pid=pid, fd=fd, file=file, role=role, start=start, end=end, perms=perms)


def _shutdown(bits: int) -> str:
    # sk_shutdown: RCV_SHUTDOWN 1, SEND_SHUTDOWN 2
    return {0: "none", 1: "read", 2: "write", 3: "read+write"}.get(bits or 0, str(bits))


def _tcp_view(s, socks: dict) -> dict:
    """A TCP connection's state, bytes queued each way, and whether its peer
    is a socket of the tree (statefile/dump/tcp.py; {} for other sockets)."""
    tcp = getattr(s, "tcp", None)
    if tcp is None:
        return {}
    inside = any(getattr(g.socket, "local", None) == s.peer
                 and getattr(g.socket, "peer", None) == s.local for g in socks.values())
    return {"tcp_state": tcp.state, "queued_in": tcp.inq, "queued_out": tcp.outq,
            "peer_where": "in the tree" if inside else "outside the tree"}


def _queued(sock: R.UnixSocket) -> tuple[int | None, int | None]:
    """(bytes, messages) waiting in a socket's receive queue, None if not recorded
    (sock_diag did not know the socket)."""
    if not sock.diag:
        return None, None
    return sum(len(m) // 2 for m in sock.queue), len(sock.queue)


def _map_dev(dev: str) -> int | None:
    try:
        major, minor = (int(x, 16) for x in str(dev).split(":"))
    except ValueError:
        return None
    return os.makedev(major, minor)


def _pty_role(f) -> str:
    if isinstance(f, R.PtyMasterFile):
        return "master"
    return f"slave ({f.pty_alias})" if getattr(f, "pty_alias", None) else "slave"


def _number(o) -> int:
    for k in ("ino", "shmid", "semid", "msqid", "inode", "file"):
        n = getattr(o, k, None)
        if isinstance(n, int):
            return n
    return 0


def _access(f) -> str:
    return _ACCESS[f.flags & O_ACCMODE]


def _unset_none(x):
    return None if x is msgspec.UNSET else x


def _sub_records(f) -> dict:
    """A file record's sub-records (its anon state, bpf map, pty...), by field."""
    out = {}
    for name in f.__struct_fields__:
        x = getattr(f, name)
        if name != "fdinfo" and isinstance(x, (dict, msgspec.Struct)):
            out[name] = x
    return out


def objects(sf) -> list:
    files = {f.id: f for f in sf.files}
    fd_users: dict[int, list[tuple[int, int]]] = {}   # file id -> [(pid, fd)]
    for t in sf.tasks:
        for fd in sorted(t.fds, key=lambda e: e.fd):
            fd_users.setdefault(fd.file, []).append((t.pid, fd.fd))
    out: list = []
    used_files: set[int] = set()

    def fd_holders(fids, role_of) -> list[v.Holder]:
        return [_holder(pid, fd, fid, role_of(files[fid]))
                for fid in fids for pid, fd in fd_users.get(fid, [])]

    def done(obj) -> None:
        obj.pids = sorted({h.pid for h in obj.holders})
        out.append(obj)

    # --- pipes and FIFOs: one object per pipe inode -----------------------------
    pipes: dict[tuple, list[int]] = {}
    for f in sf.files:
        if isinstance(f, (R.PipeFile, R.FifoFile)):
            key = (f.kind, f.dev if f.kind == "fifo" else None, f.pipe.ino)
            pipes.setdefault(key, []).append(f.id)
    for (kind, _dev, ino), fids in pipes.items():
        first = files[fids[0]]
        rec = first.pipe
        holders = fd_holders(fids, lambda f: _access(f) + " end")
        roles = {h.role for h in holders}
        done(v.PipeObject(
            kind=kind, id=f"{kind}:[{ino}]", ino=ino,
            path=first.path if kind == "fifo" else None,
            capacity=rec.size, bytes=rec.bytes, unread=rec.unread,
            readers=any(r.startswith("read") for r in roles),
            writers=any(r.startswith(("write", "read-write")) for r in roles),
            external=rec.external, error=rec.error,
            nonblock=sorted({h.fd for h in holders if files[h.file].flags & O_NONBLOCK}),
            holders=holders, pids=[]))
        used_files.update(fids)

    # --- sockets ----------------------------------------------------------------
    socks = {f.id: f for f in sf.files if isinstance(f, R.SocketFile)}

    def sock_ino(f) -> int:
        s = f.socket
        return s.ino if isinstance(s, R.UnixSocket) and s.ino is not None else f.ino

    by_ino: dict[int, list[int]] = {}
    for fid, f in socks.items():
        by_ino.setdefault(sock_ino(f), []).append(fid)
    seen: set[int] = set()

    def end_info(ino: int, label: str) -> v.UnixEnd:
        s = socks[by_ino[ino][0]].socket
        qbytes, qmsgs = _queued(s)
        return v.UnixEnd(label=label, ino=ino, name=_unset_none(s.name), abstract=s.abstract,
                         queued=qbytes, messages=qmsgs, fds_in_flight=s.fds_in_flight,
                         in_flight_files=[i for ids in s.scm for i in ids],
                         shutdown=_shutdown(s.shutdown))

    for ino in sorted(by_ino):
        if ino in seen:
            continue
        fids = by_ino[ino]
        s = socks[fids[0]].socket
        unix = isinstance(s, R.UnixSocket)
        peer = (s.peer_ino or 0) if unix else 0
        if unix and not s.listening and peer in by_ino and peer not in seen and peer != ino:
            a, b = sorted((ino, peer))
            holders = (fd_holders(by_ino[a], lambda f: "end A")
                       + fd_holders(by_ino[b], lambda f: "end B"))
            done(v.UnixPairObject(kind="unix-pair", id=f"unix-pair:[{a},{b}]", type=s.type,
                                  ends=[end_info(a, "A"), end_info(b, "B")],
                                  holders=holders, pids=[]))
            seen.update((a, b))
            used_files.update(by_ino[a] + by_ino[b])
            continue
        seen.add(ino)
        used_files.update(fids)
        if unix and s.listening:
            done(v.UnixListenObject(kind="unix-listen", id=f"socket:[{ino}]", ino=ino,
                                    type=s.type, name=_unset_none(s.name), abstract=s.abstract,
                                    backlog_queued=s.backlog_queued,
                                    holders=fd_holders(fids, lambda f: "listening"), pids=[]))
        elif unix:
            qbytes, qmsgs = _queued(s)
            done(v.UnixSocketObject(
                kind="unix-socket", id=f"socket:[{ino}]", ino=ino, type=s.type,
                name=_unset_none(s.name), abstract=s.abstract, peer_ino=peer or None,
                peer=(f"socket:[{peer}] in the tree" if peer in by_ino
                      else "outside the tree") if peer else "not connected",
                queued=qbytes, messages=qmsgs, shutdown=_shutdown(s.shutdown),
                holders=fd_holders(fids, lambda f: "socket"), pids=[]))
        else:
            done(v.SocketObject(
                kind="socket", id=f"socket:[{ino}]", ino=ino, family=s.family, type=s.type,
                local=None if s.local is None else list(s.local),
                peer=None if s.peer is None else list(s.peer),
                listening=bool(getattr(s, "listening", False)), **_tcp_view(s, socks),
                holders=fd_holders(fids, lambda f: "listening" if getattr(
                    f.socket, "listening", False) else "socket"), pids=[]))

    # --- pseudo-terminal pairs with both ends in the tree (kinds pty-master and
    # pty-slave, both carrying the pair's `pty` record) ---------------------------
    ptys: dict[int, list[int]] = {}
    for f in sf.files:
        if isinstance(f, (R.PtyMasterFile, R.PtySlaveFile)):
            ptys.setdefault(f.pty.index, []).append(f.id)
    for index, fids in sorted(ptys.items()):
        fids.sort(key=lambda i: not isinstance(files[i], R.PtyMasterFile))
        master = next((files[i] for i in fids if isinstance(files[i], R.PtyMasterFile)), None)
        rec = (master or files[fids[0]]).pty
        q = master.pty_queue if master is not None else None
        saved = None
        if q is not None:       # the bytes saved (statefile/dump/tty.py)
            saved = v.PtySaved(to_master=len(q.to_master) // 2,
                               to_slave=(len(q.to_slave) + sum(map(len, q.lines))
                                         + len(q.partial)) // 2,
                               lines=len(q.lines), partial=bool(q.partial))
        done(v.PtyObject(kind="pty", id=f"pty:[{index}]", index=index,
                         path=f"/dev/pts/{index}", master=master is not None,
                         unread=rec.unread, slave_unread=rec.slave_unread,
                         slave_closed=rec.slave_closed, sid=_unset_none(rec.sid),
                         fg_pgrp=_unset_none(rec.fg_pgrp), saved=saved,
                         holders=fd_holders(fids, _pty_role), pids=[]))
        used_files.update(fids)

    # --- SysV IPC ---------------------------------------------------------------
    ipc = sf.ipc
    pids = {t.pid for t in sf.tasks}
    for shm in ipc.shm:
        holders = [_holder(t.pid, role="attached", start=m.start, end=m.end, perms=m.perms)
                   for t in sf.tasks for m in t.mappings
                   if m.kind == "sysv-shm" and m.inode == shm.shmid]
        attaching = {(h.pid, h.start) for h in holders}
        done(v.SysvShmObject(kind="sysv-shm", id=f"shm:{shm.shmid}", shmid=shm.shmid,
                             key=shm.key, size=shm.size, perms=shm.perms, cpid=shm.cpid,
                             nattch=shm.nattch,
                             outside=max(0, shm.nattch - len(attaching)),
                             removed=bool(shm.perms & SHM_DEST), holders=holders, pids=[]))
    for sem in ipc.sem:
        holders = [_holder(p, role=f"last semop on sem {i}")
                   for i, p in enumerate(sem.pids) if p in pids]
        done(v.SysvSemObject(kind="sysv-sem", id=f"sem:{sem.semid}", semid=sem.semid,
                             key=sem.key, nsems=sem.nsems, values=list(sem.values),
                             holders=holders, pids=[]))
    for msg in ipc.msg:
        holders = [_holder(p, role=role) for p, role in
                   ((msg.lspid, "last sent"), (msg.lrpid, "last received")) if p in pids]
        done(v.SysvMsgObject(kind="sysv-msg", id=f"msg:{msg.msqid}", msqid=msg.msqid,
                             key=msg.key, qnum=msg.qnum, cbytes=msg.cbytes,
                             holders=holders, pids=[]))

    # --- shared memory objects mapped more than once ----------------------------
    # One object per shmem record of CR_FILES (memfds, POSIX shm...) when the
    # statefile has them, else per device and inode of the mappings; fds of the
    # same object are holders too.
    shmem = list(sf.shmem)
    groups: dict[tuple, dict] = {}

    def group(key) -> dict:
        return groups.setdefault(key, {"maps": [], "fids": []})

    for t in sf.tasks:
        for m in t.mappings:
            if m.perms[3:4] != "s" or m.kind == "sysv-shm" or not m.inode:
                continue
            key = ("shmem", m.shmem) if m.shmem is not None and m.shmem < len(shmem) \
                else (m.dev, m.inode)
            group(key)["maps"].append((t.pid, m))
    by_dev_ino = {(_map_dev(k[0]), k[1]): k for k in groups if k[0] != "shmem"}
    for f in sf.files:
        if f.id in used_files:
            continue
        rec = f.shmem if isinstance(f, R.RegularFile) else None
        if rec is not None and rec < len(shmem):
            group(("shmem", rec))["fids"].append(f.id)
        elif f.ino and (f.dev, f.ino) in by_dev_ino:
            groups[by_dev_ino[(f.dev, f.ino)]]["fids"].append(f.id)
    for key, g in groups.items():
        ms, fids = g["maps"], g["fids"]
        holders = [_holder(pid, role="maps", start=m.start, end=m.end, perms=m.perms)
                   for pid, m in ms]
        holders += fd_holders(fids, _access)
        if len(holders) < 2:
            continue
        used_files.update(fids)
        rec = shmem[key[1]] if key[0] == "shmem" else None
        first = ms[0][1] if ms else None
        if rec is not None and rec.kind == "memfd":
            kind = "memfd"
        else:
            kind = (first.kind if first else "") or (rec.kind if rec else "") or "shmem"
        dev = first.dev if first else rec.dev
        inode = first.inode if first else rec.ino
        done(v.SharedMemoryObject(
            kind=kind, id=f"{kind}:[{inode}@{dev}]", dev=dev, inode=inode,
            path=(first.path if first else "") or (files[fids[0]].path if fids else None),
            size=max([m.end - m.start for _, m in ms] or [rec.size if rec else 0]),
            shmem=msgspec.structs.replace(rec, blob=None) if rec is not None else msgspec.UNSET,
            holders=holders, pids=[]))

    # --- any other open file description held by several fds ---------------------
    for f in sf.files:
        users = fd_users.get(f.id, [])
        if f.id in used_files or len(users) < 2:
            continue
        done(v.FileObject(kind=f.kind, id=f"file:{f.id}", file=f.id, path=f.path,
                          offset=f.pos, flags=f.flags, deleted=f.deleted,
                          details=_sub_records(f),
                          holders=fd_holders([f.id], _access), pids=[]))

    rank = {k: i for i, k in enumerate(_KIND_ORDER)}
    out.sort(key=lambda o: (rank.get(o.kind, len(rank) + (
        0 if isinstance(o, v.SharedMemoryObject) else 1)), o.kind, _number(o), o.id))
    return out


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


def _who(h) -> str:
    if h.fd is not None:
        return f"pid {h.pid} fd {h.fd} ({h.role})"
    if h.start is not None:
        verb = "attaches" if h.role == "attached" else "maps"
        return f"pid {h.pid} {verb} {h.start:x}-{h.end:x} {h.perms}"
    return f"pid {h.pid} ({h.role})"


def _scalars(rec) -> str:
    items = (rec.items() if isinstance(rec, dict) else
             ((k, getattr(rec, k)) for k in rec.__struct_fields__))
    return ", ".join(f"{a}={b}" for a, b in items
                     if isinstance(b, (int, float, str, bool)) or b is None)


def _title(o) -> str:
    k = o.kind
    if isinstance(o, v.PipeObject):
        where = f" {o.path}" if o.path else ""
        saved = ", not saved: no reader in the tree" if o.unread == "unknown" else ""
        t = (f"{k}{where}, capacity {_size(o.capacity)}, "
             f"{o.bytes} bytes in flight{saved}")
        if not o.readers:
            t += ", no read end in the tree"
        if not o.writers:
            t += ", no write end in the tree"
        if o.external:
            t += f", also held outside the tree ({o.external})"
        return t
    if isinstance(o, v.UnixPairObject):
        return f"unix {o.type} socket pair"
    if isinstance(o, v.UnixListenObject):
        return (f"listening unix {o.type} socket {_name(o.name, o.abstract)}"
                f", {o.backlog_queued or 0} connection(s) waiting")
    if isinstance(o, v.UnixSocketObject):
        return (f"unix {o.type} socket {_name(o.name, o.abstract)}, peer "
                f"{o.peer}, {_size(o.queued)} queued, shutdown {o.shutdown}")
    if isinstance(o, v.SocketObject):
        return (f"{o.family} {o.type} socket"
                + (f" local {_addr(o.local)}" if o.local else "")
                + (f" peer {_addr(o.peer)}" if o.peer else "")
                + (", listening" if o.listening else "")
                + (f", TCP {o.tcp_state}, {_size(o.queued_in)} to read, "
                   f"{_size(o.queued_out)} not acknowledged, peer {o.peer_where}"
                   if o.tcp_state else ""))
    if isinstance(o, v.PtyObject):
        t = f"pseudo-terminal {o.path}" + ("" if o.master else ", master not in the tree")
        if o.sid:
            t += f", controlling terminal of session {o.sid} (foreground {o.fg_pgrp})"
        if o.slave_closed:
            t += ", slave closed"
        q = o.saved
        if q:
            t += (f", queued: {q.to_master} byte(s) for the master, {q.to_slave} for the "
                  f"slave ({q.lines} line(s)" + (" and one being typed)" if q.partial
                                                 else ")"))
        return t
    if isinstance(o, v.SysvShmObject):
        t = f"SysV shm key {o.key:#x}, {_size(o.size)}, {o.nattch} attached"
        if o.outside:
            t += f" ({o.outside} outside the tree)"
        if o.removed:
            t += ", removed (IPC_RMID)"
        if not o.holders:
            t += ", not attached in the tree"
        return t
    if isinstance(o, v.SysvSemObject):
        return (f"SysV semaphore set key {o.key:#x}, {o.nsems} semaphore(s), "
                f"values {o.values}")
    if isinstance(o, v.SysvMsgObject):
        return (f"SysV message queue key {o.key:#x}, {o.qnum} message(s), "
                f"{_size(o.cbytes)}")
    if isinstance(o, v.SharedMemoryObject):
        rec = None if o.shmem is msgspec.UNSET else o.shmem
        name = getattr(rec, "name", None)
        what = f'"{name}"' if name else (o.path or getattr(rec, "path", "") or "")
        mapped = any(h.start is not None for h in o.holders)
        t = f"{k} {what}, {_size(o.size)} {'mapped' if mapped else 'in size'}"
        if getattr(rec, "seals", 0):
            t += f", seals {rec.seals:#x}"
        return t.replace("  ", " ")
    t = f"{k} {o.path}".rstrip()
    t += f", offset {o.offset}"
    for name, rec in o.details.items():
        scalars = _scalars(rec)
        if scalars:
            t += f", {name}: {scalars}"
    return t


def _addr(a) -> str:
    """An inet address as it was printed before (a list: its Python repr)."""
    return str(tuple(a)) if isinstance(a, list) else str(a)


def render(objs: list) -> list[str]:
    if not objs:
        return ["  none"]
    lines: list[str] = []
    for o in objs:
        lines.append(f"  {o.id}  {_title(o)}")
        for e in getattr(o, "ends", []):
            queued = "?" if e.queued is None else _size(e.queued)
            if e.messages and o.type != "stream":
                queued += f" in {e.messages} message(s)"
            lines.append(f"    end {e.label} socket:[{e.ino}]: "
                         f"{_name(e.name, e.abstract)}, {queued} queued, "
                         f"shutdown {e.shutdown}"
                         + (", fds in flight" if e.fds_in_flight else "")
                         + (" (files " + ", ".join(map(str, e.in_flight_files)) + ")"
                            if e.in_flight_files else ""))
        for h in o.holders:
            lines.append(f"    {_who(h)}")
    return lines
