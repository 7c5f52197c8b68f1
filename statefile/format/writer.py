"""Streaming statefile writer.

Layout of a statefile (docs/FORMAT.md has the details):

    ELF header | program headers | pad to page | segment data (page aligned,
    sparse) | PT_NOTE data (standard notes of the root task, then CRELF notes)

Memory is copied with process_vm_readv or /proc/PID/mem (or from a shmem or
deleted file) into a 1 MiB buffer per worker thread, checksummed (CRC32 per
segment) and written with pwrite by the same worker into blocks allocated
beforehand (fallocate); no page ever becomes a Python object.  The file is created as a hidden temporary (mode 0600) beside the final
name, unnamed (O_TMPFILE) where the file system allows it, and given that name
only once complete; any failure removes it.  Unnamed, nothing is left even
when crcheckpoint is killed; elsewhere the next run removes what a dead one
left (TempFile below).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import queue
import re
import secrets
import stat
import threading
import time

from statefile.format import elfcore as ec
from statefile.control import ptrace, snapshot
from statefile.format import notes as nt, records
from statefile.dump.memory import PAGE, SegmentPlan
from statefile.errors import OutputError
from statefile.format.checksum import crc32
from statefile.format.integrity import CHUNK_SIZE, assemble, split

CHUNK = 1 << 20
WORKERS = 2


def _align(x: int, a: int = PAGE) -> int:
    return (x + a - 1) // a * a


def _pflags(perms: str) -> int:
    return ((ec.PF_R if perms[0] == "r" else 0) | (ec.PF_W if perms[1] == "w" else 0)
            | (ec.PF_X if perms[2] == "x" else 0))


class _Copier:
    """Worker threads, each reading a chunk into its own buffer, checksumming
    it and writing it with pwrite, then taking the next chunk; the caller's
    thread only collects the checksums (and reports progress).  Every stage
    releases the GIL in its system call or in zlib-ng, so one worker's read
    and checksum overlap the other's write.  A worker keeps its chunk in its
    own cache from read to write: measured here (bench/README.md), this beats
    readers handing buffers to a single writer by about a quarter on 2 GiB.
    Chunks may be written in any order; a chunk never crosses a checksum
    chunk boundary (integrity.CHUNK_SIZE) of its segment, so each segment's
    CRC32 and its chunks' are assembled from them (integrity.assemble).
    """

    def __init__(self, out_fd: int, progress=None, workers: int = WORKERS,
                 offsets: dict[int, int] | None = None):
        self.out = out_fd
        self.progress = progress
        self.workers = workers
        self.offsets = offsets or {}      # segment index -> its file offset
        self.tasks: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.stop = False
        self.error: BaseException | None = None
        self.crcs: dict[int, tuple[int, list[int]]] = {}

    def _worker(self):
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while not self.stop:
                task = self.tasks.get()
                if task is None:
                    return
                seg_idx, rel, src, src_off, out_off, n = task
                src.read_into(buf, n, src_off)
                mv = view[:n]
                crc = crc32(mv)
                w = 0
                while w < n:
                    w += os.pwrite(self.out, mv[w:], out_off + w)
                self.done.put((seg_idx, rel, crc, n))
        except BaseException as e:  # handed to the caller's thread
            self.error = e
        finally:
            self.done.put(None)

    def run(self, jobs) -> None:
        pieces: dict[int, list] = {}
        for seg_idx, src, items in jobs:
            base = self.offsets[seg_idx]
            for src_off, out_off, length in items:
                for rel, n in split(out_off - base, length, min(CHUNK, CHUNK_SIZE)):
                    done = rel - (out_off - base)
                    self.tasks.put((seg_idx, rel, src, src_off + done, out_off + done, n))
            pieces[seg_idx] = []
        for _ in range(self.workers):
            self.tasks.put(None)
        threads = [threading.Thread(target=self._worker, daemon=True)
                   for _ in range(self.workers)]
        for t in threads:
            t.start()
        running = len(threads)
        try:
            while running:
                item = self.done.get()
                if item is None:
                    running -= 1
                    if self.error:
                        break
                    continue
                seg_idx, rel, crc, n = item
                pieces[seg_idx].append((rel, n, crc))
                if self.progress:
                    self.progress(n)
        finally:
            self.stop = True        # the others finish their chunk and stop
            for _ in range(self.workers):
                self.tasks.put(None)
            for t in threads:
                t.join()
        if self.error:
            raise self.error
        for seg_idx, parts in pieces.items():
            self.crcs[seg_idx] = assemble(parts)


SELF_CHUNK = 32 << 20     # bytes per pwrite64 injected into a snapshot


def _copy_range(src, out_fd: int, buf: bytearray, addr: int, out: int, n: int) -> None:
    """Copy n bytes from a source into the statefile through buf (the
    reader path, for what a snapshot could not write itself)."""
    view = memoryview(buf)
    while n:
        k = min(len(buf), n)
        src.read_into(buf, k, addr)
        _pwrite_all(out_fd, view[:k], out)
        addr, out, n = addr + k, out + k, n - k


def _self_copy(out_fd: int, jobs, writers: dict, progress=None,
               offsets: dict[int, int] | None = None) -> dict[int, tuple[int, list[int]]]:
    """Memory of snapshots that write themselves (snapshot.SelfWriter): each
    run goes out in SELF_CHUNK pwrites injected into the snapshot, while a
    thread reads back and checksums what has been written, in pieces that
    never cross a checksum chunk of the segment (integrity.assemble makes the
    segment's CRC and its chunks' of them).  What a snapshot cannot write
    (unreadable pages, a failure) is copied through a buffer.  Returns
    {segment index: (crc32, chunk crc32s)}."""
    pieces: dict[int, list] = {}
    offsets = offsets or {}
    done: queue.Queue = queue.Queue()
    errors: list[BaseException] = []

    def checksum():
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while True:
                item = done.get()
                if item is None:
                    return
                seg_idx, off, n = item
                base = offsets[seg_idx]
                for rel, k in split(off - base, n, min(CHUNK, CHUNK_SIZE)):
                    if os.preadv(out_fd, [view[:k]], base + rel) != k:
                        raise OSError(errno.EIO, "short read of the statefile being written")
                    pieces.setdefault(seg_idx, []).append((rel, k, crc32(view[:k])))
        except BaseException as e:  # handed to the caller's thread
            errors.append(e)

    thread = threading.Thread(target=checksum, daemon=True)
    thread.start()
    buf = bytearray(CHUNK)
    try:
        for seg_idx, src, items in jobs:
            w = writers[src]
            for addr, out, length in items:
                for pos in range(0, length, SELF_CHUNK):
                    n = min(SELF_CHUNK, length - pos)
                    k = w.write(addr + pos, n, out + pos)
                    if k < n:
                        _copy_range(src, out_fd, buf, addr + pos + k, out + pos + k, n - k)
                    done.put((seg_idx, out + pos, n))
                    if progress:
                        progress(n)
                    if errors:
                        raise errors[0]
    finally:
        done.put(None)
        thread.join()
    if errors:
        raise errors[0]
    return {seg_idx: assemble(parts) for seg_idx, parts in pieces.items()}


class _MemSource:
    """A task's memory: process_vm_readv (fastest), /proc/PID/mem for the rest
    (pages process_vm_readv refuses, such as PROT_NONE ones, FOLL_FORCE reads).

    A copy-on-write snapshot is read through /proc/PID/mem only: process_vm_readv
    pins pages (FOLL_PIN), and pinning an anonymous page shared after fork makes
    the kernel copy it first ("unshare"), which would duplicate every page."""

    def __init__(self, pid: int, snapshot: bool = False):
        self.pid = pid
        self.snapshot = snapshot
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def read_into(self, buf: bytearray, n: int, addr: int) -> None:
        """Called from several reader threads at once: nothing shared is written."""
        got = -1
        if not self.snapshot:
            cbuf = (ctypes.c_char * n).from_buffer(buf)
            local = ptrace.iovec(ctypes.addressof(cbuf), n)
            remote = ptrace.iovec(addr, n)
            got = ptrace.process_vm_readv(self.pid, local, remote)
            del cbuf
        if got != n:
            got = os.preadv(self.fd, [memoryview(buf)[:n]], addr)
            if got != n:
                raise OSError(errno.EIO, f"pid {self.pid}: cannot read memory at {addr:#x}")

    def close(self) -> None:
        os.close(self.fd)


class _FileSource:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read_into(self, buf: bytearray, n: int, off: int) -> None:
        got = os.preadv(self.fd, [memoryview(buf)[:n]], off)
        if got != n:
            raise OSError(errno.EIO, f"short read from a file source at {off:#x}")

    def close(self) -> None:
        os.close(self.fd)


class StatefileWriter:
    def __init__(self, path: str, fsync: bool = False):
        self.path = os.path.abspath(path)
        self.fsync = fsync
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            raise OutputError(f"output directory {d} does not exist")
        if os.path.isdir(self.path):
            raise OutputError(f"output path {self.path} is a directory")
        self.out = TempFile(self.path)
        self.fd = self.out.fd

    def _self_writers(self, snapshots: dict[int, int], syscall_addrs: dict[int, int],
                      sources: dict) -> dict:
        """{snapshot memory source: its open SelfWriter}, for the snapshots
        that can write themselves."""
        out = {}
        for task_pid, snap in snapshots.items():
            src = sources.get(snap)
            if src is None or task_pid not in syscall_addrs:
                continue
            w = snapshot.SelfWriter(snap, syscall_addrs[task_pid], self.fd, self.out.open_path)
            if w.open():
                out[src] = w
        return out

    def abort(self) -> None:
        self.out.abort()
        self.fd = -1

    def write(self, *, header: records.HeaderNote, tasks: list[records.TaskNote],
              regs: list[nt.ThreadRegs], files: records.FilesNote,
              segments: list[SegmentPlan], progress=None,
              snapshots: dict[int, int] | None = None, thaw=None,
              ipc: records.IpcNote | None = None,
              syscall_addrs: dict[int, int] | None = None) -> dict:
        """Write everything; return statistics.  The caller calls abort() on failure.

        The notes are the dump side's records (statefile/format/records.py,
        checked when statefile/checkpoint.py made them).  With `snapshots`
        (task pid -> pid of its copy-on-write snapshot) the
        segments that must be read while the tree is frozen (shared memory,
        MADV_DONTFORK/WIPEONFORK memory, file contents) are copied first, then
        `thaw()` releases the tree, and private memory is read from the
        snapshots while the tree runs on.  With `syscall_addrs` (task pid ->
        its vDSO `syscall` instruction) each snapshot writes its own memory
        into the statefile (snapshot.SelfWriter), falling back to reading it.
        """
        snapshots = snapshots or {}
        root = tasks[0]
        nph = 1 + len(segments)
        phdrs = [ec.Elf64_Phdr() for _ in range(nph)]
        cur = _align(ec.headers_size(nph))
        frozen_jobs, later_jobs, seg_desc, sources, offsets = [], [], [], {}, {}
        stored = 0
        for i, p in enumerate(segments, start=1):
            ph = phdrs[i]
            ph.p_type = (ec.PT_CRELF_BLOB if p.blob else
                         ec.PT_LOAD if p.pid == root.pid else ec.PT_CRELF_TASKMEM)
            ph.p_flags = _pflags(p.flags)
            ph.p_vaddr = p.vaddr
            ph.p_memsz = p.memsz
            ph.p_align = PAGE
            filesz = max((o + n for o, n in p.runs), default=0) if p.store else 0
            ph.p_offset = cur
            ph.p_filesz = filesz
            offsets[i] = cur
            desc = records.Segment(phdr=i, pid=p.pid, vaddr=p.vaddr, memsz=p.memsz,
                                   offset=cur, filesz=filesz, mapping=p.mapping,
                                   runs=[[o, n] for o, n in p.runs] if p.store else [],
                                   blob=p.blob or None)
            seg_desc.append(desc)
            if filesz:
                later = p.src == "mem" and not p.frozen_only and p.pid in snapshots
                if p.src == "mem":
                    read_pid = snapshots[p.pid] if later else p.pid
                    if read_pid not in sources:
                        sources[read_pid] = _MemSource(read_pid, snapshot=later)
                    src, base = sources[read_pid], p.vaddr
                else:
                    src = sources[("file", i)] = _FileSource(p.src_path)
                    base = p.src_offset
                (later_jobs if later else frozen_jobs).append(
                    (i, src, [(base + o, cur + o, n) for o, n in p.runs]))
                stored += sum(n for _, n in p.runs)
                cur = _align(cur + filesz)
        if progress is not None and hasattr(progress, "expect"):
            progress.expect(stored)
        t0 = time.monotonic()
        crcs: dict[int, tuple[int, list[int]]] = {}
        writers: dict = {}
        try:
            try:
                os.ftruncate(self.fd, cur)
                for phase, jobs in enumerate((frozen_jobs, later_jobs)):
                    if phase == 1 and thaw is not None:
                        thaw()
                    # (after the thaw for the memory read from the snapshots:
                    # the tasks never wait for it)
                    _preallocate(self.fd, [(out, n) for _, _, items in jobs
                                           for _, out, n in items])
                    if phase == 1 and syscall_addrs:
                        writers = self._self_writers(snapshots, syscall_addrs, sources)
                        mine = [j for j in jobs if j[1] in writers]
                        jobs = [j for j in jobs if j[1] not in writers]
                        crcs.update(_self_copy(self.fd, mine, writers, progress, offsets))
                    copier = _Copier(self.fd, progress, offsets=offsets)
                    copier.run(jobs)
                    crcs.update(copier.crcs)
            except OSError as e:
                raise OutputError(_write_error(e, self.path)) from None
        finally:
            for w in writers.values():
                w.close()
            for src in sources.values():
                src.close()
        copy_seconds = time.monotonic() - t0
        for d in seg_desc:
            if d.filesz:
                d.crc32, d.chunks = crcs[d.phdr]

        # Notes: the gdb baseline for the root task, then ours.
        regs_by_tid = {r.tid: r for r in regs}
        root_regs = {t.tid: regs_by_tid[t.tid] for t in root.threads}
        note_list = nt.standard_notes(root, root_regs, PAGE, header.xsave_layout)
        crelf = [(nt.OWNER_CRELF, nt.CR_HEADER, nt.encode_json(nt.CR_HEADER, header))]
        crelf += [(nt.OWNER_CRELF, nt.CR_TASK, nt.encode_json(nt.CR_TASK, t)) for t in tasks]
        crelf += [(nt.OWNER_CRELF, nt.CR_THREAD_REGS, nt.encode_regs(r)) for r in regs]
        crelf.append((nt.OWNER_CRELF, nt.CR_FILES, nt.encode_json(nt.CR_FILES, files)))
        crelf.append((nt.OWNER_CRELF, nt.CR_SEGMENTS, nt.encode_json(
            nt.CR_SEGMENTS, records.SegmentsNote(v=nt.NOTE_LAYOUT_VERSION,
                                                 chunk_size=CHUNK_SIZE, segments=seg_desc))))
        if ipc is not None:
            crelf.append((nt.OWNER_CRELF, nt.CR_IPC, nt.encode_json(nt.CR_IPC, ipc)))
        note_list += crelf
        integrity = records.IntegrityNote(v=nt.NOTE_LAYOUT_VERSION, notes=[
            (o.decode(), t, crc32(d)) for o, t, d in note_list])
        note_list.append((nt.OWNER_CRELF, nt.CR_INTEGRITY, nt.encode_json(nt.CR_INTEGRITY, integrity)))
        blob = b"".join(ec.pack_note(o, t, d) for o, t, d in note_list)
        note_off = _align(cur, 8)
        ph = phdrs[0]
        ph.p_type = ec.PT_NOTE
        ph.p_offset = note_off
        ph.p_filesz = len(blob)
        ph.p_align = 4
        try:
            _pwrite_all(self.fd, blob, note_off)
            _pwrite_all(self.fd, ec.build_headers(phdrs), 0)
            self.out.commit(self.fsync)
            self.fd = -1
        except OSError as e:
            raise OutputError(_write_error(e, self.path)) from None
        return {"bytes_stored": stored, "file_size": note_off + len(blob),
                "bytes_written_by_snapshots": sum(w.written for w in writers.values()),
                "segments": len(segments), "notes": len(note_list),
                "copy_seconds": copy_seconds}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _preallocate(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Allocate the blocks of every range that will hold data before writing
    it: page-cache writes into allocated (unwritten) extents skip ext4's
    per-page delayed-allocation work, about 40% faster measured here
    (bench/README.md), and a full disk shows before any data is copied.
    Holes stay holes.  fallocate(2) through ctypes: the os module has only
    posix_fallocate, which glibc emulates by writing zeros where the file
    system lacks fallocate; here such file systems are simply skipped."""
    merged: list[list[int]] = []
    for off, n in sorted(ranges):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], off + n - merged[-1][0])
        else:
            merged.append([off, n])
    for off, n in merged:
        if _libc.fallocate(fd, 0, off, n) < 0:
            e = ctypes.get_errno()
            if e in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return          # not supported here: write as usual
            raise OSError(e, os.strerror(e))


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, off)
        mv, off = mv[n:], off + n


