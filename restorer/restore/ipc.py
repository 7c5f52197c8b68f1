"""SysV IPC objects and shared anonymous memory of a tree, recreated by the
initiator before it forks the tree (docs/TREE.md, docs/RESTORE.md).

* SysV shm segments, semaphore sets and message queues (CR_IPC) get their
  original ids: the id is written to /proc/sys/kernel/{shm,sem,msg}_next_id
  just before shmget/semget/msgget(key, IPC_CREAT|IPC_EXCL), and the id got
  is checked.  Semaphore values come back with SETALL, messages with msgsnd
  in their order, a segment's bytes are written through an attach in the
  initiator (an unattached segment's from CR_IPC, an attached one's from the
  memory segment of the first task that attaches it), owner and mode with
  IPC_SET.  A segment that was already removed (SHM_DEST) is removed again
  once every task has attached it (finish()).  Every task attaches its
  segments itself, by an injected shmat (restore_memory.Memory.map_all).
* MAP_SHARED anonymous memory (`anon-shared`): one memfd per shared object
  (same dev/inode in the mappings), holding the saved bytes; every task that
  maps it inherits the memfd (restore_files.child_setup places it at the fd
  number restore_memory.plan_extras chose), maps it MAP_SHARED|MAP_FIXED by
  injection and closes it.

Existing objects with a saved key or id are refused before anything is
created (check()); a failed restore removes what was created (remove()).
"""

from __future__ import annotations

import ctypes
import os

from statefile.format import records as R
from statefile.format.integrity import DamagedError, SegmentReader

from restorer.errors import RestoreError, ValidationError
from restorer.release.guard import current as current_guard

_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmdt.argtypes = [ctypes.c_void_p]
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

IPC_CREAT, IPC_EXCL, IPC_NOWAIT = 0o1000, 0o2000, 0o4000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
SETALL = 17
SHM_DEST = 0o1000
MFD_CLOEXEC = 1
# struct ipc64_perm (x86-64): key, uid, gid, cuid, cgid, mode (u32), ...
UID_OFF, GID_OFF, MODE_OFF = 4, 8, 20
MSG_QBYTES_OFF = 88          # struct msqid64_ds: perm (48), stime, rtime, ctime, cbytes, qnum
SHARED_ID_BASE = -1000       # synthetic "file ids" of the memfds in the inherited fds

KINDS = (("shm", "shmid", "shm_next_id"), ("sem", "semid", "sem_next_id"),
         ("msg", "msqid", "msg_next_id"))


def _err(what: str) -> RestoreError:
    e = ctypes.get_errno()
    return RestoreError("ipc", f"{what}: {os.strerror(e)}")


def _table(kind: str) -> list[dict]:
    try:
        with open(f"/proc/sysvipc/{kind}") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    head = lines[0].split()
    rows = [dict(zip(head, (int(x) for x in line.split()))) for line in lines[1:] if line.strip()]
    for r in rows:
        r["perms"] = int(str(r["perms"]), 8)   # printed in octal (as dump_ipc reads it)
    return rows


def stale(kind: str, obj, cur: dict, killed: bool) -> bool:
    """Is the live object `cur` the very object `obj` was saved from, left
    behind by a tree that crcheckpoint --kill ended (SysV objects outlive
    their processes: postgres's segment, say)?  Same key, id, creator, owner,
    mode and change time, and, for a segment, attached by nobody."""
    idname = dict((k, i) for k, i, _ in KINDS)[kind]
    return (killed and obj.ctime != 0     # (0: a statefile from before ctime was saved)
            and all(cur.get(k) == getattr(obj, k) for k in ("key", idname, "cuid", "cgid",
                                                            "ctime", "uid", "gid", "perms"))
            and (kind != "shm" or cur.get("nattch") == 0))


