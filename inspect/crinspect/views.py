"""The typed output of every `crinspect ... --json` view (docs/CRINSPECT-JSON.md).

Each view is a msgspec Struct built from the statefile's records
(statefile/format/records.py); where a view shows a record as it is (a skipped
resource, a zombie, a file's socket, a shmem object) it embeds that record
type, so the JSON and its schema come from the one definition.  `crinspect
--json` prints msgspec.to_builtins of a view; `crinspect schema` prints the
JSON Schema made from these types (msgspec.json.schema_components), and
tests/test_crinspect_json.py checks every view's output decodes strictly
with its type and validates against docs/crinspect-schema.json.

Every field of a view is always present (no defaults are left out); a view
refuses unknown keys when decoded (forbid_unknown_fields).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import UNSET, UnsetType

from statefile.format import records
from statefile.format.records import Doc

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class View(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every crinspect output type."""


# --- header ------------------------------------------------------------------

class HeaderView(View):
    """CR_HEADER, as the summary shows it."""
    created: Annotated[str, Doc("creation time, ISO 8601 UTC")]
    created_unix: Annotated[float, Doc("creation time, seconds since the epoch")]
    host: Annotated[str, Doc("host name of the checkpointing machine")]
    kernel: Annotated[str, Doc("its kernel release")]
    machine: Annotated[str, Doc("its machine (uname -m)")]
    crelf: Annotated[str, Doc("crelf version that wrote it")]
    format: Annotated[int, Doc("statefile format")]
    page_size: Annotated[int, Doc("page size")]
    root_pid: Annotated[int, Doc("pid of the root task")]
    restartable: Annotated[bool, Doc("false for a --snapshot statefile of unsupported state")]
    not_restartable: Annotated[list[str], Doc("why not, one line each")]
    skipped: Annotated[list[records.Skipped], Doc("resources the policy left out")]
    zombies: Annotated[list[records.Zombie], Doc("unreaped children, recreated as zombies")]


# --- ps ------------------------------------------------------------------------

class CrrunFlagView(View):
    """A state crrun saw the task create (CR_TASK crrun_flags)."""
    syscall: Annotated[str, Doc("the watched system call")]
    call: Annotated[str, Doc("the call as shown (name and arguments)")]
    reason: Annotated[str, Doc("why it cannot be checkpointed")]
    time: Annotated[float, Doc("when, seconds since the epoch")]
    iso_time: Annotated[str, Doc("when, ISO 8601")]
    denied: Annotated[bool, Doc("denied by crrun --strict")]
    errno: Annotated[str | None, Doc("the errno name returned, when denied")]
    resource: Annotated[str, Doc("the support-table row it creates")]
    tid: Annotated[int, Doc("the thread that made the call")]
    policy: Annotated[str | None, Doc("policy class under which it is skippable")]


class PsTask(View):
    """One task, in tree order (depth-first from the root)."""
    pid: int
    ppid: int
    pgid: int
    sid: int
    uid: Annotated[int, Doc("real uid")]
    euid: Annotated[int, Doc("effective uid")]
    comm: str
    cmdline: list[str]
    exe: str
    cwd: str
    state: Annotated[str, Doc("state before the freeze (R S D T ...)")]
    threads: Annotated[int, Doc("number of threads")]
    depth: Annotated[int, Doc("depth in the tree (0: a root)")]
    children: Annotated[list[int], Doc("pids of its children in the tree, sorted")]
    crrun: Annotated[bool, Doc("runs under crrun's monitor")]
    crrun_flags: list[CrrunFlagView]


# --- threads -------------------------------------------------------------------

class SyscallView(View):
    nr: Annotated[int, Doc("syscall number (orig_rax)")]
    name: Annotated[str | None, Doc("its name (null: not a syscall)")]
    restart: Annotated[str | None, Doc("the restart the kernel would make (null: none)")]


class ThreadView(View):
    pid: int
    tid: int
    comm: str
    rip: Annotated[int | None, Doc("instruction pointer (null: no registers)")]
    where: Annotated[str, Doc("symbol+offset in object, or the address and why not")]
    object: Annotated[str | None, Doc("the mapped object rip is in")]
    symbol: Annotated[str | None, Doc("the function symbol rip is in")]
    symbol_offset: Annotated[int | None, Doc("rip's offset in it")]
    syscall: Annotated[SyscallView | None, Doc("the syscall it was stopped in (null: none)")]
    sigmask: Annotated[int, Doc("blocked signals")]
    sigpend: Annotated[int, Doc("pending signals (private queue)")]


# --- mem -----------------------------------------------------------------------

class MappingView(View):
    pid: int
    start: int
    end: int
    size: int
    perms: str
    kind: Annotated[str, Doc("CR_TASK mapping kind")]
    path: str
    offset: int
    deleted: bool
    stored: Annotated[int, Doc("bytes stored in the statefile")]
    resident: Annotated[int, Doc("resident bytes at the checkpoint (smaps Rss)")]
    segments: Annotated[list[int], Doc("program header indices of its data")]
    skipped: Annotated[str | None, Doc("policy class that left its content out")]


