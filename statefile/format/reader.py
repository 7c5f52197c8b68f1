"""Read a statefile: headers and segments through pyelftools, notes decoded by
the table in statefile/format/notes.py.  Segment data is never loaded whole: callers read runs
(or map them) from the file by offset.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass, field

import msgspec
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from statefile.format import elfcore as ec
from statefile.format import notes as nt
from statefile.format import records
from statefile.format.checksum import crc32
from statefile import FORMAT_VERSION
from statefile.errors import FormatError
from statefile.format.integrity import chunk_problems, nchunks

# The formats this crelf reads (CR_HEADER "format"): format 1 has one CRC per
# segment, format 2 one per chunk too (docs/FORMAT.md).
FORMATS = (1, 2)


@dataclass
class Note:
    owner: str
    n_type: int
    desc: bytes


@dataclass
class Statefile:
    """A loaded statefile: every note's typed record (statefile/format/records.py)."""
    path: str
    header: records.HeaderNote
    tasks: list[records.TaskNote]          # CR_TASK, root first
    regs: dict[int, nt.ThreadRegs]         # by tid (unique inside one tree)
    files: list[records.File]              # CR_FILES files, by id
    segments: list[records.Segment]        # CR_SEGMENTS, indexed by phdr-1
    notes: list[Note] = field(default_factory=list)
    integrity: records.IntegrityNote | None = None
    phdrs: list[dict] = field(default_factory=list)
    ipc: records.IpcNote = field(
        default_factory=lambda: records.IpcNote(v=nt.NOTE_LAYOUT_VERSION))   # CR_IPC
    shmem: list[records.Shmem] = field(default_factory=list)   # CR_FILES shmem: memfds...
    format: int = FORMAT_VERSION
    chunk_size: int = 0           # CR_SEGMENTS chunk_size (0: format 1, whole segments only)

    @property
    def root(self) -> records.TaskNote:
        return self.tasks[0]

    def task(self, pid: int) -> records.TaskNote:
        for t in self.tasks:
            if t.pid == pid:
                return t
        raise KeyError(pid)

    def segment(self, phdr: int) -> records.Segment:
        return self.segments[phdr - 1]

    def open(self):
        return open(self.path, "rb", buffering=0)

    def read_segment(self, f, seg: records.Segment, rel: int, size: int) -> bytes:
        """Bytes [rel, rel+size) of a segment's memory image (holes read as zeros)."""
        end = min(rel + size, seg.filesz)
        data = os.pread(f.fileno(), max(0, end - rel), seg.offset + rel) if end > rel else b""
        return data + b"\0" * (size - len(data))