def check(ipc: R.IpcNote | None, killed: bool = False) -> list[str]:
    """Refuse (ValidationError naming it) a saved object whose key or id is
    taken by an existing object, unless that one is the saved object itself
    left behind by the killed tree: those are listed (create_sysv replaces
    them)."""
    replaced = []
    for kind, idname, _ in KINDS:
        saved = getattr(ipc, kind) if ipc is not None else []
        if not saved:
            continue
        live = _table(kind)
        for obj in saved:
            ident = getattr(obj, idname)
            for cur in live:
                if stale(kind, obj, cur, killed):
                    replaced.append(f"SysV {kind} id {ident} (key {obj.key:#x}) left "
                                    "behind by the killed original is replaced by the saved one")
                    continue
                if obj.key and cur["key"] == obj.key:
                    raise ValidationError(
                        f"SysV {kind} key {obj.key:#x} (saved id {ident}) exists "
                        f"already (id {cur[idname]}); remove it (ipcrm) to restart")
                if cur[idname] == ident:
                    raise ValidationError(
                        f"SysV {kind} id {ident} (key {obj.key:#x}) is taken by an "
                        f"existing object (key {cur['key']:#x}); remove it (ipcrm) to restart")
    return replaced


def _next_id(name: str, value: int) -> None:
    with open(f"/proc/sys/kernel/{name}", "w") as f:
        f.write(str(value))


def _ctl(ctl, ident: int, cmd: int, buf) -> int:
    return ctl(ident, 0, cmd, buf) if ctl is _libc.semctl else ctl(ident, cmd, buf)


def _stat_set(ctl, ident: int, uid: int, gid: int, perms: int, what: str,
              qbytes: int = 0) -> None:
    buf = ctypes.create_string_buffer(256)
    if _ctl(ctl, ident, IPC_STAT, buf) < 0:
        raise _err(f"IPC_STAT of {what}")
    raw = bytearray(buf.raw)
    raw[UID_OFF:UID_OFF + 4] = uid.to_bytes(4, "little")
    raw[GID_OFF:GID_OFF + 4] = gid.to_bytes(4, "little")
    raw[MODE_OFF:MODE_OFF + 4] = (perms & 0o777).to_bytes(4, "little")
    if qbytes:
        raw[MSG_QBYTES_OFF:MSG_QBYTES_OFF + 8] = qbytes.to_bytes(8, "little")
    buf = ctypes.create_string_buffer(bytes(raw), 256)
    if _ctl(ctl, ident, IPC_SET, buf) < 0:
        raise _err(f"IPC_SET of {what}")


def _write_runs(rd: SegmentReader, seg: R.Segment, write, base: int) -> None:
    """Write a memory segment's stored runs through write(offset, bytes),
    at base + (address - segment start), each chunk verified first."""
    try:
        for rel, data in rd.pieces(seg):
            write(base + rel, data)
    except DamagedError as e:
        raise RestoreError("verify", f"{e}: not restarted") from None


