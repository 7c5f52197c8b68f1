"""`crinspect core`: a standalone gdb core file for any task of a statefile.

Standard notes (statefile.format.notes.standard_notes) for the task, one PT_LOAD per
segment of that task, data copied run by run (holes stay holes) with
copy_file_range, at page-aligned offsets.  The output carries no CRELF marker:
it is a plain core, not a statefile.
"""

from __future__ import annotations

import errno
import os
import tempfile

from statefile.format import elfcore as ec
from statefile.format import notes as nt
from statefile.errors import CrelfError, FormatError, OutputError

from .views import CoreView

CHUNK = 1 << 20


def _align(n: int, page: int) -> int:
    return (n + page - 1) // page * page


def _copy(src: int, dst: int, src_off: int, dst_off: int, n: int) -> None:
    """Copy n bytes between two files in chunks of at most 1 MiB."""
    use_cfr = hasattr(os, "copy_file_range")
    while n > 0:
        chunk = min(n, CHUNK)
        done = 0
        if use_cfr:
            try:
                done = os.copy_file_range(src, dst, chunk, src_off, dst_off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
        if not use_cfr:
            data = os.pread(src, chunk, src_off)
            done = os.pwrite(dst, data, dst_off) if data else 0
        if done <= 0:
            raise FormatError("statefile truncated: segment data ends early")
        n -= done
        src_off += done
        dst_off += done


def task_segments(sf, pid: int) -> list:
    """Memory segments of one task (not blobs), in address order."""
    return sorted((s for s in sf.segments if s.pid == pid and s.blob is None),
                  key=lambda s: s.vaddr)


def _from_parent(sf, pid: int, m, a: int, b: int, depth: int = 0) -> list:
    """[(lo, hi, statefile offset)]: where the bytes of [a, b) of mapping m
    of task pid live when the task shares them copy-on-write with its parent
    (mapping "cow_parent": stored once, in the parent, or further up)."""
    try:
        parent = sf.task(sf.task(pid).ppid)
    except KeyError:
        return []
    idx, pm = next(((i, x) for i, x in enumerate(parent.mappings)
                    if (x.start, x.end) == (m.start, m.end)), (None, None))
    if pm is None or depth > len(sf.tasks):
        return []
    out = []
    for seg in sf.segments:
        if seg.pid != parent.pid or seg.mapping != idx or seg.blob is not None:
            continue
        for rel, ln in seg.runs:
            lo, hi = max(a, seg.vaddr + rel), min(b, seg.vaddr + rel + ln)
            if lo < hi:
                out.append((lo, hi, seg.offset + lo - seg.vaddr))
    for rel, ln in pm.cow_parent:
        lo, hi = max(a, pm.start + rel), min(b, pm.start + rel + ln)
        if lo < hi:
            out += _from_parent(sf, parent.pid, pm, lo, hi, depth + 1)
    return out


def _pieces(sf, pid: int, task, s) -> list[tuple[int, int, int]]:
    """[(offset in segment, length, statefile offset)] of a segment's data:
    its own runs, and the pages it shares with its parent."""
    out = [(rel, ln, s.offset + rel) for rel, ln in s.runs]
    if not 0 <= s.mapping < len(task.mappings):
        return sorted(out)
    m = task.mappings[s.mapping]
    for rel, ln in m.cow_parent:
        a = max(s.vaddr, m.start + rel)
        b = min(s.vaddr + s.memsz, m.start + rel + ln)
        if a < b:
            out += [(lo - s.vaddr, hi - lo, off) for lo, hi, off in
                    _from_parent(sf, pid, m, a, b)]
    return sorted(out)


def write_core(sf, pid: int, out_path: str) -> CoreView:
    try:
        task = sf.task(pid)
    except KeyError:
        raise CrelfError(f"no task {pid} in {sf.path} (tasks: "
                         f"{', '.join(str(t.pid) for t in sf.tasks)})") from None
    page = sf.header.page_size or 4096
    missing = [t.tid for t in task.threads if t.tid not in sf.regs]
    if missing:
        raise FormatError(f"{sf.path}: no registers for thread(s) {missing} of task {pid}")
    notes = b"".join(ec.pack_note(o, t, d)
                     for o, t, d in nt.standard_notes(task, sf.regs, page,
                                                         sf.header.xsave_layout))
    segs = task_segments(sf, pid)
    flags = {i: p["flags"] for i, p in enumerate(sf.phdrs)}

    phdrs = [ec.Elf64_Phdr(p_type=ec.PT_NOTE, p_offset=ec.headers_size(1 + len(segs)),
                           p_filesz=len(notes), p_align=4)]
    pos = _align(phdrs[0].p_offset + len(notes), page)
    placed = []
    for s in segs:
        pieces = _pieces(sf, pid, task, s)     # (the loader checked every run is in its data)
        filesz = max([s.filesz] + [rel + ln for rel, ln, _ in pieces])
        phdrs.append(ec.Elf64_Phdr(p_type=ec.PT_LOAD, p_flags=flags.get(s.phdr, ec.PF_R),
                                   p_offset=pos, p_vaddr=s.vaddr, p_filesz=filesz,
                                   p_memsz=s.memsz, p_align=page))
        placed.append((pieces, pos))
        pos = _align(pos + filesz, page)
    head = bytearray(ec.build_headers(phdrs))
    head[ec.EI_PAD:16] = bytes(16 - ec.EI_PAD)  # a plain core: no CRELF marker

    out_dir = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".crinspect-", suffix=".core.tmp")
    except OSError as e:
        raise OutputError(f"cannot write in {out_dir}: {e.strerror}") from None
    stored = 0
    try:
        with sf.open() as src:
            os.pwrite(fd, bytes(head), 0)
            os.pwrite(fd, notes, phdrs[0].p_offset)
            for pieces, off in placed:
                for rel, ln, src_off in pieces:
                    _copy(src.fileno(), fd, src_off, off + rel, ln)
                    stored += ln
        os.ftruncate(fd, pos)
        os.fchmod(fd, 0o600)
        os.close(fd)
        fd = -1
        os.rename(tmp, out_path)
    except OSError as e:
        raise OutputError(f"cannot write {out_path}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return CoreView(core=out_path, pid=pid, threads=len(task.threads), segments=len(segs),
                    bytes_stored=stored, file_size=pos, exe=task.exe)
