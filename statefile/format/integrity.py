"""Checksums of segment data, by chunk (docs/FORMAT.md, CR_SEGMENTS).

Format 2 cuts every segment's stored bytes into chunks: chunk k is what the
segment's runs store within segment offsets [k*C, (k+1)*C), C = CR_SEGMENTS
`chunk_size` (1 MiB); its CRC-32 is `chunks[k]` (holes are not part of it).
The writer computes them while it writes (`assemble`); every reader that hands
segment bytes to a restored process goes through `SegmentReader`, which
verifies each whole chunk before it returns a byte of it; the lazy page server
verifies chunks with `chunk_crc` over its mapping of the statefile.  Format 1
has only the whole segment's `crc32`: `SegmentReader` checks the whole
segment once before it returns any of it.
"""

from __future__ import annotations

import bisect
import os
import queue
import threading

from statefile.format.checksum import crc32, crc32_combine
from statefile.errors import FormatError
from statefile.format import records

CHUNK_SIZE = 1 << 20


class DamagedError(FormatError):
    """Stored bytes do not match their checksum (or are missing): one line
    naming what is damaged.  `truncated_at`: the segment offset the file
    ends before, when it was cut short there."""

    def __init__(self, message: str, truncated_at: int | None = None):
        super().__init__(message)
        self.truncated_at = truncated_at


def chunk_parts(runs: "Runs", k: int, size: int) -> list[tuple[int, int]]:
    """The stored parts (segment offset, length) of chunk k, in order."""
    lo, hi = k * size, (k + 1) * size
    out = []
    i = max(0, bisect.bisect_right(runs.starts, lo) - 1)
    while i < len(runs.runs):
        o, n = runs.runs[i]
        if o >= hi:
            break
        a, b = max(o, lo), min(o + n, hi)
        if a < b:
            out.append((a, b - a))
        i += 1
    return out


def nchunks(filesz: int, size: int) -> int:
    return (filesz + size - 1) // size


def split(rel: int, n: int, size: int):
    """(offset, length) pieces of [rel, rel+n) that never cross a chunk boundary."""
    while n:
        k = min(n, size - rel % size)
        yield rel, k
        rel, n = rel + k, n - k


def assemble(pieces: list[tuple[int, int, int]],
             size: int = CHUNK_SIZE) -> tuple[int, list[int]]:
    """From (segment offset, length, crc32) pieces (none crossing a chunk
    boundary, together the segment's runs): the whole segment's CRC (its runs
    concatenated in order) and each chunk's."""
    pieces = sorted(pieces)
    whole = 0
    chunks = [0] * nchunks(max((o + n for o, n, _ in pieces), default=0), size)
    for rel, n, crc in pieces:
        whole = crc32_combine(whole, crc, n)
        k = rel // size
        chunks[k] = crc32_combine(chunks[k], crc, n)
    return whole, chunks


class Runs:
    """A segment's runs with their start offsets, for bisect."""

    def __init__(self, runs):
        self.runs = runs
        self.starts = [o for o, _ in runs]


def describe(sf, seg: records.Segment, lo: int, hi: int) -> str:
    """What segment bytes [lo, hi) are, for the user: 'memory of pid 1234 at
    0x7f00...-0x7f00...' or 'the content of deleted file /tmp/x'."""
    phdr = seg.phdr
    if seg.blob is None and seg.mapping >= 0:
        return (f"memory of pid {seg.pid} at {seg.vaddr + lo:#x}-"
                f"{seg.vaddr + hi:#x}")
    what = f"blob segment {phdr}"
    for f in sf.files:
        if f.blob == phdr:
            if isinstance(f, (records.PipeFile, records.FifoFile)) and f.pipe.data_file == f.id:
                what = f"the bytes in flight of pipe {f.path}"
            elif f.deleted:
                what = f"the content of deleted file {f.path}"
            else:
                what = f"the saved content of file {f.path}"
            break
    else:
        for o in sf.shmem:
            if o.blob == phdr:
                name = o.name if isinstance(o, records.MemfdObject) else o.path
                kind = {"deleted": "deleted file", "tmpfs": "tmpfs file"}.get(o.kind, o.kind)
                what = f"the content of {kind} {name}"
                break
    return f"{what} (bytes {lo:#x}-{hi:#x})"


