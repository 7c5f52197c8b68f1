"""Read a statefile: headers and segments through pyelftools, notes decoded by
the table in notes.py.  Segment data is never loaded whole: callers read runs
(or map them) from the file by offset.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import elfcore as ec
from . import notes as nt
from .checksum import crc32
from .errors import FormatError


@dataclass
class Note:
    owner: str
    n_type: int
    desc: bytes


@dataclass
class Statefile:
    path: str
    header: dict
    tasks: list[dict]                      # CR_TASK payloads, root first
    regs: dict[int, nt.ThreadRegs]         # by tid (unique inside one tree)
    files: list[dict]                      # CR_FILES
    segments: list[dict]                   # CR_SEGMENTS, indexed by phdr-1
    notes: list[Note] = field(default_factory=list)
    integrity: dict = field(default_factory=dict)
    phdrs: list[dict] = field(default_factory=list)
    ipc: dict = field(default_factory=lambda: {"shm": [], "sem": [], "msg": []})  # CR_IPC
    shmem: list[dict] = field(default_factory=list)   # CR_FILES "shmem": memfds...

    @property
    def root(self) -> dict:
        return self.tasks[0]

    def task(self, pid: int) -> dict:
        for t in self.tasks:
            if t["pid"] == pid:
                return t
        raise KeyError(pid)

    def segment(self, phdr: int) -> dict:
        return self.segments[phdr - 1]

    def open(self):
        return open(self.path, "rb", buffering=0)

    def read_segment(self, f, seg: dict, rel: int, size: int) -> bytes:
        """Bytes [rel, rel+size) of a segment's memory image (holes read as zeros)."""
        end = min(rel + size, seg["filesz"])
        data = os.pread(f.fileno(), max(0, end - rel), seg["offset"] + rel) if end > rel else b""
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
        f.seek(0)
        try:
            elf = ELFFile(f)
            if elf.header["e_type"] != "ET_CORE":
                raise FormatError(f"{path}: not an ELF core file")
            phdrs, raw_notes = [], []
            size = os.fstat(f.fileno()).st_size
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


def _integrity_of(raw: list[Note]) -> dict:
    for n in raw:
        if n.owner == "CRELF" and n.n_type == nt.CR_INTEGRITY:
            try:
                return nt.decode_json(n.desc)
            except (ValueError, UnicodeDecodeError):
                return {}
    return {}


# What reading malformed notes raises (here, and in the restorer, which reads
# fields the loader does not check).  UnicodeDecodeError is a ValueError.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError, IndexError, StopIteration,
             struct.error)


def _decode_notes(path: str, raw: list[Note], phdrs: list[dict]) -> Statefile:
    header, tasks, regs, files, segments, integrity = None, [], {}, [], [], {}
    ipc = {"shm": [], "sem": [], "msg": []}
    shmem: list[dict] = []
    try:
        for n in raw:
            if n.owner != "CRELF":
                continue
            if n.n_type == nt.CR_HEADER:
                header = nt.decode_json(n.desc)
            elif n.n_type == nt.CR_TASK:
                tasks.append(nt.decode_json(n.desc))
            elif n.n_type == nt.CR_THREAD_REGS:
                r = nt.decode_regs(n.desc)
                regs[r.tid] = r
            elif n.n_type == nt.CR_FILES:
                obj = nt.decode_json(n.desc)
                files, shmem = obj["files"], obj.get("shmem", [])
            elif n.n_type == nt.CR_SEGMENTS:
                segments = nt.decode_json(n.desc)["segments"]
            elif n.n_type == nt.CR_INTEGRITY:
                integrity = nt.decode_json(n.desc)
            elif n.n_type == nt.CR_IPC:
                ipc = nt.decode_json(n.desc)
    except MALFORMED as e:
        raise FormatError(f"{path}: corrupted crelf note ({type(e).__name__}: {e})") from None
    if header is None:
        raise FormatError(f"{path}: no CR_HEADER note (truncated or not a crelf statefile)")
    if header.get("format") != 1:
        raise FormatError(f"{path}: statefile format {header.get('format')} is not supported "
                          "by this crelf")
    if not tasks or not integrity:
        raise FormatError(f"{path}: incomplete statefile (missing task or integrity notes)")
    try:
        problem = _structure_problem(tasks, regs, files, segments, phdrs)
        if not isinstance(ipc, dict) or not isinstance(shmem, list):
            problem = problem or "malformed CR_IPC or CR_FILES note"
    except MALFORMED as e:
        problem = f"malformed notes ({type(e).__name__}: {e})"
    if problem:
        raise FormatError(f"{path}: corrupted statefile ({problem})")
    sf = Statefile(path, header, tasks, regs, files, segments, raw, integrity, phdrs)
    sf.ipc = {k: ipc.get(k, []) for k in ("shm", "sem", "msg")}
    sf.shmem = shmem
    return sf