class SharedIPC:
    """What the initiator created: SysV objects and memfds (closed once every
    task is rebuilt)."""

    def __init__(self, sf):
        self.sf = sf
        self.created: list[tuple[str, int]] = []    # (kind, id)
        self.memfds: dict[int, int] = {}            # synthetic file id -> fd
        self.remove_after: list[int] = []            # shm ids to IPC_RMID once attached

    # --- SysV ------------------------------------------------------------------------
    def _create(self, kind: str, next_name: str, ident: int, make) -> int:
        try:
            _next_id(next_name, ident)     # the kernel sets it back to -1 when it is used
        except OSError as e:
            raise RestoreError("ipc", f"cannot choose the id of SysV {kind} {ident} "
                               f"({next_name}: {e.strerror}; that needs root)") from None
        got = make()
        if got < 0:
            err = _err(f"creating SysV {kind} id {ident}")
            try:
                _next_id(next_name, -1)
            except OSError:
                pass
            raise err
        self.created.append((kind, got))
        if got != ident:
            raise RestoreError("ipc", f"SysV {kind} was created with id {got}, not {ident}")
        return got

    def _attached_content(self, shmid: int):
        """(task, mapping) pairs whose memory holds the bytes of segment shmid,
        one per distinct range of the segment."""
        seen = set()
        for t in self.sf.tasks:
            for m in t.mappings:
                if m.kind == "sysv-shm" and m.inode == shmid:
                    rng = (m.offset, m.end - m.start)
                    if rng not in seen:
                        seen.add(rng)
                        yield m

    def _remove_stale(self, ipc: R.IpcNote) -> None:
        """Remove the objects validation found to be the saved ones left
        behind by the killed tree (restore_ipc.stale, checked again here)."""
        killed = not self.sf.header.leave_running
        for kind, idname, _ in KINDS:
            ctl = {"shm": _libc.shmctl, "sem": _libc.semctl, "msg": _libc.msgctl}[kind]
            live = _table(kind) if getattr(ipc, kind) else []
            for obj in getattr(ipc, kind):
                for cur in live:
                    if stale(kind, obj, cur, killed) and _ctl(ctl, cur[idname], IPC_RMID,
                                                              None) < 0:
                        raise _err(f"removing the stale SysV {kind} id {cur[idname]}")

    def create_sysv(self) -> None:
        ipc = self.sf.ipc
        if ipc is None:
            return
        g = current_guard()
        for kind, idname, _ in KINDS if g is not None else ():
            for obj in getattr(ipc, kind):      # removed if crrestart dies before the release
                g.sysv(kind, getattr(obj, idname), obj.key)
        self._remove_stale(ipc)
        rd = SegmentReader(self.sf)
        try:
            for s in ipc.shm:
                flags = IPC_CREAT | IPC_EXCL | (s.perms & 0o777)
                shmid = self._create("shm", "shm_next_id", s.shmid,
                                     lambda: _libc.shmget(s.key, s.size, flags))
                addr = _libc.shmat(shmid, None, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    raise _err(f"shmat of SysV shm id {shmid}")
                try:
                    def write(off: int, data: bytes) -> None:
                        n = max(0, min(len(data), s.size - off))
                        ctypes.memmove(addr + off, bytes(data[:n]), n)
                    if s.content:
                        write(0, bytes.fromhex(s.content))
                    for m in self._attached_content(shmid):
                        for p in m.segments:
                            seg = self.sf.segment(p)
                            _write_runs(rd, seg, write, m.offset + seg.vaddr - m.start)
                finally:
                    _libc.shmdt(ctypes.c_void_p(addr))
                _stat_set(_libc.shmctl, shmid, s.uid, s.gid, s.perms, f"SysV shm id {shmid}")
                if s.perms & SHM_DEST:
                    self.remove_after.append(shmid)
            for s in ipc.sem:
                flags = IPC_CREAT | IPC_EXCL | (s.perms & 0o777)
                semid = self._create("sem", "sem_next_id", s.semid,
                                     lambda: _libc.semget(s.key, s.nsems, flags))
                vals = (ctypes.c_ushort * s.nsems)(*s.values)
                if _libc.semctl(semid, 0, SETALL, vals) < 0:
                    raise _err(f"semctl(SETALL) of SysV sem id {semid}")
                _stat_set(_libc.semctl, semid, s.uid, s.gid, s.perms, f"SysV sem id {semid}")
            for q in ipc.msg:
                flags = IPC_CREAT | IPC_EXCL | (q.perms & 0o777)
                msqid = self._create("msg", "msg_next_id", q.msqid,
                                     lambda: _libc.msgget(q.key, flags))
                total = sum(len(x.data) // 2 for x in q.messages)
                # raise the queue's byte limit when the saved messages need it
                buf = ctypes.create_string_buffer(256)
                if _libc.msgctl(msqid, IPC_STAT, buf) < 0:
                    raise _err(f"IPC_STAT of SysV msg id {msqid}")
                cur = int.from_bytes(buf.raw[MSG_QBYTES_OFF:MSG_QBYTES_OFF + 8], "little")
                if total > cur:
                    _stat_set(_libc.msgctl, msqid, 0, 0, 0o600, f"SysV msg id {msqid}",
                              qbytes=total)
                for msg in q.messages:
                    data = bytes.fromhex(msg.data)
                    mb = ctypes.create_string_buffer(msg.type.to_bytes(8, "little", signed=True)
                                                     + data, 8 + len(data))
                    if _libc.msgsnd(msqid, mb, len(data), IPC_NOWAIT) < 0:
                        raise _err(f"msgsnd to SysV msg id {msqid}")
                _stat_set(_libc.msgctl, msqid, q.uid, q.gid, q.perms, f"SysV msg id {msqid}")
        finally:
            rd.close()

    # --- MAP_SHARED anonymous memory -------------------------------------------------
    def create_memfds(self, shared_ids: dict[tuple, int]) -> dict[int, int]:
        """One memfd per shared anonymous object, with its saved bytes.
        Returns {synthetic file id: fd} for the tasks to inherit."""
        rd = SegmentReader(self.sf)
        try:
            for key, fid in shared_ids.items():
                maps = [m for t in self.sf.tasks for m in t.mappings
                        if m.kind in SHARED_KINDS and anon_shared_key(m) == key]
                # its size when the checkpoint could see it (root), else what
                # the mappings reach
                size = max(m.object_size or m.offset + m.end - m.start
                           for m in maps)
                fd = os.memfd_create(f"crelf-shared-{key[1]}", MFD_CLOEXEC)
                self.memfds[fid] = fd
                os.ftruncate(fd, size)
                seen = set()
                # MAP_PRIVATE ones first: a MAP_SHARED mapping's bytes win
                for m in sorted(maps, key=lambda m: m.kind == "anon-shared"):
                    rng = (m.offset, m.end - m.start, m.kind)
                    if rng in seen:
                        continue   # the same bytes, seen by another task
                    seen.add(rng)
                    for p in m.segments:
                        seg = self.sf.segment(p)
                        try:
                            if m.kind == "anon-shared":
                                rd.write_into(fd, seg, m.offset + seg.vaddr - m.start)
                            else:
                                self._object_bytes(rd, fd, m, seg)
                        except DamagedError as e:
                            raise RestoreError("verify", f"{e}: not restarted") from None
        finally:
            rd.close()
        return dict(self.memfds)

    def object_fds(self, shared_ids: dict[tuple, int], memfds: dict[int, int]) -> dict[int, int]:
        """Fds open on a shared anonymous object (opened through
        /proc/PID/map_files, shown as "/dev/zero (deleted)") are opened again
        from the object's memfd: {file id: fd} for the tasks to inherit."""
        out: dict[int, int] = {}
        for f in self.sf.files:
            if f.kind != "regular" or not f.path.startswith("/dev/zero"):
                continue
            key = (f"{os.major(f.dev):02x}:{os.minor(f.dev):02x}", f.ino)   # as in maps
            fid = shared_ids.get(key)
            if fid is None or fid not in memfds:
                continue
            flags = f.flags & (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK) | os.O_CLOEXEC
            try:
                fd = os.open(f"/proc/self/fd/{memfds[fid]}", flags)
                if f.pos:
                    os.lseek(fd, f.pos, os.SEEK_SET)
            except OSError as e:
                raise RestoreError("memfds", f"{f.path}: {e.strerror or e}") from None
            out[f.id] = fd
        return out

    @staticmethod
    def _object_bytes(rd: SegmentReader, fd: int, m: R.Mapping, seg: R.Segment) -> None:
        """The bytes a MAP_PRIVATE mapping of the object saw of it: its
        saved pages but the ones it copied-on-write (cow_runs, its own)."""
        cow = [(m.start + o, m.start + o + n) for o, n in m.cow_runs]
        base = m.offset - m.start
        for off, view in rd.pieces(seg):
            lo, hi = seg.vaddr + off, seg.vaddr + off + len(view)
            for a, b in _minus(lo, hi, cow):
                part = view[a - lo:b - lo]
                pos = base + a
                while len(part):
                    n = os.pwrite(fd, part, pos)
                    part, pos = part[n:], pos + n

    # --- end -------------------------------------------------------------------------
    def close(self) -> None:
        for fd in self.memfds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.memfds = {}

    def finish(self) -> None:
        """Every task attached its segments: remove the ones that were removed."""
        for shmid in self.remove_after:
            _libc.shmctl(shmid, IPC_RMID, None)
        self.close()

    def remove(self) -> None:
        """A failed restore: remove every object created here."""
        for kind, ident in reversed(self.created):
            if kind == "shm":
                _libc.shmctl(ident, IPC_RMID, None)
            elif kind == "sem":
                _libc.semctl(ident, 0, IPC_RMID)
            else:
                _libc.msgctl(ident, IPC_RMID, None)
        self.created = []
        self.close()


SHARED_KINDS = ("anon-shared", "shmem-private")


def _minus(lo: int, hi: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in sorted(holes):
        if b <= lo or a >= hi:
            continue
        if a > lo:
            out.append((lo, a))
        lo = max(lo, b)
    if lo < hi:
        out.append((lo, hi))
    return out


def anon_shared_key(m: R.Mapping) -> tuple:
    return (m.dev, m.inode)


def shared_anon_ids(tasks: list[R.TaskNote]) -> dict[tuple, int]:
    """{(dev, inode): synthetic file id} of every MAP_SHARED anonymous object."""
    out: dict[tuple, int] = {}
    for t in tasks:
        for m in t.mappings:
            if m.kind in SHARED_KINDS:
                out.setdefault(anon_shared_key(m), SHARED_ID_BASE - len(out))
    return out
