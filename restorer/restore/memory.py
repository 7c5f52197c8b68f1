"""Memory of a restored task: unmap the restorer's copy, put the vDSO back at
its saved address, map every saved mapping, and copy the content in (eager) or
leave it to the userfaultfd server (lazy).  Memory stays anonymous: the
statefile is never mapped into the task (NOTES.md: MADV_DONTNEED would refill
pages from the file)."""

from __future__ import annotations

import os

from statefile.control.inject import find_syscall_insn
from statefile.format import records as R
from statefile.format.integrity import DamagedError, SegmentReader, read_ahead

from restorer.errors import RestoreError
from restorer.kernel import (MADV, MADV_GUARD_INSTALL, MAP_ANONYMOUS, MAP_DROPPABLE, MAP_FIXED,
                             MAP_FIXED_NOREPLACE, MAP_GROWSDOWN, MAP_NORESERVE, MAP_PRIVATE,
                             MAP_SHARED, MLOCK_ONFAULT, MREMAP_FIXED, MREMAP_MAYMOVE, PROT_EXEC,
                             PROT_READ, PROT_WRITE, TASK_SIZE)
from restorer.restore.files import ExtraOpen
from restorer.restore.memfd import extra_key, inherited_id, mapped_rw

VDSO_NAMES = ("[vvar]", "[vvar_vclock]", "[vdso]")
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
READ_AHEAD = 8 << 20      # bytes of content from which the copy reads ahead in a thread
MAP_HUGETLB, MAP_HUGE_SHIFT = 0x40000, 26
SKIP_KINDS = ("vvar", "vdso", "vsyscall")


def parse_maps(pid: int) -> list[dict]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append({"start": a, "end": b, "perms": parts[1],
                        "path": parts[5].strip() if len(parts) > 5 else ""})
    return out


def vdso_layout(maps: list[dict]) -> dict[str, tuple[int, int]]:
    """{name: (start, size)} of [vvar], [vvar_vclock], [vdso]."""
    return {m["path"]: (m["start"], m["end"] - m["start"]) for m in maps
            if m["path"] in VDSO_NAMES}


