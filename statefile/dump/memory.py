"""Memory: the mapping table of a task and the segments that hold its content.

Which pages are stored:
* anonymous private memory (heap, stacks, anon mmaps): pages present or
  swapped, but not the shared zero page; pages never touched are file holes;
* private file mappings: only the pages the task copied-on-write (not the
  file's own pages, which the restorer maps from the file again), plus the
  ELF header page of each mapped ELF file as the kernel's core dump does
  (elfutils identifies modules by it; `cow_runs` says what really changed);
* shared anonymous memory (MAP_SHARED anon, SysV shm): its pages, read
  from the shmem object through /proc/PID/map_files when we may (root), else
  the pages present in this task;
* memfds and files mapped MAP_SHARED after they were deleted: nothing per
  mapping (the object's content is saved once: statefile/dump/memfd.py); a MAP_PRIVATE
  mapping of a memfd keeps its copied-on-write pages, like a file mapping;
* the [vdso] image (gdb unwinds through it); never [vvar]/[vvar_vclock];
* never guard pages (MADV_GUARD_INSTALL: listed in the mapping's `guards`),
  MAP_DROPPABLE memory, or a child's pages still shared copy-on-write with
  its parent (`cow_parent`: stored once, in the parent; mark_cow);
* a MAP_PRIVATE mapping of a shared anonymous object (`shmem-private`): the
  object's bytes it sees and its own pages (`cow_runs`), read while frozen.

Page selection uses the PAGEMAP_SCAN ioctl (Linux 6.7+: ranges, not one entry
per page), falling back to reading /proc/PID/pagemap.  Restored by
restorer/restore/memory.py.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field

from statefile.dump import aio as dump_aio
from statefile.control import procfs
from statefile.dump.aio import AIO_PATH

PAGE = os.sysconf("SC_PAGE_SIZE")
TASK_SIZE = 0x7FFFFFFFF000    # x86-64 user space ([vsyscall] lies above it)

PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_GUARD = 1 << 8        # a MADV_GUARD_INSTALL marker (Linux 6.14+)
PM_GUARD_REGION = 1 << 58     # the same in a /proc/PID/pagemap entry


class pm_scan_arg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class page_region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


assert ctypes.sizeof(pm_scan_arg) == 96
PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(pm_scan_arg) << 16) | (ord("f") << 8) | 16

# How many copied-on-write runs a file mapping may have before we store it whole.
MAX_COW_SEGMENTS = 64


def mapping_kind(m: dict) -> str:
    path, shared = m["path"], m["perms"][3] == "s"
    if path == "[heap]":
        return "heap"
    if path == "[stack]":
        return "stack"
    if path == "[vdso]":
        return "vdso"
    if path in ("[vvar]", "[vvar_vclock]"):
        return "vvar"
    if path == "[vsyscall]":
        return "vsyscall"
    if path.startswith("/SYSV") and path.endswith(" (deleted)"):
        return "sysv-shm"
    if path.startswith("/memfd:"):
        return "memfd"
    if path == AIO_PATH:
        return "aio"
    if path.startswith("/dev/zero") and shared or path.startswith("[anon_shmem:"):
        return "anon-shared" if shared else "shmem-private"
    if path == "/dev/zero (deleted)":
        # MAP_PRIVATE of a shared anonymous object (through its map_files
        # entry): the object's pages until the task writes one
        return "shmem-private"
    if not path or path.startswith("[anon:"):
        return "anon-shared" if shared else "anon-private"
    if path.startswith("["):
        return "special"
    return "file-shared" if shared else "file-private"


@dataclass
class SegmentPlan:
    """One program header: where its content comes from and which runs are stored."""
    pid: int
    vaddr: int
    memsz: int
    flags: str            # rwxp
    store: bool           # False: p_filesz = 0 (content lives in a file, or none)
    runs: list[tuple[int, int]] = field(default_factory=list)  # (offset in segment, length)
    src: str = "mem"      # "mem": /proc/PID/mem at vaddr; "file": src_path at src_offset
    src_path: str = ""
    src_offset: int = 0
    mapping: int = -1     # index in the task's mapping table
    blob: str = ""        # for PT_CRELF_BLOB segments: what it is
    frozen_only: bool = False  # must be read while the tree is frozen (no snapshot copy)


class PageScanner:
    def __init__(self, pid: int):
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        self.have_scan = True
        self.guard_bit = PAGE_IS_GUARD   # 0 once the kernel refuses the category
        self.vec = (page_region * 1024)()

    def close(self):
        os.close(self.fd)

    def runs(self, start: int, end: int, want_anon_only: bool) -> list[tuple[int, int]]:
        """Absolute [start, end) runs of stored-worthy pages."""
        if self.have_scan:
            try:
                return self._scan(start, end, want_anon_only)
            except OSError as e:
                if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.have_scan = False
        return self._pagemap(start, end, want_anon_only)

    def guards(self, start: int, end: int) -> list[tuple[int, int]]:
        """Absolute [start, end) runs of guard pages (MADV_GUARD_INSTALL): no
        memory behind them, a fault on access.  Their PTE markers look like
        swap entries, so runs() must leave them out and the restorer must
        install them again."""
        if self.have_scan and self.guard_bit:
            try:
                return self._scan(start, end, False, guards=True)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.guard_bit = 0   # a kernel without the category: no guard pages
                return []
        if self.have_scan:
            return []
        out: list[tuple[int, int]] = []
        for a, e in self._entries(start, end):
            if e & PM_GUARD_REGION:
                if out and out[-1][1] == a:
                    out[-1] = (out[-1][0], a + PAGE)
                else:
                    out.append((a, a + PAGE))
        return out

    def _scan(self, start, end, anon_only, guards=False):
        out: list[tuple[int, int]] = []
        if guards:
            inverted, mask, anyof = 0, PAGE_IS_GUARD, 0
            ret = PAGE_IS_GUARD
        else:
            inverted = PAGE_IS_PFNZERO | (PAGE_IS_FILE if anon_only else 0) | self.guard_bit
            mask, anyof = inverted, PAGE_IS_PRESENT | PAGE_IS_SWAPPED
            ret = anyof
        while start < end:
            a = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg), start=start, end=end,
                            vec=ctypes.addressof(self.vec), vec_len=len(self.vec),
                            category_inverted=inverted, category_mask=mask,
                            category_anyof_mask=anyof, return_mask=ret)
            try:
                n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, a)
            except OSError as e:
                if e.errno != errno.EINVAL or guards or not self.guard_bit:
                    raise
                self.guard_bit = 0    # PAGE_IS_GUARD unknown here: retry without it
                return self._scan(start, end, anon_only)
            for i in range(n):
                r = self.vec[i]
                if out and out[-1][1] == r.start:
                    out[-1] = (out[-1][0], r.end)
                else:
                    out.append((r.start, r.end))
            if a.walk_end <= start:
                break
            start = a.walk_end
        return out

    def _entries(self, start, end):
        """(address, pagemap entry) of every page in [start, end)."""
        chunk = 1 << 16  # pages per read
        for base in range(start, end, chunk * PAGE):
            npages = min(chunk, (end - base) // PAGE)
            data = os.pread(self.fd, npages * 8, (base // PAGE) * 8)
            for i, (e,) in enumerate(struct.iter_unpack("<Q", data)):
                yield base + i * PAGE, e

    def _pagemap(self, start, end, anon_only):
        out: list[tuple[int, int]] = []
        for a, e in self._entries(start, end):
            present = e >> 63 & 1
            swapped = e >> 62 & 1
            filepage = e >> 61 & 1
            if e & PM_GUARD_REGION or not (present or swapped) or (
                    anon_only and filepage and not swapped):
                continue
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], a + PAGE)
            else:
                out.append((a, a + PAGE))
        return out


def _shmem_runs(pid: int, m: dict) -> tuple[str, list[tuple[int, int]]] | None:
    """Data runs of a shmem-backed mapping from its map_files entry (root
    only); notes the object's size in m["object_size"]."""
    path = f"/proc/{pid}/map_files/{m['start']:x}-{m['end']:x}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = m["end"] - m["start"]
        m["object_size"] = os.fstat(fd).st_size
        lo, hi = m["offset"], min(m["offset"] + size, m["object_size"])
        runs, pos = [], lo
        while pos < hi:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            if d >= hi:
                break
            h = min(os.lseek(fd, d, os.SEEK_HOLE), hi)
            runs.append((d - lo, h - d))
            pos = h
        return path, runs
    finally:
        os.close(fd)