# --- files ---------------------------------------------------------------------

class FdUser(View):
    pid: int
    fd: int


class FdView(View):
    pid: int
    fd: int
    file: Annotated[int, Doc("CR_FILES id of its open file description")]
    kind: Annotated[str, Doc("CR_FILES kind")]
    path: str
    flags: Annotated[int, Doc("open flags without O_CLOEXEC")]
    flags_text: Annotated[str, Doc("the same, as O_* names")]
    offset: int
    cloexec: bool
    deleted: bool
    size: int
    shared_with: Annotated[list[FdUser], Doc("the other fds on the same description")]
    socket: Annotated[records.Socket | UnsetType, Doc("the CR_FILES socket record (sockets)")] \
        = UNSET
    skipped: Annotated[str | None, Doc("policy class that left it out")] = None


# --- notes ---------------------------------------------------------------------

class NoteView(View):
    index: int
    owner: str
    type: Annotated[int, Doc("n_type")]
    name: Annotated[str, Doc("the note kind's name, or 'unknown'")]
    size: Annotated[int, Doc("descriptor size in bytes")]


# --- shared --------------------------------------------------------------------

class Holder(View):
    """Who holds a shared object: an fd (fd, file) or a mapping (start, end, perms)."""
    pid: int
    fd: int | None
    file: Annotated[int | None, Doc("CR_FILES id")]
    role: Annotated[str, Doc("read end, write end, end A, listening, maps, attached ...")]
    start: int | None
    end: int | None
    perms: str | None


class SharedBase(View, tag_field="object"):
    """Every shared object: `object` tells its class, `kind` what it is."""
    kind: str
    id: Annotated[str, Doc("unique in the statefile")]
    holders: list[Holder]
    pids: Annotated[list[int], Doc("the tasks holding it, sorted")]


class PipeObject(SharedBase, tag="pipe"):
    kind: Literal["pipe", "fifo"]
    ino: int
    path: Annotated[str | None, Doc("the FIFO's path (null for a pipe)")]
    capacity: Annotated[int, Doc("F_GETPIPE_SZ")]
    bytes: Annotated[int, Doc("bytes in flight")]
    unread: Annotated[int | Literal["unknown"], Doc("bytes saved, or 'unknown'")]
    readers: Annotated[bool, Doc("a read end is in the tree")]
    writers: Annotated[bool, Doc("a write end is in the tree")]
    external: Annotated[str | None, Doc("also held outside the tree: where")]
    error: Annotated[str | None, Doc("why it could not be read")]
    nonblock: Annotated[list[int], Doc("fds with O_NONBLOCK")]


class UnixEnd(View):
    label: Literal["A", "B"]
    ino: int
    name: Annotated[str | None, Doc("bound name (hex when abstract)")]
    abstract: bool
    queued: Annotated[int | None, Doc("bytes queued (null: not recorded)")]
    messages: Annotated[int | None, Doc("messages queued")]
    fds_in_flight: bool
    in_flight_files: Annotated[list[int], Doc("CR_FILES ids the queued messages carry")]
    shutdown: Annotated[str, Doc("none, read, write, read+write")]


class UnixPairObject(SharedBase, tag="unix-pair"):
    kind: Literal["unix-pair"]
    type: str
    ends: list[UnixEnd]


class UnixListenObject(SharedBase, tag="unix-listen"):
    kind: Literal["unix-listen"]
    ino: int
    type: str
    name: str | None
    abstract: bool
    backlog_queued: Annotated[int | None, Doc("connections waiting")]


class UnixSocketObject(SharedBase, tag="unix-socket"):
    kind: Literal["unix-socket"]
    ino: int
    type: str
    name: str | None
    abstract: bool
    peer_ino: int | None
    peer: Annotated[str, Doc("where its peer is")]
    queued: int | None
    messages: int | None
    shutdown: str


class SocketObject(SharedBase, tag="socket"):
    kind: Literal["socket"]
    ino: int
    family: str
    type: str
    local: Annotated[list[str | int] | None, Doc("the family's address")]
    peer: list[str | int] | None
    listening: bool
    tcp_state: Annotated[str | None, Doc("a TCP connection's state (established, "
                                         "close_wait, ...); null for other sockets")] = None
    queued_in: Annotated[int | None, Doc("TCP: bytes received, not read yet")] = None
    queued_out: Annotated[int | None, Doc("TCP: bytes sent, not acknowledged yet")] = None
    peer_where: Annotated[Literal["in the tree", "outside the tree"] | None,
                          Doc("TCP: whether the connection's other end is a socket of the "
                              "tree")] = None


class PtySaved(View):
    to_master: Annotated[int, Doc("bytes saved for the master")]
    to_slave: Annotated[int, Doc("bytes saved for the slave")]
    lines: Annotated[int, Doc("complete lines saved")]
    partial: Annotated[bool, Doc("a line being typed was saved")]