def prot_of(perms: str) -> int:
    return ((PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
            | (PROT_EXEC if perms[2] == "x" else 0))


def file_path(m: R.Mapping) -> str:
    p = m.path
    return p[: -len(" (deleted)")] if m.deleted and p.endswith(" (deleted)") else p


def _dev(devstr: str) -> tuple[int, int]:
    maj, mnr = devstr.split(":")
    return int(maj, 16), int(mnr, 16)


def shared_key(m: R.Mapping) -> str:
    """ExtraOpen key of the memfd that holds a MAP_SHARED anonymous object."""
    return f"shm:{m.dev}:{m.inode}"


def plan_extras(task: R.TaskNote, first_fd: int,
                shared_ids: dict[tuple, int] | None = None) -> list[ExtraOpen]:
    """The files the task must hold open while its mappings are rebuilt (and
    the memfds of its shared anonymous memory, inherited from the initiator:
    restorer/restore/ipc.py; shared_ids is {(dev, inode): inherited file id})."""
    extras: dict[tuple[str, int], ExtraOpen] = {}
    fd = first_fd
    for m in task.mappings:
        if m.shmem is not None:
            # a memfd or shared file object, made by the initiator (restorer/restore/memfd.py)
            rw = mapped_rw(m)
            key = (extra_key(m.shmem, rw), -1)
            if key not in extras:
                extras[key] = ExtraOpen(key[0], "", os.O_RDWR if rw else os.O_RDONLY, fd,
                                        shared=inherited_id(m.shmem, rw))
                fd += 1
            continue
        if m.kind in ("anon-shared", "shmem-private") and shared_ids:
            key = (shared_key(m), -1)
            if key not in extras:
                extras[key] = ExtraOpen(key[0], "", os.O_RDWR, fd,
                                        shared=shared_ids[(m.dev, m.inode)])
                fd += 1
            continue
        if m.kind not in ("file-private", "file-shared") or m.deleted:
            continue
        rw = m.kind == "file-shared" and "mw" in m.vmflags
        flags = os.O_RDWR if rw else os.O_RDONLY
        key = (file_path(m), flags)
        if key not in extras:
            extras[key] = ExtraOpen(f"map:{key[0]}:{flags}", key[0], flags, fd, None,
                                    m.inode or None)
            fd += 1
    if task.exe:
        exe = task.exe
        exe_id = task.exe_id
        if exe.endswith(" (deleted)"):
            raise RestoreError("validation", f"the executable {exe} was deleted")
        extras[("exe", 0)] = ExtraOpen("exe", exe, os.O_RDONLY, fd,
                                       exe_id.dev if exe_id else None,
                                       exe_id.ino if exe_id else None)
    return list(extras.values())


class Memory:
    """Builds one task's address space through an injector."""

    def __init__(self, sf, task: R.TaskNote, memfd: int, fds: dict[str, int]):
        self.sf = sf
        self.task = task
        self.memfd = memfd            # /proc/PID/mem of the task, O_RDWR
        self.fds = fds                # ExtraOpen.key -> fd number in the task
        self.bytes_written = 0
        self.sfd = os.open(sf.path, os.O_RDONLY | os.O_CLOEXEC)
        self._reader: SegmentReader | None = None
        self.mprotect_after: list[tuple[int, int, int]] = []
        self.mlock_after: list[tuple[int, int, int]] = []
        self._attached: dict[int, tuple[int, int]] = {}   # shmid -> (address, offset)

    # --- the restorer's own mappings out, the vDSO to its place --------------------
    def clear_and_move_vdso(self, inj, rpid: int) -> None:
        cur = vdso_layout(parse_maps(rpid))
        saved = {m.path: (m.start, m.end - m.start) for m in self.task.mappings
                 if m.path in VDSO_NAMES}
        lo = min(s for s, _ in cur.values())
        hi = max(s + n for s, n in cur.values())
        # Everything but the vDSO area (and the premapped regions) goes.
        pos = 0
        for a, b in sorted([(lo, hi)] + self._premapped()):
            if a > pos:
                inj.check("munmap", pos, a - pos)
            pos = max(pos, b)
        if pos < TASK_SIZE:
            inj.check("munmap", pos, TASK_SIZE - pos)
        if not saved:
            # The task had unmapped its vDSO: this one is unmapped once the
            # task's own code is in (drop_vdso); till then it must not be in
            # the way of the saved mappings.
            used = [(m.start, m.end) for m in self.task.mappings] + self._premapped()
            if any(lo < b and a < hi for a, b in used):
                dst = self._free_range(hi - lo, avoid=[(lo, hi)])
                self._mremap_all(inj, cur, {k: dst + (s - lo) for k, (s, _) in cur.items()})
            return
        tlo = min(s for s, _ in saved.values())
        thi = max(s + n for s, n in saved.values())
        if tlo == lo and all(cur.get(k) == v for k, v in saved.items()):
            return
        moves = cur
        if tlo < hi and lo < thi:  # overlapping: bounce through a free range first
            bounce = self._free_range(thi - tlo + (hi - lo), avoid=[(lo, hi), (tlo, thi)])
            moves = self._mremap_all(inj, moves, {k: bounce + (s - lo) for k, (s, _) in
                                                  cur.items()})
        self._mremap_all(inj, moves, {k: s for k, (s, _) in saved.items()})

    def drop_vdso(self, inj, rpid: int) -> None:
        """A task that had unmapped its vDSO: injections go through a
        `syscall` of its own code from here, and the vDSO crrestart's fork
        gave it is unmapped ([vvar] and [vvar_vclock] with it)."""
        if any(m.path in VDSO_NAMES for m in self.task.mappings):
            return
        maps = parse_maps(rpid)
        inj.addr = find_syscall_insn(rpid, maps, vdso=False)
        for start, size in vdso_layout(maps).values():
            inj.check("munmap", start, size)

    def _mremap_all(self, inj, cur: dict, target: dict) -> dict:
        out = {}
        for name in VDSO_NAMES:
            if name not in cur:
                continue
            start, size = cur[name]
            dst = target[name]
            if dst != start:
                off = inj.addr - start
                res = inj.check("mremap", start, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, dst)
                if res != dst:
                    raise RestoreError("vdso", f"{name} moved to {res:#x}, not {dst:#x}")
                if name == "[vdso]":
                    inj.addr = dst + off
            out[name] = (dst, size)
        return out

    def _premapped(self) -> list[tuple[int, int]]:
        """[addr, end) of this task's premapped regions (plan_premaps)."""
        out = []
        for p in premaps(self.task):
            m = self.task.mappings[p["mapping"]]
            out.append((p["addr"], p["addr"] + m.end - m.start))
        return out

    def _free_range(self, size: int, avoid: list[tuple[int, int]]) -> int:
        used = [(m.start, m.end) for m in self.task.mappings] + avoid \
            + self._premapped()
        for cand in (0x100000000000, 0x200000000000, 0x300000000000, 0x500000000000,
                     0x10000000000):
            if all(cand + size <= a or b <= cand for a, b in used):
                return cand
        raise RestoreError("vdso", "no free address range to move the vDSO through")

    # --- mappings ------------------------------------------------------------------
    def map_all(self, inj, lazy: bool = False) -> list[tuple[int, int]]:
        """mmap every saved mapping; returns the anonymous ranges with saved content."""
        anon_ranges = []
        premap = {p["mapping"]: p["addr"] for p in premaps(self.task)}
        for i, m in enumerate(self.task.mappings):
            kind = m.kind
            if kind in SKIP_KINDS:
                continue
            start, size = m.start, m.end - m.start
            prot = prot_of(m.perms)
            vmf = m.vmflags
            if i in premap:
                # built (content in) by the task's Python before the fork:
                # moved, not copied, so its pages stay shared
                res = inj.check("mremap", premap[i], size, size, MREMAP_MAYMOVE | MREMAP_FIXED,
                                start)
                if res == start and prot != PROT_READ | PROT_WRITE:
                    inj.check("mprotect", start, size, prot)
            elif m.shmem is not None:
                # a memfd or shared file, one object for every task (restorer/restore/memfd.py)
                flags = ((MAP_SHARED if m.perms[3] == "s" else MAP_PRIVATE) | MAP_FIXED
                         | (MAP_NORESERVE if "nr" in vmf else 0))
                res = inj.check("mmap", start, size, prot, flags,
                                self.fds[extra_key(m.shmem, mapped_rw(m))], m.offset)
            elif kind in ("file-private", "file-shared") and not m.deleted:
                rw = kind == "file-shared" and "mw" in vmf
                fd = self.fds[f"map:{file_path(m)}:{os.O_RDWR if rw else os.O_RDONLY}"]
                flags = (MAP_SHARED if kind == "file-shared" else MAP_PRIVATE) | MAP_FIXED
                res = inj.check("mmap", start, size, prot, flags, fd, m.offset)
            elif kind == "anon-shared":
                # one memfd for every task that shares it (restorer/restore/ipc.py); its
                # content is in already
                flags = MAP_SHARED | MAP_FIXED | (MAP_NORESERVE if "nr" in vmf else 0)
                res = inj.check("mmap", start, size, prot, flags, self.fds[shared_key(m)],
                                m.offset)
            elif kind == "shmem-private":
                # the object again (restorer/restore/ipc.py), privately: its own pages
                # on top (copy_all)
                flags = MAP_PRIVATE | MAP_FIXED | (MAP_NORESERVE if "nr" in vmf else 0)
                res = inj.check("mmap", start, size, prot, flags, self.fds[shared_key(m)],
                                m.offset)
            elif kind == "sysv-shm":
                res = self._shmat(inj, m, prot)
            elif kind == "aio":
                continue      # its range stays free: rebuilt by restore_aio (restore_task)
            elif kind == "special":
                raise RestoreError("memory", f"special mapping {m.path} at {start:#x} "
                                   "cannot be restored")
            else:
                shared = m.perms[3] == "s"
                flags = ((MAP_SHARED if shared else MAP_DROPPABLE if "dp" in vmf
                          else MAP_PRIVATE) | MAP_ANONYMOUS | MAP_FIXED)
                if "gd" in vmf:
                    flags |= MAP_GROWSDOWN
                if "nr" in vmf:
                    flags |= MAP_NORESERVE
                if "ht" in vmf:
                    # MAP_HUGETLB memory (its deleted file-private view, /anon_hugepage)
                    flags |= MAP_HUGETLB | ((m.page_kb << 10).bit_length() - 1) \
                        << MAP_HUGE_SHIFT
                has_data = any(self.sf.segment(p).filesz for p in m.segments)
                map_prot = prot
                if has_data and shared and not (prot & PROT_WRITE) and not lazy:
                    # /proc/PID/mem cannot write through a read-only shared mapping
                    map_prot = prot | PROT_READ | PROT_WRITE
                    self.mprotect_after.append((start, size, prot))
                res = inj.check("mmap", start, size, map_prot, flags, 2**64 - 1, 0)
                if has_data and not shared and "ht" not in vmf:
                    anon_ranges.append((start, m.end))
            if res != start:
                raise RestoreError("memory", f"mapping {start:#x} landed at {res:#x}")
            for flag, advice in MADV.items():
                if flag in vmf:
                    inj.call("madvise", start, size, advice)
            for rel, ln in m.guards:
                # never written by the copy (their pages are not stored)
                inj.check("madvise", start + rel, ln, MADV_GUARD_INSTALL)
            if "lo" in vmf:
                # mlock'ed (MAP_LOCKED, mlock, mlockall): locked once its
                # content is in (finish), so that locking faults nothing in
                # before the copy
                self.mlock_after.append((start, size, MLOCK_ONFAULT if "lf" in vmf else 0))
        return anon_ranges

    def _shmat(self, inj, m: R.Mapping, prot: int) -> int:
        """Attach SysV segment m.inode (recreated with its id by the
        initiator, content in) at its address; a later piece of the same
        attach (the vma split by mprotect) only gets its protection."""
        start, shmid = m.start, m.inode
        prev = self._attached.get(shmid)
        if prev is not None and prev[0] + (m.offset - prev[1]) == start:
            inj.check("mprotect", start, m.end - start, prot)
            return start
        if m.offset != 0:
            raise RestoreError("memory", f"SysV shm id {shmid} attached in part at {start:#x} "
                               f"(offset {m.offset:#x}); not restored by this version")
        flags = (0 if prot & PROT_WRITE else SHM_RDONLY) | (SHM_EXEC if prot & PROT_EXEC else 0)
        res = inj.check("shmat", shmid, start, flags)
        self._attached[shmid] = (start, 0)
        if res == start and prot != PROT_READ | (prot & (PROT_WRITE | PROT_EXEC)):
            inj.check("mprotect", start, m.end - start, prot)
        return res

    def finish(self, inj) -> None:
        for start, size, prot in self.mprotect_after:
            inj.check("mprotect", start, size, prot)
        for start, size, flags in self.mlock_after:
            inj.check("mlock2", start, size, flags)

    # --- content -------------------------------------------------------------------
    def copy_all(self, skip_anon: bool = False) -> None:
        """Write every saved page into the task (anonymous private memory too
        unless skip_anon: the lazy server brings it then)."""
        jobs = []
        premap = {p["mapping"] for p in premaps(self.task)}
        for i, m in enumerate(self.task.mappings):
            kind = m.kind
            if kind in SKIP_KINDS or i in premap:
                continue
            if m.shmem is not None or kind == "shmem-private" or (
                    kind in ("file-private", "file-shared") and not m.deleted):
                # the object holds the content; a private mapping's own pages on top
                for rel, ln in m.cow_runs:
                    jobs += self._range_jobs(m, m.start + rel, m.start + rel + ln)
                continue
            if kind in ("anon-shared", "sysv-shm"):
                continue   # the initiator wrote it into the shared object (restorer/restore/ipc.py)
            if skip_anon and m.perms[3] == "p" and "ht" not in m.vmflags:
                continue      # (hugetlb memory is copied eagerly: never served lazily)
            for p in m.segments:
                seg = self.sf.segment(p)
                if seg.filesz:
                    jobs.append((seg, 0, seg.filesz))
        self._copy(jobs)

    def copy_range(self, m: R.Mapping, a: int, b: int) -> None:
        self._copy(self._range_jobs(m, a, b))

    def _range_jobs(self, m: R.Mapping, a: int, b: int) -> list:
        jobs = []
        for p in m.segments:
            seg = self.sf.segment(p)
            lo = max(a, seg.vaddr)
            hi = min(b, seg.vaddr + seg.filesz)
            if lo < hi:
                jobs.append((seg, lo - seg.vaddr, hi - seg.vaddr))
        return jobs

    def _write(self, seg: R.Segment, rel: int, ln: int) -> None:
        self._copy([(seg, rel, rel + ln)])

    def _copy(self, jobs: list) -> None:
        """Copy the stored bytes of jobs [(segment, lo, hi)] into the task:
        each chunk is read once into a buffer and verified against its
        checksum (statefile/format/integrity.py) before any byte of it is written to
        /proc/PID/mem (NOTES.md: faster than process_vm_writev; reading
        through an mmap of the statefile was slower and made crrestart's RSS
        grow with the image).  Beyond READ_AHEAD bytes a thread reads and
        verifies the next chunk while this one is written.  Damage refuses the
        restore: the task is still held at the barrier and is killed with the
        tree."""
        if sum(hi - lo for _, lo, hi in jobs) >= READ_AHEAD:
            it = read_ahead(self.sf, self.sfd, jobs)
        else:
            if self._reader is None:
                self._reader = SegmentReader(self.sf, self.sfd)
            rd = self._reader
            it = ((seg, off, view) for seg, lo, hi in jobs for off, view in rd.pieces(seg, lo, hi))
        try:
            for seg, off, view in it:
                dst, pos = seg.vaddr + off, 0
                while pos < len(view):
                    w = os.pwrite(self.memfd, view[pos:], dst + pos)
                    if w <= 0:
                        raise RestoreError("memory", f"short write at {dst + pos:#x}")
                    pos += w
                self.bytes_written += len(view)
        except DamagedError as e:
            raise RestoreError("verify", f"{e}: not restarted") from None
        finally:
            it.close()

    def close(self) -> None:
        if self.sfd >= 0:
            os.close(self.sfd)
            self.sfd = -1


# --- pages shared copy-on-write between a parent and its children ---------------------
# A mapping whose pages a child shares with its parent since a fork (CR_TASK
# mapping "cow_parent", statefile/dump_memory.mark_cow) is built before the
# child exists: the parent's Python, before it forks its children, maps a
# "premapped" region at a free address and writes its own content for that
# mapping there; the children inherit it (the same physical pages), each
# drops what it did not share (MADV_DONTNEED) and writes its own pages on top
# before forking its own children.  In the injection phase every task keeps
# its premapped regions through the big munmap and moves each one to its
# address (mremap keeps the pages, so the sharing).
PREMAP_BASE = 0x400000000000
MADV_DONTNEED = 4


def plan_premaps(tasks: list[R.TaskNote]) -> None:
    """Set task._premap = [{"mapping", "addr", "create"}] on the tasks
    that take part in copy-on-write sharing (tasks parents-first)."""
    by_pid = {t.pid: t for t in tasks}
    used = sorted((m.start, m.end) for t in tasks for m in t.mappings)
    nxt = PREMAP_BASE

    def alloc(size: int) -> int:
        nonlocal nxt
        while True:
            a, b = nxt, nxt + size
            clash = [e for s, e in used if s < b and a < e]
            if not clash:
                nxt = b + 16 * 4096
                return a
            nxt = max(clash) + 16 * 4096

    need: dict[tuple[int, int, int], bool] = {}   # (parent pid, start, end) -> a child shares
    for t in tasks:
        for m in t.mappings:
            if m.cow_parent:
                need[(t.ppid, m.start, m.end)] = True
    where: dict[tuple[int, int, int], int] = {}   # (pid, start, end) -> premap address

    def depth(t):
        d = 0
        while t.ppid in by_pid and d < len(tasks):
            t, d = by_pid[t.ppid], d + 1
        return d

    for t in sorted(tasks, key=depth):
        pre = []
        for i, m in enumerate(t.mappings):
            key = (m.start, m.end)
            inherited = where.get((t.ppid, *key)) if m.cow_parent else None
            if m.cow_parent and inherited is None:
                raise RestoreError("memory", f"pid {t.pid} shares pages at {key[0]:#x} "
                                   f"with its parent {t.ppid}, which does not map them")
            if inherited is not None:
                where[(t.pid, *key)] = inherited
                pre.append({"mapping": i, "addr": inherited, "create": False})
            elif need.get((t.pid, *key)):
                a = alloc(key[1] - key[0])
                where[(t.pid, *key)] = a
                pre.append({"mapping": i, "addr": a, "create": True})
        if pre:
            t._premap = pre
        else:
            vars(t).pop("_premap", None)


def premaps(task) -> list[dict]:
    """The premapped regions plan_premaps gave the task ([] for none)."""
    return getattr(task, "_premap", None) or []


def own_jobs(sf, m: R.Mapping) -> list:
    """[(segment, lo, hi)]: the bytes of mapping m the task itself writes
    (a file or memfd mapping: its copied-on-write pages; else every stored byte)."""
    if m.shmem is not None or m.kind == "shmem-private" or (
            m.kind in ("file-private", "file-shared") and not m.deleted):
        jobs = []
        for rel, ln in m.cow_runs:
            a, b = m.start + rel, m.start + rel + ln
            for p in m.segments:
                seg = sf.segment(p)
                lo, hi = max(a, seg.vaddr), min(b, seg.vaddr + seg.filesz)
                if lo < hi:
                    jobs.append((seg, lo - seg.vaddr, hi - seg.vaddr))
        return jobs
    return [(sf.segment(p), 0, sf.segment(p).filesz) for p in m.segments
            if sf.segment(p).filesz]


def premap_in_python(sf, task: R.TaskNote) -> None:
    """Run by the task's own Python (restore_tree.task_main) before it forks
    its children: build its premapped regions (see above)."""
    import ctypes
    pre = premaps(task)
    if not pre:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rd = SegmentReader(sf)
    try:
        for p in pre:
            m = task.mappings[p["mapping"]]
            start, size, addr = m.start, m.end - m.start, p["addr"]
            vmf = m.vmflags
            if p["create"]:
                flags = MAP_PRIVATE | MAP_FIXED_NOREPLACE | (MAP_GROWSDOWN if "gd" in vmf else 0) \
                    | (MAP_NORESERVE if "nr" in vmf else 0)
                fd = -1
                if m.kind == "file-private":
                    fd = os.open(file_path(m), os.O_RDONLY | os.O_CLOEXEC)
                    st = os.fstat(fd)
                    if m.inode and st.st_ino != m.inode:
                        os.close(fd)
                        raise RestoreError("memory", f"{file_path(m)} changed since the "
                                           "checkpoint (different inode)")
                else:
                    flags |= MAP_ANONYMOUS
                try:
                    res = libc.mmap(addr, size, PROT_READ | PROT_WRITE, flags, fd,
                                    m.offset if fd >= 0 else 0)
                finally:
                    if fd >= 0:
                        os.close(fd)
                if res != addr:
                    raise RestoreError("memory", f"cannot premap {size} bytes at {addr:#x} "
                                       f"({os.strerror(ctypes.get_errno())})")
            else:
                # inherited from the parent: drop what this task did not share
                shared = [(start + o, start + o + n) for o, n in m.cow_parent]
                pos = start
                for a, b in shared + [(m.end, m.end)]:
                    if a > pos:
                        libc.madvise(addr + pos - start, a - pos, MADV_DONTNEED)
                    pos = max(pos, b)
            for seg, lo, hi in own_jobs(sf, m):
                for off, view in rd.pieces(seg, lo, hi):
                    dst = addr + seg.vaddr + off - start
                    ctypes.memmove(dst, bytes(view), len(view))
    except DamagedError as e:
        raise RestoreError("verify", f"{e}: not restarted") from None
    finally:
        rd.close()
