"""The one place that defines every note of the statefile format.

A statefile carries two families of notes in its PT_NOTE segment:

* the standard core notes (owners ``CORE`` and ``LINUX``) describing the root
  task, so gdb, eu-stack and readelf read the file as an ordinary core dump;
* crelf's own notes (owner ``CRELF``) with everything a restart needs.

gdb and pyelftools dispatch core notes on ``n_type`` alone, whatever the owner,
so crelf's n_types live far from every standard value (``0x4352....``, "CR").

docs/FORMAT.md is the prose version of this module; keep them in step.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from statefile.format import elfcore as ec
from statefile.format import records
from statefile.format import xsave

OWNER_CORE = b"CORE"
OWNER_LINUX = b"LINUX"
OWNER_CRELF = b"CRELF"

# Every JSON payload carries "v": the version of that note's layout.
NOTE_LAYOUT_VERSION = 1


@dataclass(frozen=True)
class NoteKind:
    name: str
    owner: bytes
    n_type: int
    encoding: str  # "json", "binary" or "struct"
    what: str
    record: type | None = None   # a JSON note's record (statefile/format/records.py)


CR_HEADER = 0x43520001
CR_TASK = 0x43520002
CR_THREAD_REGS = 0x43520003
CR_FILES = 0x43520004
CR_SEGMENTS = 0x43520005
CR_IPC = 0x43520006
CR_INTEGRITY = 0x4352FFFF

NOTE_KINDS: tuple[NoteKind, ...] = (
    # Standard notes for the root task, in the kernel's order.
    NoteKind("NT_PRSTATUS", OWNER_CORE, ec.NT_PRSTATUS, "struct",
             "elf_prstatus (336 bytes) per thread of the root task"),
    NoteKind("NT_PRPSINFO", OWNER_CORE, ec.NT_PRPSINFO, "struct",
             "elf_prpsinfo (136 bytes) of the root task"),
    NoteKind("NT_SIGINFO", OWNER_CORE, ec.NT_SIGINFO, "struct",
             "siginfo_t (128 bytes) per thread: SIGSTOP, the checkpoint's stop"),
    NoteKind("NT_AUXV", OWNER_CORE, ec.NT_AUXV, "binary",
             "the root task's auxiliary vector, as /proc/PID/auxv"),
    NoteKind("NT_FILE", OWNER_CORE, ec.NT_FILE, "binary",
             "file-backed mappings of the root task"),
    NoteKind("NT_PRFPREG", OWNER_CORE, ec.NT_PRFPREG, "struct",
             "fxsave area (512 bytes) per thread"),
    NoteKind("NT_X86_XSTATE", OWNER_LINUX, ec.NT_X86_XSTATE, "binary",
             "whole XSAVE area per thread, at the offsets gdb reads (statefile/format/xsave.py)"),
    NoteKind("NT_X86_XSAVE_LAYOUT", OWNER_LINUX, ec.NT_X86_XSAVE_LAYOUT, "struct",
             "once: where each XSAVE component is in the NT_X86_XSTATE notes "
             "(type, size, offset, flags: 16 bytes each)"),
    # crelf's notes.
    NoteKind("CR_HEADER", OWNER_CRELF, CR_HEADER, "json",
             "format version, creator, host, kernel, root pid, tree, skipped resources, "
             "namespaces (the tree's own UTS/IPC state, its pid namespace's inner ids)",
             record=records.HeaderNote),
    NoteKind("CR_TASK", OWNER_CRELF, CR_TASK, "json",
             "one per task: ids, creds, rlimits, signals, mm, mappings, fds, threads",
             record=records.TaskNote),
    NoteKind("CR_THREAD_REGS", OWNER_CRELF, CR_THREAD_REGS, "binary",
             "one per thread of every task: user_regs_struct, fxsave, xstate"),
    NoteKind("CR_FILES", OWNER_CRELF, CR_FILES, "json",
             "open file descriptions of the whole tree, referenced by the fd tables, and "
             "the memfds and shared file objects (shmem) its fds and mappings use",
             record=records.FilesNote),
    NoteKind("CR_SEGMENTS", OWNER_CRELF, CR_SEGMENTS, "json",
             "every data segment: owner task, stored runs, crc32, one crc32 per chunk",
             record=records.SegmentsNote),
    NoteKind("CR_IPC", OWNER_CRELF, CR_IPC, "json",
             "SysV IPC objects of the tree (of its own IPC namespace, if it has one): shm "
             "segments, semaphore sets, message queues",
             record=records.IpcNote),
    NoteKind("CR_INTEGRITY", OWNER_CRELF, CR_INTEGRITY, "json",
             "last note: crc32 of every note before it",
             record=records.IntegrityNote),
)
BY_TYPE = {(k.owner, k.n_type): k for k in NOTE_KINDS}
BY_NAME = {k.name: k for k in NOTE_KINDS}


def kind_of(owner: bytes, n_type: int) -> NoteKind | None:
    return BY_TYPE.get((owner, n_type))


# --- JSON notes -------------------------------------------------------------

# Their records: statefile/format/records.py (one typed record per note and
# per thing a note holds).

def encode_json(n_type: int, obj) -> bytes:
    """The payload of JSON note n_type: its record (statefile/format/records.py),
    given as one or as the dict the dump side built (checked against the record
    type here: a field of the wrong type or a key the format does not define is
    an error at checkpoint time, not a surprise at restart)."""
    return records.encode(BY_TYPE[(OWNER_CRELF, n_type)].record, obj, NOTE_LAYOUT_VERSION)


def record_of(n_type: int, obj):
    """The typed record of JSON note n_type from the dict the dump side built
    (msgspec.ValidationError, naming the field, if it does not fit)."""
    return records.convert(BY_TYPE[(OWNER_CRELF, n_type)].record, obj, NOTE_LAYOUT_VERSION)


def decode_json(n_type: int, desc: bytes):
    """The typed record of JSON note n_type (msgspec.ValidationError or
    DecodeError if it does not decode; ValueError for another layout version)."""
    rec = records.decode(BY_TYPE[(OWNER_CRELF, n_type)].record, desc)
    if rec.v != NOTE_LAYOUT_VERSION:
        raise ValueError(f"unsupported note layout version {rec.v}")
    return rec


# --- CR_THREAD_REGS ------------------------------------------------------------
# header: u32 version, u32 pid, u32 tid, u32 len(regs), u32 len(fxsave), u32 len(xstate)
_REGS_HDR = struct.Struct("<IIIIII")


@dataclass
class ThreadRegs:
    pid: int
    tid: int
    regs: bytes     # struct user_regs_struct, 216 bytes
    fpregs: bytes   # fxsave area, 512 bytes
    xstate: bytes   # XSAVE area as PTRACE_GETREGSET(NT_X86_XSTATE) gave it

    def user_regs(self) -> ec.user_regs_struct:
        return ec.user_regs_struct.from_buffer_copy(self.regs)


def encode_regs(r: ThreadRegs) -> bytes:
    return _REGS_HDR.pack(NOTE_LAYOUT_VERSION, r.pid, r.tid, len(r.regs), len(r.fpregs),
                          len(r.xstate)) + r.regs + r.fpregs + r.xstate


def decode_regs(desc: bytes) -> ThreadRegs:
    desc = bytes(desc)
    ver, pid, tid, nr, nf, nx = _REGS_HDR.unpack_from(desc)
    if ver != NOTE_LAYOUT_VERSION:
        raise ValueError(f"unsupported CR_THREAD_REGS version {ver}")
    o = _REGS_HDR.size
    if o + nr + nf + nx > len(desc) or nr != ctypes.sizeof(ec.user_regs_struct):
        raise ValueError("truncated CR_THREAD_REGS note")
    return ThreadRegs(pid, tid, desc[o:o + nr], desc[o + nr:o + nr + nf],
                      desc[o + nr + nf:o + nr + nf + nx])


# --- standard notes, built from crelf's own task/thread data -------------------
# Used by the writer for the root task and by `crinspect core` for any task.

def _tv(seconds: float) -> ec.timeval:
    return ec.timeval(int(seconds), int((seconds - int(seconds)) * 1e6))


def prstatus(task: records.TaskNote, thread: records.Thread, regs: ThreadRegs) -> bytes:
    p = ec.elf_prstatus()
    p.si_signo = 19  # SIGSTOP: the checkpoint's stop
    p.pr_cursig = 19
    p.pr_sigpend = thread.sigpend
    p.pr_sighold = thread.sigmask
    p.pr_pid = thread.tid
    p.pr_ppid = task.ppid
    p.pr_pgrp = task.pgid
    p.pr_sid = task.sid
    p.pr_utime = _tv(thread.utime)
    p.pr_stime = _tv(thread.stime)
    p.pr_reg = regs.user_regs()
    p.pr_fpvalid = 1
    return bytes(p)


def prpsinfo(task: records.TaskNote) -> bytes:
    p = ec.elf_prpsinfo()
    state = task.state[:1] or "S"
    p.pr_sname = state.encode()
    p.pr_state = "RSDTZW".find(state) if state in "RSDTZW" else 1
    p.pr_zomb = 1 if state == "Z" else 0
    p.pr_nice = task.nice & 0xFF
    p.pr_flag = task.flags
    p.pr_uid = task.creds.uid[0]
    p.pr_gid = task.creds.gid[0]
    p.pr_pid = task.pid
    p.pr_ppid = task.ppid
    p.pr_pgrp = task.pgid
    p.pr_sid = task.sid
    p.pr_fname = task.comm.encode()[:15]
    p.pr_psargs = " ".join(task.cmdline).encode()[:79]
    return bytes(p)


def siginfo_stop() -> bytes:
    s = ec.siginfo_t()
    s.si_signo = 19
    return bytes(s)


def nt_file(task: records.TaskNote, page_size: int) -> bytes:
    files = [m for m in task.mappings if m.path.startswith("/") and m.inode]
    head = struct.pack("<QQ", len(files), page_size)
    table = b"".join(struct.pack("<QQQ", m.start, m.end, m.offset // page_size)
                     for m in files)
    names = b"".join(m.path.encode() + b"\0" for m in files)
    return head + table + names


def standard_notes(task: records.TaskNote, regs_by_tid: dict[int, ThreadRegs], page_size: int,
                   xsave_layout: dict | None) -> list[tuple[bytes, int, bytes]]:
    """The gdb baseline notes of one task: per thread NT_PRSTATUS, NT_PRFPREG,
    NT_X86_XSTATE and NT_SIGINFO (as gcore writes them); once NT_PRPSINFO,
    NT_AUXV and NT_FILE; and last, as the kernel writes it, one
    NT_X86_XSAVE_LAYOUT when the CPU's XSAVE layout (CR_HEADER xsave_layout)
    is known and the areas are moved to gdb's offsets (statefile/format/xsave.py).

    The order is the kernel's (fill_note_info/write_note_info) for the leader:
    PRSTATUS, PRPSINFO, SIGINFO, AUXV, FILE, PRFPREG, X86_XSTATE; then for
    each other thread PRSTATUS, PRFPREG, X86_XSTATE and, where gcore puts it,
    its SIGINFO last.  The kernel writes SIGINFO once; gdb/BFD attach each
    NT_SIGINFO to the NT_PRSTATUS before it, so every SIGINFO follows its own
    thread's PRSTATUS.
    """
    threads = task.threads
    # The thread group leader first, as the kernel does.
    threads = sorted(threads, key=lambda t: (t.tid != task.pid, t.tid))
    out: list[tuple[bytes, int, bytes]] = []
    layout_note = None
    for i, t in enumerate(threads):
        r = regs_by_tid[t.tid]
        out.append((OWNER_CORE, ec.NT_PRSTATUS, prstatus(task, t, r)))
        if i == 0:
            out.append((OWNER_CORE, ec.NT_PRPSINFO, prpsinfo(task)))
            out.append((OWNER_CORE, ec.NT_SIGINFO, siginfo_stop()))
            out.append((OWNER_CORE, ec.NT_AUXV, bytes.fromhex(task.auxv)))
            out.append((OWNER_CORE, ec.NT_FILE, nt_file(task, page_size)))
        out.append((OWNER_CORE, ec.NT_PRFPREG, r.fpregs))
        if r.xstate:
            area, layout_note = xsave.gdb_view(r.xstate, xsave_layout)
            out.append((OWNER_LINUX, ec.NT_X86_XSTATE, area))
        if i > 0:
            out.append((OWNER_CORE, ec.NT_SIGINFO, siginfo_stop()))
    if layout_note:
        out.append((OWNER_LINUX, ec.NT_X86_XSAVE_LAYOUT, layout_note))
    return out