class PtyObject(SharedBase, tag="pty"):
    kind: Literal["pty"]
    index: int
    path: str
    master: Annotated[bool, Doc("the master is in the tree")]
    unread: int
    slave_unread: int
    slave_closed: bool
    sid: Annotated[int | None, Doc("session it is the controlling terminal of")]
    fg_pgrp: int | None
    saved: PtySaved | None


class SysvShmObject(SharedBase, tag="sysv-shm"):
    kind: Literal["sysv-shm"]
    shmid: int
    key: int
    size: int
    perms: int
    cpid: int
    nattch: int
    outside: Annotated[int, Doc("attachments outside the tree")]
    removed: Annotated[bool, Doc("IPC_RMID'd")]


class SysvSemObject(SharedBase, tag="sysv-sem"):
    kind: Literal["sysv-sem"]
    semid: int
    key: int
    nsems: int
    values: list[int]


class SysvMsgObject(SharedBase, tag="sysv-msg"):
    kind: Literal["sysv-msg"]
    msqid: int
    key: int
    qnum: int
    cbytes: int


class SharedMemoryObject(SharedBase, tag="shared-memory"):
    """Memory mapped shared more than once (anon-shared, memfd, file-shared ...)."""
    dev: Annotated[str | None, Doc("major:minor, hex")]
    inode: int
    path: str | None
    size: int
    shmem: Annotated[records.Shmem | UnsetType,
                     Doc("its CR_FILES shmem record, without blob")] = UNSET


class FileObject(SharedBase, tag="file"):
    """Any other open file description held by several fds."""
    file: Annotated[int, Doc("CR_FILES id")]
    path: str
    offset: int
    flags: int
    deleted: bool
    details: Annotated[dict[str, Any], Doc("the file record's sub-records, by field")]


SharedObject = Union[PipeObject, UnixPairObject, UnixListenObject, UnixSocketObject,
                     SocketObject, PtyObject, SysvShmObject, SysvSemObject, SysvMsgObject,
                     SharedMemoryObject, FileObject]


# --- whole outputs -------------------------------------------------------------

class SummaryView(View):
    """`crinspect STATEFILE --json` (summary)."""
    statefile: str
    header: HeaderView
    tasks: list[PsTask]
    threads: list[ThreadView]
    memory: list[MappingView]
    files: list[FdView]
    shared: list[SharedObject]


class PsView(View):
    """`crinspect ps --json`."""
    statefile: str
    tasks: list[PsTask]


class ThreadsView(View):
    """`crinspect threads --json`."""
    statefile: str
    threads: list[ThreadView]


class MemView(View):
    """`crinspect mem --json`."""
    statefile: str
    memory: list[MappingView]


class FilesView(View):
    """`crinspect files --json`."""
    statefile: str
    files: list[FdView]


class SharedView(View):
    """`crinspect shared --json`."""
    statefile: str
    objects: list[SharedObject]


class NotesView(View):
    """`crinspect notes --json`."""
    statefile: str
    notes: list[NoteView]


class VerifyView(View):
    """`crinspect verify --json` (notes and segments absent when it could not load)."""
    statefile: str
    ok: bool
    problems: list[str]
    notes: Annotated[int | UnsetType, Doc("notes checked")] = UNSET
    segments: Annotated[int | UnsetType, Doc("segments checked")] = UNSET


class CoreView(View):
    """`crinspect core --json`."""
    core: Annotated[str, Doc("the core file written")]
    pid: int
    threads: int
    segments: int
    bytes_stored: int
    file_size: int
    exe: str


VIEWS: dict[str, type[View]] = {
    "summary": SummaryView, "ps": PsView, "threads": ThreadsView, "mem": MemView,
    "files": FilesView, "shared": SharedView, "notes": NotesView, "verify": VerifyView,
    "core": CoreView,
}


def schema() -> dict:
    """The JSON Schema of every view: one definition per type under $defs,
    the document itself any one view; `view_schema` picks one."""
    refs, defs = msgspec.json.schema_components(list(VIEWS.values()),
                                                ref_template="#/$defs/{name}")
    return {"$schema": SCHEMA_DIALECT,
            "title": "crinspect --json",
            "description": "The output of every `crinspect VIEW --json` "
                           "(docs/CRINSPECT-JSON.md); $defs holds each view's type: "
                           + ", ".join(f"{n} {t.__name__}" for n, t in VIEWS.items()),
            "anyOf": list(refs),
            "$defs": defs}


def view_schema(doc: dict, view: str) -> dict:
    """The schema of one view out of the document `schema()` made."""
    return {"$schema": SCHEMA_DIALECT, "$ref": f"#/$defs/{VIEWS[view].__name__}",
            "$defs": doc["$defs"]}


def encode(view: View) -> str:
    return msgspec.json.format(msgspec.json.encode(view), indent=2).decode()


__all__ = ["VIEWS", "View", "schema", "view_schema", "encode", "SharedObject"]