def _write_error(e: OSError, path: str) -> str:
    if e.errno == errno.ENOSPC:
        return f"no space left on the device for {path}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {path}"
    if e.errno == errno.EROFS:
        return f"read-only file system: cannot write {path}"
    return f"writing {path} failed: {e.strerror or e}"


# ------------------------------------------------------- the file being written

USE_O_TMPFILE = True    # internal: a test sets it False to exercise the named fallback

# Hidden names crelf writes a statefile under while it is not complete: only
# ever where the file system lacks O_TMPFILE, or for the instant between
# linking an unnamed file and renaming it over an existing statefile.
# `.NAME.crelf-<16 hex digits>.tmp`: 64 random bits, so nobody can create the
# name first and block a checkpoint.
TEMP_NAME = re.compile(r"\..+\.crelf-[0-9a-f]{16}\.tmp")
_LEGACY_NAME = re.compile(r"\.(.+)\.tmp-([0-9]+)")      # before: .NAME.tmp-PID


def _temp_name(name: str) -> str:
    return f".{name[:200]}.crelf-{secrets.token_hex(8)}.tmp"


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock(fd: int) -> bool:
    """Take the writer's lock: an exclusive flock, held as long as the file is
    open here, so released by the kernel when crcheckpoint dies however it
    dies.  False when someone else holds it (a next run probing the file as a
    possible leftover).  A file system without flock: unlocked (the probe
    fails the same way there, so nothing is taken for a leftover)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def remove_leftovers(directory: str, dirfd: int, name: str) -> list[str]:
    """Remove what crcheckpoint runs that died left in `directory`: files
    named like TEMP_NAME whose writer's lock can be taken (a live writer
    holds it until it is done), and the `.NAME.tmp-PID` files of older
    versions for this statefile NAME whose PID no longer exists.  Only
    regular files owned by our effective uid.  Returns the names removed."""
    removed = []
    try:
        entries = [e.name for e in os.scandir(directory)]
    except OSError:
        return removed      # unreadable directory: nothing to clean
    me = os.geteuid()
    for entry in entries:
        legacy = _LEGACY_NAME.fullmatch(entry)
        if not TEMP_NAME.fullmatch(entry) and not (legacy and legacy[1] == name):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                         | os.O_CLOEXEC, dir_fd=dirfd)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != me:
                continue
            if legacy:
                try:
                    os.kill(int(legacy[2]), 0)
                    continue            # that pid exists: maybe the writer
                except ProcessLookupError:
                    pass
                except OSError:
                    continue
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue            # a writer holds it (or no flock here)
            if _same_file(os.stat(entry, dir_fd=dirfd, follow_symlinks=False), st):
                os.unlink(entry, dir_fd=dirfd)
                removed.append(entry)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class TempFile:
    """The statefile while it is written, in the directory of its final name.

    Where the file system allows it, an unnamed file (O_TMPFILE): it has no
    name until commit() links it under the final one, so nothing is left
    behind whatever happens to crcheckpoint (SIGKILL included): the kernel
    frees it with the last descriptor.  linkat(2) cannot replace a name: when
    a statefile exists under the final name already, the complete file is
    linked under a random hidden name and renamed over it (one step, so the
    final name always holds a complete statefile, old or new; the same as
    systemd's link_tmpfile).  Elsewhere the file is created under a random
    hidden name (O_EXCL|O_NOFOLLOW: nobody can guess it or plant it first) and
    renamed at the end.  In both cases the writer holds a flock on it from
    creation to the end, so a run that died is told apart from one still
    writing: every run first removes the hidden files whose lock it can take
    (remove_leftovers).

    `open_path` is a path by which another process (a snapshot writing its
    own memory, snapshot.SelfWriter) can open this very file: the hidden
    name, or /proc/PID/fd/N of ours for an unnamed file.
    """

    def __init__(self, path: str):
        self.path = path
        self.dir, self.name = os.path.split(path)
        self.fd = -1
        self.tmp: str | None = None     # our hidden name in the directory, while we have one
        try:
            self.dirfd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OutputError(f"cannot create statefile in {self.dir}: {e.strerror}") from None
        try:
            self.removed = remove_leftovers(self.dir, self.dirfd, self.name)
            self.unnamed = USE_O_TMPFILE and self._open_unnamed()
            if not self.unnamed:
                self._create_named()
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot create statefile in {self.dir}: {e.strerror}") from None
        self.open_path = (f"/proc/{os.getpid()}/fd/{self.fd}" if self.unnamed
                          else os.path.join(self.dir, self.tmp))

    def _open_unnamed(self) -> bool:
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                              dir_fd=self.dirfd)
        except OSError as e:
            # EOPNOTSUPP: this file system has no O_TMPFILE; EISDIR, EINVAL:
            # a kernel or a file system that does not know the flag
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return False
            raise
        os.fchmod(self.fd, 0o600)       # whatever the umask: it holds secrets
        _lock(self.fd)
        return True

    def _create_named(self) -> None:
        for _ in range(100):
            name = _temp_name(self.name)
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=self.dirfd)
            except FileExistsError:
                continue
            try:
                os.fchmod(fd, 0o600)
                # Between creating and locking it, another run may have taken
                # it for a leftover: it then holds the lock or removed the
                # name.  Start again with another name.
                ok = _lock(fd) and _same_file(
                    os.stat(name, dir_fd=self.dirfd, follow_symlinks=False), os.fstat(fd))
            except FileNotFoundError:
                ok = False
            except OSError:
                os.close(fd)
                try:
                    os.unlink(name, dir_fd=self.dirfd)
                except OSError:
                    pass
                raise
            if ok:
                self.fd, self.tmp = fd, name
                return
            os.close(fd)
        raise OSError(errno.EEXIST, "no free temporary name")

    def commit(self, fsync: bool = False) -> None:
        """Give the complete file its final name (and with `fsync` flush the
        file before and the directory after), then close it."""
        if fsync:
            os.fsync(self.fd)
        if self.unnamed:
            # os.link uses linkat(AT_SYMLINK_FOLLOW) only when given a dir fd;
            # without one Python 3.11 calls link(2), which does not follow the
            # /proc magic link (EXDEV).
            src = f"/proc/self/fd/{self.fd}"
            try:
                os.link(src, self.name, dst_dir_fd=self.dirfd)
            except FileExistsError:
                while self.tmp is None:
                    name = _temp_name(self.name)
                    try:
                        os.link(src, name, dst_dir_fd=self.dirfd)
                        self.tmp = name
                    except FileExistsError:
                        pass
        if self.tmp is not None:
            os.rename(self.tmp, self.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
            self.tmp = None
        if fsync:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._close()

    def abort(self) -> None:
        """Remove what we made (our hidden name, if it is still ours) and close."""
        if self.tmp is not None:
            try:
                if self.fd >= 0 and _same_file(
                        os.stat(self.tmp, dir_fd=self.dirfd, follow_symlinks=False),
                        os.fstat(self.fd)):
                    os.unlink(self.tmp, dir_fd=self.dirfd)
            except OSError:
                pass
            self.tmp = None
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1