_TASK_KEYS = ("pid", "ppid", "pgid", "sid", "comm", "creds", "mm", "threads", "mappings", "fds")
_SEG_KEYS = ("phdr", "pid", "vaddr", "memsz", "offset", "filesz", "runs", "mapping")


def _structure_problem(tasks, regs, files, segments, phdrs) -> str:
    """The first inconsistency between notes and program headers, or ''."""
    if len(segments) != len(phdrs) - 1:
        return f"{len(segments)} segment entries for {len(phdrs) - 1} data program headers"
    for i, seg in enumerate(segments, start=1):
        if not isinstance(seg, dict) or any(k not in seg for k in _SEG_KEYS):
            return f"segment entry {i} lacks a field"
        ph = phdrs[i]
        if (seg["phdr"], seg["offset"], seg["filesz"]) != (i, ph["offset"], ph["filesz"]):
            return f"segment entry {i} does not match its program header"
        if seg["filesz"] and seg["offset"] % 4096:
            return f"segment {i} is not page aligned"
        if any(o < 0 or n < 0 or o + n > seg["filesz"] for o, n in seg["runs"]):
            return f"segment {i} has a run outside its data"
    for t in tasks:
        missing = [k for k in _TASK_KEYS if k not in t]
        if missing:
            return f"task note lacks {missing[0]!r}"
        for th in t["threads"]:
            if th.get("tid") not in regs:
                return f"no registers for thread {th.get('tid')} of pid {t['pid']}"
        for m in t["mappings"]:
            if any(not 1 <= j < len(phdrs) for j in m.get("segments", [])):
                return f"pid {t['pid']} mapping at {m.get('start', 0):#x} names a missing segment"
        for fd in t["fds"]:
            if not 0 <= fd.get("file", -1) < len(files):
                return f"pid {t['pid']} fd {fd.get('fd')} names a missing file"
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


def _note_problems(raw: list[Note], integrity: dict) -> list[str]:
    """Every note against the CR_INTEGRITY note's list of checksums."""
    notes = [n for n in raw if not (n.owner == "CRELF" and n.n_type == nt.CR_INTEGRITY)]
    listed = integrity.get("notes") if isinstance(integrity, dict) else None
    if not isinstance(listed, list) or not all(
            isinstance(x, list) and len(x) == 3 for x in listed):
        return ["integrity note (CR_INTEGRITY) is missing or malformed"]
    if len(listed) != len(notes):
        return [f"integrity note lists {len(listed)} notes, file has {len(notes)}"]
    return [f"note {note_name(notes, i)} checksum mismatch (note {i} of the file)"
            for i, (n, (owner, ntype, crc)) in enumerate(zip(notes, listed))
            if n.owner != owner or n.n_type != ntype or crc32(n.desc) != crc]


def verify(sf: Statefile) -> list[str]:
    """Check every note and segment checksum; return the list of problems."""
    problems = verify_notes(sf)
    with sf.open() as f:
        for seg in sf.segments:
            if not seg["filesz"]:
                continue
            crc = 0
            for off, ln in seg["runs"]:
                pos = 0
                while pos < ln:
                    n = min(1 << 20, ln - pos)
                    data = os.pread(f.fileno(), n, seg["offset"] + off + pos)
                    if len(data) != n:
                        problems.append(f"segment {seg['phdr']} truncated")
                        break
                    crc = crc32(data, crc)
                    pos += n
            if crc != seg.get("crc32"):
                problems.append(f"segment {seg['phdr']} (pid {seg['pid']} at "
                                f"{seg['vaddr']:#x}) checksum mismatch")
    return problems


__all__ = ["Statefile", "load", "verify", "verify_notes", "note_name", "FormatError",
           "MALFORMED", "errno"]