def damaged(sf, seg: records.Segment, lo: int, hi: int, why: str = "checksum mismatch") -> str:
    return f"{sf.path}: {describe(sf, seg, lo, hi)} is damaged ({why})"


class SegmentReader:
    """Stored segment bytes, each chunk verified whole before any byte of it is
    returned.  One buffer of one chunk, reused: consume what `pieces` yields
    before taking the next."""

    def __init__(self, sf, fd: int | None = None):
        self.sf = sf
        self.size = sf.chunk_size or CHUNK_SIZE
        self.own = fd is None
        self.fd = os.open(sf.path, os.O_RDONLY | os.O_CLOEXEC) if fd is None else fd
        self.buf = bytearray(self.size)
        self.mv = memoryview(self.buf)
        self._runs: dict[int, Runs] = {}
        self._whole_ok: set[int] = set()

    def close(self) -> None:
        if self.own and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _runs_of(self, seg: records.Segment) -> Runs:
        r = self._runs.get(seg.phdr)
        if r is None:
            r = self._runs[seg.phdr] = Runs(seg.runs)
        return r

    def _read(self, seg: records.Segment, parts, base: int) -> int:
        """Read parts into the buffer at (offset - base); their running CRC."""
        crc = 0
        for o, n in parts:
            view = self.mv[o - base:o - base + n]
            if os.preadv(self.fd, [view], seg.offset + o) != n:
                raise DamagedError(damaged(self.sf, seg, o, o + n,
                                           "the statefile is truncated there"), o)
            crc = crc32(view, crc)
        return crc

    def _check_whole(self, seg: records.Segment) -> None:
        """Format 1: the whole segment against its crc32, once."""
        if seg.phdr in self._whole_ok:
            return
        crc = 0
        for o, n in seg.runs:
            for a, k in split(o, n, self.size):
                view = self.mv[:k]
                if os.preadv(self.fd, [view], seg.offset + a) != k:
                    raise DamagedError(damaged(self.sf, seg, a, a + k,
                                               "the statefile is truncated there"), a)
                crc = crc32(view, crc)
        if crc != seg.crc32:
            raise DamagedError(damaged(self.sf, seg, 0, seg.filesz))
        self._whole_ok.add(seg.phdr)

    def pieces(self, seg: records.Segment, lo: int = 0, hi: int | None = None):
        """Yield (segment offset, memoryview) for the stored bytes within
        [lo, hi), in order, each from a verified chunk."""
        for k in self.chunk_numbers(seg, lo, hi):
            yield from self.chunk(seg, k, lo, hi)

    def chunk_numbers(self, seg: records.Segment, lo: int = 0, hi: int | None = None) -> range:
        hi = seg.filesz if hi is None else min(hi, seg.filesz)
        if lo >= hi or not seg.runs:
            return range(0)
        return range(lo // self.size, nchunks(hi, self.size))

    def chunk(self, seg: records.Segment, k: int, lo: int = 0, hi: int | None = None) -> list:
        """Read chunk k whole into the buffer, verify it, and return its stored
        bytes within [lo, hi) as [(segment offset, memoryview)]."""
        hi = seg.filesz if hi is None else hi
        parts = chunk_parts(self._runs_of(seg), k, self.size)
        if not parts:
            return []
        chunks = seg.chunks
        if chunks is None:
            self._check_whole(seg)
        base = k * self.size
        crc = self._read(seg, parts, base)
        if chunks is not None and (k >= len(chunks) or crc != chunks[k]):
            end = min(base + self.size, seg.filesz)
            raise DamagedError(damaged(self.sf, seg, base, end))
        out = []
        for o, n in parts:
            a, b = max(o, lo), min(o + n, hi)
            if a < b:
                out.append((a, self.mv[a - base:b - base]))
        return out

    def write_into(self, fd: int, seg: records.Segment, base: int = 0) -> None:
        """pwrite every stored byte of seg at base + its segment offset in fd
        (holes stay holes), each chunk verified before a byte of it is written."""
        for pos, view in self.pieces(seg):
            pos += base
            while len(view):
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n

    def read_all(self, seg: records.Segment) -> list[tuple[int, bytes]]:
        """Every stored run of a (small) segment as bytes, verified."""
        out: list[tuple[int, bytearray]] = []
        for o, view in self.pieces(seg):
            if out and out[-1][0] + len(out[-1][1]) == o:
                out[-1][1].extend(view)
            else:
                out.append((o, bytearray(view)))
        return [(o, bytes(b)) for o, b in out]


def read_ahead(sf, fd: int, jobs):
    """SegmentReader.pieces over jobs [(segment, lo, hi)], as (segment,
    offset, memoryview), with the next chunk read and verified by a thread
    (two buffers) while the caller uses the current one: the eager copy's
    reads and checks overlap its writes into the task.  A view is valid until
    the caller asks for the next chunk's."""
    readers = [SegmentReader(sf, fd), SegmentReader(sf, fd)]
    readers[1]._whole_ok = readers[0]._whole_ok
    ready: queue.Queue = queue.Queue()
    free = threading.Semaphore(2)
    stop = threading.Event()

    def produce():
        try:
            i = 0
            for seg, lo, hi in jobs:
                for k in readers[0].chunk_numbers(seg, lo, hi):
                    free.acquire()
                    if stop.is_set():
                        return
                    parts = readers[i % 2].chunk(seg, k, lo, hi)
                    if not parts:
                        free.release()
                        continue
                    i += 1
                    ready.put((seg, parts))
            ready.put(None)
        except BaseException as e:  # noqa: BLE001  handed to the caller
            ready.put(e)

    thread = threading.Thread(target=produce, name="crelf-read-ahead", daemon=True)
    try:
        thread.start()
    except RuntimeError:
        # no thread can be made here (after unshare(CLONE_NEWPID) clone
        # refuses CLONE_THREAD): read and verify each chunk in turn
        for seg, lo, hi in jobs:
            for off, view in readers[0].pieces(seg, lo, hi):
                yield seg, off, view
        return
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            seg, parts = item
            for off, view in parts:
                yield seg, off, view
            free.release()
    finally:
        stop.set()
        free.release()
        free.release()
        thread.join()


def chunk_problems(sf, seg: records.Segment, fd: int) -> list[str]:
    """crinspect verify: every chunk (format 2) and the whole segment's crc32."""
    if not seg.filesz:
        return []
    size = sf.chunk_size or CHUNK_SIZE
    runs = Runs(seg.runs)
    chunks = seg.chunks
    buf = bytearray(size)
    mv = memoryview(buf)
    problems, whole = [], 0
    for k in range(nchunks(seg.filesz, size)):
        crc = 0
        for o, n in chunk_parts(runs, k, size):
            view = mv[:n]
            if os.preadv(fd, [view], seg.offset + o) != n:
                return problems + [f"segment {seg.phdr} truncated ({damaged(sf, seg, o, o + n)})"]
            crc = crc32(view, crc)
            whole = crc32(view, whole)
        if chunks is not None and (k >= len(chunks) or crc != chunks[k]):
            lo, hi = k * size, min((k + 1) * size, seg.filesz)
            problems.append(f"segment {seg.phdr} ({describe(sf, seg, lo, hi)}) "
                            "checksum mismatch")
    if whole != seg.crc32 and (chunks is None or not problems):
        problems.append(f"segment {seg.phdr} ({describe(sf, seg, 0, seg.filesz)}) "
                        "checksum mismatch")
    return problems


__all__ = ["CHUNK_SIZE", "DamagedError", "SegmentReader", "assemble", "chunk_parts", "read_ahead",
           "chunk_problems", "damaged", "describe", "nchunks", "split"]