def _open_regular(path: str):
    """Open `path` for reading without ever blocking: a FIFO, a device, a
    socket or a directory is refused with one line before anything is read
    (O_NONBLOCK so that opening a FIFO returns at once, O_NOCTTY so that a
    terminal never becomes our controlling terminal, then fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory") from None
    except PermissionError:
        raise FormatError(f"{path}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ENXIO:      # a unix socket, a device without its driver
            try:
                what = _kind_of_mode(os.stat(path).st_mode)
            except OSError:
                what = "cannot be opened"
            raise FormatError(f"{path}: {what}, not a regular file") from None
        raise FormatError(f"{path}: cannot open: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FormatError(f"{path}: {_kind_of_mode(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind_of_mode(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "is a FIFO"),
                       (stat.S_ISSOCK, "is a socket"), (stat.S_ISCHR, "is a character device"),
                       (stat.S_ISBLK, "is a block device")):
        if test(mode):
            return what
    return "is a special file"


def load(path: str) -> Statefile:
    """Parse a statefile; raise FormatError with one clear line when it is not one
    (never blocks: a FIFO or device is refused before it is read)."""
    f = _open_regular(path)
    with f:
        ident = f.read(16)
        if ident[:4] != ec.ELFMAG:
            raise FormatError(f"{path}: not an ELF file")
        if not ec.has_crelf_marker(ident):
            raise FormatError(f"{path}: an ELF file but not a crelf statefile "
                              "(no CRELF marker; a plain core dump?)")
        size = os.fstat(f.fileno()).st_size
        bad = layout_problems(f.fileno(), size)
        if bad:
            raise FormatError(f"{path}: corrupted statefile ({bad[0]})")
        f.seek(0)
        try:
            elf = ELFFile(f)
            if elf.header["e_type"] != "ET_CORE":
                raise FormatError(f"{path}: not an ELF core file")
            phdrs, raw_notes = [], []
            for seg in elf.iter_segments():
                h = seg.header
                phdrs.append({"type": h["p_type"], "offset": h["p_offset"],
                              "vaddr": h["p_vaddr"], "filesz": h["p_filesz"],
                              "memsz": h["p_memsz"], "flags": h["p_flags"]})
                if h["p_offset"] + h["p_filesz"] > size:
                    raise FormatError(f"{path}: truncated (segment at {h['p_offset']:#x} "
                                      f"ends past the end of the file)")
                if h["p_type"] == "PT_NOTE":
                    for n in seg.iter_notes():
                        raw_notes.append(Note(n["n_name"] or "", _ntype(n["n_type"]),
                                              bytes(n["n_descdata"])))
        except FormatError:
            raise
        except (ELFError, ValueError, KeyError, OSError, AssertionError) as e:
            raise FormatError(f"{path}: corrupted statefile ({e})") from None
        except Exception as e:  # pyelftools' construct raises assorted errors on garbage
            raise FormatError(f"{path}: corrupted statefile ({type(e).__name__})") from None
    return _decode(path, raw_notes, phdrs)

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_NHDR = struct.Struct("<III")
_DATA_TYPES = {ec.PT_LOAD: "PT_LOAD", ec.PT_CRELF_TASKMEM: "PT_CRELF_TASKMEM",
               ec.PT_CRELF_BLOB: "PT_CRELF_BLOB"}
PAGE = 4096


def layout_problems(fd: int, size: int) -> list[str]:
    """Every ELF field crrestart relies on, checked against docs/FORMAT.md:
    the ELF header (identification, type, machine, version, program header
    table offset, entry size and count, extended numbering through section
    header 0), every program header (a known type, PT_NOTE first and only
    once, data within the file, page aligned, not overlapping the headers or
    each other, memory ranges page aligned, filesz <= memsz) and the notes
    (each header, name and descriptor within PT_NOTE, 4-byte padding, owner
    names NUL-terminated, nothing left over).  Returns the problems found, ''
    first; the loader (load) refuses on the first one and `crinspect verify`
    lists them all: one function for both."""
    def pread(n: int, off: int) -> bytes:
        return os.pread(fd, n, off) if off < size else b""

    if size < _EHDR.size:
        return [f"file of {size} bytes is shorter than an ELF header"]
    (ident, e_type, e_machine, e_version, _entry, phoff, shoff, _flags, ehsize, phentsize,
     phnum, shentsize, shnum, _shstrndx) = _EHDR.unpack(pread(_EHDR.size, 0))
    out: list[str] = []
    for what, got, want in (("ELF magic", ident[:4], ec.ELFMAG),
                            ("EI_CLASS", ident[4], ec.ELFCLASS64),
                            ("EI_DATA", ident[5], ec.ELFDATA2LSB),
                            ("EI_VERSION", ident[6], ec.EV_CURRENT),
                            ("EI_OSABI", ident[7], 0),
                            ("crelf marker", ident[ec.EI_PAD:16], ec.CRELF_IDENT_PAD),
                            ("e_type", e_type, ec.ET_CORE),
                            ("e_machine", e_machine, ec.EM_X86_64),
                            ("e_version", e_version, ec.EV_CURRENT),
                            ("e_ehsize", ehsize, _EHDR.size),
                            ("e_phoff", phoff, _EHDR.size),
                            ("e_phentsize", phentsize, _PHDR.size)):
        if got != want:
            out.append(f"ELF header {what} is {got!r}, not {want!r}")
    if out:
        return out       # nothing below can be trusted
    table_end = phoff + (phnum * _PHDR.size)
    if phnum == ec.PN_XNUM:
        # extended numbering: the count is section header 0's sh_info
        if shentsize != _SHDR.size or shnum != 1 or shoff < _EHDR.size \
                or shoff + _SHDR.size > size:
            return [f"ELF header: extended numbering without a valid section header 0 "
                    f"(e_shoff {shoff:#x}, e_shnum {shnum}, e_shentsize {shentsize})"]
        sh = _SHDR.unpack(pread(_SHDR.size, shoff))
        phnum = sh[7]
        if phnum < ec.PN_XNUM:
            return [f"section header 0 sh_info {phnum} is below PN_XNUM (65535)"]
        table_end = phoff + phnum * _PHDR.size
        if shoff != table_end:
            out.append(f"section header 0 at {shoff:#x} is not right after the program "
                       f"header table (ends at {table_end:#x})")
        table_end = max(table_end, shoff + _SHDR.size)
    elif shnum or shoff:
        out.append(f"ELF header: e_shoff {shoff:#x} / e_shnum {shnum} without extended "
                   "numbering")
    if phnum < 1:
        return out + ["no program headers"]
    if table_end > size:
        return out + [f"program header table ({phnum} entries) ends at {table_end:#x}, past "
                      f"the end of the file ({size:#x})"]
    table = pread(phnum * _PHDR.size, phoff)
    used: list[tuple[int, int, int]] = []
    notes_at = None
    for i in range(phnum):
        (p_type, _pf, off, vaddr, _pa, filesz, memsz, _align) = _PHDR.unpack_from(
            table, i * _PHDR.size)
        name = f"program header {i}"
        if i == 0:
            if p_type != ec.PT_NOTE:
                out.append(f"{name} is type {p_type:#x}, not PT_NOTE")
                continue
            notes_at = (off, filesz)
            if off % 8:
                out.append(f"{name} (PT_NOTE) at {off:#x} is not 8-byte aligned")
        elif p_type not in _DATA_TYPES:
            out.append(f"{name} has type {p_type:#x}, not one a statefile holds")
            continue
        if off > size or filesz > size - off:
            out.append(f"{name} ({off:#x}+{filesz:#x}) ends past the end of the file "
                       f"({size:#x})")
            continue
        if i and p_type != ec.PT_CRELF_BLOB:
            if vaddr % PAGE or memsz % PAGE or vaddr + memsz > 1 << 64:
                out.append(f"{name} memory range {vaddr:#x}+{memsz:#x} is not page aligned")
        if i and filesz > memsz:
            out.append(f"{name} stores {filesz:#x} bytes for {memsz:#x} of memory")
        if i and filesz and off % PAGE:
            out.append(f"{name} data at {off:#x} is not page aligned")
        if filesz:
            used.append((off, off + filesz, i))
    used.sort()
    prev_end, prev = table_end, "the headers"
    for a, b, i in used:
        if a < prev_end:
            out.append(f"program header {i} data at {a:#x}-{b:#x} overlaps {prev}")
        if b > prev_end:
            prev_end, prev = b, f"program header {i}'s"
    if notes_at is not None and not out:
        out += _note_layout_problems(pread(notes_at[1], notes_at[0]), notes_at[1])
    return out


def layout_problems_of(path: str) -> list[str]:
    """layout_problems of the file at path (opened as load opens it: a FIFO or
    device is refused, FormatError, before it is read)."""
    with _open_regular(path) as f:
        ident = os.pread(f.fileno(), 16, 0)
        if ident[:4] != ec.ELFMAG or not ec.has_crelf_marker(ident):
            return []     # load says what it is instead
        return layout_problems(f.fileno(), os.fstat(f.fileno()).st_size)


def _note_layout_problems(data: bytes, filesz: int) -> list[str]:
    pos = 0
    while pos < filesz:
        if filesz - pos < _NHDR.size:
            return [f"PT_NOTE: {filesz - pos} bytes left over after the last note"]
        namesz, descsz, _ = _NHDR.unpack_from(data, pos)
        end = pos + _NHDR.size + _pad4(namesz) + _pad4(descsz)
        if end > filesz:
            return [f"PT_NOTE: note at +{pos:#x} ({namesz}+{descsz} bytes) ends past the "
                    f"segment ({filesz:#x} bytes)"]
        name = data[pos + _NHDR.size:pos + _NHDR.size + namesz]
        if namesz < 1 or name[-1:] != b"\0" or b"\0" in name[:-1]:
            return [f"PT_NOTE: note at +{pos:#x} has a malformed owner name"]
        pos = end
    return []


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _ntype(t) -> int:
    if isinstance(t, int):
        return t
    # pyelftools names the standard ones: map back through our table.
    names = {"NT_PRSTATUS": ec.NT_PRSTATUS, "NT_FPREGSET": ec.NT_PRFPREG,
             "NT_PRPSINFO": ec.NT_PRPSINFO, "NT_AUXV": ec.NT_AUXV,
             "NT_SIGINFO": ec.NT_SIGINFO, "NT_FILE": ec.NT_FILE,
             "NT_X86_XSTATE": ec.NT_X86_XSTATE}
    return names.get(t, -1)


def _decode(path: str, raw: list[Note], phdrs: list[dict]) -> Statefile:
    """Decode the crelf notes; when they do not decode (or do not fit the
    program headers), name the note whose checksum fails if one does: that
    says more than the parse error it caused."""
    try:
        return _decode_notes(path, raw, phdrs)
    except FormatError:
        bad = _note_problems(raw, _integrity_of(raw))
        if bad:
            raise FormatError(f"{path}: corrupted statefile: {bad[0]}") from None
        raise


def _integrity_of(raw: list[Note]) -> records.IntegrityNote | None:
    for n in raw:
        if n.owner == "CRELF" and n.n_type == nt.CR_INTEGRITY:
            try:
                return nt.decode_json(nt.CR_INTEGRITY, n.desc)
            except (ValueError, msgspec.MsgspecError):
                return None
    return None


# What reading malformed notes raises (here, and in the restorer, which reads
# fields the loader does not check).  UnicodeDecodeError is a ValueError.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError, IndexError, StopIteration,
             struct.error)


_JSON_NOTES = {k.n_type for k in nt.NOTE_KINDS if k.owner == nt.OWNER_CRELF and k.record}


def _decode_notes(path: str, raw: list[Note], phdrs: list[dict]) -> Statefile:
    """Every crelf note decoded into its typed record and validated (types,
    required fields, no unknown key: statefile/format/records.py), then the
    notes checked against each other and the program headers."""
    header, tasks, regs, integrity = None, [], {}, None
    files_note, segments_note, ipc = None, None, records.IpcNote(v=nt.NOTE_LAYOUT_VERSION)
    for i, n in enumerate(raw):
        if n.owner != "CRELF":
            continue
        try:
            if n.n_type in _JSON_NOTES:
                rec = nt.decode_json(n.n_type, n.desc)
            elif n.n_type == nt.CR_THREAD_REGS:
                r = nt.decode_regs(n.desc)
                regs[r.tid] = r
                continue
            else:
                continue
        except (ValueError, msgspec.MsgspecError, struct.error) as e:
            where = note_name(raw, i)
            if n.n_type == nt.CR_TASK and records.task_pid(n.desc) is not None:
                where += f" (pid {records.task_pid(n.desc)})"
            raise FormatError(f"{path}: corrupted crelf note {where}: {e}") from None
        if n.n_type == nt.CR_HEADER:
            header = rec
        elif n.n_type == nt.CR_TASK:
            tasks.append(rec)
        elif n.n_type == nt.CR_FILES:
            files_note = rec
        elif n.n_type == nt.CR_SEGMENTS:
            segments_note = rec
        elif n.n_type == nt.CR_INTEGRITY:
            integrity = rec
        elif n.n_type == nt.CR_IPC:
            ipc = rec
    if header is None:
        raise FormatError(f"{path}: no CR_HEADER note (truncated or not a crelf statefile)")
    fmt = header.format
    if fmt not in FORMATS:
        raise FormatError(f"{path}: statefile format {fmt} is not supported "
                          "by this crelf")
    if not tasks or integrity is None or files_note is None or segments_note is None:
        raise FormatError(f"{path}: incomplete statefile (missing task, files, segments or "
                          "integrity notes)")
    files, segments = files_note.files, segments_note.segments
    chunk_size = segments_note.chunk_size
    problem = _structure_problem(tasks, regs, files, segments, phdrs)
    if not problem and fmt >= 2:
        problem = _chunk_problem(segments, chunk_size)
    if problem:
        raise FormatError(f"{path}: corrupted statefile ({problem})")
    sf = Statefile(path, header, tasks, regs, files, segments, raw, integrity, phdrs)
    sf.format, sf.chunk_size = fmt, chunk_size if fmt >= 2 else 0
    sf.ipc = ipc
    sf.shmem = files_note.shmem
    return sf


def _structure_problem(tasks, regs, files, segments, phdrs) -> str:
    """The first inconsistency between notes and program headers, or ''
    (each note's own fields were checked when it was decoded)."""
    if len(segments) != len(phdrs) - 1:
        return f"{len(segments)} segment entries for {len(phdrs) - 1} data program headers"
    for i, seg in enumerate(segments, start=1):
        ph = phdrs[i]
        if (seg.phdr, seg.offset, seg.filesz, seg.vaddr, seg.memsz) != (
                i, ph["offset"], ph["filesz"], ph["vaddr"], ph["memsz"]):
            return f"segment entry {i} does not match its program header"
        if seg.filesz and seg.offset % 4096:
            return f"segment {i} is not page aligned"
        if any(o < 0 or n < 0 or o + n > seg.filesz for o, n in seg.runs):
            return f"segment {i} has a run outside its data"
    ids = [f.id for f in files]
    if ids != list(range(len(files))):
        return "file entries are not numbered in order"
    for t in tasks:
        for th in t.threads:
            if th.tid not in regs:
                return f"no registers for thread {th.tid} of pid {t.pid}"
        for m in t.mappings:
            if any(not 1 <= j < len(phdrs) for j in m.segments):
                return f"pid {t.pid} mapping at {m.start:#x} names a missing segment"
        for fd in t.fds:
            if not 0 <= fd.file < len(files):
                return f"pid {t.pid} fd {fd.fd} names a missing file"
    return ""


def _chunk_problem(segments, chunk_size) -> str:
    """Format 2: a chunk size and one CRC per chunk of every stored segment."""
    if chunk_size <= 0 or chunk_size % PAGE:
        return f"CR_SEGMENTS chunk_size {chunk_size!r} is not a positive multiple of {PAGE}"
    for seg in segments:
        if not seg.filesz:
            continue
        if seg.chunks is None or len(seg.chunks) != nchunks(seg.filesz, chunk_size) \
                or seg.crc32 is None:
            return f"segment {seg.phdr} lacks its chunk checksums"
    return ""


def verify_notes(sf: Statefile) -> list[str]:
    """Check the note checksums only (cheap: no segment data is read)."""
    return _note_problems(sf.notes, sf.integrity)


def note_name(notes: list[Note], i: int) -> str:
    """'CR_TASK #2': the kind of note i and its rank among the notes of that kind."""
    n = notes[i]
    kind = nt.kind_of(n.owner.encode(), n.n_type)
    name = kind.name if kind else f"{n.owner} {n.n_type:#x}"
    rank = sum(1 for m in notes[:i + 1] if (m.owner, m.n_type) == (n.owner, n.n_type))
    return f"{name} #{rank}"


def _note_problems(raw: list[Note], integrity: records.IntegrityNote | None) -> list[str]:
    """Every note against the CR_INTEGRITY note's list of checksums."""
    notes = [n for n in raw if not (n.owner == "CRELF" and n.n_type == nt.CR_INTEGRITY)]
    if integrity is None:
        return ["integrity note (CR_INTEGRITY) is missing or malformed"]
    listed = integrity.notes
    if len(listed) != len(notes):
        return [f"integrity note lists {len(listed)} notes, file has {len(notes)}"]
    return [f"note {note_name(notes, i)} checksum mismatch (note {i} of the file)"
            for i, (n, (owner, ntype, crc)) in enumerate(zip(notes, listed))
            if n.owner != owner or n.n_type != ntype or crc32(n.desc) != crc]


def verify(sf: Statefile) -> list[str]:
    """Check every note and segment checksum (every chunk's, format 2); return
    the list of problems."""
    problems = verify_notes(sf)
    with sf.open() as f:
        for seg in sf.segments:
            problems += chunk_problems(sf, seg, f.fileno())
    return problems


__all__ = ["Statefile", "load", "layout_problems", "layout_problems_of", "verify", "verify_notes", "note_name",
           "FormatError", "MALFORMED", "FORMAT_VERSION", "FORMATS", "errno"]
