"""Lazy restore: anonymous memory arrives on first touch through userfaultfd.

The userfaultfd is created inside the task (injected syscall, so it belongs
to the task's mm), pulled out with pidfd_getfd, and the anonymous mappings
with saved content are registered for missing-page faults.  A server (a thread
of crrestart, or a small daemon process with --detach) answers faults with
UFFDIO_COPY from an mmap of the statefile, a chunk of pages at a time, and
meanwhile copies everything else in the background; when no page is left it
closes the userfaultfd (the kernel then unregisters every range) and ends.
Memory stays anonymous: MADV_DONTNEED, munmap and mremap done by the program
are followed through userfaultfd events so a discarded page is never refilled
with old content, and fork() is followed too (the child gets its own
userfaultfd from the kernel).
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmap
import os
import select
import signal
import struct
import threading
import time

from statefile.control import procfs
from statefile.format import records as R
from statefile.format.integrity import DamagedError, SegmentReader, nchunks

from .errors import RestoreError
from restorer.release.guard import clone_files, gone, poll_fds
from restorer.release.guard import current as current_guard
from .kernel import PAGE, errno_of, pidfd_getfd, pidfd_open

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]

UFFD_API = 0xAA
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT, UFFD_EVENT_FORK, UFFD_EVENT_REMAP = 0x12, 0x13, 0x14
UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP = 0x15, 0x16
O_CLOEXEC, O_NONBLOCK = 0o2000000, 0o4000


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFD_API << 8) | nr


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64),
                ("zeropage", ctypes.c_int64)]


assert ctypes.sizeof(uffdio_api) == 24 and ctypes.sizeof(uffdio_register) == 32
assert ctypes.sizeof(uffdio_copy) == 40 and ctypes.sizeof(uffdio_zeropage) == 32
UFFDIO_API_IOC = _ioc(3, 0x3F, 24)
UFFDIO_REGISTER = _ioc(3, 0x00, 32)
UFFDIO_WAKE = _ioc(2, 0x02, 16)
UFFDIO_COPY = _ioc(3, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(3, 0x04, 32)

FAULT_PAGES = 64        # pages served per fault (256 KiB)
PREFETCH_PAGES = 1024   # pages copied per background step (4 MiB)


def _ioctl(fd: int, req: int, arg) -> int:
    ctypes.set_errno(0)
    r = _libc.ioctl(fd, ctypes.c_ulong(req), ctypes.byref(arg))
    return 0 if r == 0 else -ctypes.get_errno()


class ServeError(Exception):
    """The server cannot bring a page in (one line for the user)."""


def _copy_failure(addr: int, err: int) -> str:
    why = os.strerror(err)
    if err == errno.EFAULT:
        why += " (the statefile can no longer be read there: truncated or rewritten since " \
               "the restart began?)"
    return f"cannot bring in the page at {addr:#x}: {why}"


class ChunkGuard:
    """The checksum chunks of one segment: a chunk is read and verified whole
    (statefile/format/integrity.py SegmentReader.chunk) before any page of it is
    installed, once (the statefile must not change while it is served)."""

    def __init__(self, sf, seg: R.Segment):
        self.sf, self.seg = sf, seg
        self.ok = bytearray(nchunks(seg.filesz, sf.chunk_size))

    def ensure(self, reader: SegmentReader, lo: int, hi: int) -> None:
        """Verify every chunk that holds stored bytes in segment offsets [lo, hi)."""
        for k in reader.chunk_numbers(self.seg, lo, hi):
            if self.ok[k]:
                continue
            try:
                reader.chunk(self.seg, k)
            except DamagedError as e:
                if e.truncated_at is not None:
                    raise ServeError(_copy_failure(self.seg.vaddr + e.truncated_at,
                                                   errno.EFAULT)) from None
                raise ServeError(str(e)) from None
            self.ok[k] = 1


class Region:
    """A registered range; `pending` has one byte per page (1: saved content
    not yet copied in); the source of page i is file offset src + i*PAGE,
    verified by `guard` (None: nothing to verify) before it is installed."""

    def __init__(self, start: int, end: int, src: int, pending: bytearray | None = None,
                 guard: ChunkGuard | None = None):
        self.start, self.end, self.src = start, end, src
        self.guard = guard
        self.pending = pending if pending is not None else bytearray((end - start) // PAGE)
        self.left = self.pending.count(1)

    def clear(self, a: int, b: int) -> None:
        a, b = max(a, self.start), min(b, self.end)
        if a >= b:
            return
        i, j = (a - self.start) // PAGE, (b - self.start + PAGE - 1) // PAGE
        self.left -= self.pending.count(1, i, j)
        self.pending[i:j] = bytes(j - i)


class Ctx:
    """One userfaultfd (the task's, or a forked child's) and its regions."""

    def __init__(self, uffd: int, regions: list[Region]):
        self.uffd = uffd
        self.regions = regions
        self.cursor = 0   # region index for background copy

    @property
    def left(self) -> int:
        return sum(r.left for r in self.regions)

    def region(self, addr: int) -> Region | None:
        for r in self.regions:
            if r.start <= addr < r.end:
                return r
        return None


class LazyServer:
    def __init__(self, statefile: str, ctx: Ctx, pid: int = 0):
        # the served process (tracer-view pid): killed with its descendants
        # when its memory cannot be served; a pidfd, so a reused pid is never hit
        self.pid = pid
        self.pidfd = pidfd_open(pid) if pid else -1
        self.killed = False
        fd = os.open(statefile, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.fstat(fd).st_size
            base = _libc.mmap(None, self.size, _mmap.PROT_READ, _mmap.MAP_PRIVATE, fd, 0)
        except BaseException:
            os.close(fd)
            raise
        if base in (None, ctypes.c_void_p(-1).value):
            os.close(fd)
            raise RestoreError("lazy", "cannot map the statefile")
        self.sfd = fd       # chunks are verified from it (ChunkGuard)
        self.reader: SegmentReader | None = None
        self.base = base
        self.ctxs = [ctx]
        self.stop_flag = False
        self.thread: threading.Thread | None = None
        self.faults = 0
        self.copied = 0
        self.error: str | None = None
        self.finished = threading.Event()
        self.t_start = time.perf_counter()
        self.t_done = 0.0

    # --- serving -----------------------------------------------------------------
    def _copy(self, ctx: Ctx, r: Region, i: int, n: int) -> None:
        """UFFDIO_COPY pages [i, i+n) of region r (all pending).  A page is
        marked done only when it is in (or can no longer be: the range or the
        process is gone); one the kernel refuses to fill from the statefile
        (EFAULT: the file was truncated under us) is an error, never left to be
        served as a zero page later."""
        dst = r.start + i * PAGE
        if r.guard is not None:
            if self.reader is None:        # one chunk buffer for every guard
                self.reader = SegmentReader(r.guard.sf, self.sfd)
            rel = r.src - r.guard.seg.offset + i * PAGE
            r.guard.ensure(self.reader, rel, rel + n * PAGE)
        c = uffdio_copy(dst, self.base + r.src + i * PAGE, n * PAGE, 0, 0)
        res = _ioctl(ctx.uffd, UFFDIO_COPY, c)
        if res == 0:
            r.pending[i:i + n] = bytes(n)
            r.left -= n
            self.copied += n * PAGE
            return
        # some page got there first, the range changed, or a page failed: go
        # page by page from the first one not copied
        first = i + (c.copy // PAGE if c.copy > 0 else 0)
        self.copied += (first - i) * PAGE
        for k in range(i, i + n):
            if not r.pending[k]:
                continue
            if k >= first:
                c = uffdio_copy(r.start + k * PAGE, self.base + r.src + k * PAGE, PAGE, 0, 0)
                rk = _ioctl(ctx.uffd, UFFDIO_COPY, c)
                if rk == -errno.EAGAIN:
                    continue      # the mm is changing (an event to read first): stays pending
                if rk not in (0, -errno.EEXIST, -errno.ENOENT, -errno.ESRCH):
                    raise ServeError(_copy_failure(r.start + k * PAGE, -rk))
                if rk == 0:
                    self.copied += PAGE
            r.pending[k] = 0
            r.left -= 1
        self._wake(ctx, dst, n * PAGE)

    def _wake(self, ctx: Ctx, addr: int, ln: int) -> None:
        _ioctl(ctx.uffd, UFFDIO_WAKE, uffdio_range(addr, ln))

    def _serve_run(self, ctx: Ctx, r: Region, first: int, limit: int) -> int:
        """Copy pending pages in [first, limit) as contiguous runs; returns pages copied."""
        total = 0
        i = r.pending.find(1, first, limit)
        while i >= 0:
            j = r.pending.find(0, i, limit)
            j = limit if j < 0 else j
            self._copy(ctx, r, i, j - i)
            total += j - i
            i = r.pending.find(1, j, limit)
        return total

    def fault(self, ctx: Ctx, addr: int) -> None:
        self.faults += 1
        page = addr & ~(PAGE - 1)
        r = ctx.region(page)
        if r is not None:
            i = (page - r.start) // PAGE
            if r.pending[i]:
                lo = i - i % FAULT_PAGES
                hi = min(lo + FAULT_PAGES, len(r.pending))
                # the faulting page first, then the rest of its chunk
                self._serve_run(ctx, r, i, hi)
                self._serve_run(ctx, r, lo, i)
                return
        # never-touched (or discarded) memory: a zero page
        z = uffdio_zeropage(uffdio_range(page, PAGE), 0, 0)
        res = _ioctl(ctx.uffd, UFFDIO_ZEROPAGE, z)
        if res == -errno.EEXIST:
            self._wake(ctx, page, PAGE)

    def _event(self, ctx: Ctx, msg: bytes) -> None:
        ev = msg[0]
        if ev == UFFD_EVENT_PAGEFAULT:
            _flags, addr = struct.unpack_from("<QQ", msg, 8)
            self.fault(ctx, addr)
        elif ev in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):
            a, b = struct.unpack_from("<QQ", msg, 8)
            for r in ctx.regions:
                r.clear(a, b)
        elif ev == UFFD_EVENT_REMAP:
            frm, to, ln = struct.unpack_from("<QQQ", msg, 8)
            moved = []
            for r in ctx.regions:
                a, b = max(frm, r.start), min(frm + ln, r.end)
                if a < b:
                    i, j = (a - r.start) // PAGE, (b - r.start) // PAGE
                    nr = Region(to + (a - frm), to + (b - frm), r.src + i * PAGE,
                                bytearray(r.pending[i:j]), r.guard)
                    r.clear(a, b)
                    moved.append(nr)
            ctx.regions.extend(moved)
        elif ev == UFFD_EVENT_FORK:
            (ufd,) = struct.unpack_from("<I", msg, 8)
            os.set_blocking(ufd, False)
            child = Ctx(ufd, [Region(r.start, r.end, r.src, bytearray(r.pending), r.guard)
                              for r in ctx.regions])
            self.ctxs.append(child)

    def _prefetch(self, ctx: Ctx) -> bool:
        """Copy the next chunk of pending pages; False when nothing is left."""
        while ctx.cursor < len(ctx.regions):
            r = ctx.regions[ctx.cursor]
            i = r.pending.find(1)
            if i < 0:
                ctx.cursor += 1
                continue
            self._serve_run(ctx, r, i, min(i + PREFETCH_PAGES, len(r.pending)))
            return True
        return False

    def step(self, timeout: float) -> bool:
        """Handle events (waiting up to timeout when idle); False when done."""
        busy = False
        for ctx in list(self.ctxs):
            while True:
                try:
                    data = os.read(ctx.uffd, 32 * 64)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        break
                    raise
                if not data:
                    break
                for k in range(0, len(data), 32):
                    self._event(ctx, data[k:k + 32])
                busy = True
        if busy:
            return True
        g = current_guard()
        if g is not None and gone(g.pidfd):
            # nothing would keep the userfaultfds if we died now (restorer/release/guard.py)
            raise ServeError(f"the guard of the lazy memory (pid {g.pid}) died")
        for ctx in list(self.ctxs):
            if ctx.left and self._prefetch(ctx):
                return True
        # everything copied: closing the uffd unregisters every range (kernel);
        # the guard lets go first (it would kill the tree if we died in between)
        if g is not None and all(c.left == 0 for c in self.ctxs):
            g.done(self.pid)
        for ctx in self.ctxs:
            if ctx.left == 0:
                os.close(ctx.uffd)
        self.ctxs = [c for c in self.ctxs if c.left]
        if not self.ctxs:
            return False
        select.select([c.uffd for c in self.ctxs], [], [], timeout)
        return True

    def loop(self) -> None:
        try:
            while not self.stop_flag and self.step(0.1):
                pass
        except Exception as e:  # noqa: BLE001
            self.error = str(e) if isinstance(e, ServeError) else f"{type(e).__name__}: {e}"
            # a process whose memory cannot be served must not run on (on zero
            # pages once the userfaultfd is closed) nor hang: kill it first
            self.kill_tree()
        finally:
            if not self.ctxs:
                self.t_done = time.perf_counter() - self.t_start
                self.finished.set()

    def kill_tree(self) -> None:
        """SIGKILL the served process and every descendant and wait until they
        are gone (kill_tree), before the userfaultfds can go; then the
        guard has nothing left to keep."""
        if self.pidfd < 0:
            return
        self.killed = kill_tree(self.pidfd, self.pid)
        g = current_guard()
        if g is not None:
            g.done(self.pid)

    def as_error(self) -> RestoreError:
        """The serving failure as the restore failure it is (step "lazy memory")."""
        fate = ("the process was killed: its memory could not be served" if self.killed
                else "the process could not be killed")
        return RestoreError("lazy memory", f"pid {self.pid}: {self.error}; {fate}")

    def error_line(self) -> str:
        """The one line that reports a serving failure, as crrestart reports any."""
        return f"crrestart: failed at {self.as_error()}"

    # --- life cycle --------------------------------------------------------------
    def start_thread(self) -> None:
        self.thread = threading.Thread(target=self.loop, name="crelf-lazy", daemon=True)
        self.thread.start()

    def pause_thread(self) -> None:
        self.stop_flag = True
        if self.thread:
            self.thread.join()
        self.stop_flag = False

    def daemonize_wait(self) -> None:
        """--detach: hand the serving to a daemon process that lives while pages
        remain (the caller then exits)."""
        self.pause_thread()
        if not self.ctxs or self.error is not None:
            return      # all in, or failed already (the caller reports it)
        def daemon() -> None:
            # the daemon keeps crrestart's stderr: that is where a serving
            # failure is reported (the process is killed then, see loop)
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1):
                os.dup2(devnull, fd)
            os.close(devnull)
            self.loop()
            if self.error is not None:
                os.write(2, (self.error_line() + "\n").encode())
                raise SystemExit(1)
        # The daemon shares crrestart's file table (as the guard does): the
        # userfaultfds are never closed in between, and crrestart must not
        # close them (it would close them for the daemon too); the guard
        # watches the daemon instead of crrestart from here on.
        g = current_guard()
        try:
            pid, pidfd = clone_files("crelf-lazy", daemon)
        except OSError as e:
            self.error = f"cannot start the lazy memory daemon ({e.strerror})"
            self.kill_tree()
            return
        if g is not None:
            g.watch(pidfd, pid)
            g.unwatch_me()
        self.ctxs = []
        self.pidfd = -1

    def wind_down(self) -> None:
        """Foreground, the process exited: stop serving once no descendant it
        forked still waits for pages (those would get zero pages once we go),
        then let the guard go."""
        if self.thread:
            while self.thread.is_alive() and any(c.left for c in self.ctxs[1:]):
                self.thread.join(timeout=0.1)
        self.stop()
        g = current_guard()
        if g is not None and not (self.thread and self.thread.is_alive()):
            g.done(self.pid)

    def stop(self) -> None:
        """Foreground end (the process exited): stop serving."""
        self.stop_flag = True
        if self.thread:
            self.thread.join(timeout=5)
            if self.thread.is_alive():
                return        # still serving: it may yet need the pidfd
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def kill_tree(pidfd: int, pid: int, wait: float = 10.0) -> bool:
    """SIGKILL the process behind pidfd and every descendant (all stopped
    first, so none forks behind our back), then wait until each is gone, so
    nothing of it runs once the caller lets go of what it holds.  Returns
    whether the process itself was killed by us."""
    victims: dict[int, int] = {}      # pid -> pidfd
    killed = False
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    except OSError:
        pass
    # its descendants are found by pid number: only while it is alive (and
    # stopped) is that number still its own
    for _ in range(50 if not gone(pidfd) else 0):
        new = [p for p in procfs.descendants(pid)[1:] if p not in victims]
        if not new:
            break
        for p in new:
            try:
                victims[p] = pidfd_open(p)
            except OSError:
                continue
            try:
                signal.pidfd_send_signal(victims[p], signal.SIGSTOP)
            except OSError:
                pass
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        killed = True
    except OSError:
        pass
    for fd in victims.values():
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    for fd in [pidfd, *victims.values()]:
        while not poll_fds([fd], max(0.0, min(0.05, deadline - time.monotonic()))) \
                and time.monotonic() < deadline:
            pass
    for fd in victims.values():
        os.close(fd)
    return killed


def start_lazy(tr, inj, anon_ranges: list[tuple[int, int]]) -> LazyServer:
    """Create the task's userfaultfd, register the anonymous ranges and start
    serving them (called with the task stopped, before any other injection that
    touches anonymous memory)."""
    tfd = inj.call("userfaultfd", O_CLOEXEC | O_NONBLOCK)
    if errno_of(tfd):
        raise RestoreError("lazy", f"userfaultfd in the task: {os.strerror(errno_of(tfd))} "
                           "(lazy restore needs root; use --eager)")
    pidfd = pidfd_open(tr.rpid)
    try:
        uffd = pidfd_getfd(pidfd, tfd)
    finally:
        os.close(pidfd)
    inj.check("close", tfd)
    api = uffdio_api(0xAA, UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP |
                     UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP, 0)
    res = _ioctl(uffd, UFFDIO_API_IOC, api)
    if res:
        os.close(uffd)
        raise RestoreError("lazy", f"UFFDIO_API: {os.strerror(-res)}")
    regions = []
    for start, end in anon_ranges:
        m = next(m for m in tr.task.mappings if m.start == start)
        segs = [tr.sf.segment(p) for p in m.segments]
        segs = [s for s in segs if s.filesz]
        if len(segs) != 1 or segs[0].vaddr != start:
            # unusual layout: copy it eagerly
            tr.mem.copy_range(m, start, end)
            for s in segs:
                for rel, ln in s.runs:
                    tr.mem._write(s, rel, ln)
            continue
        seg = segs[0]
        r = Region(start, end, seg.offset, guard=ChunkGuard(tr.sf, seg))
        for rel, ln in seg.runs:
            i, j = rel // PAGE, (rel + ln + PAGE - 1) // PAGE
            r.pending[i:j] = b"\x01" * (j - i)
        r.left = r.pending.count(1)
        reg = uffdio_register(uffdio_range(start, end - start), UFFDIO_REGISTER_MODE_MISSING, 0)
        res = _ioctl(uffd, UFFDIO_REGISTER, reg)
        if res:
            os.close(uffd)
            raise RestoreError("lazy", f"UFFDIO_REGISTER {start:#x}-{end:#x}: "
                               f"{os.strerror(-res)}")
        regions.append(r)
    server = LazyServer(tr.sf.path, Ctx(uffd, regions), tr.rpid)
    server.start_thread()
    return server