def _is_elf(pid: int, addr: int) -> bool:
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _within(runs: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of sorted absolute runs inside [start, end)."""
    i = bisect.bisect_right(runs, (start, start))
    if i and runs[i - 1][1] > start:
        i -= 1
    out = []
    while i < len(runs) and runs[i][0] < end:
        a, b = max(runs[i][0], start), min(runs[i][1], end)
        if a < b:
            out.append((a, b))
        i += 1
    return out


def _minus(runs: list[tuple[int, int]], base: int,
           holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) runs relative to base, less the absolute [a, b) holes."""
    out = []
    for o, n in runs:
        lo, hi = base + o, base + o + n
        for a, b in holes:
            if b <= lo or a >= hi:
                continue
            if a > lo:
                out.append((lo - base, a - lo))
            lo = max(lo, b)
        if lo < hi:
            out.append((lo - base, hi - lo))
    return out


def _file_ident(pid: int, m: dict, cache: dict) -> tuple[int, int] | None:
    """Size and mtime of the file a mapping maps (so a restart can tell a
    library rewritten in place, same inode, from the one that was mapped).
    Read through /proc/PID/map_files (the very file mapped), else the path."""
    key = (m["dev"], m["inode"])
    if key not in cache:
        cache[key] = None
        for path in (f"/proc/{pid}/map_files/{m['start']:x}-{m['end']:x}", m["path"]):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino == m["inode"]:
                cache[key] = (st.st_size, st.st_mtime_ns)
                break
    return cache[key]


def dump_mappings(pid: int) -> tuple[list[dict], list[SegmentPlan]]:
    """The mapping table of a task and the segment plans for its memory."""
    maps = procfs.smaps(pid)
    scanner = PageScanner(pid)
    plans: list[SegmentPlan] = []
    idents: dict[tuple, tuple[int, int] | None] = {}
    try:
        # one scan for the whole address space (one per mapping costs ~25 µs each)
        user = [m for m in maps if m["end"] <= TASK_SIZE]
        all_guards = scanner.guards(user[0]["start"], user[-1]["end"]) if user else []
        for idx, m in enumerate(maps):
            kind = mapping_kind(m)
            m["kind"] = kind
            m["deleted"] = m["path"].endswith(" (deleted)")
            m["segments"] = []
            if kind in ("file-private", "file-shared") and not m["deleted"]:
                ident = _file_ident(pid, m, idents)
                if ident:
                    m["file_size"], m["file_mtime_ns"] = ident
            size = m["end"] - m["start"]
            guards = [] if kind in ("vvar", "vdso", "vsyscall", "special", "aio") else \
                _within(all_guards, m["start"], m["end"])
            if guards:
                # MADV_GUARD_INSTALL ranges: nothing to read, installed again
                # by the restorer (restorer/restore/memory.py)
                m["guards"] = [[a - m["start"], b - a] for a, b in guards]

            # A fork()ed snapshot lacks MADV_DONTFORK memory, sees MADV_WIPEONFORK
            # memory as zeros and shares shared memory: read those while frozen.
            frozen_only = m["perms"][3] == "s" or "dc" in m["vmflags"] or "wf" in m["vmflags"]

            def plan(vaddr, memsz, store, runs, **kw):
                if guards and store and kw.get("src", "mem") == "mem":
                    runs = _minus(runs, vaddr, guards)
                p = SegmentPlan(pid, vaddr, memsz, m["perms"], store, runs, mapping=idx,
                                frozen_only=frozen_only, **kw)
                m["segments"].append(len(plans))
                plans.append(p)

            if kind in ("vvar", "vsyscall", "special") or "io" in m["vmflags"] \
                    or "pf" in m["vmflags"]:
                plan(m["start"], size, False, [])
            elif kind == "vdso":
                plan(m["start"], size, True, [(0, size)])
            elif kind == "aio":
                # an AIO context's ring: rebuilt, not copied (statefile/dump/aio.py)
                m["aio"] = dump_aio.parse(pid, m)
                plan(m["start"], size, False, [])
            elif "dp" in m["vmflags"]:
                # MAP_DROPPABLE: the kernel may drop its pages whenever it
                # likes (they read as zeros then); nothing is kept, like CRIU
                plan(m["start"], size, False, [])
            elif kind == "memfd" and m["perms"][3] == "s" or (
                    kind == "file-shared" and m["deleted"]):
                # one object for every fd and mapping: its content is saved
                # once, in a blob (statefile/dump/memfd.py), not per mapping
                plan(m["start"], size, False, [])
            elif kind in ("anon-shared", "sysv-shm"):
                shm = _shmem_runs(pid, m)
                if shm is not None:
                    plan(m["start"], size, True, shm[1], src="file", src_path=shm[0],
                         src_offset=m["offset"])
                else:
                    runs = scanner.runs(m["start"], m["end"], False)
                    plan(m["start"], size, True, [(a - m["start"], b - a) for a, b in runs])
            elif kind == "shmem-private":
                # Its copied-on-write pages (cow_runs) and the object's bytes
                # it sees (the restorer puts those in the object again: it
                # may be mapped by nobody else); read while frozen.
                frozen_only = True
                cow = scanner.runs(m["start"], m["end"], True)
                m["cow_runs"] = [[a - m["start"], b - a] for a, b in cow]
                seen = [(a - m["start"], b - a) for a, b in
                        scanner.runs(m["start"], m["end"], False)]
                shm = _shmem_runs(pid, m)
                if shm is not None:
                    seen += shm[1]
                    end = m["object_size"] - m["offset"]   # beyond: SIGBUS, not memory
                    seen = [(o, min(n, end - o)) for o, n in seen if o < end]
                runs = _merge(sorted((o, o + n) for o, n in seen))
                plan(m["start"], size, True, [(a, b - a) for a, b in runs])
            elif kind == "file-shared":
                plan(m["start"], size, False, [])
            elif kind in ("file-private", "memfd"):   # (a memfd here is MAP_PRIVATE)
                cow = scanner.runs(m["start"], m["end"], True)
                m["cow_runs"] = [[a - m["start"], b - a] for a, b in cow]
                if m["offset"] == 0 and _is_elf(pid, m["start"]) and \
                        not (cow and cow[0][0] == m["start"]):
                    # Like the kernel's core dump (coredump_filter bit 4): keep
                    # the ELF header page, elfutils finds modules by it.
                    cow.insert(0, (m["start"], m["start"] + PAGE))
                    cow = _merge(cow)
                if m["deleted"] and kind == "file-private":
                    # The file is gone: keep every page of the mapping.
                    plan(m["start"], size, True, [(0, size)])
                elif len(cow) > MAX_COW_SEGMENTS:
                    plan(m["start"], size, True, [(0, size)])
                else:
                    pos = m["start"]
                    for a, b in cow:
                        if a > pos:
                            plan(pos, a - pos, False, [])
                        plan(a, b - a, True, [(0, b - a)])
                        pos = b
                    if pos < m["end"]:
                        plan(pos, m["end"] - pos, False, [])
            else:  # anon-private, heap, stack
                runs = scanner.runs(m["start"], m["end"], False)
                plan(m["start"], size, True, [(a - m["start"], b - a) for a, b in runs])
    finally:
        scanner.close()
    return maps, plans


# --- pages shared copy-on-write with the parent -------------------------------------
COW_KINDS = ("anon-private", "heap", "stack", "file-private")
PM_PRESENT, PM_FILE, PFN_MASK = 1 << 63, 1 << 61, (1 << 55) - 1


def _pfns(fd: int, start: int, end: int) -> list[int]:
    """PFN of each page of [start, end) that is present and anonymous, else 0
    (PFNs read as 0 without CAP_SYS_ADMIN: nothing is found shared then)."""
    out = []
    data = os.pread(fd, (end - start) // PAGE * 8, start // PAGE * 8)
    for (e,) in struct.iter_unpack("<Q", data):
        out.append(e & PFN_MASK if e & PM_PRESENT and not e & PM_FILE else 0)
    return out


def mark_cow(tasks: list[dict], plans_by_task: list[list[SegmentPlan]]) -> None:
    """Find the private pages a task still shares with its parent since a
    fork (the same physical page at the same address in a mapping of the same
    range and kind) and leave them out of the task's stored content: the
    mapping gets ``cow_parent`` (runs, relative to its start) and the
    restorer makes them shared again (restorer/restore/memory.py, premapped regions).
    Call while the tree is frozen."""
    by_pid = {t["pid"]: (t, plans) for t, plans in zip(tasks, plans_by_task)}
    fds: dict[int, int] = {}

    def fd_of(pid):
        if pid not in fds:
            fds[pid] = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        return fds[pid]

    try:
        for t, plans in zip(tasks, plans_by_task):
            parent = by_pid.get(t["ppid"])
            if parent is None:
                continue
            pmaps = {(m["start"], m["end"]): m for m in parent[0]["mappings"]}
            for m in t["mappings"]:
                pm = pmaps.get((m["start"], m["end"]))
                if (m["kind"] not in COW_KINDS or pm is None or pm["kind"] != m["kind"]
                        or pm["perms"] != m["perms"] or pm.get("offset") != m.get("offset")
                        or pm.get("inode") != m.get("inode") or m.get("deleted")
                        or ("gd" in m["vmflags"]) != ("gd" in pm["vmflags"])
                        or "dp" in m["vmflags"] or "dc" in m["vmflags"]
                        or "wf" in m["vmflags"]):
                    continue
                try:
                    mine = _pfns(fd_of(t["pid"]), m["start"], m["end"])
                    theirs = _pfns(fd_of(t["ppid"]), m["start"], m["end"])
                except OSError:
                    continue
                # only pages the parent stores (not its zero page: not stored)
                # or has from its own parent (tasks come parents first)
                pstored = [False] * len(theirs)
                for o, n in pm.get("cow_parent", []):
                    for k in range(o // PAGE, (o + n) // PAGE):
                        pstored[k] = True
                for j in pm["segments"]:
                    p = parent[1][j]
                    if not p.store:
                        continue
                    for o, n in p.runs:
                        a = (p.vaddr - m["start"] + o) // PAGE
                        for k in range(a, a + n // PAGE):
                            pstored[k] = True
                runs: list[tuple[int, int]] = []
                for i, (a, b) in enumerate(zip(mine, theirs)):
                    if a and a == b and pstored[i]:
                        if runs and runs[-1][1] == i * PAGE:
                            runs[-1] = (runs[-1][0], (i + 1) * PAGE)
                        else:
                            runs.append((i * PAGE, (i + 1) * PAGE))
                if not runs:
                    continue
                m["cow_parent"] = [[a, b - a] for a, b in runs]
                holes = [(m["start"] + a, m["start"] + b) for a, b in runs]
                for j in m["segments"]:
                    p = plans[j]
                    if p.store:
                        p.runs = _minus(p.runs, p.vaddr, holes)
                if "cow_runs" in m:
                    m["cow_runs"] = [[o, n] for o, n in
                                     _minus([tuple(r) for r in m["cow_runs"]], m["start"], holes)]
    finally:
        for fd in fds.values():
            os.close(fd)
